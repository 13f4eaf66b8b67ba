"""Oracles of MoH (P006): all heads on with unit gates is multi-head attention; inactive heads contribute exactly
zero (value and gradient); h_s + K heads per token; the gathered fast form equals the dense reference; the
load-balancing loss on a hand-computed case."""

import math

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.heads._routing import gather_positions, load_balancing_loss, routed_attention
from attnzoo.mechanisms.heads.moh import MixtureOfHeadsAttention, moh_reference
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def _copy_mha(moh: MixtureOfHeadsAttention, causal: bool):
    mha = attnzoo.build("softmax", moh.dim, moh.heads, kv_heads=moh.kv_heads, causal=causal, backend="reference")
    mha = mha.double()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(mha, name).weight.copy_(getattr(moh, name).weight)
    return mha


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("config", [dict(shared_heads=4, gate="binary"),
                                    dict(shared_heads=0, routed_topk=4, gate="binary")])
def test_all_heads_unit_gates_is_mha(causal, backend, config):
    torch.manual_seed(0)
    moh = MixtureOfHeadsAttention(16, 4, kv_heads=2, causal=causal, backend=backend, **config).double()
    mha = _copy_mha(moh, causal)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 7, [True, False, True, True, False, True, True]])
    assert_close(moh(x), mha(x), torch.float64, "MoH all heads, unit gates vs MHA")
    assert_close(moh(x, key_padding_mask=mask), mha(x, key_padding_mask=mask), torch.float64, "... with padding")
    if not causal:
        ctx = torch.randn(2, 9, 16, dtype=torch.float64)
        assert_close(moh(x, ctx), mha(x, ctx), torch.float64, "MoH all heads vs MHA, cross attention")
    assert moh.last_active.all()


@pytest.mark.parametrize("gate", ["official", "paper", "binary"])
def test_active_head_count_and_shared_heads(gate):
    torch.manual_seed(1)
    moh = MixtureOfHeadsAttention(24, 6, shared_heads=2, routed_topk=2, gate=gate).double()
    x = torch.randn(3, 11, 24, dtype=torch.float64)
    moh(x)
    active = moh.last_active
    assert (active.sum(-1) == 4).all(), "every token must have exactly h_s + K = 4 active heads"
    assert active[..., :2].all(), "shared heads are always active"
    assert ((moh.last_gates != 0) == active).all(), "gates are non-zero exactly on active heads"
    assert len(set(map(tuple, active[..., 2:].reshape(-1, 4).tolist()))) > 1, "routing should vary over tokens"


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_inactive_heads_contribute_exactly_zero(backend):
    torch.manual_seed(2)
    moh = MixtureOfHeadsAttention(16, 4, shared_heads=1, routed_topk=1, causal=True, backend=backend).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    base = moh(x)
    gates, active = moh.last_gates, moh.last_active
    inactive = torch.nonzero(~active[..., 1])
    b, t = inactive[inactive[:, 1] > 0][0].tolist()  # a token (not the first) whose routed head 1 is inactive
    # Value: the inactive head's query/attention row at that token does not matter (reference form, explicit).
    B, N = x.shape[:2]
    q = moh.q_proj(x).view(B, N, 4, 4).transpose(1, 2).detach().requires_grad_(True)
    k = moh.k_proj(x).view(B, N, 4, 4).transpose(1, 2)
    v = moh.v_proj(x).view(B, N, 4, 4).transpose(1, 2)
    y = moh_reference(q, k, v, gates, moh.o_proj, causal=True, key_padding_mask=None, scale=0.5)
    assert_close(y, base, torch.float64, "moh_reference vs module")
    q2 = q.detach().clone()
    q2[b, 1, t] += 100.0
    y2 = moh_reference(q2, k, v, gates, moh.o_proj, causal=True, key_padding_mask=None, scale=0.5)
    assert torch.equal(y2, y.detach()), "perturbing an inactive head's query changed the output"
    # Gradient: exactly zero for the inactive (token, head) query, non-zero for an active one.
    (g,) = torch.autograd.grad(y.square().sum(), q)
    assert torch.equal(g[b, 1, t], torch.zeros(4, dtype=torch.float64))
    assert g[b, 0, t].abs().sum() > 0
    # Module level: a routed head no token selects gets exactly zero gradient, and its weights do not matter.
    x = x.clone()
    x[..., 0] = 1.0  # a constant feature; the router reads it with weights (5, 0, -5): head 3 is never in the top-1
    with torch.no_grad():
        moh.w_routed.weight.mul_(0.01)
        moh.w_routed.weight[:, 0] = torch.tensor([5.0, 0.0, -5.0])
    moh.zero_grad()
    y = moh(x)
    assert not moh.last_active[..., 3].any()
    y.square().sum().backward()
    assert torch.equal(moh.q_proj.weight.grad[12:16], torch.zeros(4, 16, dtype=torch.float64))
    assert moh.q_proj.weight.grad[:4].abs().sum() > 0
    with torch.no_grad():
        moh.q_proj.weight[12:16] += 10.0
        assert torch.equal(moh(x), y.detach())


