"""Oracles of HAT (P093): (shifted) window attention and OCAB against explicit loops, window = grid -> exact
attention with relative bias, OCAB with gamma = 0 -> window attention, alpha = 0 -> pure window block, CAB is
channel gating, module fast == dense reference (outputs and gradients)."""

import pytest
import torch

from attnzoo.mechanisms.local.hat import (
    HAB,
    ChannelAttentionBlock,
    HybridAttentionBlock,
    ocab_fast,
    ocab_reference,
    wsa_fast,
    wsa_reference,
)
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def _qkv(B, h, H, W, d, dtype=torch.float64, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, H, W, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
                 for _ in range(3))


def _wsa_loop(q, k, v, table, M, s, scale):
    """Query by query: keys in the same window of the cyclically shifted grid that did not wrap around the
    border differently (Swin's shifted-window rule), bias table[(dy + M - 1) * (2M - 1) + dx + M - 1]."""
    B, h, H, W, d = q.shape
    out = torch.zeros_like(q)
    for r in range(H):
        for c in range(W):
            keys = [(r2, c2) for r2 in range(H) for c2 in range(W)
                    if ((r2 - s) % H) // M == ((r - s) % H) // M and ((c2 - s) % W) // M == ((c - s) % W) // M
                    and (r2 < s) == (r < s) and (c2 < s) == (c < s)]
            logit = torch.stack([(q[:, :, r, c] * k[:, :, r2, c2]).sum(-1) * scale
                                 + table[(r - r2 + M - 1) * (2 * M - 1) + c - c2 + M - 1] for r2, c2 in keys], -1)
            vals = torch.stack([v[:, :, r2, c2] for r2, c2 in keys], 2)
            out[:, :, r, c] = torch.einsum("bhn,bhnd->bhd", logit.softmax(-1), vals)
    return out


def _ocab_loop(q, k, v, table, M, Mo, scale):
    B, h, H, W, d = q.shape
    pad, span = (Mo - M) // 2, M + Mo - 1
    out = torch.zeros_like(q)
    for r in range(H):
        for c in range(W):
            br, bc = r // M * M, c // M * M
            logits, vals = [], []
            for r2 in range(br - pad, br - pad + Mo):
                for c2 in range(bc - pad, bc - pad + Mo):
                    inside = 0 <= r2 < H and 0 <= c2 < W
                    kk = k[:, :, r2, c2] if inside else torch.zeros(B, h, d, dtype=q.dtype)
                    vals.append(v[:, :, r2, c2] if inside else torch.zeros(B, h, d, dtype=q.dtype))
                    idx = (r2 - r + pad + M - 1) * span + (c2 - c + pad + M - 1)
                    logits.append((q[:, :, r, c] * kk).sum(-1) * scale + table[idx])
            p = torch.stack(logits, -1).softmax(-1)
            out[:, :, r, c] = torch.einsum("bhn,bhnd->bhd", p, torch.stack(vals, 2))
    return out


@pytest.mark.parametrize("H,W,M,s", [(6, 6, 3, 0), (6, 6, 3, 1), (4, 6, 2, 1), (6, 9, 3, 2), (3, 3, 3, 1)])
def test_window_attention_matches_loop(H, W, M, s):
    q, k, v = _qkv(2, 2, H, W, 4)
    table = torch.randn((2 * M - 1) ** 2, 2, dtype=torch.float64)
    want = _wsa_loop(q, k, v, table, M, s, 0.5)
    for fn in (wsa_fast, wsa_reference):
        assert_close(fn(q, k, v, table, window=M, shift=s, scale=0.5), want, torch.float64, f"{fn.__name__}")


