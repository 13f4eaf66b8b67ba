"""MANIQA: the transposed attention block (TAB, attention across channels) and the scale Swin transformer block
(SSTB, window attention with a scaled residual).

Paper: "MANIQA: Multi-dimension Attention Network for No-Reference Image Quality Assessment", Yang et al.,
arXiv 2204.08958 (CVPR 2022 workshops), catalog P002. Official code: https://github.com/IIGROUP/MANIQA
(``models/maniqa.py`` ``TABlock``, ``models/swin.py`` ``BasicLayer``/``SwinBlock``/``WindowAttention``).

TAB (confirmed from ``TABlock``; the CATALOG's Restormer-style L2-normalised q, k and learned temperature are *not*
in the code): the (B, C, N = HW) feature map is read with the C channels as tokens and the N positions as their
features; ``q, k, v = Linear_N(X)`` (N -> N, with bias), ``A = softmax(q k^T / sqrt(N))`` is C x C, ``out = A v + X``.
The Linear layers act on the N positions, so a TAB is built for one grid size (``tokens`` = H W, 28 x 28 = 784 in
MANIQA). The official code reshapes ``(A v).transpose(1, 2).reshape(B, C, N)``, which scatters the (C, N) result
over the channels rather than transposing it back; ``output_layout="official"`` (default) keeps that, so MANIQA's
trained weights compute what they were trained for, ``"paper"`` keeps row c of ``A v`` at channel c (the equation).
The official block applies dropout (0.1) to the attention output before the residual: option ``dropout``, 0 here.

SSTB (confirmed from ``BasicLayer`` and ``SwinTransformer.forward``): ``depth`` Swin blocks (pre-LayerNorm window
self-attention with Swin's relative position bias, then a GELU MLP of ``mlp_dim``), shift 0 and ``window // 2``
alternating, then a 3 x 3 convolution and ReLU; the stage output is ``x + scale * layer(x)`` with scale 0.8. MANIQA
uses window 4, 4 heads, depth 2, mlp_dim = dim = 768 on a 28 x 28 grid. As the official ``SwinBlock``, a grid with
``min(H, W) <= window`` uses one window of ``min(H, W)`` and no shift (its bias read from the same table). Beyond
the official code (which needs H and W to be multiples of the window), any grid size runs: it is zero-padded to a
window multiple with the padded keys masked (:mod:`attnzoo.kernels.window`), the Swin shift regions are taken on the
padded grid and the outputs cropped. Shifted-window masking is exact (the official code adds -100 to masked scores).
``backend``: "fast"/"auto" runs the windows as tiles, "reference" the dense masked softmax.

Both modules take (B, C, H, W) maps, or (B, H, W, C) with ``channels_last=True``. Parameter names follow the official
modules (``c_q``/``c_k``/``c_v``; ``blocks.i.attn.qkv``, ``...relative_position_bias_table``, ``blocks.i.mlp.fc1``,
``conv``), so their state dicts load (the official ``relative_position_index``/``attn_mask`` buffers are derived here).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_int
from ...kernels.window import window_attention
from ...registry import Mechanism, Option, register
from ._common import channels_first, restore_layout, single_head

LAYOUTS = ("official", "paper")


# --------------------------------------------------------------------------------------------------------
# TAB: transposed (channel) attention
# --------------------------------------------------------------------------------------------------------
class TransposedAttention(nn.Module):
    """MANIQA's TAB: ``x (B, dim, H, W) -> (B, dim, H, W)`` with a (dim x dim) attention across channels.

    Args:
        dim: channels C (the attention tokens). heads: must be 1 (the official block has no heads).
        tokens: H * W of the maps (the size of the position Linear layers); required.
        output_layout: "official" (the code's transpose-reshape) or "paper" (channel c keeps row c of A v).
        dropout: dropout on the attention output before the residual (the official block trains with 0.1).
        channels_last: take and return (B, H, W, C) maps.
    """

    def __init__(self, dim: int, heads: int = 1, *, tokens: int | None = None, output_layout: str = "official",
                 dropout: float = 0.0, channels_last: bool = False) -> None:
        super().__init__()
        opts = MANIQA_TAB.resolve_options(dict(tokens=tokens, output_layout=output_layout, dropout=dropout,
                                               channels_last=channels_last))
        self.dim = check_int("dim", dim)
        single_head("MANIQA's TAB", heads)
        if opts["tokens"] is None:
            raise ValueError("tokens: a TAB's q/k/v Linear layers act on the H*W positions; give tokens = H * W of "
                             "the maps it will see (784 for MANIQA's 28 x 28 ViT grid), got None")
        n = opts["tokens"]
        self.tokens, self.output_layout, self.channels_last = n, opts["output_layout"], opts["channels_last"]
        self.c_q = nn.Linear(n, n)
        self.c_k = nn.Linear(n, n)
        self.c_v = nn.Linear(n, n)
        self.norm_fact = n ** -0.5
        self.proj_drop = nn.Dropout(opts["dropout"])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, tokens={self.tokens}, output_layout={self.output_layout!r}"

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H * W != self.tokens:
            raise ValueError(f"x: this TAB was built for maps of H*W = {self.tokens} positions, got H={H}, W={W} "
                             f"({H * W})")
        return x.reshape(B, C, H * W)  # (B, C, N): channels are the tokens

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C, C) channel attention of a (B, C, H, W) map (rows sum to 1)."""
        t = self._tokens(x)
        q, k = self.c_q(t), self.c_k(t)  # (B, C, N)
        return torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.norm_fact, dim=-1)  # (B, C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, H, W) -> (B, dim, H, W); (B, H, W, dim) with ``channels_last``."""
        x = channels_first(self, x, dim=self.dim, channels_last=self.channels_last)  # (B, C, H, W)
        B, C, H, W = x.shape
        t = self._tokens(x)  # (B, C, N)
        out = torch.matmul(self.attention(x), self.c_v(t))  # (B, C, N): A v
        if self.output_layout == "official":
            out = out.transpose(1, 2).reshape(B, C, H * W)  # the official (B, N, C) -> (B, C, N) reshape
        out = self.proj_drop(out) + t
        return restore_layout(out.view(B, C, H, W), self.channels_last)


