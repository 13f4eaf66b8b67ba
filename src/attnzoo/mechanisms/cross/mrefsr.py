"""MRefSR's multi-reference attention: every pixel of the target features attends over the M aligned references at
the same pixel, followed by spatial adaptive fusion.

Paper: "LMR: A Large-Scale Multi-Reference Dataset for Reference-based Super-Resolution", Zhang, Li, Liu, Yang, Li,
Luo, arXiv 2303.04970. Official code: https://github.com/wdmwhh/MRefSR (basicsr/archs/ref_mrapa_restoration_arch.py,
``MRAPAFusion``). CATALOG P001.
Target features F_t (B, C_t, H, W) and M aligned reference features F_r^m (B, C_r, H, W). Per pixel p:
``s_m = <q(F_t)_p, k(F_r^m)_p> / sqrt(c)``, ``w = softmax_m(s)``, ``R_p = sum_m w_m v(F_r^m)_p`` (a softmax over the
references, not over pixels); then the spatial adaptive fusion (SAFM) modulates R with a sigmoid gate and an offset
computed from [F_t; R], and ``lrelu(conv1x1([F_t; R]))`` is the fused feature.

Confirmed against the official ``MRAPAFusion`` (the CATALOG's "(?)": the design is in the released code): q = PReLU(
conv1x1(F_t)) times ``c^-0.5``, k = PReLU(conv3x3(F_r)), v = conv3x3(F_r) of width 2c (c = the reference width), one
softmax over the references per pixel; SAFM ``attn = lrelu(conv1x1([F_t; R]))``, ``R = R * 2 sigmoid(conv3(lrelu(
conv3(attn)))) + conv3(lrelu(conv3(attn)))``; out ``lrelu(conv1x1([F_t; R]))`` (reflect padding to a multiple of 4 is
the official wrapper's, not here). ``heads`` splits c into heads (the official is one head). Inputs are maps, x (B, C_t,
H, W) with references (B, M, C_r, H, W), or tokens, x (B, N, C_t) with references (B, M N, C_r) (M references of N
pixels, stacked) or (B, M, N, C_r) -- spatial kernels need maps (``kernel_size=1`` makes every conv per-pixel). The
per-pixel attention runs on :func:`attnzoo.cross_attention` with pixels folded into the batch (one fused SDPA call).
``key_padding_mask`` (B, M) drops references per image.

Example:
    >>> import torch, attnzoo
    >>> mam = attnzoo.build("mrefsr", 16, 1, context_dim=8)
    >>> target, refs = torch.randn(1, 16, 12, 12), torch.randn(1, 3, 8, 12, 12)   # 3 references
    >>> mam(target, refs).shape
    torch.Size([1, 16, 12, 12])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...cross import cross_attention
from ...errors import check_int, check_key_padding_mask, check_module_input, check_tensor
from ...registry import CrossSpec, Mechanism, Option, register


class MultiReferenceAttention(nn.Module):
    """MAM + SAFM: ``x`` target features, ``context`` M reference features (layouts in the module docstring) ->
    fused target features of ``x``'s layout (width dim)."""

    def __init__(self, dim: int, heads: int = 1, *, context_dim: int = 64, channels: int | None = None,
                 kernel_size: int = 3, safm: bool = True) -> None:
        super().__init__()
        self.dim, self.context_dim = check_int("dim", dim), check_int("context_dim", context_dim)
        self.heads = check_int("heads", heads)
        c = self.context_dim if channels is None else check_int("channels", channels)
        if c % self.heads:
            raise ValueError(f"heads: channels ({c}) must be divisible by heads, got {heads}")
        self.channels, self.kernel_size = c, check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd size (same padding), got {kernel_size}")
        k, p = kernel_size, kernel_size // 2
        self.conv_emb1 = nn.Sequential(nn.Conv2d(dim, c, 1), nn.PReLU())
        self.conv_emb2 = nn.Sequential(nn.Conv2d(self.context_dim, c, k, 1, p), nn.PReLU())
        self.conv_ass = nn.Conv2d(self.context_dim, 2 * c, k, 1, p)
        self.safm = safm
        if safm:
            self.spatial_attn = nn.Conv2d(dim + 2 * c, 2 * c, 1)
            self.mul1, self.mul2, self.add1, self.add2 = (nn.Conv2d(2 * c, 2 * c, k, padding=p) for _ in range(4))
        self.feat_fusion = nn.Conv2d(dim + 2 * c, dim, 1)

    def _maps(self, x: torch.Tensor, context: torch.Tensor, hw):
        """(target (B, C_t, H, W), references (B, M, C_r, H, W), token layout?) from either layout."""
        check_tensor("x", x)
        if x.dim() == 4:
            check_module_input(self, x, layout="(B, C, H, W)", channels=self.dim, channel_axis=1)
            check_module_input(self, context, name="context", layout="(B, M, C, H, W)", channels=self.context_dim,
                               channel_axis=2)
            if context.shape[0] != x.shape[0] or context.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"context: expected references (B, M, C_r, H, W) on x's grid {tuple(x.shape[-2:])} "
                                 f"and batch {x.shape[0]}, got shape {tuple(context.shape)}")
            return x, context, False
        check_module_input(self, x, channels=self.dim)
        B, N, _ = x.shape
        check_tensor("context", context)
        if context.dim() == 3:
            check_module_input(self, context, name="context", channels=self.context_dim)
            if context.shape[1] % N:
                raise ValueError(f"context: (B, M N, C_r) stacks M references of x's N={N} pixels; got "
                                 f"{context.shape[1]} tokens")
            context = context.view(B, context.shape[1] // N, N, self.context_dim)
        check_module_input(self, context, name="context", layout="(B, M, N, C)", channels=self.context_dim)
        if context.shape[0] != B or context.shape[2] != N:
            raise ValueError(f"context: expected (B, M, N, C_r) with x's batch {B} and N={N}, got "
                             f"{tuple(context.shape)}")
        H, W = (1, N) if hw is None else hw
        if hw is None and self.kernel_size > 1:
            raise ValueError(f"hw: kernel_size={self.kernel_size} needs the pixel grid of token inputs, (H, W); pass "
                             "hw or build with kernel_size=1")
        if H * W != N:
            raise ValueError(f"hw: expected H * W = N = {N}, got {hw}")
        target = x.transpose(1, 2).reshape(B, self.dim, H, W)
        refs = context.permute(0, 1, 3, 2).reshape(B, context.shape[1], self.context_dim, H, W)
        return target, refs, True

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, hw: tuple[int, int] | None = None) -> torch.Tensor:
        if context is None:
            raise ValueError("context: the multi-reference attention needs M reference feature maps; got none")
        target, refs, tokens = self._maps(x, context, hw)
        B, M, _, H, W = refs.shape
        check_key_padding_mask(key_padding_mask, B, M, device=target.device)
        c, h = self.channels, self.heads
        flat = refs.flatten(0, 1)  # (B M, C_r, H, W)
        q = self.conv_emb1(target).permute(0, 2, 3, 1).reshape(B * H * W, 1, h, c // h).transpose(1, 2)
        k = self.conv_emb2(flat).view(B, M, c, H, W).permute(0, 3, 4, 1, 2).reshape(B * H * W, M, h, c // h)
        v = self.conv_ass(flat).view(B, M, 2 * c, H, W).permute(0, 3, 4, 1, 2).reshape(B * H * W, M, h, 2 * c // h)
        masks = None if key_padding_mask is None else {
            "references": key_padding_mask.repeat_interleave(H * W, dim=0)}  # (B H W, M)
        fused = cross_attention(q, {"references": (k.transpose(1, 2), v.transpose(1, 2))}, masks=masks,
                                scale=1.0 / math.sqrt(c // h))  # (B H W, h, 1, 2c/h): softmax over references
        fused = fused.reshape(B, H, W, 2 * c).permute(0, 3, 1, 2)  # (B, 2c, H, W)
        if self.safm:
            attn = F.leaky_relu(self.spatial_attn(torch.cat([target, fused], 1)), 0.1)
            gate = torch.sigmoid(self.mul2(F.leaky_relu(self.mul1(attn), 0.1)))
            offset = self.add2(F.leaky_relu(self.add1(attn), 0.1))
            fused = fused * gate * 2 + offset
        out = F.leaky_relu(self.feat_fusion(torch.cat([target, fused], 1)), 0.1)  # (B, dim, H, W)
        return out.reshape(B, self.dim, H * W).transpose(1, 2) if tokens else out


def _module(dim: int, heads: int, **options: Any):
    return MultiReferenceAttention(dim, heads, **MREFSR.resolve_options(options))


MREFSR = register(Mechanism(
    name="mrefsr",
    aliases=("multi_reference_attention", "lmr_mam"),
    family="cross",
    kind="fusion",
    catalog="P001",
    title="LMR: A Large-Scale Multi-Reference Dataset for Reference-based Super-Resolution",
    arxiv="2303.04970",
    code="https://github.com/wdmwhh/MRefSR",
    summary="Per-pixel softmax over M aligned references (target query, reference keys/values at the same pixel), "
            "then spatial adaptive fusion; any number of references.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(M H W c) attention (+ convolutions), memory O(M H W c)",
    module=_module,
    options=(
        Option("context_dim", 64, int, low=1, doc="reference feature width (official ref_nf: 64 at relu1_1)"),
        Option("channels", None, int, low=1, allow_none=True, doc="attention width c (None: context_dim)"),
        Option("kernel_size", 3, int, low=1, doc="kernel of the key/value and SAFM convolutions (official 3)"),
        Option("safm", True, bool, doc="spatial adaptive fusion after the attention"),
    ),
    test_options={"context_dim": 12, "kernel_size": 1},
    test_sizes={"nq": 3, "nk": 9},
    cross=CrossSpec(query_independent=False),
    notes="one reference: the attention returns its value exactly; permuting the references changes nothing; "
          "parity with the official MRAPAFusion written out (heads=1).",
))
