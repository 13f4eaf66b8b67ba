"""EMOv2 i2RMB: the improved inverted residual mobile block, with window attention whose queries/keys come from the
un-expanded features and values from the expanded ones, plus its spanning (strided-window) attention.

Paper: "EMOv2: Pushing 5M Vision Model Frontier", Zhang et al., arXiv 2412.06674 (TPAMI 2025), catalog P070.
Official code: https://github.com/zhangzjn/EMOv2 (``model/lib_emo/emo2.py``: ``iiRMB``, ``EW_MHSA_Hybrid``).
i2RMB on a (B, C, H, W) map, expansion ratio lambda (C_mid = lambda C):
    y = Norm(x)
    q, k = split(Conv1x1_{C -> 2C}(y))                 (heads of C / heads channels: un-expanded)
    v = Act(Conv1x1_{C -> C_mid}(y))                    (heads of C_mid / heads channels: expanded)
    a = WinAttn(q, k, v) + SpanAttn(q, k, v)            (SEW-MHSA, "hybrid"; scale (C / heads)^-1/2)
    a = a + SiLU(BN(DWConv_{k x k}(a)))                 (local mixing with a skip)
    out = x + gamma * Conv1x1_{C_mid -> C}(a)           (layer scale gamma = 1e-6 at init)
WinAttn attends inside contiguous M x M windows, SpanAttn inside strided windows (rows j, j + n1, ..., n1 = H / M
windows: M tokens spread over the whole grid, the long-range half), both on the same q, k, v.

Confirmed from the official code: the configurations use ``hybrid_eops=[3]`` (both attentions summed) in the
attention stages with window 7 (8 at 256/512 px), LayerNorm over channels (eps 1e-6) before the block, GELU on V,
a 5 x 5 depthwise convolution with BatchNorm (eps 1e-6) and SiLU, qkv biases, a projection without bias and a
layer scale initialised to 1e-6. ``attention="window"``/``"spanning"`` keep one of the two (the official
``EW_MHSA_Close``/``EW_MHSA_Remote``). As the official code, a grid that the window does not divide is zero-padded at
the bottom/right to a multiple and cropped after the attention; unlike it, the padded keys are masked out of the
softmax (the official code attends to them as zero tokens), so real tokens never see padding. ``dw_kernel=0``
drops the depthwise branch (the official code would add the attention output to itself there); with
``exp_ratio=1``, ``dw_kernel=0``, ``act="none"``, ``norm="none"`` and ``attention="window"`` the block is plain window
attention with projections. Only the stride-1, C -> C block (the one with the residual and the attention) is built.

Forms: ``backend="fast"``/``"auto"`` runs the windows as tiles (:func:`attnzoo.kernels.window.window_attention`),
``"reference"`` the dense masked softmax over all tokens. Layouts: (B, C, H, W), or (B, H, W, C) with
``channels_last=True``. BatchNorm makes training-mode outputs depend on the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import check_backend, check_int
from ...kernels.window import window_attention
from ...registry import Mechanism, Option, register
from ._common import channels_first, restore_layout

ATTENTIONS = ("hybrid", "window", "spanning")
NORMS = ("ln", "bn", "none")
ACTS = ("gelu", "silu", "relu", "none")


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (EMOv2's ``ln_2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "none": nn.Identity}[name]()


class ImprovedInvertedResidualBlock(nn.Module):
    """EMOv2's i2RMB: ``x (B, dim, H, W) -> (B, dim, H, W)``.

    Args:
        dim: channels C; heads: attention heads (C % heads == 0 and C_mid % heads == 0).
        exp_ratio: expansion lambda (C_mid = int(lambda C)); window_size: M (7).
        attention: "hybrid" (window + spanning, EMOv2), "window" or "spanning".
        dw_kernel: depthwise kernel of the local branch (5; 0 = none). norm: "ln" (default), "bn" or "none".
        act: activation of V ("gelu"). qkv_bias: biases of the q/k and v convolutions. layer_scale: gamma's init.
        backend: "auto"/"fast" (windows as tiles) or "reference" (dense masked softmax); read at forward time.
        channels_last: take and return (B, H, W, C) maps.
    """

    def __init__(self, dim: int, heads: int, *, exp_ratio: float = 4.0, window_size: int = 7,
                 attention: str = "hybrid", dw_kernel: int = 5, norm: str = "ln", act: str = "gelu",
                 qkv_bias: bool = True, layer_scale: float = 1e-6, channels_last: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        opts = EMOV2.resolve_options(dict(exp_ratio=exp_ratio, window_size=window_size, attention=attention,
                                          dw_kernel=dw_kernel, norm=norm, act=act, qkv_bias=qkv_bias,
                                          layer_scale=layer_scale, channels_last=channels_last))
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        mid = int(dim * opts["exp_ratio"])
        if dim % heads or mid < 1 or mid % heads:
            raise ValueError(f"heads: dim ({dim}) and the expanded dim int(dim * exp_ratio) ({mid}) must be "
                             f"divisible by heads, got heads={heads}")
        dw = opts["dw_kernel"]
        if dw and dw % 2 == 0:
            raise ValueError(f"dw_kernel: expected 0 or an odd int, got {dw}")
        self.mid, self.window_size, self.attention_kind = mid, opts["window_size"], opts["attention"]
        self.channels_last, self.backend = opts["channels_last"], check_backend(backend)
        self.scale = (dim // heads) ** -0.5
        self.norm = {"ln": lambda: _ChannelLayerNorm(dim, eps=1e-6), "bn": lambda: nn.BatchNorm2d(dim, eps=1e-6),
                     "none": nn.Identity}[opts["norm"]]()
        self.qk = nn.Conv2d(dim, 2 * dim, 1, bias=opts["qkv_bias"])
        self.v = nn.Conv2d(dim, mid, 1, bias=opts["qkv_bias"])
        self.v_act = _activation(opts["act"])
        self.conv_local = (nn.Sequential(nn.Conv2d(mid, mid, dw, 1, dw // 2, groups=mid, bias=False),
                                         nn.BatchNorm2d(mid, eps=1e-6), nn.SiLU()) if dw else None)
        self.proj = nn.Conv2d(mid, dim, 1, bias=False)
        self.gamma = nn.Parameter(opts["layer_scale"] * torch.ones(1, dim, 1, 1))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, mid={self.mid}, window_size={self.window_size}, "
                f"attention={self.attention_kind!r}, channels_last={self.channels_last}")

    def mix(self, y: torch.Tensor) -> torch.Tensor:
        """The attention of a normalised (B, C, H, W) map: (B, C_mid, H, W)."""
        B, C, H, W = y.shape
        h = self.heads
        qk = self.qk(y).view(B, 2, h, C // h, H, W).permute(1, 0, 2, 4, 5, 3)  # (2, B, h, H, W, C/h)
        v = self.v_act(self.v(y)).view(B, h, self.mid // h, H, W).permute(0, 1, 3, 4, 2)  # (B, h, H, W, Cmid/h)
        out = 0
        for strided in {"hybrid": (False, True), "window": (False,), "spanning": (True,)}[self.attention_kind]:
            out = out + window_attention(qk[0], qk[1], v, window=self.window_size, strided=strided, scale=self.scale,
                                         backend=self.backend)  # (B, h, H, W, Cmid/h)
        return out.permute(0, 1, 4, 2, 3).reshape(B, self.mid, H, W)  # (B, C_mid, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, H, W) -> (B, dim, H, W); (B, H, W, dim) with ``channels_last``."""
        x = channels_first(self, x, dim=self.dim, channels_last=self.channels_last)  # (B, C, H, W)
        check_backend(self.backend, "backend")
        a = self.mix(self.norm(x))  # (B, C_mid, H, W)
        if self.conv_local is not None:
            a = a + self.conv_local(a)
        return restore_layout(x + self.gamma * self.proj(a), self.channels_last)


