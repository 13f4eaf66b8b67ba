"""Conditional Cross-Attention Network: a learned condition (attribute) embedding is the query over the ViT tokens,
so one backbone yields one embedding space per attribute.

Paper: "Conditional Cross Attention Network for Multi-Space Embedding without Entanglement in Only a SINGLE Network",
Song, Lee, Park, Kim, Yoon, arXiv 2307.13254 (ICCV 2023). Official code: none released (none found). CATALOG P084.
For condition c (an attribute such as collar design or sleeve length) with learned embedding e_c, the attribute-
specific embedding of image tokens X (B, M, d) is ``z_c = softmax(e_c W_q (X W_k)^T / sqrt(d_h)) X W_v`` (multi-head,
then an output projection): switching c switches the embedding space inside a single network.

(?) No official code: the paper fuses the condition with the image tokens by cross-attention in the last block of a
ViT; here the condition's learned query token(s) attend to the token set (``query_tokens`` per condition, default 1)
and nothing else is added; ``num_conditions`` defaults to 8 (FashionAI's eight attributes). ``condition`` is an int or
a (B,) tensor (one condition per image).

Example:
    >>> import torch, attnzoo
    >>> cca = attnzoo.build("conditional_cross_attention", 32, 4, num_conditions=3)
    >>> tokens = torch.randn(2, 50, 32)
    >>> collar, sleeve = cca(tokens, condition=0), cca(tokens, condition=1)
    >>> collar.shape, bool((collar - sleeve).abs().max() > 0)
    (torch.Size([2, 1, 32]), True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...cross import CrossAttention
from ...errors import check_int, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register


class ConditionalCrossAttention(nn.Module):
    """``x (B, M, context_dim)`` image tokens -> ``(B, query_tokens, dim)``: the embedding of condition ``condition``
    (int or (B,) integer tensor), its learned query token(s) attending to the tokens."""

    def __init__(self, dim: int, heads: int, *, num_conditions: int = 8, query_tokens: int = 1,
                 context_dim: int | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.num_conditions = check_int("num_conditions", num_conditions)
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        tokens = check_int("query_tokens", query_tokens)
        self.queries = nn.Parameter(torch.randn(num_conditions, tokens, dim) * dim ** -0.5)
        self.attn = CrossAttention(dim, heads, context_dim=self.context_dim, bias=True)

    def condition_queries(self, condition: int | torch.Tensor, batch: int) -> torch.Tensor:
        """(B, query_tokens, dim): the query tokens of ``condition`` for each batch row."""
        if isinstance(condition, torch.Tensor):
            if condition.dtype in (torch.bool,) or condition.is_floating_point() or tuple(condition.shape) != (batch,):
                raise TypeError(f"condition: expected an int or an integer tensor ({batch},), got dtype "
                                f"{condition.dtype} and shape {tuple(condition.shape)}")
            if condition.numel() and (int(condition.min()) < 0 or int(condition.max()) >= self.num_conditions):
                raise ValueError(f"condition: expected values in [0, {self.num_conditions}), got "
                                 f"{condition.tolist()}")
            return self.queries[condition.to(self.queries.device)]
        check_int("condition", condition, low=0, high=self.num_conditions - 1)
        return self.queries[condition].unsqueeze(0).expand(batch, -1, -1)

    def forward(self, x: torch.Tensor, *, condition: int | torch.Tensor = 0,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, M, context_dim) tokens, key_padding_mask (B, M) bool -> (B, query_tokens, dim)."""
        check_module_input(self, x, channels=self.context_dim)
        q = self.condition_queries(condition, x.shape[0])  # (B, query_tokens, dim)
        return self.attn(q, x, key_padding_mask=key_padding_mask)


def _module(dim: int, heads: int, **options: Any):
    return ConditionalCrossAttention(dim, heads, **CONDITIONAL_CROSS_ATTENTION.resolve_options(options))


CONDITIONAL_CROSS_ATTENTION = register(Mechanism(
    name="conditional_cross_attention",
    aliases=("ccanet", "condition_query_attention"),
    family="cross",
    kind="pooling",
    catalog="P084",
    title="Conditional Cross Attention Network for Multi-Space Embedding without Entanglement in Only a SINGLE Network",
    arxiv="2307.13254",
    code="(none released)",
    summary="A learned condition (attribute) embedding is the query over the image tokens: one attribute-specific "
            "embedding space per condition from a single backbone.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(q M d) for q query tokens over M tokens, memory O(q + M) fused",
    module=_module,
    options=(
        Option("num_conditions", 8, int, low=1, doc="number of conditions (FashionAI: 8 attributes)"),
        Option("query_tokens", 1, int, low=1, doc="learned query tokens per condition"),
        Option("context_dim", None, int, low=1, allow_none=True, doc="image token width (None: dim)"),
    ),
    test_options={"num_conditions": 3, "context_dim": 12},
    cross=CrossSpec(context_permutation_invariant=True),
    notes="equals torch nn.MultiheadAttention with the condition's query token (copied weights); conditions change "
          "only the query; (?) architecture details unpublished.",
))
