"""Oracles of criss-cross attention (P064): explicit per-position loop over row and column, fast == dense
masked reference, gamma = 0 -> identity, R = 1 sees only its row/column while R = 2 sees the whole image."""

import pytest
import torch

from attnzoo.mechanisms.local.criss_cross import CrissCrossAttention, criss_cross_fast, criss_cross_reference
from attnzoo.testing import assert_close


def _qkv(B, h, H, W, d, dv, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(0)
    mk = lambda n: torch.randn(B, h, H, W, n, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
    return mk(d), mk(d), mk(dv)


def _loop(q, k, v):
    B, h, H, W, _ = q.shape
    out = torch.zeros(B, h, H, W, v.shape[-1], dtype=q.dtype)
    for i in range(H):
        for j in range(W):
            keys = [(i, c) for c in range(W)] + [(r, j) for r in range(H) if r != i]  # H + W - 1, itself once
            assert len(keys) == H + W - 1
            kk = torch.stack([k[:, :, r, c] for r, c in keys], dim=2)
            vv = torch.stack([v[:, :, r, c] for r, c in keys], dim=2)
            p = torch.einsum("bhd,bhnd->bhn", q[:, :, i, j], kk).softmax(-1)  # no scaling, as the paper
            out[:, :, i, j] = torch.einsum("bhn,bhnd->bhd", p, vv)
    return out


@pytest.mark.parametrize("H,W", [(1, 7), (5, 7), (6, 3), (4, 4)])
def test_matches_loop(H, W):
    q, k, v = _qkv(2, 2, H, W, 3, 5)
    want = _loop(q, k, v)
    assert_close(criss_cross_fast(q, k, v), want, torch.float64, "fast vs loop")
    assert_close(criss_cross_reference(q, k, v), want, torch.float64, "reference vs loop")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_matches_reference_with_gradients(dtype):
    q, k, v = _qkv(2, 3, 7, 5, 4, 6, dtype=dtype, grad=True)
    ref, fast = criss_cross_reference(q, k, v), criss_cross_fast(q, k, v)
    assert_close(fast, ref, dtype, "output")
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b, dtype, "gradient")


def test_gamma_zero_is_identity():
    m = CrissCrossAttention(16, 1).double()  # gamma is initialised to 0
    x = torch.randn(2, 5, 6, 16, dtype=torch.float64)
    assert torch.equal(m(x), x)


def _dependence(recurrence):
    torch.manual_seed(0)
    m = CrissCrossAttention(8, 1, qk_reduction=2, recurrence=recurrence).double()
    with torch.no_grad():
        m.gamma.fill_(0.7)
    x = torch.randn(1, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    out = m(x)
    (g,) = torch.autograd.grad(out[0, 1, 2].sum(), x)  # output at (1, 2)
    return g[0].abs().sum(-1)  # (H, W) influence of every input position


def test_recurrence_one_sees_row_and_column_only():
    dep = _dependence(1)
    for r in range(4):
        for c in range(5):
            on_cross = r == 1 or c == 2
            assert (dep[r, c] > 1e-8) == on_cross, (r, c, float(dep[r, c]))


def test_recurrence_two_sees_everything():
    assert bool((_dependence(2) > 1e-8).all())


def test_module_is_gamma_times_attention_plus_x():
    torch.manual_seed(1)
    m = CrissCrossAttention(16, 2, qk_reduction=4, recurrence=1).double()
    with torch.no_grad():
        m.gamma.fill_(0.3)
    x = torch.randn(1, 3, 4, 16, dtype=torch.float64)
    q, k, v = m.qkv(x).split([4, 4, 16], dim=-1)
    split = lambda t: t.view(1, 3, 4, 2, -1).permute(0, 3, 1, 2, 4)
    att = _loop(split(q), split(k), split(v)).permute(0, 2, 3, 1, 4).reshape(1, 3, 4, 16)
    assert_close(m(x), 0.3 * att + x, torch.float64, "module")


def test_module_backends_agree_and_gradcheck():
    torch.manual_seed(0)
    m = CrissCrossAttention(8, 2, qk_reduction=2).double()
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = torch.randn(1, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    m.backend = "reference"
    ref = m(x)
    m.backend = "fast"
    assert_close(m(x), ref, torch.float64, "module backends")
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


def test_errors():
    with pytest.raises(ValueError, match="heads"):
        CrissCrossAttention(16, 3)
    with pytest.raises(ValueError, match="x"):
        CrissCrossAttention(16, 1)(torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="recurrence"):
        CrissCrossAttention(16, 1, recurrence=0)
