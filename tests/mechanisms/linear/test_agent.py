"""Oracles of `agent` (Agent Attention) and `agent_layer` (its vision block)."""

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.mechanisms.linear.agent import pool_agents
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("nq,nk,agents", [(7, 7, 3), (5, 9, 4), (12, 3, 5)])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_two_chained_softmax_attentions(nq, nk, agents, backend):
    """O = SDPA(Q, A, SDPA(A, K, V)) with A the pooled queries (GQA, a key-padding mask, cross lengths)."""
    q, k, v = rand(2, 4, nq, 6), rand(2, 2, nk, 6, seed=1), rand(2, 2, nk, 5, seed=2)
    mask = torch.rand(2, nk, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[:, 0] = True
    out = attnzoo.attention(q, k, v, mechanism="agent", agents=agents, key_padding_mask=mask, backend=backend)
    A = pool_agents(q, agents, mask if nq == nk else None)  # self attention pools only unpadded queries
    v_agents = softmax_attention(A, k, v, key_padding_mask=mask)
    assert_close(out, softmax_attention(q, A, v_agents), F64, f"{backend} vs two chained softmax attentions")


def test_masked_pooling_equals_pooling_the_unpadded_sequence():
    q = rand(1, 2, 11, 3)
    valid = torch.tensor([[True] * 8 + [False] * 3])
    for m in (1, 3, 4, 8, 9):
        assert_close(pool_agents(q, m, valid), pool_agents(q[:, :, :8], m), F64, f"{m} agents")
    holes = torch.tensor([[True, False, True, True, False, True, True, True, True, False, True]])
    keep = holes[0].nonzero().flatten()
    assert_close(pool_agents(q, 3, holes), pool_agents(q[:, :, keep], 3), F64, "holes")


def test_agents_are_bin_averages_of_the_queries():
    q = rand(1, 1, 6, 2)
    A = pool_agents(q, 3)  # bins {0,1}, {2,3}, {4,5}
    assert_close(A, q.view(1, 1, 3, 2, 2).mean(3), F64, "adaptive average pooling")


def test_generalised_linear_attention_view():
    """O = phi_q(Q) (phi_k(K) V) with phi_q(Q) = softmax(Q A^T s), phi_k(K) = softmax(A K^T s): an N x N
    operator of rank <= m whose rows sum to 1."""
    q, k, v = rand(1, 1, 8, 4), rand(1, 1, 10, 4, seed=1), rand(1, 1, 10, 3, seed=2)
    A = pool_agents(q, 2)
    pq = torch.softmax(q @ A.transpose(-1, -2) / 2, -1)  # (1, 1, 8, 2)
    pk = torch.softmax(A @ k.transpose(-1, -2) / 2, -1)  # (1, 1, 2, 10)
    op = pq @ pk
    assert torch.linalg.matrix_rank(op[0, 0]) <= 2
    assert_close(op.sum(-1), torch.ones(1, 1, 8, dtype=F64), F64, "rows of the operator")
    assert_close(attnzoo.attention(q, k, v, mechanism="agent", agents=2), op @ v, F64, "phi_q (phi_k V)")


def test_invariant_to_permuting_keys_with_values():
    q, k, v = rand(2, 2, 6, 4), rand(2, 2, 9, 4, seed=1), rand(2, 2, 9, 4, seed=2)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    a = attnzoo.attention(q, k, v, mechanism="agent", agents=3)
    b = attnzoo.attention(q, k[:, :, perm], v[:, :, perm], mechanism="agent", agents=3)
    assert_close(b, a, F64, "permuted keys and values")


def test_causal_raises():
    q = rand(1, 1, 4, 2)
    with pytest.raises(ValueError, match="causal"):
        attnzoo.attention(q, q, q, mechanism="agent", causal=True)


def _module(**kw):
    torch.manual_seed(0)
    return attnzoo.build("agent_layer", 8, 2, **kw).double()


def test_module_without_biases_is_chained_softmax_plus_dwc():
    m = _module(agents=4, grid=6, agent_bias=False)
    x = rand(2, 6, 6, 8, seed=4)
    q, k, v = m.qkv(x.reshape(2, 36, 8)).chunk(3, -1)
    A = F.adaptive_avg_pool2d(q.reshape(2, 6, 6, 8).permute(0, 3, 1, 2), 2).reshape(2, 8, 4).transpose(1, 2)
    heads = lambda t: t.reshape(2, -1, 2, 4).transpose(1, 2)
    o = softmax_attention(heads(q), heads(A), softmax_attention(heads(A), heads(k), heads(v)))
    o = o.transpose(1, 2).reshape(2, 6, 6, 8)
    conv = m.dwc(v.reshape(2, 6, 6, 8).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), m.proj(o + conv), F64, f"agent_layer ({backend}) without biases")


def test_module_biases_follow_the_official_layout():
    m = _module(agents=4, grid=6)
    b1, b2 = m.biases(6, 6)
    an = F.interpolate(m.an_bias, size=(6, 6), mode="bilinear").reshape(1, 2, 4, 36)
    rows = (m.ah_bias + m.aw_bias).reshape(1, 2, 4, 36)  # agent a, key (r, c): ah[r] + aw[c]
    assert_close(b1, an + rows, F64, "agent -> key bias")
    assert b2.shape == (1, 2, 36, 4)
    assert torch.equal(b2[0, 1, 6 * 2 + 3], (m.ha_bias[0, 1, 2, 0] + m.wa_bias[0, 1, 0, 3]) +
                       F.interpolate(m.na_bias, size=(6, 6), mode="bilinear")[1, :, 2, 3])


def test_module_other_grid_sizes():
    m = _module(agents=4, grid=6)
    x = rand(1, 5, 7, 8, seed=5)
    outs = []
    for backend in ("reference", "fast"):
        m.backend = backend
        outs.append(m(x))
    assert outs[0].shape == (1, 5, 7, 8)
    assert_close(outs[1], outs[0], F64, "fast vs reference on a 5 x 7 grid")
    with pytest.raises(ValueError, match="agents"):
        _module(agents=5)
