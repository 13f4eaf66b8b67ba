"""Oracles of HaloNet attention (P080): explicit per-block loop over halo windows, block = grid -> global
attention with relative logits, fast == dense masked reference (outputs and gradients)."""

import pytest
import torch

from attnzoo.mechanisms.local.halonet import HaloAttention, halo_fast, halo_reference
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def _inputs(B, h, H, W, d, block, halo, dtype=torch.float64, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
    span = 2 * (block + halo) - 1
    return mk(B, h, H, W, d), mk(B, h, H, W, d), mk(B, h, H, W, d), mk(span, d), mk(span, d)


def _loop(q, k, v, rh, rw, block, halo, scale, mask_padding):
    B, h, H, W, d = q.shape
    out = torch.zeros_like(q)
    off = block + halo - 1
    for qr in range(H):
        for qc in range(W):
            br, bc = qr // block * block, qc // block * block
            logits, vals = [], []
            for kr in range(br - halo, br + block + halo):
                for kc in range(bc - halo, bc + block + halo):
                    inside = 0 <= kr < H and 0 <= kc < W
                    if not inside and mask_padding:
                        continue
                    kk = k[:, :, kr, kc] if inside else torch.zeros_like(k[:, :, 0, 0])
                    vv = v[:, :, kr, kc] if inside else torch.zeros_like(v[:, :, 0, 0])
                    qq = q[:, :, qr, qc]
                    s = (qq * (kk + rh[kr - qr + off] + rw[kc - qc + off])).sum(-1) * scale
                    logits.append(s)
                    vals.append(vv)
            p = torch.stack(logits, -1).softmax(-1)  # (B, h, n)
            out[:, :, qr, qc] = torch.einsum("bhn,bhnd->bhd", p, torch.stack(vals, 2))
    return out


@pytest.mark.parametrize("H,W,block,halo", [(6, 8, 2, 1), (4, 6, 2, 2), (6, 6, 3, 1), (4, 4, 4, 0)])
@pytest.mark.parametrize("mask_padding", [True, False])
def test_matches_loop(H, W, block, halo, mask_padding):
    q, k, v, rh, rw = _inputs(2, 2, H, W, 3, block, halo)
    want = _loop(q, k, v, rh, rw, block, halo, 0.6, mask_padding)
    for fn in (halo_fast, halo_reference):
        got = fn(q, k, v, rh, rw, block=block, halo=halo, scale=0.6, mask_padding=mask_padding)
        assert_close(got, want, torch.float64, f"{fn.__name__} vs loop")


@pytest.mark.parametrize("H,W,block,halo", [(3, 3, 3, 2), (4, 4, 2, 2), (4, 6, 2, 4)])
def test_halo_covering_the_image_is_global_attention_with_relative_logits(H, W, block, halo):
    q, k, v, rh, rw = _inputs(1, 2, H, W, 4, block, halo)
    off = block + halo - 1
    n = H * W
    bias = torch.zeros(1, 2, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            r = rh[j // W - i // W + off] + rw[j % W - i % W + off]  # (d,)
            bias[0, :, i, j] = (q[0, :, i // W, i % W] * r).sum(-1) * 0.5
    flat = lambda t: t.reshape(1, 2, n, 4)
    want = softmax_attention(flat(q), flat(k), flat(v), bias=bias, scale=0.5).view(1, 2, H, W, 4)
    for fn in (halo_fast, halo_reference):
        got = fn(q, k, v, rh, rw, block=block, halo=halo, scale=0.5, mask_padding=True)
        assert_close(got, want, torch.float64, f"{fn.__name__}: every window covers the image")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_padding", [True, False])
def test_fast_matches_reference_gradients(dtype, mask_padding):
    q, k, v, rh, rw = _inputs(2, 2, 6, 4, 3, 2, 1, dtype=dtype, grad=True)
    args = dict(block=2, halo=1, scale=0.5, mask_padding=mask_padding)
    ref, fast = halo_reference(q, k, v, rh, rw, **args), halo_fast(q, k, v, rh, rw, **args)
    assert_close(fast, ref, dtype, "output")
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv hw", torch.autograd.grad(fast, (q, k, v, rh, rw), g),
                          torch.autograd.grad(ref, (q, k, v, rh, rw), g)):
        assert_close(a, b, dtype, f"gradient {name}")


def test_module_backends_and_gradcheck():
    torch.manual_seed(0)
    m = HaloAttention(8, 2, block_size=2, halo_size=1).double()
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    m.backend = "reference"
    ref = m(x)
    m.backend = "fast"
    assert_close(m(x), ref, torch.float64, "module")
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


def test_errors():
    assert HaloAttention(8, 2, block_size=3)(torch.randn(1, 4, 5, 8)).shape == (1, 4, 5, 8)  # padded, not refused
    with pytest.raises(ValueError, match="block_size"):
        HaloAttention(8, 2, block_size=0)
    with pytest.raises(ValueError, match="heads"):
        HaloAttention(8, 3)
    with pytest.raises(TypeError, match="mask_padding"):
        HaloAttention(8, 2, mask_padding=1)
