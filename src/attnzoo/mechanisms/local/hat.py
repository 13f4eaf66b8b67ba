"""HAT: hybrid attention block (window attention + channel attention) and overlapping cross-attention.

Paper: "Activating More Pixels in Image Super-Resolution Transformer" / "HAT: Hybrid Attention Transformer
for Image Restoration", Chen et al., arXiv 2205.04437 / 2309.05239 (catalog P093).
Official code: https://github.com/XPixelGroup/HAT (``basicsr/archs/hat_arch.py``)
- HAB: X' = X + WSA(LN X) + alpha * CAB(LN X), then X' + MLP(LN X'). WSA is (shifted) window self-attention
  on M x M windows with a relative position bias; CAB = conv3x3 (C -> C/beta) -> GELU -> conv3x3 -> channel
  attention (global average pool -> 1x1 conv C -> C/s -> ReLU -> 1x1 conv -> sigmoid -> scale).
- OCAB: queries from non-overlapping M x M windows, keys/values from the overlapping M_o x M_o windows
  around them (M_o = M + int(gamma * M), zero padding at the image border, as the official unfold) with a
  relative position bias over the (M + M_o - 1)^2 offsets; then a projection, a residual and an MLP.

The registered module (:class:`HybridAttentionBlock`) is one HAB followed by one OCAB, the attention part of
a residual hybrid attention group (RHAG) at depth one. Inside it, CAB works on (B, C, H, W) maps as the paper
does: the channels-last grid is permuted to channels-first for the convolutions and back, so the whole block is
one grid module ``(B, H, W, C) -> (B, H, W, C)``. :class:`HAB` and :class:`OCAB` are usable on their own.

Choices and differences from the official code:
- Shifted-window masking is exact (masked scores are dropped), where the official code adds -100 to them
  (their weight there is below exp(-100), about 4e-44 of the row).
- The OCAB position table is indexed by the true offset (key minus query, in pixels); the official index
  ``rpi_oca`` is a relabelling of the same (M + M_o - 1)^2 entries (it wraps negative indices), so the two
  parameterisations hold the same function class.
- OCAB attends to the zero-padded keys at the border as the official code does (their value is zero).
- Any grid size: HAT pads the image to a window multiple at the network level (``check_image_size``); here the
  attention pads its q/k/v grid at the bottom/right to a window multiple (WSA through
  :mod:`attnzoo.kernels.window`, the Swin shift and regions taken on the padded grid as Swin does), the padded keys
  are masked in the WSA and the OCAB (whose border padding stays zero keys, as the official unfold), and the padded
  queries are cropped; the CAB convolution and the MLP run on the real grid. A divisible grid is unchanged.
- M_o - M must be even (the official unfold uses padding (M_o - M) / 2).

Forms: ``reference`` = dense softmax over all tokens (the padded grid for OCAB) with the window masks
(window/region ids of :func:`attnzoo.kernels.window.window_layout`; HaloNet's :func:`halo_mask` for OCAB) and the
biases scattered densely; ``fast`` = window tiles with :func:`attnzoo.kernels.grid.tile_attention` (recomputing
backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_bool, check_float, check_heads, check_int, check_module_input
from ...kernels.grid import from_tiles, tile_attention, to_tiles
from ...kernels.window import padded_length, window_attention, window_attention_reference
from ...masks import materialize
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from .halonet import halo_mask


def _mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


# --------------------------------------------------------------------------------------------------------
# Window self-attention (WSA), shifted or not: the shared window kernel (any grid size, padding masked)
# --------------------------------------------------------------------------------------------------------
def wsa_reference(q, k, v, table, *, window, shift, scale):
    """Dense: q, k, v (B, h, H, W, d), table ((2M-1)^2, heads) -> (B, h, H, W, d)."""
    return window_attention_reference(q, k, v, window=window, shift=shift, table=table, scale=scale)


def wsa_fast(q, k, v, table, *, window, shift, scale):
    """Windows as tiles (:func:`attnzoo.kernels.window.window_attention`): roll by -shift, M*M tiles, relative bias
    + Swin region mask (+ padded keys masked), roll back."""
    return window_attention(q, k, v, window=window, shift=shift, table=table, scale=scale, backend="fast")


# --------------------------------------------------------------------------------------------------------
# Overlapping cross-attention (OCAB)
# --------------------------------------------------------------------------------------------------------
def _window_padded(q, k, v, window):
    """q, k, v zero-padded at the bottom/right to window multiples, and the real (H, W)."""
    H, W = q.shape[2], q.shape[3]
    hm, wm = padded_length(H, window), padded_length(W, window)
    if (hm, wm) == (H, W):
        return q, k, v, (H, W)
    pad = lambda t: F.pad(t, (0, 0, 0, wm - W, 0, hm - H))  # (B, h, Hm, Wm, d)
    return pad(q), pad(k), pad(v), (H, W)


def ocab_reference(q, k, v, table, *, window, overlap, scale):
    """Dense over the zero-padded grid: q (B, h, H, W, d), k, v likewise, table ((M+Mo-1)^2, heads)."""
    q, k, v, (He, We) = _window_padded(q, k, v, window)
    B, h, H, W, d = q.shape
    pad = (overlap - window) // 2
    Hp, Wp = H + 2 * pad, W + 2 * pad
    n, npad = H * W, Hp * Wp
    span = window + overlap - 1
    # The overlapping window of a query's M x M window is the halo window of HaloNet with halo (Mo - M) / 2;
    # the zero-padded border keys are not masked (official OCAB); the window-multiple padding is.
    mask = materialize(halo_mask(H, W, window, pad, mask_padding=False, extent=(He, We)), 1, 1, n, npad,
                       device=q.device)
    qr = torch.arange(H, device=q.device).view(H, 1).expand(H, W).reshape(n, 1)
    qc = torch.arange(W, device=q.device).view(1, W).expand(H, W).reshape(n, 1)
    kr = torch.arange(Hp, device=q.device).view(Hp, 1).expand(Hp, Wp).reshape(1, npad) - pad  # image coordinates
    kc = torch.arange(Wp, device=q.device).view(1, Wp).expand(Hp, Wp).reshape(1, npad) - pad
    iy = (kr - qr + pad + window - 1).clamp(0, span - 1)  # key minus query, shifted to >= 0
    ix = (kc - qc + pad + window - 1).clamp(0, span - 1)
    bias = table[iy * span + ix].permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, Np)
    padk = lambda t: F.pad(t, (0, 0, pad, pad, pad, pad)).reshape(B, h, npad, t.shape[-1])
    out = softmax_attention(q.reshape(B, h, n, d), padk(k), padk(v), attn_mask=mask,
                            bias=bias.to(q.dtype), scale=scale)
    return out.view(B, h, H, W, -1)[:, :, :He, :We]


def ocab_fast(q, k, v, table, *, window, overlap, scale):
    """M*M query tiles against their gathered Mo*Mo windows of the zero-padded grid."""
    q, k, v, (He, We) = _window_padded(q, k, v, window)
    B, h, H, W, d = q.shape
    pad = (overlap - window) // 2
    Wp = W + 2 * pad
    nh, nw = H // window, W // window
    T, Q, R = nh * nw, window * window, overlap * overlap
    o = torch.arange(overlap, device=q.device)
    rows = torch.arange(nh, device=q.device).view(nh, 1) * window + o  # (nh, Mo) padded-grid rows
    cols = torch.arange(nw, device=q.device).view(nw, 1) * window + o
    idx = (rows.view(nh, 1, overlap, 1) * Wp + cols.view(1, nw, 1, overlap)).reshape(-1)  # (T*R,)
    padk = lambda t: F.pad(t, (0, 0, pad, pad, pad, pad)).reshape(B, h, -1, t.shape[-1])
    kt = padk(k).index_select(2, idx).view(B, h, T, R, d)
    vt = padk(v).index_select(2, idx).view(B, h, T, R, v.shape[-1])
    span = window + overlap - 1
    a = torch.arange(window, device=q.device)
    dy = o.view(1, overlap) - a.view(window, 1) + window - 1  # (M, Mo): key row minus query row + pad + M - 1 - pad
    index = (dy.view(window, 1, overlap, 1) * span + dy.view(1, window, 1, overlap)).reshape(Q, R)
    bias = table[index].permute(2, 0, 1).reshape(1, h, 1, Q, R)
    if (He, We) != (H, W):  # keys of the window-multiple padding (image rows >= He or columns >= We) never attended
        ir, ic = rows - pad, cols - pad  # (nh, Mo), (nw, Mo) image coordinates of the keys
        grid = ((ir >= 0) & (ir < H)).view(nh, 1, overlap, 1) & ((ic >= 0) & (ic < W)).view(1, nw, 1, overlap)
        beyond = (ir >= He).view(nh, 1, overlap, 1) | (ic >= We).view(1, nw, 1, overlap)
        forced = (grid & beyond).reshape(1, 1, T, 1, R)
        bias = bias.masked_fill(forced, float("-inf"))  # (1, h, T, Q, R)
    out = tile_attention(to_tiles(q, window, window, nh, nw), kt, vt, scale=scale, bias=bias)  # (B, h, T, Q, d)
    return from_tiles(out, window, window, nh, nw, H, W)[:, :, :He, :We]


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------
class ChannelAttentionBlock(nn.Module):
    """CAB on (B, C, H, W): conv3x3 -> GELU -> conv3x3 -> squeeze-excitation channel attention."""

    def __init__(self, dim: int, compress_ratio: int = 3, squeeze_factor: int = 30) -> None:
        super().__init__()
        mid, squeezed = dim // compress_ratio, dim // squeeze_factor
        if mid < 1 or squeezed < 1:
            raise ValueError(f"compress_ratio, squeeze_factor: dim ({dim}) // compress_ratio ({compress_ratio}) and "
                             f"dim // squeeze_factor ({squeeze_factor}) must be >= 1")
        self.body = nn.Sequential(nn.Conv2d(dim, mid, 3, 1, 1), nn.GELU(), nn.Conv2d(mid, dim, 3, 1, 1))
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, squeezed, 1), nn.ReLU(),
                                       nn.Conv2d(squeezed, dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        y = self.body(x)
        return y * self.attention(y)


class HAB(nn.Module):
    """Hybrid attention block on channels-last grids (B, H, W, C)."""

    def __init__(self, dim: int, heads: int, *, window_size: int = 16, shift_size: int = 0, compress_ratio: int = 3,
                 squeeze_factor: int = 30, conv_scale: float = 0.01, mlp_ratio: float = 2.0, qkv_bias: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size: expected 0 <= shift_size < window_size ({window_size}), got {shift_size}")
        self.heads, self.window, self.shift, self.conv_scale = heads, window_size, shift_size, float(conv_scale)
        self.scale = (dim // heads) ** -0.5
        self.backend = backend
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window_size - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.conv_block = ChannelAttentionBlock(dim, compress_ratio, squeeze_factor)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = self.norm1(x)
        conv = self.conv_block(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # CAB on (B, C, H, W), back to (B, H, W, C)
        qkv = self.qkv(y).view(B, H, W, 3, self.heads, -1).permute(3, 0, 4, 1, 2, 5)  # (3, B, h, H, W, d)
        fn = wsa_reference if self.backend == "reference" else wsa_fast
        att = fn(qkv[0], qkv[1], qkv[2], self.relative_position_bias_table, window=self.window, shift=self.shift,
                 scale=self.scale)  # (B, h, H, W, d)
        att = self.proj(att.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))
        x = x + att + self.conv_scale * conv
        return x + self.mlp(self.norm2(x))


class OCAB(nn.Module):
    """Overlapping cross-attention block on channels-last grids (B, H, W, C)."""

    def __init__(self, dim: int, heads: int, *, window_size: int = 16, overlap_ratio: float = 0.5,
                 mlp_ratio: float = 2.0, qkv_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.overlap = int(window_size * overlap_ratio) + window_size
        if (self.overlap - window_size) % 2:
            raise ValueError(f"overlap_ratio: int(window_size * overlap_ratio) must be even (border padding "
                             f"(M_o - M) / 2), got window_size={window_size}, overlap_ratio={overlap_ratio}")
        self.heads, self.window, self.backend = heads, window_size, backend
        self.scale = (dim // heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.empty((window_size + self.overlap - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, H, W, 3, self.heads, -1).permute(3, 0, 4, 1, 2, 5)  # (3, B, h, H, W, d)
        fn = ocab_reference if self.backend == "reference" else ocab_fast
        att = fn(qkv[0], qkv[1], qkv[2], self.relative_position_bias_table, window=self.window, overlap=self.overlap,
                 scale=self.scale)  # (B, h, H, W, d)
        x = x + self.proj(att.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))
        return x + self.mlp(self.norm2(x))


class HybridAttentionBlock(nn.Module):
    """HAT's attention: one HAB then (optionally) one OCAB, ``x (B, H, W, dim) -> (B, H, W, dim)``.

    Args:
        dim, heads: channels and heads (dim % heads == 0).
        window_size: M (default 16). shift_size: HAB window shift (0 or M // 2 in HAT; default 0).
        overlap_ratio: OCAB gamma (default 0.5). compress_ratio: CAB beta (3). squeeze_factor: CAB s (30).
        conv_scale: alpha (0.01). mlp_ratio: 2. qkv_bias: True. ocab: include the OCAB (default True).
        backend: "auto", "fast" or "reference" (applies to both blocks).
    """

    def __init__(self, dim: int, heads: int, *, window_size: int = 16, shift_size: int = 0,
                 overlap_ratio: float = 0.5, compress_ratio: int = 3, squeeze_factor: int = 30,
                 conv_scale: float = 0.01, mlp_ratio: float = 2.0, qkv_bias: bool = True, ocab: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        dim, heads, _, _ = check_heads(dim, heads)
        check_int("window_size", window_size)
        check_int("shift_size", shift_size, low=0)
        check_int("compress_ratio", compress_ratio)
        check_int("squeeze_factor", squeeze_factor)
        check_bool("qkv_bias", qkv_bias)
        check_bool("ocab", ocab)
        for name, val in (("overlap_ratio", overlap_ratio), ("conv_scale", conv_scale), ("mlp_ratio", mlp_ratio)):
            check_float(name, val, low=0.0)
        if int(dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio: int(dim * mlp_ratio) must be >= 1, got {mlp_ratio}")
        check_backend(backend)
        self.dim, self.heads, self.window = dim, heads, window_size
        self.hab = HAB(dim, heads, window_size=window_size, shift_size=shift_size, compress_ratio=compress_ratio,
                       squeeze_factor=squeeze_factor, conv_scale=conv_scale, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.ocab = OCAB(dim, heads, window_size=window_size, overlap_ratio=overlap_ratio, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias) if ocab else None
        self._backend = backend
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value)
        self.hab.backend = value
        if self.ocab is not None:
            self.ocab.backend = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_module_input(self, x, layout="(B, H, W, C)", channels=self.dim)
        B, H, W, C = x.shape
        x = self.hab(x)
        return self.ocab(x) if self.ocab is not None else x


HAT = register(Mechanism(
    name="hat",
    aliases=("hybrid_attention", "hat_block"),
    family="local",
    kind="grid",
    catalog="P093",
    title="HAT: Hybrid Attention Transformer for Image Restoration",
    arxiv="2309.05239",
    code="https://github.com/XPixelGroup/HAT",
    summary="Hybrid attention block (shifted window attention + alpha * channel attention CAB + MLP) followed "
            "by overlapping cross-attention (M x M query windows, (1+gamma)M key windows).",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(HW (M^2 + M_o^2) d + HW C^2), memory O(HW M_o^2)",
    fast=wsa_fast,
    module=HybridAttentionBlock,
    options=(
        Option("window_size", 16, int, low=1, doc="window side M (other grids are padded to multiples, masked)"),
        Option("shift_size", 0, int, low=0, doc="cyclic window shift of the HAB (HAT alternates 0 and M // 2)"),
        Option("overlap_ratio", 0.5, float, low=0.0, doc="OCAB gamma: key windows of M + int(gamma M)"),
        Option("compress_ratio", 3, int, low=1, doc="CAB beta: conv channels C // beta"),
        Option("squeeze_factor", 30, int, low=1, doc="CAB channel attention squeeze C // s"),
        Option("conv_scale", 0.01, float, low=0.0, doc="alpha, weight of the CAB branch"),
        Option("mlp_ratio", 2.0, float, low=0.0, doc="MLP hidden = int(dim * mlp_ratio)"),
        Option("qkv_bias", True, bool, doc="bias of the qkv projections"),
        Option("ocab", True, bool, doc="follow the HAB with an OCAB"),
    ),
    test_options={"window_size": 3, "shift_size": 1, "overlap_ratio": 0.67, "compress_ratio": 2,
                  "squeeze_factor": 4},
    test_sizes={"height": 6, "width": 6},
    notes="kind 'grid': x (B, H, W, C) -> (B, H, W, C); the CAB runs on the (B, C, H, W) permutation inside. "
          "A transformer block (attention + MLP residuals), not a bare attention: exact=False.",
))
