"""Oracles of TransNeXt aggregated attention (P115): a port of the official unfold-based forward in the
official (B, N, C) / (B, C, H, W) layout, local-only limit = cosine neighbourhood attention (loop), window over
the whole image = dense cosine attention, hand-computed length scale and CPB coordinates, fast == reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.mechanisms.local.transnext_aggregated import (
    AggregatedAttention,
    aggregated_fast,
    aggregated_reference,
    local_geometry,
    relative_position_cpb,
)
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def _official_forward(m: AggregatedAttention, x: torch.Tensor) -> torch.Tensor:
    """The official AggregatedAttention.forward, transcribed on (B, N, C) tokens with nn.Unfold semantics."""
    B, H, W, C = x.shape
    N, h, d, k = H * W, m.heads, m.head_dim, m.window
    Ph, Pw = m.pool_size
    P, L = Ph * Pw, k * k
    xt = x.reshape(B, N, C)
    ones = torch.ones(1, 1, H, W, dtype=x.dtype)
    attn_map = F.unfold(ones, k, padding=k // 2)  # (1, k*k, N)
    local_len = attn_map.sum(-2).squeeze().unsqueeze(-1)  # (N, 1)
    padding_mask = attn_map.squeeze(0).permute(1, 0) == 0  # (N, k*k)
    seq_scale = torch.log(local_len + P)
    q_norm = F.normalize(m.q(xt).reshape(B, N, h, d).permute(0, 2, 1, 3), dim=-1)
    q_scaled = (q_norm + m.query_embedding) * F.softplus(m.temperature) * seq_scale
    k_loc, v_loc = m.kv(xt).chunk(2, dim=-1)
    k_loc = F.normalize(k_loc.reshape(B, N, h, d), dim=-1).reshape(B, N, -1)
    kv_loc = torch.cat([k_loc, v_loc], dim=-1).permute(0, 2, 1).reshape(B, -1, H, W)
    k_loc, v_loc = F.unfold(kv_loc, k, padding=k // 2).reshape(B, 2 * h, d, L, N).permute(0, 1, 4, 2, 3).chunk(2, 1)
    attn_loc = ((q_scaled.unsqueeze(-2) @ k_loc).squeeze(-2) + m.relative_pos_bias_local.unsqueeze(1))
    attn_loc = attn_loc.masked_fill(padding_mask, float("-inf"))
    x_ = xt.permute(0, 2, 1).reshape(B, -1, H, W)
    x_ = F.conv2d(x_, m.sr.weight.view(C, C, 1, 1), m.sr.bias)  # sr is a 1x1 convolution
    x_ = F.adaptive_avg_pool2d(F.gelu(x_), (Ph, Pw)).reshape(B, -1, P).permute(0, 2, 1)
    x_ = m.norm(x_)
    kv_pool = m.kv(x_).reshape(B, P, 2 * h, d).permute(0, 2, 1, 3)
    k_pool, v_pool = kv_pool.chunk(2, dim=1)
    idx, table = relative_position_cpb((H, W), (Ph, Pw), m.pretrain_size or (H, W))
    pool_bias = m.cpb_fc2(torch.relu(m.cpb_fc1(table.to(x.dtype)))).transpose(0, 1)[:, idx.view(-1)].view(-1, N, P)
    attn_pool = q_scaled @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + pool_bias
    attn = torch.cat([attn_loc, attn_pool], dim=-1).softmax(dim=-1)
    attn_loc, attn_pool = torch.split(attn, [L, P], dim=-1)
    x_loc = (((q_norm @ m.learnable_tokens) + m.learnable_bias + attn_loc).unsqueeze(-2)
             @ v_loc.transpose(-2, -1)).squeeze(-2)
    out = (x_loc + attn_pool @ v_pool).transpose(1, 2).reshape(B, N, C)
    return m.proj(out).view(B, H, W, C)


def _module(dim=8, heads=2, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = AggregatedAttention(dim, heads, **kw).to(dtype)
    with torch.no_grad():  # the learnable bias starts at zero: give it a value so its path is exercised
        m.learnable_bias.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("H,W,window,pool", [(5, 6, 3, 2), (7, 7, 5, 3), (4, 9, 3, (2, 3)), (1, 6, 3, 1)])
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_matches_official_forward(H, W, window, pool, backend):
    m = _module(window_size=window, pool_size=pool, cpb_hidden=16)
    m.backend = backend
    x = torch.randn(2, H, W, 8, dtype=torch.float64)
    assert_close(m(x), _official_forward(m, x), torch.float64, f"{backend} vs official forward")


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_local_only_is_cosine_neighbourhood_attention():
    """Pool branch and learnable tokens removed: a clipped k x k window with cosine logits (+ local bias)."""
    B, h, H, W, d, k = 1, 2, 5, 4, 3, 3
    q, kk = 4 * _unit(B, h, H, W, d), _unit(B, h, H, W, d, seed=1)
    v = torch.randn(B, h, H, W, d, dtype=torch.float64)
    lb = torch.randn(h, k * k, dtype=torch.float64)
    empty = torch.zeros(B, h, 0, d, dtype=torch.float64)
    got = aggregated_fast(q, q, kk, v, empty, empty, lb, torch.zeros(h, H * W, 0, dtype=torch.float64), None, None,
                          window=k)
    want = torch.zeros_like(got)
    for r in range(H):
        for c in range(W):
            logits, vals = [], []
            for a in range(k):
                for b in range(k):
                    r2, c2 = r + a - 1, c + b - 1
                    if 0 <= r2 < H and 0 <= c2 < W:
                        logits.append((q[:, :, r, c] * kk[:, :, r2, c2]).sum(-1) + lb[:, a * k + b])
                        vals.append(v[:, :, r2, c2])
            want[:, :, r, c] = torch.einsum("bhn,bhnd->bhd", torch.stack(logits, -1).softmax(-1), torch.stack(vals, 2))
    assert_close(got, want, torch.float64, "local-only vs loop")
    ref = aggregated_reference(q, q, kk, v, empty, empty, lb, torch.zeros(h, H * W, 0, dtype=torch.float64), None,
                               None, window=k)
    assert_close(ref, want, torch.float64, "reference local-only vs loop")


def test_window_over_the_whole_image_is_dense_cosine_attention():
    B, h, H, W, d = 1, 2, 3, 4, 3
    k = 2 * max(H, W) - 1
    q, kk = 3 * _unit(B, h, H, W, d), _unit(B, h, H, W, d, seed=1)
    v = torch.randn(B, h, H, W, d, dtype=torch.float64)
    lb = torch.randn(h, k * k, dtype=torch.float64)
    n = H * W
    bias = torch.zeros(1, h, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            bias[0, :, i, j] = lb[:, (j // W - i // W + k // 2) * k + (j % W - i % W + k // 2)]
    flat = lambda t: t.reshape(B, h, n, d)
    want = softmax_attention(flat(q), flat(kk), flat(v), bias=bias, scale=1.0).view(B, h, H, W, d)
    empty = torch.zeros(B, h, 0, d, dtype=torch.float64)
    got = aggregated_fast(q, q, kk, v, empty, empty, lb, torch.zeros(h, n, 0, dtype=torch.float64), None, None,
                          window=k)
    assert_close(got, want, torch.float64, "whole-image window vs dense cosine attention")


def test_length_scale_counts_in_image_neighbours():
    _, outside, count = local_geometry(4, 5, 3)
    grid = count.view(4, 5)
    assert grid[0, 0] == 4 and grid[0, 2] == 6 and grid[2, 2] == 9 and grid[3, 4] == 4
    assert bool((outside.sum(-1) == 9 - count).all())


def test_cpb_coordinates_hand_computed():
    idx, table = relative_position_cpb((4, 4), (2, 2), (4, 4))
    coords = table[idx].view(16, 4, 2)  # (query, pooled, (dy, dx))
    # pooled centres: adaptive average of [0, 1, 2, 3] into 2 bins -> 0.5, 2.5
    t = (0 - 0.5) / 3 * 8
    f = lambda t: math.copysign(math.log2(abs(t) + 1) / 3, t)
    assert_close(coords[0, 0], torch.tensor([f(t), f(t)]), torch.float32, "query (0,0) to pooled (0,0)", tol=1e-6)
    t2 = (3 - 0.5) / 3 * 8
    assert_close(coords[15, 0], torch.tensor([f(t2), f(t2)]), torch.float32, "query (3,3) to pooled (0,0)", tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_fast_matches_reference_gradients(dtype):
    m = _module(window_size=3, pool_size=2, cpb_hidden=16, dtype=dtype)
    x = torch.randn(2, 5, 7, 8, dtype=dtype, requires_grad=True)
    res = {}
    for backend in ("reference", "fast"):
        m.backend = backend
        m.zero_grad()
        x.grad = None
        out = m(x)
        out.square().sum().backward()
        res[backend] = (out.detach(), [x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    assert_close(res["fast"][0], res["reference"][0], dtype, "output")
    for a, b in zip(res["fast"][1], res["reference"][1]):
        assert_close(a, b, dtype, "gradient")


def test_gradcheck_fast():
    m = _module(dim=4, heads=2, window_size=3, pool_size=2, cpb_hidden=4)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


def test_errors():
    with pytest.raises(ValueError, match="window_size"):
        AggregatedAttention(8, 2, window_size=4)
    with pytest.raises(ValueError, match="heads"):
        AggregatedAttention(8, 3)
    with pytest.raises(ValueError, match="x"):
        AggregatedAttention(8, 2)(torch.randn(1, 4, 4, 6))