def _emov2_module(dim: int, heads: int, **options: Any) -> ImprovedInvertedResidualBlock:
    return ImprovedInvertedResidualBlock(dim, heads, **options)


def _case_options(*, n, side, heads, causal):
    """Benchmark/training cases: window 7 (the paper's) on grids of 14 and more, else half the side (two windows
    per axis, so both the window and the spanning attention mix something)."""
    return {"window_size": 7 if side is None or side >= 14 else max(2, side // 2)}


EMOV2 = register(Mechanism(
    name="emov2_i2rmb",
    aliases=("i2rmb", "emov2", "sew_mhsa"),
    family="vision",
    kind="channel",
    catalog="P070",
    title="EMOv2: Pushing 5M Vision Model Frontier",
    arxiv="2412.06674",
    code="https://github.com/zhangzjn/EMOv2",
    summary="Inverted residual block whose mixer is window + spanning (strided-window) attention with Q/K from the "
            "C input channels and V from the lambda*C expanded ones, then a depthwise conv and a projection; "
            "(B, C, H, W) maps, any size.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(HW M^2 lambda C + HW lambda C^2), memory O(HW M^2) fast, O((HW)^2) reference",
    module=_emov2_module,
    fast=window_attention,
    case_options=_case_options,
    options=(
        Option("exp_ratio", 4.0, float, low=1e-9, doc="expansion lambda of the values (C_mid = int(lambda C))"),
        Option("window_size", 7, int, low=1, doc="window M of both attentions"),
        Option("attention", "hybrid", str, choices=ATTENTIONS,
               doc="'hybrid' = window + spanning (EMOv2), 'window' or 'spanning' alone"),
        Option("dw_kernel", 5, int, low=0, doc="depthwise kernel of the local branch (0: none)"),
        Option("norm", "ln", str, choices=NORMS, doc="normalisation before the block"),
        Option("act", "gelu", str, choices=ACTS, doc="activation of V"),
        Option("qkv_bias", True, bool, doc="biases of the q/k and v convolutions"),
        Option("layer_scale", 1e-6, float, low=0.0, doc="initial value of the layer scale gamma"),
        Option("channels_last", False, bool, doc="take and return (B, H, W, C) maps"),
    ),
    test_options={"exp_ratio": 2.0, "window_size": 3, "dw_kernel": 3, "layer_scale": 1.0},
    test_sizes={"heads": 2, "dim": 8, "height": 7, "width": 6},
    notes="Window attention equals dense attention under the block mask; spanning attention under the strided "
          "(r mod n1, c mod n2) mask; any grid size (padded windows, padded keys masked).",
))
