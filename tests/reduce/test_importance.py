"""Importance without an n x n matrix: the attention row recomputed from q, K and the log-sum-exp equals the eager
matrix's row (float64, 1e-10) for dense softmax and for every registered mechanism that exposes its selected mask,
and row @ V equals the mechanism's own output; mechanisms that are not masked softmax raise."""

import pytest
import torch

from attnzoo import registry
from attnzoo.kernels.sdpa import sdpa_with_lse
from attnzoo.reduce.importance import attention_received, attention_row, mechanism_attention_row, row_predicate
from attnzoo.reference import dense_mask, repeat_kv, softmax_attention
from attnzoo.testing import Sizes


def _qkv(B, Hq, Hk, nq, nk, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, nq, D, generator=g, dtype=dtype), torch.randn(B, Hk, nk, D, generator=g, dtype=dtype),
            torch.randn(B, Hk, nk, D, generator=g, dtype=dtype))


def eager_probs(q, k, *, causal=False, key_padding_mask=None, attn_mask=None, scale=None):
    """The (B, Hq, Nq, Nk) softmax matrix, materialised: the oracle."""
    B, Hq, nq, D = q.shape
    kk = repeat_kv(k, Hq // k.shape[1])
    s = q @ kk.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    m = dense_mask(B, Hq, nq, k.shape[2], causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                   device=q.device)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("causal,nq,nk,hq,hk,pad", [
    (False, 9, 9, 4, 4, False), (True, 9, 9, 4, 2, False), (True, 4, 11, 6, 2, True), (False, 5, 13, 2, 1, True),
    (True, 1, 1, 1, 1, False), (False, 65, 65, 2, 2, True),
])
@pytest.mark.parametrize("given_lse", [False, True])
def test_attention_row_equals_eager_row(causal, nq, nk, hq, hk, pad, given_lse):
    q, k, v = _qkv(2, hq, hk, nq, nk)
    kpm = None
    if pad:
        kpm = torch.rand(2, nk, generator=torch.Generator().manual_seed(5)) > 0.3
        kpm[:, 0] = True
    rows = sorted({0, nq - 1, nq // 2})
    lse = None
    if given_lse:
        _, lse_all = sdpa_with_lse(q, k, v, causal=causal, key_padding_mask=kpm, scale=0.7)
        lse = lse_all[:, :, rows]
    got = attention_row(q[:, :, rows], k, rows=rows, nq=nq, causal=causal, key_padding_mask=kpm, scale=0.7, lse=lse)
    ref = eager_probs(q, k, causal=causal, key_padding_mask=kpm, scale=0.7)[:, :, rows]
    assert got.shape == ref.shape and got.dtype == torch.float64
    assert rel(got, ref) < 1e-10


def test_sdpa_with_lse_equals_reference():
    for causal, nq, nk in [(False, 7, 9), (True, 9, 9), (True, 5, 9)]:
        q, k, v = _qkv(2, 4, 2, nq, nk, seed=nq)
        kpm = torch.ones(2, nk, dtype=torch.bool)
        kpm[1, :3] = False
        out, lse = sdpa_with_lse(q, k, v, causal=causal, key_padding_mask=kpm, scale=0.4)
        rout, rlse = softmax_attention(q, k, v, causal=causal, key_padding_mask=kpm, scale=0.4, return_lse=True)
        assert rel(out, rout) < 1e-10
        fin = torch.isfinite(rlse)
        assert torch.equal(fin, torch.isfinite(lse)) and (lse[fin] - rlse[fin]).abs().max() < 1e-10


def test_attention_received_equals_column_mean():
    q, k, _ = _qkv(2, 3, 3, 37, 37)
    qm = torch.ones(2, 37, dtype=torch.bool)
    qm[0, 30:] = False
    got = attention_received(q, k, causal=True, query_mask=qm, chunk=8)
    p = eager_probs(q, k, causal=True)
    ref = (p * qm.view(2, 1, 37, 1)).sum(2) / qm.sum(1).view(2, 1, 1)
    assert rel(got, ref) < 1e-10


def _maskable():
    out = []
    for m in registry.mechanisms(kind="sequence"):
        if not m.functional:
            continue
        try:
            row_predicate(m.name, 16, 16, causal=not m.supports("noncausal_self"), heads=4, kv_heads=2,
                          **dict(m.test_options))
        except ValueError:
            continue
        out.append(m)
    return out


MASKABLE = _maskable()


def test_the_maskable_set_covers_dense_and_masked_mechanisms():
    names = {m.name for m in MASKABLE}
    assert {"softmax", "sliding_window", "neighborhood_1d", "sink_window"} <= names


@pytest.mark.parametrize("mech", MASKABLE, ids=lambda m: m.name)
def test_mechanism_row_equals_eager_row_and_its_output(mech):
    sz = Sizes.of(mech)
    opts = dict(mech.test_options)
    for pattern in mech.patterns:
        causal = pattern.startswith("causal")
        nq, nk = (sz.n, sz.n) if pattern.endswith("self") else (sz.nq, sz.nk)
        q, k, v = _qkv(sz.batch, sz.heads, sz.kv_heads, nq, nk, D=sz.head_dim, seed=3)
        rows = list(range(nq))
        got = mechanism_attention_row(mech.name, q, k, rows=rows, causal=causal, scale=0.5, **opts)
        pred = row_predicate(mech.name, nq, nk, causal=causal, heads=sz.heads, kv_heads=sz.kv_heads, **opts)
        from attnzoo.masks import materialize

        am = None if pred is None else materialize(pred, sz.batch, sz.heads, nq, nk)
        ref = eager_probs(q, k, causal=causal and am is None, attn_mask=am, scale=0.5)
        assert rel(got, ref) < 1e-10, pattern
        # the row is the mechanism's own attention: row @ V reproduces its output
        out = mech.reference(q, k, v, causal=causal, key_padding_mask=None, scale=0.5, **mech.resolve_options(opts))
        assert rel(got @ repeat_kv(v, sz.heads // sz.kv_heads), out) < 1e-10, pattern


def test_s2_attention_rows_come_from_its_declared_mask():
    """S2-Attention is exact inside its per-head sparse pattern, which its record declares: rows are available."""
    assert {m.name for m in MASKABLE} >= {"s2_attention", "moa", "sinklora"}


@pytest.mark.parametrize("name", ["linear_attention", "hip", "agent"])
def test_non_softmax_or_unexposed_mechanisms_raise(name):
    try:
        registry.get(name)
    except KeyError:
        pytest.skip(f"{name} not registered")
    with pytest.raises(ValueError, match="cannot be recomputed"):
        row_predicate(name, 8, 8, causal=True)


def test_bad_rows_and_lse_raise():
    q, k, _ = _qkv(1, 2, 2, 5, 5)
    with pytest.raises(ValueError, match="rows"):
        attention_row(q[:, :, :2], k, rows=[0, 9], nq=5)
    with pytest.raises(ValueError, match="lse"):
        attention_row(q[:, :, :2], k, rows=[0, 1], lse=torch.zeros(1, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple of key heads"):
        attention_row(torch.randn(1, 3, 1, 8), torch.randn(1, 2, 5, 8), rows=[0])