def test_window_equal_to_grid_is_exact_attention_with_relative_bias():
    M = 4
    q, k, v = _qkv(1, 2, M, M, 3)
    table = torch.randn((2 * M - 1) ** 2, 2, dtype=torch.float64)
    n = M * M
    bias = torch.stack([torch.stack([table[(i // M - j // M + M - 1) * (2 * M - 1) + i % M - j % M + M - 1]
                                     for j in range(n)], -1) for i in range(n)], -2)  # (heads, N, N)
    flat = lambda t: t.reshape(1, 2, n, 3)
    want = softmax_attention(flat(q), flat(k), flat(v), bias=bias.unsqueeze(0), scale=0.5).view(1, 2, M, M, 3)
    assert_close(wsa_fast(q, k, v, table, window=M, shift=0, scale=0.5), want, torch.float64, "single window")


@pytest.mark.parametrize("H,W,M,Mo", [(6, 6, 3, 5), (4, 6, 2, 4), (4, 4, 2, 2), (6, 3, 3, 7)])
def test_ocab_matches_loop(H, W, M, Mo):
    q, k, v = _qkv(2, 2, H, W, 3)
    table = torch.randn((M + Mo - 1) ** 2, 2, dtype=torch.float64)
    want = _ocab_loop(q, k, v, table, M, Mo, 0.7)
    for fn in (ocab_fast, ocab_reference):
        assert_close(fn(q, k, v, table, window=M, overlap=Mo, scale=0.7), want, torch.float64, f"{fn.__name__}")


def test_ocab_without_overlap_is_window_attention():
    """gamma = 0: key windows = query windows; OCAB's table is indexed key-minus-query, WSA's query-minus-key."""
    M = 3
    q, k, v = _qkv(2, 2, 6, 9, 4)
    table = torch.randn((2 * M - 1) ** 2, 2, dtype=torch.float64)
    flipped = table.view(2 * M - 1, 2 * M - 1, 2).flip(0, 1).reshape(-1, 2)
    assert_close(ocab_fast(q, k, v, table, window=M, overlap=M, scale=0.5),
                 wsa_fast(q, k, v, flipped, window=M, shift=0, scale=0.5), torch.float64, "OCAB gamma=0 vs WSA")


def test_channel_attention_block_is_channel_gating():
    torch.manual_seed(0)
    cab = ChannelAttentionBlock(12, compress_ratio=3, squeeze_factor=4).double()
    x = torch.randn(2, 12, 5, 6, dtype=torch.float64)
    body = cab.body(x)
    gate = cab(x) / body  # (B, C, H, W): one weight per (batch, channel), in (0, 1)
    assert_close(gate, gate[:, :, :1, :1].expand_as(gate), torch.float64, "gate constant over space")
    assert bool(((gate > 0) & (gate < 1)).all())
    mean = body.mean(dim=(2, 3), keepdim=True)
    a = cab.attention
    want = torch.sigmoid(a[3](torch.relu(a[1](mean))))
    assert_close(gate[:, :, :1, :1], want, torch.float64, "gate = sigmoid(up(relu(down(GAP))))")


def test_conv_scale_zero_is_pure_window_block():
    torch.manual_seed(0)
    hab = HAB(8, 2, window_size=2, shift_size=1, compress_ratio=2, squeeze_factor=2, conv_scale=0.0).double()
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    base = hab(x)
    with torch.no_grad():
        for p in hab.conv_block.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(hab(x), base), "alpha = 0: the CAB branch must not matter"
    hab.conv_scale = 0.01
    assert (hab(x) - base).abs().max() > 1e-6, "alpha > 0: the CAB branch must matter"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shift,ocab", [(0, True), (1, True), (1, False)])
def test_module_fast_matches_reference(dtype, shift, ocab):
    torch.manual_seed(0)
    m = HybridAttentionBlock(8, 2, window_size=3, shift_size=shift, overlap_ratio=0.67, compress_ratio=2,
                             squeeze_factor=2, ocab=ocab).to(dtype)
    x = torch.randn(2, 6, 9, 8, dtype=dtype, requires_grad=True)
    res = {}
    for backend in ("reference", "fast"):
        m.backend = backend
        m.zero_grad()
        x.grad = None
        out = m(x)
        out.square().sum().backward()
        grads = [x.grad.clone(), m.hab.relative_position_bias_table.grad.clone(), m.hab.qkv.weight.grad.clone()]
        if ocab:
            grads += [m.ocab.relative_position_bias_table.grad.clone(), m.ocab.qkv.weight.grad.clone()]
        res[backend] = (out.detach(), grads)
    assert_close(res["fast"][0], res["reference"][0], dtype, "module output")
    for a, b in zip(res["fast"][1], res["reference"][1]):
        assert_close(a, b, dtype, "module gradient")


def test_gradcheck_fast():
    torch.manual_seed(0)
    m = HybridAttentionBlock(4, 2, window_size=2, shift_size=1, overlap_ratio=1.0, compress_ratio=2,
                             squeeze_factor=2).double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


def test_errors():
    # a grid the window does not divide is padded (masked), not refused
    assert HybridAttentionBlock(8, 2, window_size=4, compress_ratio=2, squeeze_factor=2)(
        torch.randn(1, 6, 7, 8)).shape == (1, 6, 7, 8)
    with pytest.raises(ValueError, match="overlap_ratio"):
        HybridAttentionBlock(8, 2, window_size=4, overlap_ratio=0.25, compress_ratio=2, squeeze_factor=2)
    with pytest.raises(ValueError, match="squeeze_factor"):
        HybridAttentionBlock(8, 2, window_size=4)
    with pytest.raises(ValueError, match="shift_size"):
        HybridAttentionBlock(8, 2, window_size=4, shift_size=4, compress_ratio=2, squeeze_factor=2)
    with pytest.raises(ValueError, match="backend"):
        HybridAttentionBlock(8, 2, window_size=4, compress_ratio=2, squeeze_factor=2).backend = "flex"
