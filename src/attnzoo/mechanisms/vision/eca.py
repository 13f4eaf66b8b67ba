"""ECA-Net: efficient channel attention (a 1-D convolution across channels instead of SE's bottleneck MLP).

Paper: "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", Wang, Wu, Zhu, Li, Zuo, Hu,
arXiv 1910.03151 (CVPR 2020), catalog P067. Official code: https://github.com/BangguWu/ECANet (``eca_layer``);
timm ``EcaModule``.
``y = GAP(X)`` (B, C); ``w = sigmoid(conv1d_k(y))`` along the channel axis, one k-tap kernel shared by every channel
(zero padding (k - 1) / 2, no bias: no dimensionality reduction); ``out = X * w``. O(HWC) time, k parameters.

Adaptive kernel size (paper Eq. 12): ``t = int(|(log2 C + b) / gamma|)``, ``k = t`` if t is odd else ``t + 1``, with
gamma = 2, b = 1 (64 -> 3, 128 -> 5, 512 -> 5, 2048 -> 7), as timm's ``EcaModule`` computes it. timm also clamps k
to at least 3; so do we (:func:`eca_kernel_size`, ``min_size=3``): the formula alone gives k = 1 for C < 8, a gate
without any cross-channel interaction. The official ``eca_layer`` takes k as an argument (its ResNets pass 3 or
the formula's value); an explicit ``kernel_size`` (odd) overrides the formula.

Forms: ``eca_reference`` (the composition above through autograd) and ``eca_fast`` (a custom autograd function:
the backward computes the kernel's and the input's gradients in two passes over the map, ``dw = sum_HW g * x`` and
``dx = g * w + dy / HW``, where autograd's broadcasting backward makes several); ``backend`` picks one ("auto" =
fast). ``benchmarks/vision_perf.py`` times the module against the official ``eca_layer``.

The parameter is named ``conv`` (an ``nn.Conv1d(1, 1, k)``) as in ``eca_layer`` and timm, so their state dicts load.
Layouts: (B, C, H, W), or (B, H, W, C) with ``channels_last=True``; the pooled mean and the gate read the same
numbers either way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_float, check_int
from ...registry import Mechanism, Option, register
from ._common import channels_first, one_head_case, restore_layout, single_head


def eca_kernel_size(channels: int, gamma: float = 2.0, beta: float = 1.0, min_size: int = 3) -> int:
    """ECA's adaptive kernel size: ``t = int(|(log2 C + beta) / gamma|)``, the odd number ``t`` or ``t + 1``,
    at least ``min_size`` (timm's clamp; ``min_size=1`` gives the paper's formula alone)."""
    check_int("channels", channels)
    check_float("gamma", gamma, low=0.0, low_open=True)
    check_float("beta", beta)
    check_int("min_size", min_size)
    t = int(abs((math.log2(channels) + beta) / gamma))
    k = t if t % 2 else t + 1
    return max(k, min_size if min_size % 2 else min_size + 1)


def eca_gate(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, w) of x (B, C, H, W) and the kernel (1, 1, k): the pooled y (B, C) and the gate w = sigmoid(conv1d_k(y))."""
    k = weight.shape[-1]
    y = x.mean(dim=(2, 3))  # (B, C) global average pool
    return y, torch.sigmoid(F.conv1d(y.unsqueeze(1), weight, padding=(k - 1) // 2)).squeeze(1)  # across channels


def eca_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W), weight (1, 1, k) -> x * sigmoid(conv1d_k(mean_HW x)), through autograd."""
    _, w = eca_gate(x, weight)  # (B, C)
    return x * w[:, :, None, None]


class _EcaGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y, w = eca_gate(x, weight)  # (B, C), (B, C)
        ctx.save_for_backward(x, weight, y, w)
        return x * w[:, :, None, None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, weight, y, w = ctx.saved_tensors
        k, hw = weight.shape[-1], x.shape[2] * x.shape[3]
        if g.is_contiguous() and x.is_contiguous():
            gw = torch.einsum("bchw,bchw->bc", g, x)  # (B, C) dL/dw: one batched dot per channel
        else:
            gw = (g * x).sum(dim=(2, 3))
        ds = (gw * w * (1 - w)).unsqueeze(1)  # (B, 1, C) through the sigmoid
        dy = F.conv_transpose1d(ds, weight, padding=(k - 1) // 2).squeeze(1)  # (B, C) through the conv
        dweight = torch.nn.grad.conv1d_weight(y.unsqueeze(1), weight.shape, ds, padding=(k - 1) // 2)
        dx = torch.addcmul((dy / hw)[:, :, None, None], g, w[:, :, None, None])  # g * w + mean's backward
        return dx, dweight


def eca_fast(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`eca_reference` with a hand-written backward (two passes over the map)."""
    return _EcaGate.apply(x, weight)


class EfficientChannelAttention(nn.Module):
    """ECA: ``x (B, dim, H, W) -> x * sigmoid(conv1d_k(mean_HW x))``, or (B, H, W, dim) with ``channels_last``.

    Args:
        dim: channels C. heads: must be 1 (ECA has one gate per channel, no heads).
        kernel_size: odd k; None (default) = the adaptive size of :func:`eca_kernel_size` from ``gamma``, ``beta``.
        channels_last: take and return (B, H, W, C) maps.
        backend: "auto"/"fast" (hand-written backward) or "reference" (autograd); read at forward time.
    """

    def __init__(self, dim: int, heads: int = 1, *, kernel_size: int | None = None, gamma: float = 2.0,
                 beta: float = 1.0, channels_last: bool = False, backend: str = "auto") -> None:
        super().__init__()
        opts = ECA.resolve_options(dict(kernel_size=kernel_size, gamma=gamma, beta=beta, channels_last=channels_last))
        self.dim = check_int("dim", dim)
        single_head("ECA", heads)
        k = opts["kernel_size"]
        if k is None:
            k = eca_kernel_size(dim, opts["gamma"], opts["beta"])
        elif k % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd int (the gate of channel c is centred on c), got {k}")
        self.kernel_size, self.channels_last, self.backend = k, opts["channels_last"], check_backend(backend)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, channels_last={self.channels_last}"

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The channel weights ``w`` (B, C) in (0, 1) of a (B, C, H, W) map."""
        return eca_gate(x, self.conv.weight)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, H, W) -> (B, dim, H, W); with ``channels_last``: (B, H, W, dim) -> (B, H, W, dim)."""
        x = channels_first(self, x, dim=self.dim, channels_last=self.channels_last)  # (B, C, H, W)
        form = eca_reference if check_backend(self.backend) == "reference" else eca_fast
        return restore_layout(form(x, self.conv.weight), self.channels_last)  # (B, C, H, W) gated


def _eca_module(dim: int, heads: int, **options: Any) -> EfficientChannelAttention:
    return EfficientChannelAttention(dim, heads, **options)


ECA = register(Mechanism(
    name="eca",
    aliases=("eca_net", "efficient_channel_attention"),
    family="vision",
    kind="channel",
    catalog="P067",
    title="ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
    arxiv="1910.03151",
    code="https://github.com/BangguWu/ECANet",
    summary="Channel gate sigmoid(conv1d_k(GAP(X))): one k-tap kernel across channels (k adaptive to C), no "
            "dimensionality reduction; (B, C, H, W) maps.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(HWC + Ck), k parameters",
    module=_eca_module,
    fast=eca_fast,
    case_options=one_head_case,
    options=(
        Option("kernel_size", None, int, low=1, allow_none=True,
               doc="odd 1-D kernel size k; None: adaptive, int(|(log2 C + beta) / gamma|) made odd, at least 3"),
        Option("gamma", 2.0, float, low=1e-9, doc="gamma of the adaptive kernel size"),
        Option("beta", 1.0, float, doc="b of the adaptive kernel size"),
        Option("channels_last", False, bool, doc="take and return (B, H, W, C) maps"),
    ),
    test_options={"kernel_size": 3},
    test_sizes={"heads": 1, "dim": 16, "height": 5, "width": 6},
    notes="kind 'channel': (B, C, H, W) maps (or (B, H, W, C) with channels_last). Gates are invariant to "
          "permuting the spatial positions; a (C x C) banded Toeplitz matrix of the k taps is the same gate.",
))
