"""SSG-QA-Net's Scene-embedded Interaction Module: scene-graph node features cross-attend to the question tokens.

Paper: "Advancing Surgical VQA with Scene Graph Knowledge", Yuan, Kattel, Lavanchy, Navab, Srivastav, Padoy,
arXiv 2312.10251. Official code: https://github.com/CAMMA-public/SSG-VQA (models/VisualBert_ssgqa.py). CATALOG P055.
The lightweight SIM fuses geometric scene knowledge into the VQA model: per layer, the question tokens are projected
to the scene width, the scene nodes s (B, N, d_s) attend to them and then to each other, each step post-normed:
``s = LN1(s + MHA(s, P t, P t))``, ``s = LN2(s + MHA(s, s, s))``; two layers; the result is concatenated to the visual
features of the VQA transformer.

Confirmed against the official code (``TextToSceneAttentionLayer``, the layer the model uses; ``SceneToText`` is
commented out there): the scene nodes are the queries and the projected text the keys and values (CATALOG's "(?)"
direction was the other way round: the code decides); its multi-head attention has no q/k/v biases, an output
projection with bias, and divides the scores by ``sqrt(emb_dim)`` -- the full width, not the head width (kept:
``scale="width"``; ``"head"`` is the usual 1/sqrt(head_dim)); scene width 18, 3 heads, text width 1024, 2 layers.
Dropout is omitted (inference form). The official call passes no text mask; ``key_padding_mask`` (B, T) masks padded
question tokens here (all True reproduces it).

Example:
    >>> import torch, attnzoo
    >>> sim = attnzoo.build("ssg_qa", 18, 3, context_dim=64)   # scene width 18, 3 heads, question width 64
    >>> scene, question = torch.randn(2, 7, 18), torch.randn(2, 11, 64)
    >>> sim(scene, question).shape
    torch.Size([2, 7, 18])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...errors import check_choice, check_int
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import AttentionSublayer, check_pair, plain_heads

SCALES = ("width", "head")


class SceneTextLayer(nn.Module):
    """One ``TextToSceneAttentionLayer``: text projected to the scene width, scene -> text attention, scene
    self-attention, each with a post-norm residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, scale: str) -> None:
        super().__init__()
        self.text_projection = nn.Linear(context_dim, dim)
        self.cross = AttentionSublayer(dim, heads, bias=False, out_bias=True)
        self.self = AttentionSublayer(dim, heads, self_attention=True, bias=False, out_bias=True)
        if scale == "width":  # the official MultiHeadAttention divides by sqrt(emb_dim)
            for sub in (self.cross, self.self):
                sub.attn.scale = 1.0 / math.sqrt(dim)

    def forward(self, scene: torch.Tensor, text: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        text = self.text_projection(text)  # (B, T, dim)
        scene = self.cross(scene, text, key_padding_mask=key_padding_mask)  # LN1(s + MHA(s, t, t))
        return self.self(scene)  # LN2(s + MHA(s, s, s))


class SceneEmbeddedInteraction(nn.Module):
    """SIM: ``x (B, N, dim)`` scene-graph nodes, ``context (B, T, context_dim)`` question tokens -> ``(B, N, dim)``."""

    def __init__(self, dim: int, heads: int, *, context_dim: int = 1024, layers: int = 2, scale: str = "width") -> None:
        super().__init__()
        self.dim, self.context_dim = check_int("dim", dim), check_int("context_dim", context_dim)
        check_choice("scale", scale, SCALES)
        self.layers = nn.ModuleList(SceneTextLayer(dim, heads, context_dim, scale)
                                    for _ in range(check_int("layers", layers)))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim) scene nodes, context (B, T, context_dim) question tokens, key_padding_mask (B, T) bool."""
        x, context = check_pair(self, x, context, channels=self.dim, context_channels=self.context_dim)
        for layer in self.layers:
            x = layer(x, context, key_padding_mask)
        return x


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("ssg_qa", kv_heads, causal)
    return SceneEmbeddedInteraction(dim, heads, **SSG_QA.resolve_options(options))


SSG_QA = register(Mechanism(
    name="ssg_qa",
    aliases=("ssg_qa_net", "scene_embedded_interaction"),
    family="cross",
    catalog="P055",
    title="Advancing Surgical VQA with Scene Graph Knowledge",
    arxiv="2312.10251",
    code="https://github.com/CAMMA-public/SSG-VQA",
    summary="Scene-graph nodes attend to the projected question tokens, then to each other (post-norm residuals, "
            "scores over sqrt(width) as the official code), two layers.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(L (N T + N^2) d) for N nodes, T tokens, L layers; memory O(N + T) fused",
    module=_module,
    options=(
        Option("context_dim", 1024, int, low=1, doc="question token width (the official 1024)"),
        Option("layers", 2, int, low=1, doc="SIM layers (the official 2)"),
        Option("scale", "width", str, choices=SCALES,
               doc="scores over sqrt(width) as the official code, or over sqrt(head_dim)"),
    ),
    permutation_equivariant=True,
    test_options={"context_dim": 12},
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="parity with the official TextToSceneAttentionLayer written out (copied weights); scene nodes are "
          "permutation-equivariant, question tokens permutation-invariant; the width scale is the official quirk.",
))