# --------------------------------------------------------------------------------------------------------
# SSTB: Swin blocks with a scaled residual
# --------------------------------------------------------------------------------------------------------
class SwinWindowAttention(nn.Module):
    """Swin's W-MSA on (B, H, W, C) tokens: qkv Linear, relative position bias table, proj Linear."""

    def __init__(self, dim: int, heads: int, window: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads, self.window, self.scale = heads, window, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, window: int, shift: int, backend: str) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).view(B, H, W, 3, self.heads, C // self.heads).permute(3, 0, 4, 1, 2, 5)  # (3, B, h, H, W, d)
        out = window_attention(qkv[0], qkv[1], qkv[2], window=window, shift=shift,
                               table=self.relative_position_bias_table, table_window=self.window, scale=self.scale,
                               backend=backend)  # (B, h, H, W, d)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))


class SwinMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """One Swin block on (B, H, W, C) tokens: x + W-MSA(LN x) (shifted by ``shift``), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_dim: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SwinWindowAttention(dim, heads, window, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, mlp_dim)

    def geometry(self, height: int, width: int) -> tuple[int, int]:
        """(window, shift) on an H x W grid: the official rule, one min(H, W) window and no shift when
        min(H, W) <= window."""
        if min(height, width) <= self.window:
            return min(height, width), 0
        return self.window, self.shift

    def forward(self, x: torch.Tensor, *, backend: str) -> torch.Tensor:
        window, shift = self.geometry(x.shape[1], x.shape[2])
        x = x + self.attn(self.norm1(x), window=window, shift=shift, backend=backend)
        return x + self.mlp(self.norm2(x))


class ScaleSwinBlock(nn.Module):
    """MANIQA's SSTB: ``x (B, dim, H, W) -> x + scale * ReLU(conv3x3(SwinBlocks(x)))``.

    Args:
        dim: channels; heads: attention heads (dim % heads == 0).
        window_size: Swin window M (4 in MANIQA); blocks alternate shift 0 and M // 2.
        depth: Swin blocks (2). mlp_dim: hidden size of each MLP (None: dim, as MANIQA's 768 at dim 768).
        scale: residual scale (0.8). qkv_bias: bias of the qkv projection (True).
        backend: "auto"/"fast" (windows as tiles) or "reference" (dense masked softmax); read at forward time.
        channels_last: take and return (B, H, W, C) maps.
    """

    def __init__(self, dim: int, heads: int, *, window_size: int = 4, depth: int = 2, mlp_dim: int | None = None,
                 scale: float = 0.8, qkv_bias: bool = True, channels_last: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        opts = MANIQA_SSTB.resolve_options(dict(window_size=window_size, depth=depth, mlp_dim=mlp_dim, scale=scale,
                                                qkv_bias=qkv_bias, channels_last=channels_last))
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"heads: dim ({dim}) must be divisible by heads, got heads={heads}")
        M = opts["window_size"]
        hidden = dim if opts["mlp_dim"] is None else opts["mlp_dim"]
        self.window_size, self.scale, self.channels_last = M, opts["scale"], opts["channels_last"]
        self.backend = check_backend(backend)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, M, 0 if i % 2 == 0 else M // 2, hidden, qkv_bias=opts["qkv_bias"])
            for i in range(opts["depth"]))
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, window_size={self.window_size}, depth={len(self.blocks)}, "
                f"scale={self.scale}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, H, W) -> (B, dim, H, W); (B, H, W, dim) with ``channels_last``."""
        x = channels_first(self, x, dim=self.dim, channels_last=self.channels_last)  # (B, C, H, W)
        check_backend(self.backend, "backend")
        t = x.permute(0, 2, 3, 1)  # (B, H, W, C) tokens
        for blk in self.blocks:
            t = blk(t, backend=self.backend)
        y = F.relu(self.conv(t.permute(0, 3, 1, 2)))  # (B, C, H, W)
        return restore_layout(x + self.scale * y, self.channels_last)


def _tab_module(dim: int, heads: int, **options: Any) -> TransposedAttention:
    return TransposedAttention(dim, heads, **options)


def _sstb_module(dim: int, heads: int, **options: Any) -> ScaleSwinBlock:
    return ScaleSwinBlock(dim, heads, **options)


def _tab_case(*, n, side, heads, causal):
    """Benchmark/training cases: one head, Linear layers over the case's H*W positions."""
    return {"heads": 1, "tokens": n}


_TITLE = "MANIQA: Multi-dimension Attention Network for No-Reference Image Quality Assessment"
_CODE = "https://github.com/IIGROUP/MANIQA"

MANIQA_TAB = register(Mechanism(
    name="maniqa_tab",
    aliases=("transposed_attention_block", "tab"),
    family="vision",
    kind="channel",
    catalog="P002",
    title=_TITLE,
    arxiv="2204.08958",
    code=_CODE,
    summary="Transposed attention: channels are the tokens, Linear(HW -> HW) q/k/v, C x C softmax(q k^T / "
            "sqrt(HW)), residual; built for one grid size; (B, C, H, W) maps.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(C (HW)^2 + C^2 HW), attention memory O(C^2), 3 (HW)^2 parameters",
    module=_tab_module,
    case_options=_tab_case,
    options=(
        Option("tokens", None, int, low=1, allow_none=True, doc="H * W of the maps (required: the Linear size)"),
        Option("output_layout", "official", str, choices=LAYOUTS,
               doc="'official': the code's transpose-reshape of A v; 'paper': channel c keeps row c of A v"),
        Option("dropout", 0.0, float, low=0.0, high=1.0, doc="dropout on the attention output (official: 0.1)"),
        Option("channels_last", False, bool, doc="take and return (B, H, W, C) maps"),
    ),
    test_options={"tokens": 30},
    test_sizes={"heads": 1, "dim": 16, "height": 5, "width": 6},
    notes="Rows of the C x C attention sum to 1. With output_layout='paper' the block is equivariant to permuting "
          "the channels.",
))

MANIQA_SSTB = register(Mechanism(
    name="maniqa_sstb",
    aliases=("scale_swin_block", "sstb"),
    family="vision",
    kind="channel",
    catalog="P002",
    title=_TITLE,
    arxiv="2204.08958",
    code=_CODE,
    summary="Scale Swin transformer block: Swin (shifted) window attention blocks with relative bias, a 3x3 conv + "
            "ReLU, residual scaled by 0.8; any grid size (padded windows, padding masked); (B, C, H, W) maps.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(depth HW (M^2 C + C^2 + C mlp)), memory O(HW M^2) fast, O((HW)^2) reference",
    module=_sstb_module,
    fast=window_attention,
    options=(
        Option("window_size", 4, int, low=1, doc="Swin window M (shift M // 2 on every other block)"),
        Option("depth", 2, int, low=1, doc="Swin blocks before the 3x3 convolution"),
        Option("mlp_dim", None, int, low=1, allow_none=True, doc="hidden size of the MLPs (None: dim)"),
        Option("scale", 0.8, float, doc="scale of the block's residual branch"),
        Option("qkv_bias", True, bool, doc="bias of the qkv projection"),
        Option("channels_last", False, bool, doc="take and return (B, H, W, C) maps"),
    ),
    test_options={"window_size": 3, "mlp_dim": 8},
    test_sizes={"heads": 2, "dim": 8, "height": 7, "width": 6},
    notes="Window attention equals dense attention under the block-diagonal (shifted: Swin region) mask; a window "
          "that covers the grid is plain softmax attention with a relative bias.",
))
