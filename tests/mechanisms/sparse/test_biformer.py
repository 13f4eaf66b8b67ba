"""Oracles for BiFormer bi-level routing attention (CATALOG P061)."""

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.mechanisms.sparse.biformer import bra_fast, bra_reference, route_regions
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def _module(dim=8, heads=2, seed=0, dtype=torch.float64, **opts):
    torch.manual_seed(seed)
    m = attnzoo.build("biformer", dim, heads, **opts).to(dtype)
    with torch.no_grad():  # random biases too, so every path is exercised
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _grid(B, H, W, C, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, W, C, generator=g, dtype=torch.float64).to(dtype)


def _dense_module_output(m, x):
    """The module computed by hand with every region routed: dense softmax over the grid + LCE."""
    B, H, W, C = x.shape
    q, k, v = m.qkv(x).split([m.qk_dim, m.qk_dim, m.dim], dim=-1)
    hd, vd = m.qk_dim // m.heads, m.dim // m.heads
    qh = q.reshape(B, H * W, m.heads, hd).transpose(1, 2)
    kh = k.reshape(B, H * W, m.heads, hd).transpose(1, 2)
    vh = v.reshape(B, H * W, m.heads, vd).transpose(1, 2)
    att = softmax_attention(qh, kh, vh, scale=m.scale).transpose(1, 2).reshape(B, H, W, C)
    lce = F.conv2d(v.permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias, padding=m.side_dwconv // 2, groups=C)
    return m.wo(att + lce.permute(0, 2, 3, 1))


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("shape,n_win", [((2, 6, 6), 3), ((1, 4, 8), 2)])
def test_all_regions_routed_is_dense_attention_plus_lce(backend, shape, n_win):
    B, H, W = shape
    m = _module(n_win=n_win, topk=n_win * n_win, side_dwconv=3)
    m.backend = backend
    x = _grid(B, H, W, 8)
    assert_close(m(x), _dense_module_output(m, x), torch.float64, f"biformer {backend} topk=S^2 vs dense")


def _explicit_region_mask(r_idx, H, W, n_win):
    """Region-block mask by explicit loops over tokens (independent of attnzoo's routed_mask)."""
    B = r_idx.shape[0]
    rh, rw = H // n_win, W // n_win
    N = H * W
    mask = torch.zeros(B, 1, N, N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            ri = (i // W) // rh * n_win + (i % W) // rw
            for j in range(N):
                rj = (j // W) // rh * n_win + (j % W) // rw
                mask[b, 0, i, j] = bool((r_idx[b, ri] == rj).any())
    return mask


@pytest.mark.parametrize("H,W,n_win,topk", [(6, 6, 3, 2), (4, 6, 2, 3), (8, 4, 2, 1)])
def test_gathered_equals_dense_sdpa_with_region_block_mask(H, W, n_win, topk):
    g = torch.Generator().manual_seed(3)
    B, heads, N, d = 2, 2, H * W, 5
    q, k = (torch.randn(B, heads, N, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, heads, N, 3, generator=g, dtype=torch.float64)
    r_idx = torch.stack([torch.randperm(n_win * n_win, generator=g)[:topk] for _ in range(B * n_win * n_win)])
    r_idx = r_idx.view(B, n_win * n_win, topk)
    mask = _explicit_region_mask(r_idx, H, W, n_win)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.4)
    got = bra_fast(q, k, v, r_idx, height=H, width=W, n_win=n_win, scale=0.4)
    ref = bra_reference(q, k, v, r_idx, height=H, width=W, n_win=n_win, scale=0.4)
    assert_close(got, want, torch.float64, "gathered routed attention vs SDPA with explicit region mask")
    assert_close(ref, want, torch.float64, "reference routed attention vs SDPA with explicit region mask")


def test_fast_equals_reference_outputs_and_all_gradients():
    x = _grid(2, 8, 4, 8).requires_grad_(True)
    m = _module(n_win=4, topk=3)
    res = {}
    for backend in ("reference", "fast"):
        m.backend = backend
        m.zero_grad()
        xi = x.detach().clone().requires_grad_(True)
        out = m(xi)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        res[backend] = (out.detach(), xi.grad, {n: p.grad.clone() for n, p in m.named_parameters()})
    (ro, rx, rp), (fo, fx, fp) = res["reference"], res["fast"]
    assert_close(fo, ro, torch.float64, "output")
    assert_close(fx, rx, torch.float64, "grad x")
    for n in rp:
        assert_close(fp[n], rp[n], torch.float64, f"grad {n}")


def test_fast_float32_close_to_reference():
    m = _module(n_win=2, topk=2, dtype=torch.float32)
    x = _grid(1, 6, 8, 8, dtype=torch.float32)
    m.backend = "reference"
    ref = m(x)
    m.backend = "fast"
    assert_close(m(x), ref, torch.float32, "float32 fast vs reference")


def test_gradcheck_fast_kernel():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 16, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    r_idx = torch.tensor([[[0, 1], [3, 1], [2, 0], [3, 2]]])
    fn = lambda q, k, v: bra_fast(q, k, v, r_idx, height=4, width=4, n_win=2, scale=0.5)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_routing_hand_computed():
    # Region means chosen so that region r's best partner is known: q_r . k_s largest for s = (r + 1) % 4.
    kr = torch.eye(4, dtype=torch.float64).unsqueeze(0)  # (1, 4, 4)
    qr = torch.roll(torch.eye(4, dtype=torch.float64), shifts=1, dims=1).unsqueeze(0) * 3 + 0.1 * kr
    idx = route_regions(qr, kr, topk=2, scale=1.0)
    assert idx[0, :, 0].tolist() == [1, 2, 3, 0]
    assert idx[0, :, 1].tolist() == [0, 1, 2, 3]  # the 0.1 self term is second


def test_routing_and_output_equivariant_to_permutations_inside_regions():
    m = _module(n_win=2, topk=2, side_dwconv=0)  # LCE (a convolution) is not permutation invariant
    x = _grid(2, 4, 4, 8)
    # permute tokens inside every 2x2 region with the same permutation
    perm_in_region = torch.tensor([3, 1, 0, 2])
    idx = torch.arange(16).view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)  # region-major token ids
    new = idx.clone()
    new[:, :] = idx[:, perm_in_region]
    src = torch.empty(16, dtype=torch.long)
    src[idx.reshape(-1)] = new.reshape(-1)  # token at raster position p is taken from src[p]
    xp = x.reshape(2, 16, 8)[:, src].reshape(2, 4, 4, 8)
    for backend in ("reference", "fast"):
        m.backend = backend
        out, outp = m(x), m(xp)
        assert_close(outp, out.reshape(2, 16, 8)[:, src].reshape(2, 4, 4, 8), torch.float64,
                     f"{backend}: permuting inside regions permutes the output")
    q, k, _ = m.qkv(x).split([8, 8, 8], dim=-1)
    qp, kp, _ = m.qkv(xp).split([8, 8, 8], dim=-1)
    mean = lambda t: t.view(2, 2, 2, 2, 2, 8).mean(dim=(2, 4)).reshape(2, 4, 8)
    assert torch.equal(route_regions(mean(q), mean(k), 2, m.scale), route_regions(mean(qp), mean(kp), 2, m.scale))


def test_sparse_is_not_dense_when_topk_small():
    m = _module(n_win=3, topk=1)
    x = _grid(1, 6, 6, 8)
    assert (m(x) - _dense_module_output(m, x)).abs().max() > 1e-3


def test_errors():
    m = _module(n_win=3, topk=2)
    assert m(_grid(1, 5, 7, 8)).shape == (1, 5, 7, 8)  # auto_pad: padded (masked), not refused
    with pytest.raises(ValueError, match=r"x: expected \(B, H, W, 8\)"):
        m(_grid(1, 6, 6, 4))
    with pytest.raises(ValueError, match="topk"):
        _module(n_win=2, topk=5)(_grid(1, 4, 4, 8))
    with pytest.raises(ValueError, match="backend"):
        attnzoo.build("biformer", 8, 2, backend="dense")
    with pytest.raises(ValueError, match="n_win"):
        attnzoo.build("biformer", 8, 2, n_win=0)
    with pytest.raises(ValueError, match="heads"):
        attnzoo.build("biformer", 8, 3)
