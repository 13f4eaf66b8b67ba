"""VideoLights BiCMF: bi-directional cross-modal fusion of video clips and query words.

Paper: "VideoLights: Feature Refinement and Cross-Task Alignment Transformer for Joint Video Highlight Detection and
Moment Retrieval", Paul, Parvez, Mohammed, Rahman, arXiv 2412.01558. Official code:
https://github.com/dpaul06/VideoLights (video_lights/transformer.py, ``BiCMFLayer``). CATALOG P107.
Text-to-video and video-to-text attention, then the query-aware video attends to the video-aware text:
``v1 = LN1(v + W1 MHA(v + p_v, t + p_t, t))``, ``t1 = t + W2 MHA(t + p_t, v + p_v, v)``,
``c = LN3(v1 + W3 MHA(v1, t1, t1))``, ``out = LN4(f + f)`` with ``f = W5 ReLU(W4 c)``; positional embeddings p are
added to queries and keys, never to values.

Confirmed against the official ``BiCMFLayer.forward_post`` (the default path): three ``nn.MultiheadAttention``
(width 256, 8 heads), a linear after each, post-norms on the video side only, FF 1024; its last line normalises
``f + dropout(f)`` -- the feed-forward output added to itself, not to ``c`` -- kept as ``ffn_residual="official"``
(``"standard"`` gives ``LN4(c + f)``). The official attention masks only add query-padding x key-padding pairs on top
of the key padding, which changes no real row; ``key_padding_mask`` (text) and ``video_mask`` are the paddings here.
The global token and text pass-through around the layer are the host model's. Dropout is omitted.

Example:
    >>> import torch, attnzoo
    >>> bicmf = attnzoo.build("videolights", 32, 4, ffn=64)
    >>> video, words = torch.randn(2, 10, 32), torch.randn(2, 6, 32)
    >>> bicmf(video, words).shape
    torch.Size([2, 10, 32])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...cross import CrossAttention
from ...errors import check_choice, check_int, check_key_padding_mask, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import MLP, check_pair, plain_heads

FFN_RESIDUALS = ("official", "standard")


class BiCrossModalFusion(nn.Module):
    """``x (B, L_v, dim)`` video clips, ``context (B, L_t, dim)`` query words -> ``(B, L_v, dim)`` fused clips."""

    def __init__(self, dim: int, heads: int, *, ffn: int = 1024, ffn_residual: str = "official",
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = self.context_dim = check_int("dim", dim)
        self.ffn_residual = check_choice("ffn_residual", ffn_residual, FFN_RESIDUALS)
        self.cross_attn_1, self.cross_attn_2, self.cross_attn_3 = (
            CrossAttention(dim, heads, context_dim=dim, bias=True) for _ in range(3))
        self.linear1, self.linear2, self.linear3 = (nn.Linear(dim, dim) for _ in range(3))
        self.ff = MLP(dim, check_int("ffn", ffn))
        self.norm1, self.norm3, self.norm4 = (nn.LayerNorm(dim, eps=eps) for _ in range(3))

    def _positions(self, name: str, pos: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if pos is None:
            return like
        check_module_input(self, pos, name=name, channels=self.dim)
        if pos.shape != like.shape:
            raise ValueError(f"{name}: expected the shape of its tokens {tuple(like.shape)}, got {tuple(pos.shape)}")
        return like + pos

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, video_mask: torch.Tensor | None = None,
                video_pos: torch.Tensor | None = None, text_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L_v, dim) video, context (B, L_t, dim) words; key_padding_mask (B, L_t) and video_mask (B, L_v) bool
        (True = real token); video_pos / text_pos positional embeddings of x / context (added to queries and keys)."""
        v, t = check_pair(self, x, context, channels=self.dim, context_channels=self.dim)
        check_key_padding_mask(video_mask, v.shape[0], v.shape[1], name="video_mask", device=v.device)
        pv, pt = self._positions("video_pos", video_pos, v), self._positions("text_pos", text_pos, t)
        a1 = self.cross_attn_1(v, t, query=pv, key_context=pt, key_padding_mask=key_padding_mask)  # video -> text
        v1 = self.norm1(v + self.linear1(a1))
        a2 = self.cross_attn_2(t, v, query=pt, key_context=pv, key_padding_mask=video_mask)  # text -> video
        t1 = t + self.linear2(a2)
        a3 = self.cross_attn_3(v1, t1, key_padding_mask=key_padding_mask)  # query-aware video -> video-aware text
        c = self.norm3(v1 + self.linear3(a3))
        f = self.ff(c)
        return self.norm4(f + f if self.ffn_residual == "official" else c + f)


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("videolights", kv_heads, causal)
    return BiCrossModalFusion(dim, heads, **VIDEOLIGHTS.resolve_options(options))


VIDEOLIGHTS = register(Mechanism(
    name="videolights",
    aliases=("bicmf", "bi_directional_cross_modal_fusion"),
    family="cross",
    catalog="P107",
    title="VideoLights: Feature Refinement and Cross-Task Alignment Transformer for Joint Video Highlight Detection "
          "and Moment Retrieval",
    arxiv="2412.01558",
    code="https://github.com/dpaul06/VideoLights",
    summary="Bi-directional cross-modal fusion: video->text and text->video attention, then the query-aware video "
            "attends to the video-aware text (official BiCMF layer).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(L_v L_t d + L_v d ffn), memory O(L_v + L_t) fused",
    module=_module,
    options=(
        Option("ffn", 1024, int, low=1, doc="feed-forward width (official dim_feedforward 1024)"),
        Option("ffn_residual", "official", str, choices=FFN_RESIDUALS,
               doc="LN4(f + f) as the official code, or LN4(c + f)"),
        Option("eps", 1e-5, float, low=0.0, doc="layer-norm epsilon"),
    ),
    permutation_equivariant=True,
    test_options={"ffn": 24},
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="parity with the official BiCMFLayer.forward_post written out with torch nn.MultiheadAttention (copied "
          "weights); video tokens permutation-equivariant, words permutation-invariant.",
))
