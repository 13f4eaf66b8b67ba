"""SHViT single-head self-attention (SHSA) on a fraction of the channels.

Paper: "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design", Yun & Ro, arXiv 2401.16456
(CVPR 2024). Official code: https://github.com/ysj9909/SHViT (also timm ``shvit``).
The channels are split ``X = [X_att (C_p channels), X_res (C - C_p)]``; one attention head runs on X_att with
query/key dim ``qk_dim`` (16) and value dim C_p, ``X_att' = softmax(Q K^T / sqrt(qk_dim)) V``; the untouched X_res
is concatenated back and the result projected: ``out = Proj(ReLU([X_att'; X_res]))``.

Layout: CNN maps (B, C, H, W), as the official code and timm (SHViT is built from Conv2d + BatchNorm blocks),
so the registry kind is ``channel``; the H*W positions are the tokens.

Confirmed from the official code: a GroupNorm(1 group) pre-norm on X_att only; q, k, v from one 1x1
Conv2d + BatchNorm ("Conv2d_BN"); the projection is ReLU then 1x1 Conv2d + BatchNorm with BN weight initialised
to 0 (the block starts as identity through its residual); no attention bias. Options: ``qk_dim`` (16),
``partial_dim`` (default ``round(dim / 4.67)``, the paper's ratio; the official configs use 32/64/96 of
128/256/384), ``norm`` (False drops GroupNorm and BatchNorm, plain 1x1 convolutions: with ``partial_dim = dim``
that is standard single-head attention followed by ReLU and a projection). The block's residual 3x3 depthwise
convolution and FFN are outside the mechanism. BatchNorm makes training-mode outputs depend on the batch
(eval mode does not).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_int, check_module_input
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register


class ConvBN(nn.Sequential):
    """1x1 Conv2d (no bias) followed by BatchNorm2d (weight initialised to ``bn_weight``), or a plain 1x1 conv."""

    def __init__(self, cin: int, cout: int, *, norm: bool, bn_weight: float = 1.0) -> None:
        if norm:
            bn = nn.BatchNorm2d(cout)
            nn.init.constant_(bn.weight, bn_weight)
            nn.init.zeros_(bn.bias)
            super().__init__(nn.Conv2d(cin, cout, 1, bias=False), bn)
        else:
            super().__init__(nn.Conv2d(cin, cout, 1, bias=False))


class SingleHeadSelfAttention(nn.Module):
    """SHSA: ``x (B, dim, H, W)`` -> ``(B, dim, H, W)``; attention over the H*W positions of ``partial_dim``
    channels with one head. ``backend``: ``"reference"`` explicit softmax, ``"fast"``/``"auto"`` fused SDPA."""

    def __init__(self, dim: int, heads: int = 1, *, qk_dim: int = 16, partial_dim: int | None = None,
                 norm: bool = True, backend: str = "auto") -> None:
        super().__init__()
        opts = SHVIT.resolve_options(dict(qk_dim=qk_dim, partial_dim=partial_dim, norm=norm))
        self.dim = check_int("dim", dim)
        if heads != 1:
            raise ValueError(f"heads: SHViT's attention is single-head by design, expected 1, got {heads!r}")
        pdim = max(1, round(dim / 4.67)) if opts["partial_dim"] is None else opts["partial_dim"]
        if pdim > dim:
            raise ValueError(f"partial_dim: expected at most dim={dim}, got {pdim}")
        check_backend(backend)
        self.qk_dim, self.pdim, self.norm, self.backend = opts["qk_dim"], pdim, opts["norm"], backend
        self.scale = 1.0 / math.sqrt(self.qk_dim)
        self.pre_norm = nn.GroupNorm(1, pdim) if self.norm else nn.Identity()
        self.qkv = ConvBN(pdim, 2 * self.qk_dim + pdim, norm=self.norm)
        self.proj = nn.Sequential(nn.ReLU(), ConvBN(dim, dim, norm=self.norm, bn_weight=0.0))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, partial_dim={self.pdim}, qk_dim={self.qk_dim}, norm={self.norm}"

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor before the projection: ``[attention(X_att); X_res]`` (B, dim, H, W)."""
        check_module_input(self, x, layout="(B, C, H, W)", channels=self.dim, channel_axis=1)
        B, C, Hh, Ww = x.shape
        x_att, x_res = torch.split(x, [self.pdim, C - self.pdim], dim=1)  # (B, Cp, H, W), (B, C - Cp, H, W)
        q, k, v = self.qkv(self.pre_norm(x_att)).split([self.qk_dim, self.qk_dim, self.pdim], dim=1)
        q = q.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, qk)
        k = k.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, qk)
        v = v.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, Cp)
        if self.backend == "reference":
            out = softmax_attention(q, k, v, scale=self.scale)  # (B, 1, HW, Cp)
        else:
            out = shvit_fast(q, k, v, scale=self.scale)
        att = out.squeeze(1).transpose(1, 2).reshape(B, self.pdim, Hh, Ww)  # (B, Cp, H, W)
        return torch.cat([att, x_res], dim=1)  # (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, H, W) -> (B, dim, H, W)."""
        return self.proj(self.mix(x))


def shvit_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """One fused SDPA call for the single head: q, k (B, 1, HW, qk), v (B, 1, HW, Cp) -> (B, 1, HW, Cp)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _shvit_module(dim: int, heads: int, **options: Any):
    return SingleHeadSelfAttention(dim, heads, **options)


def _case_options(*, n, side, heads, causal):
    """Benchmark/training cases: SHViT's attention is one head on a channel slice."""
    return {"heads": 1}

SHVIT = register(Mechanism(
    name="shvit",
    case_options=_case_options,
    aliases=("shsa", "single_head_self_attention"),
    family="heads",
    kind="channel",
    catalog="P073",
    title="SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design",
    arxiv="2401.16456",
    code="https://github.com/ysj9909/SHViT",
    summary="One attention head on a fraction C_p of the channels (q/k dim 16), the other channels passed "
            "through, then ReLU + 1x1 projection; (B, C, H, W) maps.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O((HW)^2 (qk_dim + C_p)), memory O((HW)^2) reference, O(HW C) fused",
    module=_shvit_module,
    fast=shvit_fast,
    options=(
        Option("qk_dim", 16, int, low=1, doc="query/key dimension of the single head"),
        Option("partial_dim", None, int, low=1, allow_none=True,
               doc="channels C_p the head attends with (None: round(dim / 4.67))"),
        Option("norm", True, bool, doc="GroupNorm pre-norm and BatchNorm after the 1x1 convs, as the paper"),
    ),
    permutation_equivariant=False,
    test_options={"qk_dim": 4, "partial_dim": 6},
    test_sizes={"heads": 1, "dim": 16, "height": 5, "width": 6},
    notes="partial_dim = dim with norm=False is single-head softmax attention + ReLU + 1x1 projection; the "
          "channels beyond partial_dim reach the projection unchanged.",
))

