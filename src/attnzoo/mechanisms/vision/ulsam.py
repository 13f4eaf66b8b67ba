"""ULSAM: ultra-lightweight subspace attention, one spatial softmax map per group of channels.

Paper: "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks", Saini, Jha,
Das, Mittal, Mohan, arXiv 2006.15102 (WACV 2020), catalog P072. Official code: https://github.com/Nandan91/ULSAM
The C channels are split into g subspaces F_n of C/g channels. For each,
``A_n = softmax_HW(ReLU(BN(PW_{C/g -> 1}(MaxPool_{3x3, s1, p1}(ReLU(BN(DW_{1x1}(F_n))))))))`` is one attention map
over the H*W positions, and ``F^_n = A_n * F_n + F_n`` (the map broadcast over the subspace's channels); the output
is the concatenation of the F^_n. About 2C parameters, O(HWC) time.

Confirmed from the official ``SubSpace``/``ULSAM``: the depthwise and pointwise 1x1 convolutions have biases, each is
followed by BatchNorm (momentum 0.9 in PyTorch's convention, kept here) and ReLU; the softmax runs over the
flattened H*W positions of the single-channel map. This file computes all g subspaces at once: the depthwise
convolution is one ``groups=C`` convolution and the g pointwise ones are one ``groups=g`` convolution (C -> g), the g
one-channel BatchNorms are one BatchNorm over g channels (each channel its own statistics): the same function as the
official loop over subspaces, with the official parameters as slices (tested with copied weights).

``heads`` is the number of subspaces g (the paper uses 1..32; C % g == 0). Layouts: (B, C, H, W), or (B, H, W, C)
with ``channels_last=True``. BatchNorm makes training-mode outputs depend on the batch; eval mode does not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_int
from ...registry import Mechanism, Option, register
from ._common import channels_first, restore_layout


class SubspaceAttention(nn.Module):
    """ULSAM: ``x (B, dim, H, W) -> (B, dim, H, W)`` with ``heads`` = g subspaces of ``dim / g`` channels each.

    ``attention_maps(x)`` returns the g softmax maps (B, g, H, W); each sums to 1 over the positions.
    """

    def __init__(self, dim: int, heads: int = 4, *, channels_last: bool = False) -> None:
        super().__init__()
        opts = ULSAM.resolve_options(dict(channels_last=channels_last))
        self.dim, self.groups = check_int("dim", dim), check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"heads: the {dim} channels must split into equal subspaces, got heads={heads}")
        self.channels_last = opts["channels_last"]
        self.conv_dws = nn.Conv2d(dim, dim, kernel_size=1, groups=dim)  # every subspace's depthwise 1x1
        self.bn_dws = nn.BatchNorm2d(dim, momentum=0.9)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.conv_point = nn.Conv2d(dim, heads, kernel_size=1, groups=heads)  # subspace n: C/g channels -> 1
        self.bn_point = nn.BatchNorm2d(heads, momentum=0.9)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, subspaces={self.groups}, channels_last={self.channels_last}"

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, g, H, W) of a (B, C, H, W) map: one spatial softmax per subspace."""
        B, C, H, W = x.shape
        a = F.relu(self.bn_dws(self.conv_dws(x)))  # (B, C, H, W)
        a = self.maxpool(a)  # (B, C, H, W)
        a = F.relu(self.bn_point(self.conv_point(a)))  # (B, g, H, W)
        return torch.softmax(a.reshape(B, self.groups, H * W), dim=-1).view(B, self.groups, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, H, W) -> (B, dim, H, W); (B, H, W, dim) with ``channels_last``."""
        x = channels_first(self, x, dim=self.dim, channels_last=self.channels_last)  # (B, C, H, W)
        B, C, H, W = x.shape
        a = self.attention_maps(x).unsqueeze(2)  # (B, g, 1, H, W)
        xs = x.reshape(B, self.groups, C // self.groups, H, W)  # (B, g, C/g, H, W) subspaces
        out = (a * xs + xs).reshape(B, C, H, W)  # A_n (x) F_n + F_n
        return restore_layout(out, self.channels_last)


def _ulsam_module(dim: int, heads: int, **options: Any) -> SubspaceAttention:
    return SubspaceAttention(dim, heads, **options)


def _case_options(*, n, side, heads, causal):
    """Benchmark/training cases: g = 4 subspaces (the paper's common setting)."""
    return {"heads": 4}


ULSAM = register(Mechanism(
    name="ulsam",
    aliases=("subspace_attention",),
    family="vision",
    kind="channel",
    catalog="P072",
    title="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks",
    arxiv="2006.15102",
    code="https://github.com/Nandan91/ULSAM",
    summary="Channels split into g subspaces; each gets one spatial softmax map from a depthwise 1x1 conv, 3x3 max "
            "pool and a 1x1 conv to one channel; F^ = A * F + F; (B, C, H, W) maps.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(HWC), about 2C + 2g parameters",
    module=_ulsam_module,
    case_options=_case_options,
    options=(Option("channels_last", False, bool, doc="take and return (B, H, W, C) maps"),),
    test_sizes={"heads": 4, "dim": 16, "height": 5, "width": 6},
    notes="heads = number of subspaces g. Each map sums to 1 over the H*W positions; subspaces do not interact.",
))
