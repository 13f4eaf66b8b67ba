"""RelationNet++'s bridging visual representations (BVR): detector features attend to sampled keypoint features with a
relative-position term added to the appearance scores.

Paper: "RelationNet++: Bridging Visual Representations for Object Detection via Transformer Decoder", Chi, Wei, Hu,
arXiv 2010.15831 (NeurIPS 2020). Official code: https://github.com/microsoft/RelationNet2
(code/models/utils/bvr_transformer/{transformer.py, multihead_attention.py, positional_encoding.py}). CATALOG P063.
Queries are the main representation's features f_i at locations p_i (anchors / centres); keys are auxiliary keypoints
(corners, centres) f_j at p_j, sampled to the top-K by their keypoint score; per head
``a_ij = softmax_j(<W_q f_i, W_k f_j> / sqrt(d_h) + G(p_j - p_i))`` with G a sine/cosine encoding of the relative
offset followed by a linear map to one value per head (shared by all queries: the "shared location embedding"),
``f_i' = ReLU(f_i + W_o sum_j a_ij W_v f_j)``.

Confirmed against the official code: the relative offset is key minus query position; G is ``PositionalEncodingSine``
(temperature 1000, per coordinate ``embedding_dim / 4`` frequencies ``1000^(4 i / embedding_dim)``, sin then cos)
followed by a 1x1 conv to ``num_heads`` (normal init std 0.01) and, with ``log_scale`` (the configs' setting), ``log(
clamp(G, 1e-6))``; the appearance scores are the standard scaled dot product with biased projections; keypoint groups
(top-left/bottom-right corners, centres) each have their own attention and are summed ("add"), then ReLU; top-50 keys.
Choices: the official evaluates G on a precomputed 400 x 400 grid of integer offsets and samples it bilinearly
(``grid_sample``); here G is computed exactly at each offset (the paper's definition; equal at grid points). One
module is one keypoint group: the regression branch's two groups are two modules whose outputs the caller adds before
the ReLU (``relu=False`` returns ``f + attention``). ``relative_position=False`` is the official appearance-only
configuration (``with_relative_positional_encoding=False``: G = 0, the CATALOG limit where it equals plain cross-
attention over the sampled keys); with it (the default) ``q_pos`` and ``context_pos`` are required. Runs on
:func:`attnzoo.cross_attention` with the pairwise bias of the contract (one fused SDPA call).

Example:
    >>> import torch, attnzoo
    >>> bvr = attnzoo.build("relationnet_bvr", 32, 4, top_k=8)
    >>> feats, pos = torch.randn(1, 20, 32), torch.rand(1, 20, 2) * 64          # anchors and their locations
    >>> keys, kpos, score = torch.randn(1, 30, 32), torch.rand(1, 30, 2) * 64, torch.rand(1, 30)
    >>> bvr(feats, keys, q_pos=pos, context_pos=kpos, context_scores=score).shape
    torch.Size([1, 20, 32])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...cross import CrossAttention, cross_attention
from ...errors import check_bool, check_float, check_int, check_key_padding_mask, check_module_input, check_tensor
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import check_pair, plain_heads


def sine_embedding(rel: torch.Tensor, embedding_dim: int, temperature: float = 1000.0) -> torch.Tensor:
    """Official ``PositionalEncodingSine.preprocess_embedding`` of offsets rel (..., 2) -> (..., embedding_dim): per
    coordinate ``embedding_dim / 4`` frequencies ``temperature^(4 i / embedding_dim)``, [sin; cos]."""
    feat = embedding_dim // 4
    freq = temperature ** ((4.0 / embedding_dim) * torch.arange(feat, dtype=rel.dtype, device=rel.device))
    div = rel.unsqueeze(-1) / freq  # (..., 2, feat)
    return torch.cat([torch.sin(div), torch.cos(div)], dim=-1).flatten(-2)  # (..., 2 * 2 feat)


class BridgingAttention(nn.Module):
    """``x (B, N, dim)`` query features, ``context (B, M, dim)`` keypoint features -> ``(B, N, dim)``. ``q_pos`` (B, N,
    2) and ``context_pos`` (B, M, 2) locations (both or neither); ``context_scores`` (B, M) keep the top-k keys;
    ``key_padding_mask`` (B, M)."""

    def __init__(self, dim: int, heads: int, *, embedding_dim: int | None = None, temperature: float = 1000.0,
                 log_scale: bool = True, top_k: int = 50, relu: bool = True, relative_position: bool = True) -> None:
        super().__init__()
        self.dim = self.context_dim = check_int("dim", dim)
        self.embedding_dim = dim if embedding_dim is None else check_int("embedding_dim", embedding_dim)
        if self.embedding_dim % 4:
            raise ValueError(f"embedding_dim: must be a multiple of 4 (sin and cos of 2 coordinates), got "
                             f"{self.embedding_dim}")
        self.temperature = check_float("temperature", temperature, low=0.0, low_open=True)
        self.log_scale, self.relu = check_bool("log_scale", log_scale), check_bool("relu", relu)
        self.top_k = check_int("top_k", top_k)
        self.attn = CrossAttention(dim, heads, context_dim=dim, bias=True)
        self.position_proj = None
        if check_bool("relative_position", relative_position):
            self.position_proj = nn.Linear(self.embedding_dim, heads)  # the official 1x1 conv
            nn.init.normal_(self.position_proj.weight, std=0.01)
            nn.init.zeros_(self.position_proj.bias)

    def relative_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """G(p_j - p_i): (B, heads, N, M)."""
        rel = k_pos[:, None, :, :] - q_pos[:, :, None, :]  # (B, N, M, 2)
        g = self.position_proj(sine_embedding(rel, self.embedding_dim, self.temperature))  # (B, N, M, heads)
        if self.log_scale:
            g = torch.log(g.clamp(min=1e-6))
        return g.permute(0, 3, 1, 2)

    def _positions(self, name: str, pos: torch.Tensor, B: int, n: int) -> torch.Tensor:
        check_tensor(name, pos, ndim=3)
        if tuple(pos.shape) != (B, n, 2):
            raise ValueError(f"{name}: expected (B, {n}, 2) locations, got {tuple(pos.shape)}")
        check_module_input(self, pos, name=name, layout="(B, N, C)", channels=2)
        return pos

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, q_pos: torch.Tensor | None = None,
                context_pos: torch.Tensor | None = None, context_scores: torch.Tensor | None = None) -> torch.Tensor:
        x, keys = check_pair(self, x, context, channels=self.dim, context_channels=self.dim)
        B, N, M = x.shape[0], x.shape[1], keys.shape[1]
        check_key_padding_mask(key_padding_mask, B, M, device=x.device)
        if self.position_proj is None and (q_pos is not None or context_pos is not None):
            raise ValueError("q_pos, context_pos: this layer was built with relative_position=False (appearance only)")
        if self.position_proj is not None and (q_pos is None or context_pos is None):
            raise ValueError("q_pos, context_pos: the relative-position term needs both locations, (B, N, 2) and "
                             "(B, M, 2); build with relative_position=False for an appearance-only layer")
        if q_pos is not None:
            q_pos = self._positions("q_pos", q_pos, B, N)
            context_pos = self._positions("context_pos", context_pos, B, M)
        if context_scores is not None and M > self.top_k:  # key sampling: the top-k keypoints by score
            check_module_input(self, context_scores.unsqueeze(-1) if isinstance(context_scores, torch.Tensor) else
                               context_scores, name="context_scores", channels=1)
            if tuple(context_scores.shape) != (B, M):
                raise ValueError(f"context_scores: expected (B, M) = ({B}, {M}), got {tuple(context_scores.shape)}")
            s = context_scores if key_padding_mask is None else context_scores.masked_fill(~key_padding_mask,
                                                                                           float("-inf"))
            idx = s.topk(self.top_k, dim=1).indices  # (B, K)
            keys = keys.gather(1, idx.unsqueeze(-1).expand(-1, -1, self.dim))
            if context_pos is not None:
                context_pos = context_pos.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.gather(1, idx)
        a = self.attn
        q = a.q_proj(x).view(B, N, a.heads, a.head_dim).transpose(1, 2)  # (B, H, N, hd)
        k, v = a.project(a.single, keys)  # (B, H, K, hd)
        bias = None if q_pos is None else {"keypoints": self.relative_bias(q_pos, context_pos).to(x.dtype)}
        out = cross_attention(q, {"keypoints": (k, v)}, biases=bias, scale=1.0 / math.sqrt(a.head_dim),
                              masks=None if key_padding_mask is None else {"keypoints": key_padding_mask})
        y = x + a.o_proj(out.transpose(1, 2).reshape(B, N, a.heads * a.head_dim))
        return F.relu(y) if self.relu else y


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("relationnet_bvr", kv_heads, causal)
    return BridgingAttention(dim, heads, **RELATIONNET_BVR.resolve_options(options))


RELATIONNET_BVR = register(Mechanism(
    name="relationnet_bvr",
    aliases=("bvr", "bridging_visual_representations"),
    family="cross",
    catalog="P063",
    title="RelationNet++: Bridging Visual Representations for Object Detection via Transformer Decoder",
    arxiv="2010.15831",
    code="https://github.com/microsoft/RelationNet2",
    summary="Detector features attend to the top-K keypoint features with a per-head relative-position term "
            "G(p_j - p_i) (sine encoding -> linear, log-scaled) added to the scores; residual + ReLU.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N K (d + E)) for K sampled keys and E-wide position encodings, memory O(N K H) for the bias",
    module=_module,
    options=(
        Option("embedding_dim", None, int, low=4, allow_none=True, doc="sine encoding width (None: dim, official 256)"),
        Option("temperature", 1000.0, float, low=0.0, doc="sine encoding temperature (official 1000)"),
        Option("log_scale", True, bool, doc="log(clamp(G, 1e-6)) as the official configs"),
        Option("top_k", 50, int, low=1, doc="keypoints kept by score (official 50)"),
        Option("relu", True, bool, doc="ReLU after the residual (False: sum several groups first)"),
        Option("relative_position", True, bool, doc="the relative-position term G (needs q_pos and context_pos)"),
    ),
    permutation_equivariant=True,
    test_options={"top_k": 4, "relative_position": False},  # G is exercised with locations in its own tests
    cross=CrossSpec(context_permutation_invariant=True),
    notes="relative_position=False (G = 0): plain cross-attention over the sampled keys; top-k covering every key "
          "equals the "
          "unsampled result; parity with the official multi_head_attention_forward with relative weights.",
))
