"""Throw-away module mechanisms of every layout, registered only by the bench tests (``--import`` this file):
a sequence module that decodes, a grid module (B, H, W, C) and a channel module (B, C, H, W). They exercise
the harness's module paths; they are not attention mechanisms of any paper."""

import torch
from torch import nn

from attnzoo.layers import Attention
from attnzoo.registry import Mechanism, register


def sequence_module(dim, heads, *, kv_heads=None, causal=False):
    return Attention(dim, heads, kv_heads=kv_heads, mechanism="softmax", causal=causal)


class GridGate(nn.Module):
    """x (B, H, W, C) -> x * sigmoid(depthwise 3x3 conv of x)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x):
        g = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
        return x * torch.sigmoid(g)


class ChannelGate(nn.Module):
    """x (B, C, H, W) -> x * sigmoid(W mean_hw(x)) (squeeze-and-excitation without the bottleneck)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3))))[:, :, None, None]


COMMON = dict(title="bench test fixture", arxiv="", code="-", summary="test only", exact=False, complexity="-")
NAMES = ("bench_fake_module", "bench_fake_grid", "bench_fake_channel")
register(Mechanism(name="bench_fake_module", family="core", kind="sequence", module=sequence_module,
                   patterns=("noncausal_self", "causal_self"), state="kv", **COMMON))
register(Mechanism(name="bench_fake_grid", family="vision", kind="grid", module=GridGate,
                   patterns=("noncausal_self",), **COMMON))
register(Mechanism(name="bench_fake_channel", family="vision", kind="channel", module=ChannelGate,
                   patterns=("noncausal_self",), **COMMON))
