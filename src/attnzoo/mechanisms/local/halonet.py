"""HaloNet blocked local self-attention with halos and factorised relative position logits.

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", Vaswani et al.,
arXiv 2103.12731 (catalog P080). No official code was released; timm's ``HaloAttn``
(https://github.com/huggingface/pytorch-image-models, ``timm/layers/halo_attn.py``) is the maintained
re-implementation and the one this module was checked against for structure.
The grid is cut into non-overlapping b x b query blocks; each block attends to the (b + 2h) x (b + 2h)
window centred on it (halo h). Logits are q . k + q . r_row[dy] + q . r_col[dx] with learned relative
embeddings per row and column offset (dy, dx = key minus query position, |dy|, |dx| <= b + h - 1).

Choices where the paper is silent (each an option or stated here):
- Scale: ``head_dim ** -0.5`` multiplies both the content and the position logits (timm's
  ``scale_pos_embed=True``); the relative embeddings start at normal(0, head_dim ** -0.5).
- ``mask_padding`` (default True): keys in the zero padding outside the image are masked. With False they
  take part as zero keys and values (what timm's unfold-based code does: they still get exp(q . r) weight).
- Projections: q and kv Linear without bias (timm's qkv_bias=False) and an output Linear (the paper's
  bottleneck block follows attention with a 1x1 convolution; here it belongs to the module).
- The strided (query-pooling) variant is not implemented.
- Any grid size: timm's ``HaloAttn`` asserts that H and W are multiples of the block size; here a grid that the
  block does not divide is zero-padded at the bottom/right to the next multiple (as Swin/HAT pad to a window
  multiple), the padded keys are always masked (whatever ``mask_padding`` says about the halo border), the padded
  queries' outputs are cropped. A divisible grid takes the unchanged path.

Forms: ``reference`` = dense softmax of every query over the whole zero-padded grid with the block+halo mask
(:func:`halo_mask`) and the relative logits scattered into a dense bias; ``fast`` = per-block tiles against
their gathered halo windows with :func:`attnzoo.kernels.grid.tile_attention` (recomputing backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_bool, check_heads, check_int, check_module_input
from ...kernels.grid import from_tiles, tile_attention, to_tiles
from ...masks import Predicate, materialize
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register


def halo_mask(height: int, width: int, block: int, halo: int, *, mask_padding: bool = True,
              extent: tuple[int, int] | None = None) -> Predicate:
    """Predicate: query ``q_idx`` of the H x W grid (row-major) sees key ``kv_idx`` of the zero-padded
    (H + 2 halo) x (W + 2 halo) grid iff the key lies in the halo window of the query's block (and, with
    ``mask_padding``, inside the image). ``extent`` (He, We) <= (H, W): the grid is a real He x We image padded
    to block multiples; keys at rows >= He or columns >= We inside the grid are always masked."""
    wp = width + 2 * halo
    he, we = (height, width) if extent is None else extent

    def halo_mask_mod(b, h, q_idx, kv_idx):
        qr, qc = torch.div(q_idx, width, rounding_mode="floor"), torch.remainder(q_idx, width)
        kr = torch.div(kv_idx, wp, rounding_mode="floor") - halo  # image coordinates of the key
        kc = torch.remainder(kv_idx, wp) - halo
        br = torch.div(qr, block, rounding_mode="floor") * block
        bc = torch.div(qc, block, rounding_mode="floor") * block
        ok = (kr >= br - halo) & (kr < br + block + halo) & (kc >= bc - halo) & (kc < bc + block + halo)
        if mask_padding:
            ok = ok & (kr >= 0) & (kr < height) & (kc >= 0) & (kc < width)
        if (he, we) != (height, width):  # the block-multiple padding (inside the grid, outside the image): never
            grid = (kr >= 0) & (kr < height) & (kc >= 0) & (kc < width)
            ok = ok & ~(grid & ((kr >= he) | (kc >= we)))
        return ok

    return halo_mask_mod


def _block_padded(q, k, v, block):
    """q, k, v zero-padded at the bottom/right to block multiples, and the real (H, W)."""
    H, W = q.shape[2], q.shape[3]
    hb, wb = -(-H // block) * block, -(-W // block) * block
    if (hb, wb) == (H, W):
        return q, k, v, (H, W)
    pad = lambda t: F.pad(t, (0, 0, 0, wb - W, 0, hb - H))  # (B, h, Hb, Wb, d)
    return pad(q), pad(k), pad(v), (H, W)


def halo_reference(q, k, v, rel_h, rel_w, *, block, halo, scale, mask_padding):
    """Dense reference. q, k, v (B, h, H, W, d); rel_h, rel_w (2(b+halo)-1, d) -> (B, h, H, W, d)."""
    q, k, v, (He, We) = _block_padded(q, k, v, block)
    B, h, H, W, d = q.shape
    Hp, Wp = H + 2 * halo, W + 2 * halo
    pad = lambda t: F.pad(t, (0, 0, halo, halo, halo, halo))  # (B, h, Hp, Wp, d), zeros outside
    n, npad = H * W, Hp * Wp
    mask = materialize(halo_mask(H, W, block, halo, mask_padding=mask_padding, extent=(He, We)), 1, 1, n, npad,
                       device=q.device)
    off = block + halo - 1
    dy = (torch.arange(Hp, device=q.device).view(1, Hp) - halo - torch.arange(H, device=q.device).view(H, 1))
    dx = (torch.arange(Wp, device=q.device).view(1, Wp) - halo - torch.arange(W, device=q.device).view(W, 1))
    RH = rel_h[(dy + off).clamp(0, 2 * off)]  # (H, Hp, d): embedding of key row minus query row
    RW = rel_w[(dx + off).clamp(0, 2 * off)]  # (W, Wp, d)
    lh = torch.einsum("bhijd,ird->bhijr", q, RH)  # (B, h, H, W, Hp)
    lw = torch.einsum("bhijd,jcd->bhijc", q, RW)  # (B, h, H, W, Wp)
    bias = (lh.unsqueeze(-1) + lw.unsqueeze(-2)).reshape(B, h, n, npad) * scale  # (B, h, N, Np)
    out = softmax_attention(q.reshape(B, h, n, d), pad(k).reshape(B, h, npad, d), pad(v).reshape(B, h, npad, -1),
                            attn_mask=mask, bias=bias, scale=scale)  # (B, h, N, d)
    return out.view(B, h, H, W, -1)[:, :, :He, :We]


def _window_index(H: int, W: int, block: int, halo: int, device,
                  extent: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Flat indices into the padded grid of every block's halo window (T*win*win,), the padding mask
    (T, win*win) True where the key is outside the grid, and (with ``extent`` (He, We) < (H, W)) the block-padding
    mask (T, win*win) True where the key is at a row >= He or a column >= We of the grid (else None)."""
    win, Wp = block + 2 * halo, W + 2 * halo
    nh, nw = H // block, W // block
    r = (torch.arange(nh, device=device).view(nh, 1) * block + torch.arange(win, device=device).view(1, win))
    c = (torch.arange(nw, device=device).view(nw, 1) * block + torch.arange(win, device=device).view(1, win))
    idx = (r.view(nh, 1, win, 1) * Wp + c.view(1, nw, 1, win)).reshape(-1)  # (nh*nw*win*win,)
    out_r = (r < halo) | (r >= H + halo)  # (nh, win)
    out_c = (c < halo) | (c >= W + halo)  # (nw, win)
    padding = (out_r.view(nh, 1, win, 1) | out_c.view(1, nw, 1, win)).reshape(nh * nw, win * win)
    if extent is None or tuple(extent) == (H, W):
        return idx, padding, None
    he, we = extent
    grid = ~out_r.view(nh, 1, win, 1) & ~out_c.view(1, nw, 1, win)  # keys inside the (padded) grid
    fr, fc = r >= he + halo, c >= we + halo  # rows / columns beyond the image
    forced = (grid & (fr.view(nh, 1, win, 1) | fc.view(1, nw, 1, win))).reshape(nh * nw, win * win)
    return idx, padding, forced


