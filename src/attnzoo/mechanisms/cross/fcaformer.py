"""FcaFormer forward cross attention: a block's tokens also attend to merged tokens of the earlier blocks of its stage.

Paper: "Fcaformer: Forward Cross Attention in Hybrid Vision Transformer", Zhang, Hu, Wang, arXiv 2211.07198
(ICCV 2023). Official code: https://github.com/hkzhang-git/FcaFormer (``FcaBlock`` in
``image_classification/models/fcaformer.py``). CATALOG P071.
Block l of a stage computes ``K = [X_l; s * C_<l] W_K``, ``V = [X_l; s * C_<l] W_V`` where ``C_<l`` are cross tokens
that earlier blocks produced by token merging (a long-stride large-kernel depthwise convolution, TME), calibrated by
learnable scale factors s (LSF): one softmax over the block's own tokens and the cross tokens.

Confirmed from the official code: the scale factors are per cross token (``(1, N_S, 1)``, initialised to 1), not per
channel; the cross tokens get their own LayerNorm (``s_norm``) while X gets the block's ``norm1``; one qkv projection
serves both (only K and V of the cross tokens are used); the cross tokens' scores get a learnable bias per head and
cross token (``s_token_bias``, zeros at init) before the joint softmax; the scale factors multiply the cross tokens
*before* their LayerNorm (which removes a per-token scale up to its epsilon and sign: kept as the official code has
it); the merge is a 7x7 depthwise convolution of stride 4 without bias on the block's output grid
(:class:`TokenMerge`), and block l reads the cross tokens of the last ``cab_max_d`` earlier blocks concatenated. The
self part's LeViT-style relative-position bias and the block's local convolution/FFN are outside this mechanism.
``cross_tokens`` fixes the number of cross tokens (the scale factors and biases are per token, as in the official
code). The attention is :func:`attnzoo.cross_attention` in joint mode over the sources "self" and "cross", with the
cross bias as a key bias.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...cross import cross_attention
from ...errors import check_bool, check_int, check_key_padding_mask, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register


class TokenMerge(nn.Module):
    """TME's merge: ``x (B, H, W, C)`` -> cross tokens ``(B, ceil(H/stride) * ceil(W/stride), C)`` by a depthwise
    ``kernel x kernel`` convolution of stride ``stride`` without bias (the official 7x7, stride 4)."""

    def __init__(self, dim: int, *, kernel: int = 7, stride: int = 4) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        kernel, stride = check_int("kernel", kernel), check_int("stride", stride)
        self.conv = nn.Conv2d(dim, dim, kernel, stride=stride, padding=kernel // 2, groups=dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_module_input(self, x, layout="(B, H, W, C)", channels=self.dim)
        y = self.conv(x.permute(0, 3, 1, 2))  # (B, C, H', W')
        return y.flatten(2).transpose(1, 2)  # (B, H' W', C)


class ForwardCrossAttention(nn.Module):
    """``x (B, N, dim)`` attends to itself and to ``context (B, M, dim)``, the earlier blocks' cross tokens (M =
    ``cross_tokens``), in one softmax -> ``(B, N, dim)``. (A stage's first block has no cross tokens and no cross
    parameters: it is a plain self-attention block, not this module.)

    ``key_padding_mask`` masks cross tokens (B, M) (a tensor; or {"self": (B, N), "cross": (B, M)}).
    ``return_source_mass`` returns the share of attention on {"self", "cross"}.
    """

    def __init__(self, dim: int, heads: int, *, cross_tokens: int, qkv_bias: bool = True, eps: float = 1e-5,
                 causal: bool = False, kv_heads: int | None = None) -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"heads: dim ({dim}) must be divisible by heads, got {heads}")
        if causal or kv_heads is not None:
            raise ValueError(f"causal, kv_heads: FcaFormer's attention is non-causal multi-head attention; got "
                             f"causal={causal!r}, kv_heads={kv_heads!r}")
        self.cross_tokens = check_int("cross_tokens", cross_tokens)
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.s_norm = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=check_bool("qkv_bias", qkv_bias))
        self.proj = nn.Linear(dim, dim)
        self.s_scale_factors = nn.Parameter(torch.ones(1, self.cross_tokens, 1))  # LSF, one per cross token
        self.s_token_bias = nn.Parameter(torch.zeros(1, heads, self.cross_tokens))  # per head and cross token

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, cross_tokens={self.cross_tokens}"

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, h, N, hd)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | dict | None = None, return_source_mass: bool = False):
        """x (B, N, dim), context (B, cross_tokens, dim) -> (B, N, dim) (and the {"self", "cross"} mass)."""
        check_module_input(self, x, channels=self.dim)
        if context is None:
            raise ValueError("context: forward cross attention needs the earlier blocks' cross tokens "
                             "(B, cross_tokens, dim); a block without them is plain self-attention")
        B, N, _ = x.shape
        q, k, v = (self._split(t) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))  # (B, h, N, hd) each
        sources = {"self": (k, v)}
        if isinstance(key_padding_mask, dict):
            masks = dict(key_padding_mask)
        else:
            masks = {} if key_padding_mask is None else {"cross": key_padding_mask}
        check_module_input(self, context, name="context", channels=self.dim)
        if context.shape[:2] != (B, self.cross_tokens):
            raise ValueError(f"context: expected (B, cross_tokens, dim) = ({B}, {self.cross_tokens}, {self.dim}) "
                             f"(the scale factors and biases are per cross token), got {tuple(context.shape)}")
        s = self.s_norm(context * self.s_scale_factors)  # (B, M, dim): calibrated, then normalised
        _, ks, vs = (self._split(t) for t in self.qkv(s).chunk(3, dim=-1))  # (B, h, M, hd)
        sources["cross"] = (ks, vs)
        biases = {"cross": self.s_token_bias.to(x.dtype)}
        for name, mk in masks.items():
            if name not in sources:
                raise ValueError(f"key_padding_mask: unknown part {name!r}; expected 'self' or 'cross'")
            check_key_padding_mask(mk, B, sources[name][0].shape[2], name=f"key_padding_mask[{name!r}]",
                                   device=x.device)
        res = cross_attention(q, sources, mode="joint", masks=masks or None, biases=biases, scale=self.scale,
                              return_source_mass=return_source_mass)
        out, mass = res if return_source_mass else (res, None)
        y = self.proj(out.transpose(1, 2).reshape(B, N, self.dim))  # (B, N, dim)
        return (y, mass) if return_source_mass else y


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    return ForwardCrossAttention(dim, heads, kv_heads=kv_heads, causal=causal, **FCAFORMER.resolve_options(options))


FCAFORMER = register(Mechanism(
    name="fcaformer",
    aliases=("forward_cross_attention",),
    family="cross",
    catalog="P071",
    title="Fcaformer: Forward Cross Attention in Hybrid Vision Transformer",
    arxiv="2211.07198",
    code="https://github.com/hkzhang-git/FcaFormer",
    summary="A block's tokens attend, in one softmax, to themselves and to earlier blocks' merged cross tokens "
            "(per-token learnable scale factors and score biases).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N (N + M) d), memory O(N + M) fused",
    module=_module,
    options=(
        Option("cross_tokens", 16, int, low=1, doc="number M of cross tokens (per-token scales and biases)"),
        Option("qkv_bias", True, bool, doc="biases in the shared qkv projection"),
        Option("eps", 1e-5, float, low=0.0, doc="LayerNorm epsilon"),
    ),
    test_options={"cross_tokens": 9},
    cross=CrossSpec(query_independent=False, source_mass=True, mode="joint"),
    notes="with the cross tokens masked it is the block's self-attention; equals one softmax over the concatenated "
          "keys with the cross tokens' bias; cross tokens carry per-token parameters, so their order matters.",
))
