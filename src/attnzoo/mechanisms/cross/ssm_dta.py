"""SSM-DTA's lightweight cross-attention: each side's [CLS] token attends to the other side's tokens, weights shared.

Paper: "SSM-DTA: Breaking the Barriers of Data Scarcity in Drug-Target Affinity Prediction", Pei, Wu, Zhu, Xia, Xie,
Qin, Liu, Liu, Yan, arXiv 2206.09818. Official code: https://github.com/QizhiPei/SSM-DTA
(fairseq/models/dti_mlm_regress_sep_encoder.py, ``RobertaDTICrossAttn``). CATALOG P054.
Drug tokens D (B, N_d, d) and protein tokens P (B, N_p, d) come from two pretrained encoders; one multi-head attention
(the same weights both ways) lets the drug's [CLS] attend to the protein and the protein's [CLS] to the drug:
``z = [MHA(D_0, P, P) ; MHA(P_0, D, D)]`` (B, 1, 2d), which feeds the affinity regression head.

Confirmed against the official code (``use_2_attention``): the queries are the first token of each side only, one
``fairseq.modules.MultiheadAttention`` (the standard scaled dot-product attention with q/k/v/out biases) serves both
directions, padding (token id 1) is masked as keys, and the two outputs are concatenated along channels; RoBERTa-base
sizes (width 768, 12 heads). The CATALOG's "(?)" (symmetric cross-attention, pooled and concatenated) is this.

Example:
    >>> import torch, attnzoo
    >>> fuse = attnzoo.build("ssm_dta", 32, 4)
    >>> drug, protein = torch.randn(2, 9, 32), torch.randn(2, 20, 32)
    >>> fuse(drug, protein).shape   # [drug CLS -> protein ; protein CLS -> drug]
    torch.Size([2, 1, 64])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...cross import CrossAttention
from ...errors import check_int, check_key_padding_mask
from ...registry import CrossSpec, Mechanism, register
from ._blocks import check_pair


class DrugTargetCrossAttention(nn.Module):
    """``x (B, N_d, dim)`` drug tokens and ``context (B, N_p, dim)`` protein tokens, [CLS] first in each ->
    ``(B, 1, 2 dim)``: the drug [CLS] over the protein and the protein [CLS] over the drug, one shared attention."""

    def __init__(self, dim: int, heads: int, *, bias: bool = True) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.cross_attn = CrossAttention(dim, heads, context_dim=dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, x_padding_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, N_d, dim) drug, context (B, N_p, dim) protein; key_padding_mask (B, N_p) and x_padding_mask (B, N_d)
        bool, True = real token."""
        drug, protein = check_pair(self, x, context, channels=self.dim, context_channels=self.dim)
        check_key_padding_mask(x_padding_mask, drug.shape[0], drug.shape[1], name="x_padding_mask", device=drug.device)
        drug_on_protein = self.cross_attn(drug[:, :1], protein, key_padding_mask=key_padding_mask)  # (B, 1, dim)
        protein_on_drug = self.cross_attn(protein[:, :1], drug, key_padding_mask=x_padding_mask)  # (B, 1, dim)
        return torch.cat([drug_on_protein, protein_on_drug], dim=-1)  # (B, 1, 2 dim)


def _module(dim: int, heads: int, **options: Any):
    return DrugTargetCrossAttention(dim, heads, **SSM_DTA.resolve_options(options))


SSM_DTA = register(Mechanism(
    name="ssm_dta",
    aliases=("drug_target_cross_attention",),
    family="cross",
    kind="fusion",
    catalog="P054",
    title="SSM-DTA: Breaking the Barriers of Data Scarcity in Drug-Target Affinity Prediction",
    arxiv="2206.09818",
    code="https://github.com/QizhiPei/SSM-DTA",
    summary="Drug [CLS] attends to protein tokens and protein [CLS] to drug tokens with one shared multi-head "
            "attention; outputs concatenated (B, 1, 2d).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O((N_d + N_p) d^2), memory O(N_d + N_p): two single-query attentions",
    module=_module,
    cross=CrossSpec(query_independent=False),
    notes="parity with one torch nn.MultiheadAttention used both ways (copied weights); tokens after [CLS] are "
          "permutation-invariant on each side.",
))
