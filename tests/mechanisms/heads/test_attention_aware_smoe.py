"""Oracles of attention/similarity-aware SMoE routing (P033): an identity token graph is standard routing; the
attention-aware gates are exactly (head-averaged A) p; the similarity-aware gates S p with S by hand; rows of
the mixed gates sum to 1; exactly top_k experts per token; routed experts (fast) equal dense masked experts
(reference); decoding with the routed cache equals the causal forward."""

import pytest
import torch

from attnzoo.mechanisms.heads.attention_aware_smoe import AttentionAwareSMoE, mix_gates
from attnzoo.mechanisms.heads.echoatt import attention_probs
from attnzoo.testing import assert_close

F64 = torch.float64


def test_identity_graph_is_standard_routing():
    p = torch.softmax(torch.randn(2, 5, 4, dtype=F64), -1)
    assert torch.equal(mix_gates(p, torch.eye(5, dtype=F64).expand(2, 5, 5)), p)
    assert torch.equal(mix_gates(p, None), p)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_aware_gates_are_mean_attention_times_gate_probs(causal):
    torch.manual_seed(0)
    m = AttentionAwareSMoE(16, 4, kv_heads=2, experts=5, top_k=2, causal=causal).double()
    x = torch.randn(2, 7, 16, dtype=F64)
    mask = torch.tensor([[True] * 7, [True, True, False, True, True, True, False]])
    out = m(x, key_padding_mask=mask)
    xa = m.norm1(x)
    q = m.q_proj(xa).view(2, 7, 4, 4).transpose(1, 2)
    k = m.k_proj(xa).view(2, 7, 2, 4).transpose(1, 2)
    v = m.v_proj(xa).view(2, 7, 2, 4).transpose(1, 2).repeat_interleave(2, 1)
    A = attention_probs(q, k, causal=causal, key_padding_mask=mask, scale=0.5)
    h = x + m.o_proj((A @ v).transpose(1, 2).reshape(2, 7, 16))
    y = m.norm2(h)
    p = torch.softmax(y @ m.gate.weight.T, -1)
    p_mix = A.mean(1) @ p
    assert_close(m.last_gates, p_mix, F64, "attention-aware gates")
    assert_close(p_mix.sum(-1), torch.ones(2, 7, dtype=F64), F64, "mixed gates sum to 1")
    sel = m.last_selected
    assert (sel.sum(-1) == 2).all()
    g = p_mix * sel
    g = g / g.sum(-1, keepdim=True)
    want = h.clone()
    for e in range(5):
        ffn = torch.nn.functional.gelu(y @ m.w1[e].T + m.b1[e]) @ m.w2[e].T + m.b2[e]
        want = want + g[..., e : e + 1] * ffn
    assert_close(out, want, F64, "block output by hand")


def test_similarity_aware_gates_by_hand():
    torch.manual_seed(1)
    m = AttentionAwareSMoE(8, 2, experts=3, top_k=1, router="similarity", tau=0.5).double()
    x = torch.randn(1, 6, 8, dtype=F64)
    m(x)
    S = m.last_graph
    assert_close(S.sum(-1), torch.ones(1, 6, dtype=F64), F64, "S rows sum to 1")
    # S = softmax((y W_s) y^T / tau) with y the MoE input: check against the stored gates.
    xa = m.norm1(x)
    q = m.q_proj(xa).view(1, 6, 2, 4).transpose(1, 2)
    k = m.k_proj(xa).view(1, 6, 2, 4).transpose(1, 2)
    v = m.v_proj(xa).view(1, 6, 2, 4).transpose(1, 2)
    A = attention_probs(q, k, causal=False, key_padding_mask=None, scale=0.5)
    h = x + m.o_proj((A @ v).transpose(1, 2).reshape(1, 6, 8))
    y = m.norm2(h)
    S_hand = torch.softmax((y @ m.w_sim.weight.T) @ y.transpose(1, 2) / 0.5, -1)
    assert_close(S, S_hand, F64, "similarity graph")
    assert_close(m.last_gates, S_hand @ torch.softmax(y @ m.gate.weight.T, -1), F64, "similarity-aware gates")


@pytest.mark.parametrize("router", ["attention", "similarity", "standard"])
def test_fast_equals_reference_and_decode(router):
    torch.manual_seed(2)
    m = AttentionAwareSMoE(16, 4, experts=4, top_k=2, router=router, causal=True, expert_hidden=8).double()
    x = torch.randn(2, 6, 16, dtype=F64)
    res = []
    for backend in ("reference", "fast"):
        m.backend = backend
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y.square().sum() + m.aux_loss).backward()
        res.append((y, xi.grad, [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    assert_close(res[1][0], res[0][0], F64, "fast vs reference")
    assert_close(res[1][1], res[0][1], F64, "fast vs reference dx")
    for a, b in zip(res[1][2], res[0][2]):
        assert_close(a, b, F64, "fast vs reference parameter gradient")
    m.eval()
    full = m(x)
    state = m.init_state(2)
    y, state = m(x[:, :3], state=state)
    outs = [y]
    for t in range(3, 6):
        y, state = m(x[:, t : t + 1], state=state)
        outs.append(y)
    assert_close(torch.cat(outs, 1), full, F64, f"decode vs forward ({router})")


def test_errors():
    with pytest.raises(ValueError, match="top_k"):
        AttentionAwareSMoE(16, 4, experts=2, top_k=3)
    with pytest.raises(ValueError, match="context"):
        AttentionAwareSMoE(16, 4)(torch.randn(1, 3, 16), torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="router"):
        AttentionAwareSMoE(16, 4, router="hash")