def halo_fast(q, k, v, rel_h, rel_w, *, block, halo, scale, mask_padding):
    """Blocked attention: b*b query tiles against their (b+2h)^2 windows, O(HW (b+2h)^2 d)."""
    q, k, v, (He, We) = _block_padded(q, k, v, block)
    B, h, H, W, d = q.shape
    win = block + 2 * halo
    nh, nw = H // block, W // block
    T, Q, R = nh * nw, block * block, win * win
    idx, padding, forced = _window_index(H, W, block, halo, q.device, extent=(He, We))
    pad = lambda t: F.pad(t, (0, 0, halo, halo, halo, halo)).reshape(B, h, -1, t.shape[-1])  # (B, h, Hp*Wp, d)
    qt = to_tiles(q, block, block, nh, nw)  # (B, h, T, Q, d)
    kt = pad(k).index_select(2, idx).view(B, h, T, R, d)  # (B, h, T, R, d)
    vt = pad(v).index_select(2, idx).view(B, h, T, R, v.shape[-1])  # (B, h, T, R, dv)
    j = torch.arange(win, device=q.device).view(1, win)
    x = torch.arange(block, device=q.device).view(block, 1)
    rel = j - x + block - 1  # (b, win): key row in window minus query row in block, shifted to >= 0
    q5 = qt.view(B, h, T, block, block, d)
    lh = torch.einsum("bhtxyd,xjd->bhtxyj", q5, rel_h[rel])  # (B, h, T, b, b, win) row logits
    lw = torch.einsum("bhtxyd,yjd->bhtxyj", q5, rel_w[rel])  # (B, h, T, b, b, win) column logits
    bias = (lh.unsqueeze(-1) + lw.unsqueeze(-2)).reshape(B, h, T, Q, R) * scale  # (B, h, T, Q, R)
    if mask_padding:
        bias = bias.masked_fill(padding.view(1, 1, T, 1, R), float("-inf"))
    if forced is not None:
        bias = bias.masked_fill(forced.view(1, 1, T, 1, R), float("-inf"))
    out = tile_attention(qt, kt, vt, scale=scale, bias=bias)  # (B, h, T, Q, dv)
    return from_tiles(out, block, block, nh, nw, H, W)[:, :, :He, :We]  # (B, h, He, We, dv)