def test_fast_equals_reference_with_gradients_causal_cross_and_padding():
    torch.manual_seed(3)
    ref = MixtureOfHeadsAttention(16, 4, kv_heads=2, shared_heads=1, routed_topk=2, causal=True,
                                  backend="reference").double()
    fast = MixtureOfHeadsAttention(16, 4, kv_heads=2, shared_heads=1, routed_topk=2, causal=True,
                                   backend="fast").double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    ctx = torch.randn(2, 10, 16, dtype=torch.float64)  # causal cross: query i sees keys j <= i + 4
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 2] = mask[0, 7] = False
    outs = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y = m(xi, ctx, key_padding_mask=mask)
        y.square().sum().backward()
        outs.append((y, xi.grad, [p.grad.clone() for p in m.parameters()]))
    assert_close(outs[1][0], outs[0][0], torch.float64, "fast vs reference output")
    assert_close(outs[1][1], outs[0][1], torch.float64, "fast vs reference dx")
    for a, b in zip(outs[1][2], outs[0][2]):
        assert_close(a, b, torch.float64, "fast vs reference parameter gradient")


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_routed_attention_equals_dense_rows(causal, padded):
    g = torch.Generator().manual_seed(4)
    B, H, Hk, N, D = 2, 4, 2, 65, 8
    q_all = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, N + 3, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, N + 3, 5, generator=g, dtype=torch.float64)
    kpm = torch.rand(B, N + 3, generator=g) > 0.2
    kpm[:, 0] = True
    kpm = kpm if padded else None
    active = torch.rand(B, N, H, generator=g) > 0.6
    pos, valid = gather_positions(active)
    assert torch.equal(valid.sum(-1), active.sum(1).T.reshape(H, B).T)
    dense = softmax_attention(q_all, k, v, causal=causal, key_padding_mask=kpm, scale=0.3)  # (B, H, N, 5)
    q_rows = q_all.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, D)).requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    got = routed_attention(q_rows, k, v, pos, valid, causal=causal, offset=3, key_padding_mask=kpm, scale=0.3,
                           block=4)  # several causal row blocks
    want = softmax_attention(q_rows, k, v, causal=False, key_padding_mask=kpm, scale=0.3, attn_mask=(
        torch.arange(N + 3).view(1, 1, 1, -1) <= (pos + 3).unsqueeze(-1)) if causal else None)
    keep = valid.unsqueeze(-1)
    assert_close(got * keep, want * keep, torch.float64, "routed rows vs dense rows")
    assert_close(got * keep, dense.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, 5)) * keep, torch.float64,
                 "routed rows vs rows of the dense attention")
    assert torch.isfinite(got).all()
    g = torch.randn_like(got) * keep
    for a, b, name in zip(torch.autograd.grad(got, (q_rows, k, v), g), torch.autograd.grad(want, (q_rows, k, v), g),
                          "qkv"):
        assert_close(a, b, torch.float64, f"routed attention gradient of {name}")


