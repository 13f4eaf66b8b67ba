"""Tiny models whose attention is ``attnzoo.build(mechanism, ...)``: the only thing that changes between runs.

- :class:`SequenceModel`: token embedding (or a linear map of feature vectors) + learned positions, pre-norm
  blocks (attention, then a 4x MLP), a final norm and a head per position or, for classification, at the
  last token or the mean over tokens. A mechanism whose paper puts its own tokens into the stream (Landmark
  Attention: a landmark token after every block) gets them as the paper does: its module is built with
  ``interleaved=True``, the model inserts a learned token embedding with ``module.interleave`` and carries
  it through every layer, and drops those positions before the head.
- :class:`GridModel`: side x side pixels (8x8 digits, 16x16 patches) as a (B, side, side, C) token grid, blocks of
  a grid mechanism, mean pool.
- :class:`ChannelModel`: a small CNN on (B, C, side, side) maps, each block conv -> norm -> ReLU -> the channel
  mechanism (``mechanism=None`` gives the same CNN without attention), residual, mean pool.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ... import registry
from ...layers import build


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the ``aux_loss`` attributes (load-balancing losses) of the model's modules, if any."""
    total = None
    for m in model.modules():
        a = getattr(m, "aux_loss", None)
        if isinstance(a, torch.Tensor) and a.requires_grad:
            total = a if total is None else total + a
    return total


class SequenceBlock(nn.Module):
    def __init__(self, attn: nn.Module, dim: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _first(self.attn(self.norm1(x)))  # (B, N, dim)
        return x + self.mlp(self.norm2(x))


def streams_tokens(mechanism: str) -> bool:
    """True when the mechanism's module takes a stream with the model's own tokens interleaved (its module
    has ``interleave``, e.g. Landmark Attention's landmark tokens)."""
    module = registry.get(mechanism).module
    return module is not None and callable(getattr(module, "interleave", None))


def _build(mechanism: str, dim: int, heads: int, *, n: int, side: int | None, causal: bool | None,
           options: dict[str, Any] | None) -> nn.Module:
    """``attnzoo.build`` with the options (and head count) the mechanism needs at these sizes (its
    ``case_options``; explicit options win). ``causal=None``: a grid/channel module (no causal argument)."""
    mech = registry.get(mechanism)
    opts, heads = mech.fit_case(options or {}, n=n, side=side, heads=heads, causal=bool(causal))
    if causal is None:
        return build(mechanism, dim, heads, **opts)
    if streams_tokens(mechanism):
        opts = {**opts, "interleaved": True}
    return build(mechanism, dim, heads, causal=causal, **opts)


class SequenceModel(nn.Module):
    """x (B, L) tokens or (B, L, F) vectors -> (B, L, out) per position, or (B, out) with ``readout``."""

    def __init__(self, mechanism: str, *, vocab: int = 0, features: int = 0, out: int, seq_len: int,
                 dim: int = 64, layers: int = 2, heads: int = 4, causal: bool = True, readout: str | None = None,
                 options: dict[str, Any] | None = None):
        super().__init__()
        if (vocab > 0) == (features > 0):
            raise ValueError(f"vocab, features: give exactly one, got vocab={vocab}, features={features}")
        self.embed = nn.Embedding(vocab, dim) if vocab else nn.Linear(features, dim)
        self.blocks = nn.ModuleList(
            SequenceBlock(_build(mechanism, dim, heads, n=seq_len, side=None, causal=causal, options=options), dim)
            for _ in range(layers))
        # the mechanism's own tokens in the stream (landmarks): one learned embedding, positions of the stream
        self.stream_token = nn.Parameter(0.02 * torch.randn(dim)) if streams_tokens(mechanism) else None
        self.pos = nn.Parameter(0.02 * torch.randn(self.stream_length(seq_len), dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out)
        self.readout = readout
        self.causal = causal

    def stream_length(self, n: int) -> int:
        """Positions of the stream that ``n`` input tokens occupy (with the mechanism's own tokens)."""
        return n if self.stream_token is None else self.blocks[0].attn.layout(0, n)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, L, dim)
        keep = None
        if self.stream_token is not None:
            h, keep = self.blocks[0].attn.interleave(h, self.stream_token)  # (B, M, dim), (L,)
        h = h + self.pos[: h.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        if keep is not None:
            h = h[:, keep]  # (B, L, dim): the stream's own tokens dropped
        h = self.norm(h)
        if self.readout == "last":
            h = h[:, -1]  # (B, dim)
        elif self.readout == "mean":
            h = h.mean(dim=1)  # (B, dim)
        return self.head(h)


class GridModel(nn.Module):
    """x (B, side, side) pixels -> (B, classes) with a grid mechanism on (B, H, W, C)."""

    def __init__(self, mechanism: str, *, classes: int, side: int = 8, dim: int = 64, layers: int = 2,
                 heads: int = 4, options: dict[str, Any] | None = None):
        super().__init__()
        self.embed = nn.Linear(1, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(side, side, dim))
        self.norms1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.attns = nn.ModuleList(_build(mechanism, dim, heads, n=side * side, side=side, causal=None, options=options)
                                   for _ in range(layers))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.unsqueeze(-1)) + self.pos  # (B, H, W, C)
        for n1, attn, n2, mlp in zip(self.norms1, self.attns, self.norms2, self.mlps):
            h = h + _first(attn(n1(h)))  # (B, H, W, C)
            h = h + mlp(n2(h))
        return self.head(self.norm(h).mean(dim=(1, 2)))  # (B, classes)


class ChannelModel(nn.Module):
    """x (B, side, side) pixels -> (B, classes): conv blocks with a channel mechanism on (B, C, H, W)."""

    def __init__(self, mechanism: str | None, *, classes: int, side: int = 8, dim: int = 64, layers: int = 2,
                 heads: int = 4, options: dict[str, Any] | None = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU())
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU()) for _ in range(layers))
        self.attns = nn.ModuleList(
            (_build(mechanism, dim, heads, n=side * side, side=side, causal=None, options=options) if mechanism
             else nn.Identity())
            for _ in range(layers))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x.unsqueeze(1))  # (B, C, H, W)
        for conv, attn in zip(self.convs, self.attns):
            h = h + _first(attn(conv(h)))  # (B, C, H, W)
        return self.head(h.mean(dim=(2, 3)))  # (B, classes)
