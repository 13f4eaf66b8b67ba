"""PEM's prototype-based masked cross-attention: each object query takes one prototype pixel -- its most similar pixel
per head -- instead of a softmax over all pixels.

Paper: "PEM: Prototype-based Efficient MaskFormer for Image Segmentation", Cavagnero, Rosi, Cuttano, Pistilli, Ciccone,
Averta, Cermelli, arXiv 2402.19422 (CVPR 2024). Official code: https://github.com/NiccoloCavagnero/PEM
(pem/modeling/transformer_decoder/pem_transformer_decoder.py, ``PEM_CA``). CATALOG P062.
Object queries Q (B, N, d) and pixel features F (B, HW, d) (with positional embeddings): pixels go through a local
representation (BN, depth-wise 3x3 conv, linear), queries through LN + linear; both are L2-normalised and, per head,
each query's prototype is the most similar pixel within its mask, ``p_i = argmax_j <f_j, q_i>`` (a one-hot attention:
the tau -> 0 limit of ``softmax(S / tau)``); then ``out = final(normalize(proj(p * q)) * alpha + p) + Q``.

Confirmed against the official ``PEM_CA`` (CATALOG's "(?)" resolved): similarities on the normalised features per
head, pixels outside the previous layer's mask (mask logits < 0) excluded, the prototype gathered per head, the
modulation ``normalize(proj(prototype * key), dim=1) * alpha + prototype`` -- the normalisation runs over axis 1, the
*query* axis of (B, Q, D) (kept, ``norm_axis="queries"``; ``"channels"`` normalises each vector) --, ``final`` linear
and the residual; alpha starts at ones. Here the memory mask is bool ``attn_mask`` (B, N, HW) (True = may be the
prototype); a query whose mask excludes every pixel sees every pixel (Mask2Former's rule -- the official port unmasks
only when every query of a batch row and head is masked, so a lone fully masked query there falls on pixel 0, the
argmax of an all -inf row; not reproduced), padded pixels (``key_padding_mask``) are never prototypes (a query with no
real pixel gets a zero prototype). The local 3x3 conv needs the pixel grid: ``context`` as a map (B, d, H, W) or
tokens with ``hw``; ``local_conv=False`` keeps only its linear (tokens without a grid). Cost: one (N x HW) similarity
per head and N gathers -- no softmax over HW, no value matrix.

Example:
    >>> import torch, attnzoo
    >>> pem = attnzoo.build("pem", 32, 4)
    >>> queries, pixels = torch.randn(2, 10, 32), torch.randn(2, 32, 8, 8)      # a pixel map (B, d, H, W)
    >>> pem(queries, pixels).shape
    torch.Size([2, 10, 32])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_bool, check_choice, check_heads, check_key_padding_mask, check_module_input, check_tensor
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import check_bool_mask, plain_heads

NORM_AXES = ("queries", "channels")


class LocalRepresentation(nn.Module):
    """Pixels (B, d, H, W) -> (B, HW, d): BatchNorm, depth-wise 3x3 conv, linear (the official ``to_query``)."""

    def __init__(self, dim: int, conv: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim) if conv else None
        self.conv = nn.Conv2d(dim, dim, 3, groups=dim, padding=1) if conv else None
        self.out = nn.Linear(dim, dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            pixels = self.conv(self.bn(pixels))
        return self.out(pixels.flatten(2).transpose(1, 2))  # (B, HW, d)


class PrototypeCrossAttention(nn.Module):
    """``x (B, N, dim)`` object queries, ``context`` pixel features (B, dim, H, W) or (B, HW, dim) ->
    ``(B, N, dim)``."""

    def __init__(self, dim: int, heads: int, *, local_conv: bool = True, norm_axis: str = "queries") -> None:
        super().__init__()
        self.dim, self.heads, _, self.head_dim = check_heads(dim, heads, gqa=False)
        self.context_dim = dim
        self.local_conv = check_bool("local_conv", local_conv)
        self.norm_axis = check_choice("norm_axis", norm_axis, NORM_AXES)
        self.to_query = LocalRepresentation(dim, local_conv)  # pixel side (the official name)
        self.to_key = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))  # query side
        self.proj, self.final = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def _pixels(self, context: torch.Tensor, B: int, hw) -> tuple[torch.Tensor, int]:
        check_tensor("context", context)
        if context.dim() == 4:
            check_module_input(self, context, name="context", layout="(B, C, H, W)", channels=self.dim,
                               channel_axis=1)
            pixels = context
        else:
            check_module_input(self, context, name="context", channels=self.dim)
            if context.shape[0] != B:
                raise ValueError(f"context: batch {context.shape[0]} does not match x's batch {B}")
            M = context.shape[1]
            if self.local_conv:
                if hw is None or hw[0] * hw[1] != M:
                    raise ValueError(f"hw: the local 3x3 conv needs the pixel grid of token inputs, (H, W) with H * W "
                                     f"= {M}; got {hw!r} (or build with local_conv=False)")
                pixels = context.transpose(1, 2).reshape(B, self.dim, *hw)
            else:
                pixels = context.transpose(1, 2).reshape(B, self.dim, 1, M)
        if pixels.shape[0] != B:
            raise ValueError(f"context: batch {pixels.shape[0]} does not match x's batch {B}")
        return pixels, pixels.shape[2] * pixels.shape[3]

    def prototypes(self, pixels: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Per head, each query's most similar allowed pixel: pixels (B, HW, dim), keys (B, N, dim) normalised, allowed
        (B, N, HW) bool or None -> (B, N, dim) (zeros where a query may take no pixel)."""
        B, M, _ = pixels.shape
        N, h, d = keys.shape[1], self.heads, self.head_dim
        p = pixels.view(B, M, h, d).transpose(1, 2)  # (B, h, HW, d)
        k = keys.view(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
        sim = k @ p.transpose(-2, -1)  # (B, h, N, HW)
        if allowed is not None:
            sim = sim.masked_fill(~allowed[:, None], float("-inf"))
        idx = sim.argmax(dim=-1)  # (B, h, N): the prototype of each query, per head
        proto = p.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d))  # (B, h, N, d)
        if allowed is not None:
            proto = proto * allowed.any(-1)[:, None, :, None].to(proto.dtype)
        return proto.transpose(1, 2).reshape(B, N, self.dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                pos: torch.Tensor | None = None, query_pos: torch.Tensor | None = None,
                hw: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, N, dim); context (B, dim, H, W) or (B, HW, dim); attn_mask (B, N, HW) bool (the previous layer's mask,
        True = may be the prototype); key_padding_mask (B, HW); pos (B, HW, dim) / query_pos (B, N, dim) positional
        embeddings added before the projections."""
        check_module_input(self, x, channels=self.dim)
        if context is None:
            raise ValueError("context: PEM's cross-attention needs the pixel features; got none")
        B, N, _ = x.shape
        pixels, M = self._pixels(context, B, hw)
        check_key_padding_mask(key_padding_mask, B, M, device=x.device)
        allowed = None
        if attn_mask is not None:
            allowed = check_bool_mask("attn_mask", attn_mask, (B, N, M), x.device)
            allowed = allowed | ~allowed.any(-1, keepdim=True)  # a query masked everywhere sees every pixel
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, :].expand(B, N, M)
            allowed = pad if allowed is None else allowed & pad
        for name, t, n in (("pos", pos, M), ("query_pos", query_pos, N)):
            if t is not None:
                check_module_input(self, t, name=name, channels=self.dim)
                if tuple(t.shape) != (B, n, self.dim):
                    raise ValueError(f"{name}: expected (B, {n}, {self.dim}), got {tuple(t.shape)}")
        if pos is not None:
            pixels = pixels + pos.transpose(1, 2).reshape(pixels.shape)
        pix = F.normalize(self.to_query(pixels), dim=-1)  # (B, HW, dim)
        keys = F.normalize(self.to_key(x if query_pos is None else x + query_pos), dim=-1)  # (B, N, dim)
        proto = self.prototypes(pix, keys, allowed)  # (B, N, dim)
        out = F.normalize(self.proj(proto * keys), dim=1 if self.norm_axis == "queries" else -1) * self.alpha + proto
        return self.final(out) + x


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("pem", kv_heads, causal)
    return PrototypeCrossAttention(dim, heads, **PEM.resolve_options(options))


PEM = register(Mechanism(
    name="pem",
    aliases=("prototype_cross_attention", "pem_ca"),
    family="cross",
    catalog="P062",
    title="PEM: Prototype-based Efficient MaskFormer for Image Segmentation",
    arxiv="2402.19422",
    code="https://github.com/NiccoloCavagnero/PEM",
    summary="Prototype cross-attention: each query takes its most similar pixel per head (cosine, within the mask) "
            "instead of a softmax over all pixels, then a light modulation and a residual.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N HW d) similarities + O(N d) gathers, memory O(N HW) per head; no softmax, no value matrix",
    module=_module,
    options=(
        Option("local_conv", True, bool, doc="BN + depth-wise 3x3 conv on the pixels (needs the grid)"),
        Option("norm_axis", "queries", str, choices=NORM_AXES,
               doc="normalisation axis of the modulation: the query axis (official) or channels"),
    ),
    permutation_equivariant=True,
    test_options={"local_conv": False},
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="the prototype is the tau -> 0 limit of softmax(S / tau) aggregation; masked and padded pixels are never "
          "selected; parity with the official PEM_CA written out.",
))
