"""Oracles of `aaren` (Attention as an RNN)."""

import math

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.linear.aaren import aaren_scan, combine, finish, leaf_triples, prefix_scan
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def per_prefix(s, v, mask=None):
    """o_t = softmax(s_{1:t}) v_{1:t}, one prefix at a time (masked tokens left out)."""
    B, H, N = s.shape
    outs = []
    for t in range(N):
        st = s[..., : t + 1].clone()
        if mask is not None:
            st = st.masked_fill(~mask[:, None, : t + 1], -math.inf)
        w = torch.softmax(st, -1)
        w = torch.nan_to_num(w, nan=0.0)  # an all-masked prefix gives 0
        outs.append((w.unsqueeze(-1) * v[..., : t + 1, :]).sum(-2))
    return torch.stack(outs, 2)


@pytest.mark.parametrize("n", [1, 7, 65])
def test_scans_equal_per_prefix_softmax(n):
    s, v = rand(2, 3, n) * 3, rand(2, 3, n, 4, seed=1)
    want = per_prefix(s, v)
    m, u, w = prefix_scan(*leaf_triples(s, v))  # the paper's Hillis-Steele scan over tokens
    assert_close(finish(u, w), want, F64, "token-level parallel scan")
    for chunk in (1, 3, 4, 64):
        out, _ = aaren_scan(s, v, chunk=chunk)
        assert_close(out, want, F64, f"two-level scan (chunk {chunk})")


def test_sequential_rnn_update_equals_scan():
    s, v = rand(1, 2, 9), rand(1, 2, 9, 3, seed=1)
    state = (torch.full((1, 2), -math.inf, dtype=F64), torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, 3, dtype=F64))
    outs = []
    for t in range(9):  # the RNN: fold one token at a time
        state = combine(state, leaf_triples(s[..., t], v[..., t, :]))
        outs.append(finish(state[1], state[2]))
    out, final = aaren_scan(s, v, chunk=4)
    assert_close(torch.stack(outs, 2), out, F64, "sequential update vs parallel scan")
    assert_close(finish(final[1], final[2]), outs[-1], F64, "final triple")


def test_extreme_scores_and_masked_prefixes():
    s = torch.tensor([[[-800.0, 700.0, -5.0, 900.0, 0.0, -1000.0]]], dtype=F64)
    v = rand(1, 1, 6, 2)
    mask = torch.tensor([[False, False, True, True, False, True]])
    sm = s.masked_fill(~mask[:, None], -math.inf)
    out, _ = aaren_scan(sm, v, chunk=4)
    assert torch.isfinite(out).all()
    assert out[..., :2, :].abs().max() == 0  # nothing visible yet
    assert_close(out, per_prefix(s, v, mask), F64, "extreme scores with a mask")


def module(**kw):
    torch.manual_seed(0)
    return attnzoo.build("aaren", 12, 3, causal=True, **kw).double()


def test_module_is_softmax_of_a_learned_query_and_pools():
    m = module(chunk=4)
    x = rand(2, 11, 12, seed=2)
    k = m.k_proj(x).view(2, 11, 3, 4).transpose(1, 2)
    v = m.v_proj(x).view(2, 11, 3, 4).transpose(1, 2)
    q = m.query.view(1, 3, 1, 4).expand(2, 3, 11, 4)
    want = softmax_attention(q, k, v, causal=True)  # each position: the query over its prefix
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), m.o_proj(want.transpose(1, 2).reshape(2, 11, 12)), F64, f"aaren ({backend})")
    # many-to-one: the last output is one-query softmax attention over all tokens
    one = softmax_attention(m.query.view(1, 3, 1, 4).expand(2, 3, 1, 4), k, v)
    assert_close(m.pool(x), m.o_proj(one.transpose(1, 2).reshape(2, 12)), F64, "pool vs one-query softmax")
    assert_close(m.pool(x), m(x)[:, -1], F64, "pool vs last output")


def test_module_decoding_and_constant_state():
    m = module(chunk=4).eval()
    x = rand(1, 40, 12, seed=3)
    full = m(x)
    state = m.init_state(1)
    out, state = m(x[:, :30], state=state)
    size = state.state_nbytes()
    outs = [out] + [m(x[:, t:t + 1], state=state)[0] for t in range(30, 40)]
    assert_close(torch.cat(outs, 1), full, F64, "prefill 30 + 10 steps vs forward")
    assert state.state_nbytes() == size == 3 * (1 + 1 + 4) * 8


def test_scan_gradcheck():
    s, v = rand(1, 1, 6).requires_grad_(True), rand(1, 1, 6, 2, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, v: aaren_scan(s, v, chunk=4)[0], (s, v), fast_mode=True)


def test_errors():
    with pytest.raises(ValueError, match="causal"):
        attnzoo.build("aaren", 12, 3, causal=False)
    with pytest.raises(ValueError, match="context"):
        module()(rand(1, 3, 12), rand(1, 3, 12))
