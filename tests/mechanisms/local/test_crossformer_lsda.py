"""Oracles of CrossFormer LSDA (P056): explicit per-group loop, full-attention limits (SDA with G = grid, LDA
with interval 1), DPB table == per-pair MLP, fast == dense masked reference."""

import pytest
import torch

from attnzoo.mechanisms.local.crossformer_lsda import (
    CrossFormerLSDA,
    DynamicPosBias,
    lsda_fast,
    lsda_geometry,
    lsda_reference,
)
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def _qkv(B, h, H, W, d, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, H, W, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
                 for _ in range(3))


def _loop(q, k, v, table, mode, Gh, Gw, Ih, Iw, scale):
    """Group by group: collect the members' coordinates explicitly and run exact attention on them."""
    B, h, H, W, d = q.shape
    out = torch.zeros_like(q)
    if mode == "sda":
        groups = [[(gy * Gh + a, gx * Gw + b) for a in range(Gh) for b in range(Gw)]
                  for gy in range(H // Gh) for gx in range(W // Gw)]
        coord = lambda r, c: (r % Gh, c % Gw)
    else:
        groups = [[(a * Ih + i, b * Iw + j) for a in range(Gh) for b in range(Gw)]
                  for i in range(Ih) for j in range(Iw)]
        coord = lambda r, c: (r // Ih, c // Iw)
    for members in groups:
        rows = torch.tensor([r for r, _ in members])
        cols = torch.tensor([c for _, c in members])
        bias = torch.zeros(1, h, len(members), len(members), dtype=q.dtype)
        for i, (ri, ci) in enumerate(members):
            for j, (rj, cj) in enumerate(members):
                (yi, xi), (yj, xj) = coord(ri, ci), coord(rj, cj)
                bias[0, :, i, j] = table[:, yi - yj + Gh - 1, xi - xj + Gw - 1]
        o = softmax_attention(q[:, :, rows, cols], k[:, :, rows, cols], v[:, :, rows, cols], bias=bias, scale=scale)
        out[:, :, rows, cols] = o
    return out


@pytest.mark.parametrize("mode,H,W,G,I", [("sda", 6, 9, 3, None), ("sda", 4, 4, 2, None), ("lda", 6, 9, 3, None),
                                          ("lda", 8, 4, 2, None), ("lda", 6, 9, 7, 3)])
def test_matches_group_loop(mode, H, W, G, I):
    Gh, Gw, Ih, Iw = lsda_geometry(H, W, mode, G, I)
    q, k, v = _qkv(2, 2, H, W, 4)
    table = torch.randn(2, 2 * Gh - 1, 2 * Gw - 1, dtype=torch.float64)
    want = _loop(q, k, v, table, mode, Gh, Gw, Ih, Iw, 0.7)
    fast = lsda_fast(q, k, v, table, mode=mode, Gh=Gh, Gw=Gw, Ih=Ih, Iw=Iw, scale=0.7)
    flat = lambda t: t.reshape(2, 2, H * W, 4)
    ref = lsda_reference(flat(q), flat(k), flat(v), table, height=H, width=W, mode=mode, Gh=Gh, Gw=Gw, Ih=Ih, Iw=Iw,
                         scale=0.7).view(2, 2, H, W, 4)
    assert_close(fast, want, torch.float64, f"{mode} fast vs group loop")
    assert_close(ref, want, torch.float64, f"{mode} reference vs group loop")


def test_lda_interval_is_dilated_grid():
    """LDA with interval I: token (r, c) shares its group exactly with tokens congruent mod I."""
    Gh, Gw, Ih, Iw = lsda_geometry(6, 6, "lda", 3, None)
    assert (Gh, Gw, Ih, Iw) == (3, 3, 2, 2)
    assert lsda_geometry(6, 9, "lda", 99, 3) == (2, 3, 3, 3)


@pytest.mark.parametrize("mode,H,W,G,I", [("sda", 4, 5, 99, None), ("sda", 5, 5, 5, None), ("lda", 3, 4, 99, 1),
                                          ("lda", 4, 4, 4, None)])
def test_full_attention_limits(mode, H, W, G, I):
    """SDA with G = grid and LDA with interval 1 are exact attention over all tokens (+ the DPB)."""
    if mode == "sda" and G > H:
        with pytest.raises(ValueError, match="group_size"):
            lsda_geometry(H, W, mode, G, I)
        return
    Gh, Gw, Ih, Iw = lsda_geometry(H, W, mode, G, I)
    assert (Gh, Gw) == (H, W)
    q, k, v = _qkv(1, 2, H, W, 4)
    table = torch.randn(2, 2 * H - 1, 2 * W - 1, dtype=torch.float64)
    bias = torch.zeros(1, 2, H * W, H * W, dtype=torch.float64)
    for i in range(H * W):
        for j in range(H * W):
            bias[0, :, i, j] = table[:, i // W - j // W + H - 1, i % W - j % W + W - 1]
    flat = lambda t: t.reshape(1, 2, H * W, 4)
    want = softmax_attention(flat(q), flat(k), flat(v), bias=bias, scale=0.5).view(1, 2, H, W, 4)
    got = lsda_fast(q, k, v, table, mode=mode, Gh=Gh, Gw=Gw, Ih=Ih, Iw=Iw, scale=0.5)
    assert_close(got, want, torch.float64, f"{mode} full-grid group vs exact attention")


def test_one_token_groups_return_their_value():
    Gh, Gw, Ih, Iw = lsda_geometry(3, 4, "lda", 1, None)  # interval = grid: every group is one token
    q, k, v = _qkv(1, 2, 3, 4, 4)
    out = lsda_fast(q, k, v, torch.randn(2, 1, 1, dtype=torch.float64), mode="lda", Gh=Gh, Gw=Gw, Ih=Ih, Iw=Iw,
                    scale=1.0)
    assert_close(out, v, torch.float64, "one-token groups")


def test_dpb_table_equals_mlp_per_pair():
    torch.manual_seed(0)
    dpb = DynamicPosBias(8, 3).double()
    table = dpb.table(3, 4, torch.float64, "cpu")  # (3, 5, 7)
    for dy in range(-2, 3):
        for dx in range(-3, 4):
            direct = dpb(torch.tensor([[float(dy), float(dx)]], dtype=torch.float64))[0]
            assert_close(table[:, dy + 2, dx + 3], direct, torch.float64, f"DPB at ({dy}, {dx})")


@pytest.mark.parametrize("mode,group_size,interval", [("sda", 3, None), ("lda", 3, None), ("lda", 7, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_fast_matches_reference(mode, group_size, interval, dtype):
    torch.manual_seed(0)
    m = CrossFormerLSDA(16, 4, mode=mode, group_size=group_size, interval=interval, dpb_dim=8).to(dtype)
    x = torch.randn(2, 6, 12, 16, dtype=dtype, requires_grad=True)
    outs, grads = {}, {}
    for backend in ("reference", "fast"):
        m.backend = backend
        m.zero_grad()
        x.grad = None
        out = m(x)
        out.square().sum().backward()
        outs[backend] = out.detach()
        grads[backend] = [x.grad.clone(), m.qkv.weight.grad.clone(), m.pos.pos_proj.weight.grad.clone()]
    assert_close(outs["fast"], outs["reference"], dtype, "module output")
    for a, b in zip(grads["fast"], grads["reference"]):
        assert_close(a, b, dtype, "module gradient")


def test_gradcheck_fast():
    torch.manual_seed(0)
    m = CrossFormerLSDA(4, 2, mode="lda", group_size=2, dpb_dim=4).double()
    x = torch.randn(1, 4, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


def test_errors():
    # grids the groups or the interval do not divide are padded (masked), not refused
    assert CrossFormerLSDA(16, 2, group_size=4)(torch.randn(1, 6, 7, 16)).shape == (1, 6, 7, 16)
    assert CrossFormerLSDA(16, 2, mode="lda", interval=4)(torch.randn(1, 6, 6, 16)).shape == (1, 6, 6, 16)
    with pytest.raises(ValueError, match="group_size"):
        CrossFormerLSDA(16, 2, group_size=0)
    with pytest.raises(ValueError, match="interval"):
        CrossFormerLSDA(16, 2, mode="sda", interval=2)
    with pytest.raises(ValueError, match="mode"):
        CrossFormerLSDA(16, 2, mode="both")
