"""Oracles of BAM (P012): one expert is multi-head attention; top-1 routing gives each token exactly its
expert's MHA output; KV sharing with identical experts is a single MHA; top-k with k = E equals soft routing;
fused/routed forms equal the per-expert reference; the load-balancing loss by hand; upcycling from dense
layers; the KV cache is E times smaller with KV sharing."""

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.heads.bam import BAMAttention
from attnzoo.testing import assert_close

F64 = torch.float64


def _dense(causal, seed, kv_heads=2):
    torch.manual_seed(seed)
    return attnzoo.build("softmax", 16, 4, kv_heads=kv_heads, causal=causal, backend="reference").double()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_one_expert_is_mha(causal, backend):
    mha = _dense(causal, 0)
    bam = BAMAttention.from_dense([mha], backend=backend)
    x = torch.randn(2, 7, 16, dtype=F64)
    mask = torch.tensor([[True] * 7, [True, False, True, True, True, False, True]])
    assert_close(bam(x, key_padding_mask=mask), mha(x, key_padding_mask=mask), F64, "BAM E=1 vs MHA")
    if not causal:
        ctx = torch.randn(2, 5, 16, dtype=F64)
        assert_close(bam(x, ctx), mha(x, ctx), F64, "BAM E=1 vs MHA, cross")


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_top1_routing_gives_the_chosen_experts_output(backend):
    experts = [_dense(True, s) for s in range(3)]
    bam = BAMAttention.from_dense(experts, routing="topk", top_k=1, backend=backend)
    x = torch.randn(2, 9, 16, dtype=F64)
    y = bam(x)
    chosen = bam.last_router.argmax(-1)  # (B, N)
    assert torch.equal(bam.last_router.amax(-1), torch.ones(2, 9, dtype=F64)), "top-1 weight renormalised to 1"
    outs = torch.stack([e(x) for e in experts], dim=2)  # (B, N, E, dim)
    want = outs.gather(2, chosen.view(2, 9, 1, 1).expand(2, 9, 1, 16)).squeeze(2)
    assert_close(y, want, F64, "top-1 BAM vs the chosen expert's MHA")
    assert len(set(chosen.flatten().tolist())) > 1


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_kv_sharing_identical_experts_is_one_mha(backend):
    mha = _dense(False, 1)
    bam = BAMAttention.from_dense([mha, mha, mha], kv_sharing=True, backend=backend)
    assert len(bam.k_proj) == 1
    x = torch.randn(2, 6, 16, dtype=F64)
    assert_close(bam(x), mha(x), F64, "KV-shared BAM with identical experts vs MHA")


@pytest.mark.parametrize("kv_sharing", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_all_equals_soft_and_fast_equals_reference(kv_sharing, causal):
    torch.manual_seed(2)
    soft = BAMAttention(16, 4, kv_heads=2, experts=3, kv_sharing=kv_sharing, causal=causal).double()
    allk = BAMAttention(16, 4, kv_heads=2, experts=3, kv_sharing=kv_sharing, causal=causal, routing="topk",
                        top_k=3).double()
    allk.load_state_dict(soft.state_dict())
    x = torch.randn(2, 8, 16, dtype=F64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 3] = False
    base = soft(x, key_padding_mask=mask)
    assert_close(allk(x, key_padding_mask=mask), base, F64, "top-k with k = E vs soft")
    for m in (soft, allk):
        results = []
        for backend in ("reference", "fast"):
            m.backend = backend
            m.zero_grad()
            xi = x.clone().requires_grad_(True)
            y = m(xi, key_padding_mask=mask)
            y.square().sum().backward()
            results.append((y, xi.grad, [p.grad.clone() for p in m.parameters() if p.grad is not None]))
        (y0, g0, p0), (y1, g1, p1) = results
        assert_close(y1, y0, F64, "fast vs reference")
        assert_close(g1, g0, F64, "fast vs reference dx")
        for a, b in zip(p1, p0):
            assert_close(a, b, F64, "fast vs reference parameter gradient")


def test_load_balancing_loss_hand_computed():
    # 2 experts, top-1, two tokens with router probabilities (0.75, 0.25) and (0.2, 0.8): one token each,
    # f = (0.5, 0.5), P = (0.475, 0.525): loss = E * sum f P = 2 * 0.5 = 1.0. Tokens (0.75, 0.25) and (0.8, 0.2):
    # f = (1, 0), P = (0.775, 0.225): loss = 2 * 0.775 = 1.55.
    import math
    bam = BAMAttention(2, 1, experts=2, routing="topk", top_k=1, aux_loss_weight=1.0).double()
    x = torch.eye(2, dtype=F64).unsqueeze(0)
    for logit1, want in ((math.log(0.2 / 0.8), 1.0), (math.log(4.0), 1.55)):
        with torch.no_grad():
            bam.router.weight.copy_(torch.tensor([[math.log(3.0), logit1], [0.0, 0.0]], dtype=F64))
        bam(x)
        assert abs(bam.aux_loss.item() - want) < 1e-12
    soft = BAMAttention(2, 1, experts=2).double()
    soft(x)
    assert soft.aux_loss.item() == 0.0


def test_kv_cache_size_and_decode():
    torch.manual_seed(3)
    for kv_sharing, heads in ((False, 3 * 2), (True, 2)):
        bam = BAMAttention(16, 4, kv_heads=2, experts=3, kv_sharing=kv_sharing, causal=True).double().eval()
        x = torch.randn(1, 6, 16, dtype=F64)
        full = bam(x)
        state = bam.init_state(1)
        outs = []
        for t in range(6):
            y, state = bam(x[:, t : t + 1], state=state)
            outs.append(y)
        assert_close(torch.cat(outs, 1), full, F64, "decode vs forward")
        assert state.keys.shape == (1, heads, 6, 4)


def test_errors():
    with pytest.raises(ValueError, match="top_k"):
        BAMAttention(16, 4, experts=2, routing="topk", top_k=3)
    with pytest.raises(ValueError, match="routing"):
        BAMAttention(16, 4, routing="hard")
    with pytest.raises(ValueError, match="layers"):
        BAMAttention.from_dense([])
