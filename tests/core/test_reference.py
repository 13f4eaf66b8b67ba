"""The exact reference and the softmax mechanism: hand-computed cases, SDPA agreement, edge cases."""

import math

import pytest
import torch

import attnzoo
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close, rel_err


def _qkv(B, Hq, Hk, Nq, Nk, D, Dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(B, Hk, Nk, D, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(B, Hk, Nk, Dv, generator=g, dtype=torch.float64).to(dtype))


def test_hand_computed_two_keys():
    # One query, two keys: weights softmax([1*1, 1*0] / sqrt(1)) = [e/(e+1), 1/(e+1)].
    q = torch.tensor([[[[1.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0], [0.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[10.0], [20.0]]]], dtype=torch.float64)
    e = math.e
    want = (10 * e + 20) / (e + 1)
    out, lse = softmax_attention(q, k, v, return_lse=True)
    assert out.item() == pytest.approx(want, rel=1e-14)
    assert lse.item() == pytest.approx(math.log(e + 1), rel=1e-14)


def test_explicit_loop_gqa_causal_cross():
    """Against a per-(b, h, i) loop over visible keys, with GQA and bottom-right causal alignment."""
    B, Hq, Hk, Nq, Nk, D = 2, 6, 2, 4, 7, 3
    q, k, v = _qkv(B, Hq, Hk, Nq, Nk, D)
    out = softmax_attention(q, k, v, causal=True, scale=0.7)
    want = torch.empty_like(out)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hk)
            for i in range(Nq):
                vis = [j for j in range(Nk) if j <= i + Nk - Nq]
                s = torch.stack([0.7 * (q[b, h, i] @ k[b, kh, j]) for j in vis])
                w = torch.softmax(s, 0)
                want[b, h, i] = sum(w[t] * v[b, kh, j] for t, j in enumerate(vis))
    assert_close(out, want, torch.float64, "reference vs loop")


CASES = [
    # B, Hq, Hk, Nq, Nk, D, Dv
    (2, 4, 4, 7, 7, 16, 16),
    (2, 8, 2, 63, 63, 16, 8),   # GQA
    (1, 4, 1, 65, 65, 32, 32),  # MQA
    (2, 4, 2, 5, 9, 16, 16),    # Nq < Nk
    (2, 4, 2, 9, 5, 16, 16),    # Nq > Nk
    (3, 2, 2, 1, 1, 8, 8),      # N = 1
    (2, 2, 1, 1, 17, 8, 8),     # one query, decode-like
]


@pytest.mark.parametrize("B,Hq,Hk,Nq,Nk,D,Dv", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_fast_matches_reference(B, Hq, Hk, Nq, Nk, D, Dv, causal, padded, dtype):
    q, k, v = _qkv(B, Hq, Hk, Nq, Nk, D, Dv)
    kpm = None
    if padded:
        kpm = torch.rand(B, Nk, generator=torch.Generator().manual_seed(3)) > 0.4
        kpm[0] = False  # a fully padded row: zeros by contract
    ref = softmax_attention(q, k, v, causal=causal, key_padding_mask=kpm)
    got = attnzoo.attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, key_padding_mask=kpm, backend="fast")
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    assert_close(got, ref, dtype, "SDPA fast vs float64 reference")


def test_bfloat16_close():
    q, k, v = _qkv(2, 4, 2, 33, 33, 32)
    ref = softmax_attention(q, k, v, causal=True)
    got = attnzoo.attention(*(t.bfloat16() for t in (q, k, v)), causal=True)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) < 2e-2


def test_fully_masked_rows_return_zeros_and_minus_inf_lse():
    q, k, v = _qkv(2, 2, 2, 4, 6, 8)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1] = False
    out, lse = softmax_attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert (out[0] != 0).any() and torch.isfinite(lse[0]).all()
    # causal with Nq > Nk: the first Nq - Nk query rows see no key
    q, k, v = _qkv(1, 2, 2, 6, 4, 8)
    out = softmax_attention(q, k, v, causal=True)
    assert (out[:, :, :2] == 0).all() and (out[:, :, 2:] != 0).any()
    fast = attnzoo.attention(q, k, v, causal=True, backend="fast")
    assert_close(fast, out, torch.float64, "fast on rows with no key")


def test_attn_mask_and_bias():
    q, k, v = _qkv(2, 4, 2, 5, 6, 8)
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    bias = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    out = softmax_attention(q, k, v, attn_mask=mask, bias=bias)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8) + bias
    s = s.masked_fill(~mask, float("-inf"))
    want = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    assert_close(out, want, torch.float64, "mask + bias vs direct")


def test_nan_propagates():
    q, k, v = _qkv(1, 2, 2, 4, 4, 8)
    k[0, 0, 2, 0] = float("nan")
    out = softmax_attention(q, k, v)
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[0, 1]).all()


def test_gradcheck_reference():
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 4, 2, 4, 5, 3))
    kpm = torch.tensor([[True, False, True, True, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: softmax_attention(q, k, v, causal=True, key_padding_mask=kpm), (q, k, v))
