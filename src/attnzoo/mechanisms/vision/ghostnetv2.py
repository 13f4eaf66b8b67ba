"""GhostNetV2 DFC attention: decoupled fully connected (horizontal then vertical) attention on a downsampled map,
gating a Ghost module's features.

Paper: "GhostNetV2: Enhance Cheap Operation with Long-Range Attention", Tang, Han, Guo, Xu, Xu, Wang,
arXiv 2211.12905 (NeurIPS 2022), catalog P122. Official code:
https://github.com/huawei-noah/Efficient-AI-Backbones (``ghostnetv2_pytorch/model/ghostnetv2_torch.py``,
``GhostModuleV2`` with ``mode='attn'``); timm ``ghostnetv2``.
DFC attention: ``Z = AvgPool_2x2(X)``; ``Z = BN(Conv1x1(Z))``; ``Z = BN(DWConv_{1xK}(Z))`` (horizontal FC, shared
along columns); ``Z = BN(DWConv_{Kx1}(Z))`` (vertical); ``A = sigmoid(Z)`` upsampled (nearest) to H x W. The Ghost
module: ``Y1 = ReLU(BN(Conv1x1(X)))`` (ceil(C/ratio) channels), ``Y2 = ReLU(BN(DWConv_{3x3}(Y1)))`` (cheap
operation), ``out = [Y1, Y2][:C] * A``. O(HWC (K_H + K_V) / 4) for the attention branch.

Confirmed from the official ``GhostModuleV2`` (``mode='attn'``): K = 5 for both axes, no biases, the 1x1 convolution
of the attention branch maps the input to the output channels, the pooling is ``F.avg_pool2d(x, 2, 2)`` (odd sizes
floored) and the upsampling ``F.interpolate(..., size=(H, W), mode='nearest')``. Parameter names follow the official
module (``primary_conv``, ``cheap_operation``, ``short_conv``) so its state dict loads. The module here keeps the
channel count (C -> C, a block's first Ghost module with in = out); ``ratio``, ``dw_size``, ``kernel_size`` (K) are
options. H and W must be at least 2 (the 2x2 average pool). BatchNorm makes training-mode outputs depend on the
batch. Layouts: (B, C, H, W), or (B, H, W, C) with ``channels_last=True``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_int
from ...registry import Mechanism, Option, register
from ._common import channels_first, one_head_case, restore_layout, single_head


class DFCGhostModule(nn.Module):
    """GhostNetV2's Ghost module with DFC attention: ``x (B, dim, H, W) -> (B, dim, H, W)``.

    Args:
        dim: channels (in = out). heads: must be 1 (the attention is a per-position sigmoid gate, no heads).
        kernel_size: K of the horizontal 1 x K and vertical K x 1 depthwise convolutions (5, odd).
        ratio: Ghost ratio (intrinsic channels ceil(dim / ratio)); dw_size: the cheap depthwise conv (3, odd).
        relu: ReLU after the primary and cheap convolutions (True, the official ``relu=True``).
        channels_last: take and return (B, H, W, C) maps.
    """

    def __init__(self, dim: int, heads: int = 1, *, kernel_size: int = 5, ratio: int = 2, dw_size: int = 3,
                 relu: bool = True, channels_last: bool = False) -> None:
        super().__init__()
        opts = GHOSTNETV2.resolve_options(dict(kernel_size=kernel_size, ratio=ratio, dw_size=dw_size, relu=relu,
                                               channels_last=channels_last))
        self.dim = check_int("dim", dim)
        single_head("GhostNetV2 DFC attention", heads)
        for name in ("kernel_size", "dw_size"):
            if opts[name] % 2 == 0:
                raise ValueError(f"{name}: expected an odd int (a centred kernel), got {opts[name]}")
        K, r, dw = opts["kernel_size"], opts["ratio"], opts["dw_size"]
        self.kernel_size, self.ratio, self.channels_last = K, r, opts["channels_last"]
        init = math.ceil(dim / r)
        new = init * (r - 1)
        act = (lambda: nn.ReLU(inplace=True)) if opts["relu"] else nn.Sequential
        self.primary_conv = nn.Sequential(
            nn.Conv2d(dim, init, 1, 1, 0, bias=False), nn.BatchNorm2d(init), act())
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init, new, dw, 1, dw // 2, groups=init, bias=False), nn.BatchNorm2d(new), act())
        self.short_conv = nn.Sequential(
            nn.Conv2d(dim, dim, 1, 1, 0, bias=False), nn.BatchNorm2d(dim),
            nn.Conv2d(dim, dim, kernel_size=(1, K), stride=1, padding=(0, K // 2), groups=dim, bias=False),
            nn.BatchNorm2d(dim),
            nn.Conv2d(dim, dim, kernel_size=(K, 1), stride=1, padding=(K // 2, 0), groups=dim, bias=False),
            nn.BatchNorm2d(dim),
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, ratio={self.ratio}, channels_last={self.channels_last}"

    def dfc_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The gate A (B, C, H, W) in (0, 1) of a (B, C, H, W) map: computed at half resolution, then nearest."""
        H, W = x.shape[-2:]
        if H < 2 or W < 2:
            raise ValueError(f"x: DFC attention pools 2x2 first, expected H, W >= 2, got H={H}, W={W}")
        z = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))  # (B, C, H/2, W/2): 1x1, 1xK, Kx1 (+BN)
        return F.interpolate(torch.sigmoid(z), size=(H, W), mode="nearest")  # (B, C, H, W)

    def ghost(self, x: torch.Tensor) -> torch.Tensor:
        """The Ghost module's features [Y1, cheap(Y1)][:C] (B, C, H, W)."""
        y1 = self.primary_conv(x)  # (B, ceil(C/r), H, W)
        y2 = self.cheap_operation(y1)  # (B, ceil(C/r)(r-1), H, W)
        return torch.cat([y1, y2], dim=1)[:, : self.dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, H, W) -> (B, dim, H, W); (B, H, W, dim) with ``channels_last``."""
        x = channels_first(self, x, dim=self.dim, channels_last=self.channels_last)  # (B, C, H, W)
        a = self.dfc_attention(x)  # (B, C, H, W)
        return restore_layout(self.ghost(x) * a, self.channels_last)


def _ghost_module(dim: int, heads: int, **options: Any) -> DFCGhostModule:
    return DFCGhostModule(dim, heads, **options)


GHOSTNETV2 = register(Mechanism(
    name="ghostnetv2_dfc",
    aliases=("dfc_attention", "ghostnetv2"),
    family="vision",
    kind="channel",
    catalog="P122",
    title="GhostNetV2: Enhance Cheap Operation with Long-Range Attention",
    arxiv="2211.12905",
    code="https://github.com/huawei-noah/Efficient-AI-Backbones",
    summary="Ghost module features gated by DFC attention: sigmoid of 1x1 -> 1xK -> Kx1 depthwise convs (+BN) "
            "on the 2x2-pooled map, upsampled (nearest); (B, C, H, W) maps.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(HWC (C/r + dw^2) + HWC (C + 2K) / 4)",
    module=_ghost_module,
    case_options=one_head_case,
    options=(
        Option("kernel_size", 5, int, low=1, doc="K of the decoupled 1xK / Kx1 depthwise convolutions (odd)"),
        Option("ratio", 2, int, low=1, doc="Ghost ratio: ceil(C / ratio) intrinsic channels"),
        Option("dw_size", 3, int, low=1, doc="kernel of the Ghost module's cheap depthwise convolution (odd)"),
        Option("relu", True, bool, doc="ReLU after the primary and cheap convolutions"),
        Option("channels_last", False, bool, doc="take and return (B, H, W, C) maps"),
    ),
    test_options={"kernel_size": 3},
    test_sizes={"heads": 1, "dim": 16, "height": 5, "width": 6},
    notes="The two depthwise passes equal one depthwise K x K convolution with the outer-product kernel; the gate "
          "at a pixel reads the pooled map within +-K//2 pooled rows and columns. H, W >= 2.",
))