def test_load_balancing_loss_hand_computed():
    # Two tokens, two routed heads, top-1. Router logits: token 0 (ln 3, 0) -> p = (0.75, 0.25);
    # token 1 (ln 4, 0) -> p = (0.8, 0.2). Both pick head 0: f = (1, 0), P = (0.775, 0.225).
    # Loss = R * sum f P = 2 * 0.775 = 1.55 (times aux_loss_weight).
    moh = MixtureOfHeadsAttention(2, 2, shared_heads=0, routed_topk=1, aux_loss_weight=1.0).double()
    with torch.no_grad():
        moh.w_routed.weight.copy_(torch.tensor([[math.log(3), math.log(4)], [0.0, 0.0]], dtype=torch.float64))
    x = torch.eye(2, dtype=torch.float64).unsqueeze(0)  # tokens e1, e2
    moh(x)
    assert abs(moh.aux_loss.item() - 1.55) < 1e-12
    assert moh.last_active[0, :, 0].all() and not moh.last_active[0, :, 1].any()
    # Official gates: the selected routed head is renormalised to K = 1.
    assert torch.allclose(moh.last_gates[0, :, 0], torch.ones(2, dtype=torch.float64))
    # Padded tokens are not counted: with token 1 padded, f = (1, 0), P = (0.75, 0.25) -> 1.5.
    moh(x, key_padding_mask=torch.tensor([[True, False]]))
    assert abs(moh.aux_loss.item() - 1.5) < 1e-12
    p = torch.tensor([[0.75, 0.25], [0.8, 0.2]])
    assert abs(load_balancing_loss(p, torch.tensor([[True, False], [True, False]])).item() - 1.55) < 1e-6


def test_gate_formulas_hand_computed():
    torch.manual_seed(5)
    for gate in ("official", "paper"):
        moh = MixtureOfHeadsAttention(8, 4, shared_heads=2, routed_topk=1, gate=gate).double()
        x = torch.randn(1, 3, 8, dtype=torch.float64)
        moh(x)
        ps = torch.softmax(x @ moh.w_shared.weight.T, -1)  # (1, 3, 2)
        pr = torch.softmax(x @ moh.w_routed.weight.T, -1)  # (1, 3, 2)
        a = torch.softmax(x @ moh.w_mix.weight.T, -1)  # (1, 3, 2)
        sel = pr == pr.amax(-1, keepdim=True)
        if gate == "official":  # shared: 2 * 2 softmax * a1; routed: renormalised to K = 1, times 2 a2
            want = torch.cat([2 * ps * 2 * a[..., :1], sel * 1.0 * 2 * a[..., 1:]], -1)
        else:  # paper: a1 softmax(W_s x), a2 softmax(W_r x) on the top-K
            want = torch.cat([ps * a[..., :1], pr * sel * a[..., 1:]], -1)
        assert_close(moh.last_gates, want, torch.float64, f"{gate} gates")


def test_query_norm_router_selects_largest_query_norms():
    torch.manual_seed(6)
    moh = MixtureOfHeadsAttention(16, 4, shared_heads=1, routed_topk=2, router="query_norm", gate="binary").double()
    assert moh.w_routed is None and moh.w_shared is None and moh.w_mix is None
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    moh(x)
    norms = moh.q_proj(x).view(2, 5, 4, 4).norm(dim=-1)[..., 1:]  # (2, 5, 3)
    want = torch.zeros_like(norms, dtype=torch.bool).scatter(-1, norms.topk(2, -1).indices, True)
    assert torch.equal(moh.last_active[..., 1:], want)


def test_decode_matches_forward_and_cache_is_mha_sized():
    torch.manual_seed(7)
    moh = MixtureOfHeadsAttention(16, 4, kv_heads=2, shared_heads=1, routed_topk=1, causal=True).double().eval()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    full = moh(x)
    state = moh.init_state(2)
    outs = []
    for t in range(8):
        y, state = moh(x[:, t : t + 1], state=state)
        outs.append(y)
    assert_close(torch.cat(outs, 1), full, torch.float64, "token-by-token decode vs causal forward")
    assert state.keys.shape == (2, 2, 8, 4)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="routed_topk"):
        MixtureOfHeadsAttention(16, 4, shared_heads=2, routed_topk=3)
    with pytest.raises(ValueError, match="shared_heads"):
        MixtureOfHeadsAttention(16, 4, shared_heads=5)
    with pytest.raises(ValueError, match="gate"):
        MixtureOfHeadsAttention(16, 4, gate="soft")
    moh = MixtureOfHeadsAttention(16, 4)
    with pytest.raises(ValueError, match="x"):
        moh(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="state"):
        moh(torch.randn(1, 2, 16), state=object())
