"""TransRefer3D's entity- and relation-aware attention: objects attend to the utterance as entities (node path) and
through their pairwise differences as relations (edge path, max over partners).

Paper: "TransRefer3D: Entity-and-Relation Aware Transformer for Fine-Grained 3D Visual Grounding", He, Zhao, Luo, Hui,
Huang, Zhang, Liu, arXiv 2108.02388 (ACM MM 2021). Official code: https://github.com/luo-junyu/TransRefer3D
(referit3d/models/coattention_net.py ``ObjEdgeGaModule``). CATALOG P021.
Objects O (B, N, d) and word features L (B, T, d). Entity-aware (node) path: ``n_i = MHA(o_i, L, L)``; relation-aware
(edge) path: the pairwise differences ``o_i - o_j`` query the words and the strongest relation is kept,
``e_i = max_j MHA_e(o_i - o_j, L, L)`` (channel-wise max); fusion ``x_n = LN(o + n)``, ``x_e = LN(o + e)``,
``o' = LN(x_n + FFN([x_n; x_e]))``.

Confirmed against the official ``ObjEdgeGaModule`` (CATALOG's "(?)" on RA): the relation features are the raw
differences ``o_i - o_j`` (no geometry MLP), matched to the whole utterance by their own attention, max-pooled over
j; ``MultiheadAttn`` is standard scaled dot-product attention with biased q/k/v/out linears; 4 heads and FFN width =
model width in the official stacking, LayerNorms as above. Choices: padded objects (``x_padding_mask``) are left out
of the max over j (the official max runs over padded partners too, whose rows attend uniformly after its -1e9 fill);
padded words are masked as keys (``key_padding_mask``); dropout omitted. The language side's guided attention
(``LangGaModule``) is a plain post-norm cross-attention block (``attnzoo.build("dmmi", ...)``-style) and not repeated
here. Memory: the edge path attends N^2 queries (O(N^2 T) scores), as the official.

Example:
    >>> import torch, attnzoo
    >>> era = attnzoo.build("transrefer3d", 32, 4)
    >>> objects, words = torch.randn(2, 6, 32), torch.randn(2, 9, 32)
    >>> era(objects, words).shape
    torch.Size([2, 6, 32])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...cross import CrossAttention
from ...errors import check_int, check_key_padding_mask
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import MLP, check_pair, plain_heads


class EntityRelationAttention(nn.Module):
    """``x (B, N, dim)`` object features, ``context (B, T, dim)`` word features -> ``(B, N, dim)``."""

    def __init__(self, dim: int, heads: int, *, ffn: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = self.context_dim = check_int("dim", dim)
        self.msa_node = CrossAttention(dim, heads, context_dim=dim, bias=True)
        self.msa_edge = CrossAttention(dim, heads, context_dim=dim, bias=True)
        self.normq, self.norme, self.norm2 = (nn.LayerNorm(dim, eps=eps) for _ in range(3))
        self.ffn = MLP(2 * dim, dim if ffn is None else check_int("ffn", ffn), out=dim)

    def edges(self, x: torch.Tensor, words: torch.Tensor, key_padding_mask: torch.Tensor | None,
              x_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """e_i = max_j MHA_e(o_i - o_j, words): (B, N, dim)."""
        B, N, D = x.shape
        diff = (x[:, :, None, :] - x[:, None, :, :]).reshape(B * N, N, D)  # rows (b, i), tokens j: o_i - o_j
        words_r = words.repeat_interleave(N, dim=0)  # (B N, T, dim)
        kpm = None if key_padding_mask is None else key_padding_mask.repeat_interleave(N, dim=0)
        rel = self.msa_edge(diff, words_r, key_padding_mask=kpm).view(B, N, N, D)  # (B, i, j, dim)
        if x_padding_mask is not None:  # padded partners j take no part in the max
            rel = rel.masked_fill(~x_padding_mask[:, None, :, None], float("-inf"))
        return rel.amax(dim=2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, x_padding_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, N, dim) objects, context (B, T, dim) words; key_padding_mask (B, T), x_padding_mask (B, N) bool."""
        x, words = check_pair(self, x, context, channels=self.dim, context_channels=self.dim)
        check_key_padding_mask(x_padding_mask, x.shape[0], x.shape[1], name="x_padding_mask", device=x.device)
        node = self.msa_node(x, words, key_padding_mask=key_padding_mask)  # entity-aware
        edge = self.edges(x, words, key_padding_mask, x_padding_mask)  # relation-aware
        xe = self.norme(x + edge)
        xn = self.normq(x + node)
        return self.norm2(xn + self.ffn(torch.cat([xn, xe], dim=-1)))


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("transrefer3d", kv_heads, causal)
    return EntityRelationAttention(dim, heads, **TRANSREFER3D.resolve_options(options))


TRANSREFER3D = register(Mechanism(
    name="transrefer3d",
    aliases=("entity_relation_attention",),
    family="cross",
    catalog="P021",
    title="TransRefer3D: Entity-and-Relation Aware Transformer for Fine-Grained 3D Visual Grounding",
    arxiv="2108.02388",
    code="https://github.com/luo-junyu/TransRefer3D",
    summary="Objects attend to the words as entities and, through pairwise differences o_i - o_j max-pooled over j, "
            "as relations; fused by LayerNorms and an FFN (official ObjEdgeGaModule).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N^2 T d) (edge path), memory O(N^2 (T + d))",
    module=_module,
    options=(
        Option("ffn", None, int, low=1, allow_none=True, doc="FFN width (None: dim, as the official)"),
        Option("eps", 1e-5, float, low=0.0, doc="layer-norm epsilon"),
    ),
    permutation_equivariant=True,
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="parity with the official ObjEdgeGaModule written out (copied weights); equivariant to object order, "
          "invariant to word order; without the edge path it is the entity attention alone.",
))
