"""HaloNet (P080) against timm's ``HaloAttn`` forward, written out from ``timm/layers/halo_attn.py`` (no official code
exists; timm is the implementation users know): copied weights, max abs diff < 1e-5 in float32.

The correspondence: timm's kv 1x1 conv interleaves each head's key and value channels ([k_h, v_h] per head), ours
is [all keys, all values]; timm's relative tables have 2 (b + 2h) - 1 rows of which rows 2h.. are reachable, ours
hold exactly those 2 (b + h) - 1; timm pads the halo with zero keys that take part in the softmax
(``mask_padding=False`` here); timm has no output projection (ours is set to the identity); attnzoo scales the
position logits with the content ones, timm's ``scale_pos_embed=True``."""

import pytest
import torch
import torch.nn.functional as F

from attnzoo.mechanisms.local.halonet import HaloAttention


def rel_logits_1d(q, rel_k, permute_mask):
    B, H, W, dim = q.shape
    rel_size = rel_k.shape[0]
    win_size = (rel_size + 1) // 2
    x = (q @ rel_k.transpose(-1, -2))
    x = x.reshape(-1, W, rel_size)
    x_pad = F.pad(x, [0, 1]).flatten(1)
    x_pad = F.pad(x_pad, [0, rel_size - W])
    x_pad = x_pad.reshape(-1, W + 1, rel_size)
    x = x_pad[:, :W, win_size - 1:]
    x = x.reshape(B, H, 1, W, win_size).expand(-1, -1, win_size, -1, -1)
    return x.permute(permute_mask)


def pos_embed(q, block_size, dim_head, height_rel, width_rel):
    B, BB, HW, _ = q.shape
    q = q.reshape(-1, block_size, block_size, dim_head)
    rel_logits_w = rel_logits_1d(q, width_rel, permute_mask=(0, 1, 3, 2, 4))
    q = q.transpose(1, 2)
    rel_logits_h = rel_logits_1d(q, height_rel, permute_mask=(0, 3, 1, 4, 2))
    return (rel_logits_h + rel_logits_w).reshape(B, BB, HW, -1)


def timm_halo_attn(x, q_w, kv_w, height_rel, width_rel, *, num_heads, block_size, halo_size):
    """``HaloAttn.forward`` (stride 1, scale_pos_embed=True, no qkv bias), written out; x (B, C, H, W)."""
    B, C, H, W = x.shape
    dim_head_qk = q_w.shape[0] // num_heads
    dim_head_v = (kv_w.shape[0] - q_w.shape[0]) // num_heads
    win_size = block_size + 2 * halo_size
    scale = dim_head_qk ** -0.5
    nh, nw = H // block_size, W // block_size
    num_blocks = nh * nw
    q = F.conv2d(x, q_w)
    q = q.reshape(-1, dim_head_qk, nh, block_size, nw, block_size).permute(0, 1, 3, 5, 2, 4)
    q = q.reshape(B * num_heads, dim_head_qk, -1, num_blocks).transpose(1, 3)
    kv = F.conv2d(x, kv_w)
    kv = F.pad(kv, [halo_size, halo_size, halo_size, halo_size])
    kv = kv.unfold(2, win_size, block_size).unfold(3, win_size, block_size).reshape(
        B * num_heads, dim_head_qk + dim_head_v, num_blocks, -1).permute(0, 2, 3, 1)
    k, v = torch.split(kv, [dim_head_qk, dim_head_v], dim=-1)
    attn = (q @ k.transpose(-1, -2) + pos_embed(q, block_size, dim_head_qk, height_rel, width_rel)) * scale
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 3)
    out = out.reshape(-1, block_size, block_size, nh, nw)
    return out.permute(0, 3, 1, 4, 2).contiguous().view(B, num_heads * dim_head_v, H, W)


@pytest.mark.parametrize("H,W,block,halo", [(16, 16, 8, 3), (8, 12, 4, 2), (6, 6, 3, 1)])
def test_parity_with_timm_halo_attn(H, W, block, halo):
    torch.manual_seed(0)
    dim, heads = 32, 4
    d = dim // heads
    ours = HaloAttention(dim, heads, block_size=block, halo_size=halo, mask_padding=False)
    with torch.no_grad():
        ours.proj.weight.copy_(torch.eye(dim))
        ours.proj.bias.zero_()
    win = block + 2 * halo
    g = torch.Generator().manual_seed(1)
    height_rel = torch.randn(2 * win - 1, d, generator=g) * d ** -0.5
    width_rel = torch.randn(2 * win - 1, d, generator=g) * d ** -0.5
    with torch.no_grad():
        ours.rel_height.copy_(height_rel[2 * halo:])
        ours.rel_width.copy_(width_rel[2 * halo:])
    q_w = ours.q.weight.view(dim, dim, 1, 1)
    wk, wv = ours.kv.weight.chunk(2, dim=0)  # (dim, dim) each, heads outer
    kv_w = torch.cat([wk.view(heads, d, dim), wv.view(heads, d, dim)], dim=1).reshape(2 * dim, dim, 1, 1)
    x = torch.randn(2, H, W, dim)
    want = timm_halo_attn(x.permute(0, 3, 1, 2), q_w, kv_w, height_rel, width_rel, num_heads=heads,
                          block_size=block, halo_size=halo)
    for backend in ("fast", "reference"):
        ours.backend = backend
        with torch.no_grad():
            got = ours(x).permute(0, 3, 1, 2)
        assert (got - want).abs().max().item() < 1e-5, backend
