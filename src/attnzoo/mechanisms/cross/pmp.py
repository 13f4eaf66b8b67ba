"""PMP: mask queries of a segmentation decoder attend to the text-prompt tokens, added as a zero-initialised residual.

Paper: "Prompt-Guided Mask Proposal for Two-Stage Open-Vocabulary Segmentation", Li, Zhang, Wan, Yu, Kale, Lu,
arXiv 2412.10292. Official code: none released (none found). CATALOG P106.
After each decoder layer of a query-based mask generator (Mask2Former style), the N mask queries q (B, N, d) attend to
the T text-prompt tokens t (B, T, d_t) (CLIP text embeddings) and add the result:
``q' = q + W_o softmax(q W_q (t W_k)^T / sqrt(d_h)) t W_v`` (multi-head), W_o zero-initialised so that the untrained
module leaves the original decoder exactly unchanged.

(?) No official code: the paper states a text-query cross-attention after each decoding layer; choices, each an option:
no norm around the residual (``norm="none"``; ``"pre"`` normalises the queries first; a post-norm would change q at
initialisation, so it is not offered), biases as torch's ``nn.MultiheadAttention``, defaults of Mask2Former's decoder
(dim 256, 8 heads) and CLIP ViT-B's text width (``context_dim=512``). Padded prompt tokens: ``key_padding_mask``.
Runs on :class:`attnzoo.cross.CrossAttention` (one fused SDPA call). The same composition serves LightCLIP's MLM
fusion (P112, ``lightclip.py``: masked text over image tokens, pre-norm, not zero-initialised): one implementation,
two records.

Example:
    >>> import torch, attnzoo
    >>> layer = attnzoo.build("pmp", 32, 4, context_dim=24)
    >>> queries, prompt = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    >>> torch.equal(layer(queries, prompt), queries)  # zero-initialised: the original decoder
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import check_bool, check_choice, check_int
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import AttentionSublayer, check_pair, plain_heads


class PromptGuidedQueries(nn.Module):
    """``x (B, N, dim)`` mask queries, ``context (B, T, context_dim)`` text-prompt tokens -> ``(B, N, dim)``:
    ``x + CrossAttn(x, context)`` (``norm="pre"``: the queries are layer-normed inside the attention)."""

    def __init__(self, dim: int, heads: int, *, context_dim: int = 512, norm: str = "none", zero_init: bool = True,
                 bias: bool = True) -> None:
        super().__init__()
        self.dim, self.context_dim = check_int("dim", dim), check_int("context_dim", context_dim)
        check_choice("norm", norm, ("none", "pre"))
        self.block = AttentionSublayer(dim, heads, context_dim=context_dim, norm=norm, bias=check_bool("bias", bias),
                                       zero_out=check_bool("zero_init", zero_init))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, T, context_dim), key_padding_mask (B, T) bool -> (B, N, dim)."""
        x, context = check_pair(self, x, context, channels=self.dim, context_channels=self.context_dim)
        return self.block(x, context, key_padding_mask=key_padding_mask)


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("pmp", kv_heads, causal)
    return PromptGuidedQueries(dim, heads, **PMP.resolve_options(options))


PMP = register(Mechanism(
    name="pmp",
    aliases=("prompt_guided_mask_proposal",),
    family="cross",
    catalog="P106",
    title="Prompt-Guided Mask Proposal for Two-Stage Open-Vocabulary Segmentation",
    arxiv="2412.10292",
    code="(none released)",
    summary="Mask queries cross-attend to text-prompt tokens after each decoder layer; zero-initialised residual, so "
            "the untrained module is the original decoder.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N T d), memory O(N + T) fused",
    module=_module,
    options=(
        Option("context_dim", 512, int, low=1, doc="text-prompt token width (CLIP ViT-B text: 512)"),
        Option("norm", "none", str, choices=("none", "pre"), doc="no norm, or a pre-norm of the queries"),
        Option("zero_init", True, bool, doc="zero-initialise the output projection (identity at start)"),
        Option("bias", True, bool, doc="biases in the projections (torch nn.MultiheadAttention)"),
    ),
    permutation_equivariant=True,
    test_options={"context_dim": 12},
    cross=CrossSpec(context_permutation_invariant=True),
    notes="equals x + torch nn.MultiheadAttention(x, text, text) with the same weights; zero-initialised output is "
          "the identity; (?) layer details not published, see the header.",
))
