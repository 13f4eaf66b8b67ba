"""VLANet's Cascaded Cross-modal Attention: video -> query, query -> video, then self-attention over both.

Paper: "VLANet: Video-Language Alignment Network for Weakly-Supervised Video Moment Retrieval", Ma, Yoon, Kim, Lee,
Kang, Yoo, arXiv 2008.10238 (ECCV 2020). Official code: none released (none found). CATALOG P105.
After the Surrogate Proposal Selection has pruned the proposals, the Cascaded Cross-modal Attention (CCA) module lets
the video proposal features v (B, N, d) and the word features w (B, T, d) interact densely in several directions:
``v1 = LN(v + MHA(v, w, w))`` (video attends to the query), ``w1 = LN(w + MHA(w, v1, v1))`` (the query attends to the
query-aware video), then ``[v2; w2] = LN([v1; w1] + MHA([v1; w1]))`` (self-attention over both); the video part is the
aligned representation scored against the query with a contrastive loss.

(?) No official code: the abstract names "dense feature interactions and multi-directional attention flow" in a
cascade; the order (video->query, query->video, joint self-attention), post-norm residuals and the defaults (width
512, 8 heads) are choices, each kept plain. Surrogate proposal selection (a top-1 choice by cosine similarity in the
joint space) happens before this module and is not part of it. ``return_words=True`` also returns ``w2``.

Example:
    >>> import torch, attnzoo
    >>> cca = attnzoo.build("vlanet", 32, 4)
    >>> proposals, words = torch.randn(2, 8, 32), torch.randn(2, 5, 32)
    >>> cca(proposals, words).shape
    torch.Size([2, 8, 32])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import check_bool, check_int, check_key_padding_mask
from ...registry import CrossSpec, Mechanism, register
from ._blocks import AttentionSublayer, check_pair, plain_heads


class CascadedCrossModalAttention(nn.Module):
    """``x (B, N, dim)`` video proposals, ``context (B, T, dim)`` words -> ``(B, N, dim)`` (and the words
    ``(B, T, dim)`` with ``return_words``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim = self.context_dim = check_int("dim", dim)
        self.video_to_query = AttentionSublayer(dim, heads, context_dim=dim)
        self.query_to_video = AttentionSublayer(dim, heads, context_dim=dim)
        self.joint = AttentionSublayer(dim, heads, self_attention=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, x_padding_mask: torch.Tensor | None = None,
                return_words: bool = False):
        """x (B, N, dim) proposals, context (B, T, dim) words; key_padding_mask (B, T) / x_padding_mask (B, N) bool."""
        v, w = check_pair(self, x, context, channels=self.dim, context_channels=self.dim)
        check_key_padding_mask(x_padding_mask, v.shape[0], v.shape[1], name="x_padding_mask", device=v.device)
        check_bool("return_words", return_words)
        v1 = self.video_to_query(v, w, key_padding_mask=key_padding_mask)
        w1 = self.query_to_video(w, v1, key_padding_mask=x_padding_mask)
        both = torch.cat([v1, w1], dim=1)  # (B, N + T, dim)
        pads = None
        if key_padding_mask is not None or x_padding_mask is not None:
            B, N, T = v.shape[0], v.shape[1], w.shape[1]
            pads = torch.cat([v.new_ones(B, N, dtype=torch.bool) if x_padding_mask is None else x_padding_mask,
                              v.new_ones(B, T, dtype=torch.bool) if key_padding_mask is None else key_padding_mask], 1)
        out = self.joint(both, key_padding_mask=pads)
        v2, w2 = out[:, : v.shape[1]], out[:, v.shape[1] :]
        return (v2, w2) if return_words else v2


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("vlanet", kv_heads, causal)
    return CascadedCrossModalAttention(dim, heads, **VLANET.resolve_options(options))


VLANET = register(Mechanism(
    name="vlanet",
    aliases=("cascaded_cross_modal_attention",),
    family="cross",
    catalog="P105",
    title="VLANet: Video-Language Alignment Network for Weakly-Supervised Video Moment Retrieval",
    arxiv="2008.10238",
    code="(none released)",
    summary="Cascaded cross-modal attention: video attends to words, words to the query-aware video, then "
            "self-attention over both (post-norm residuals).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O((N + T)^2 d), memory O(N + T) fused",
    module=_module,
    permutation_equivariant=True,
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="each step equals torch nn.MultiheadAttention with copied weights in a post-norm residual; (?) the cascade "
          "order is a choice (no code), see the header.",
))