class HaloAttention(nn.Module):
    """HaloNet attention, ``x (B, H, W, dim) -> (B, H, W, dim)``.

    Args:
        dim, heads: channels and heads (dim % heads == 0).
        block_size: query block side b (default 8); halo_size: halo h (default 3), as HaloNet's defaults.
        qkv_bias: bias of the q/kv projections (default False). mask_padding: mask keys outside the image
            (default True). backend: "auto", "fast" or "reference".
    """

    def __init__(self, dim: int, heads: int, *, block_size: int = 8, halo_size: int = 3, qkv_bias: bool = False,
                 mask_padding: bool = True, backend: str = "auto") -> None:
        super().__init__()
        dim, heads, _, _ = check_heads(dim, heads)
        check_int("block_size", block_size)
        check_int("halo_size", halo_size, low=0)
        check_bool("qkv_bias", qkv_bias)
        check_bool("mask_padding", mask_padding)
        check_backend(backend)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.block_size, self.halo_size, self.mask_padding, self.backend = block_size, halo_size, mask_padding, backend
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        span = 2 * (block_size + halo_size) - 1
        self.rel_height = nn.Parameter(torch.randn(span, self.head_dim) * self.scale)
        self.rel_width = nn.Parameter(torch.randn(span, self.head_dim) * self.scale)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, block_size={self.block_size}, halo_size={self.halo_size}, "
                f"mask_padding={self.mask_padding}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_module_input(self, x, layout="(B, H, W, C)", channels=self.dim)
        B, H, W, C = x.shape
        check_backend(self.backend)
        split = lambda t: t.view(B, H, W, self.heads, self.head_dim).permute(0, 3, 1, 2, 4)  # (B, h, H, W, d)
        q = split(self.q(x))
        k, v = (split(t) for t in self.kv(x).chunk(2, dim=-1))
        fn = halo_reference if self.backend == "reference" else halo_fast
        out = fn(q, k, v, self.rel_height, self.rel_width, block=self.block_size, halo=self.halo_size,
                 scale=self.scale, mask_padding=self.mask_padding)  # (B, h, H, W, d)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))  # (B, H, W, dim)


HALONET = register(Mechanism(
    name="halonet",
    aliases=("halo_attention", "halo"),
    family="local",
    kind="grid",
    catalog="P080",
    title="Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
    arxiv="2103.12731",
    code="https://github.com/huggingface/pytorch-image-models (timm HaloAttn; no official code)",
    summary="b x b query blocks attend to their (b + 2h) x (b + 2h) halo windows, with factorised relative "
            "position logits q . r_dy + q . r_dx.",
    patterns=("noncausal_self",),
    exact=True,
    complexity="time O(HW (b + 2h)^2 d), memory O(HW (b + 2h)^2)",
    fast=halo_fast,
    module=HaloAttention,
    options=(
        Option("block_size", 8, int, low=1, doc="query block side b (other grids are padded to multiples, masked)"),
        Option("halo_size", 3, int, low=0, doc="halo h around each block"),
        Option("qkv_bias", False, bool, doc="bias of the q and kv projections"),
        Option("mask_padding", True, bool, doc="mask keys in the zero padding outside the image"),
    ),
    test_options={"block_size": 2, "halo_size": 1},
    test_sizes={"height": 6, "width": 8},
    notes="kind 'grid': x (B, H, W, C) -> (B, H, W, C). halo_size >= grid size with one block is global "
          "attention plus relative logits.",
))
