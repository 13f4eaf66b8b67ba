"""KeNet doc-label attention: labels are the queries of a cross-attention over the document (and its knowledge).

Paper: "KeNet: Knowledge-enhanced Doc-Label Attention Network for Multi-label text classification", Li, Chen, Zeng,
arXiv 2403.01767 (ICASSP 2024). Official code: none found. CATALOG P018.
Document tokens H (n, d) (a BiLSTM over BERT embeddings in the paper) and retrieved-knowledge tokens K (m, d) are
attended by the label embeddings L (c, d): per label, ``A = softmax_n(L W H^T)`` and ``R = A H`` -- a label-specific
document vector -- and likewise over the knowledge; the label-wise vectors give one score per label, sigmoid per
label (multi-label).

(?) Only the abstract and secondary summaries were available here: "a dual attention computes the interactions of
documents and labels and of knowledge and labels". Choices: labels are learned embeddings (``num_labels``) or given
per call; each named source ("document", "knowledge", ...) is a context source of :func:`attnzoo.cross_attention`,
``mode="separate"`` (a softmax per source, label vectors summed; ``"joint"`` is one softmax over document and
knowledge together); the per-label score is label-wise linear, ``s_c = w_c . R_c + b_c``, for learned labels, and the
label's own embedding, ``s_c = L_c . R_c / sqrt(d)``, for labels given per call; ``predict`` applies a sigmoid
(``task="multi_label"``) or a softmax over labels (``task="single_label"``). CrossTune (P068,
:mod:`~attnzoo.mechanisms.cross.crosstune`) is the same composition with label descriptions as the queries and a
softmax over labels: one implementation, two records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...cross import MODES, CrossAttention
from ...errors import check_choice, check_int, check_module_input, check_tensor
from ...registry import CrossSpec, Mechanism, Option, register

TASKS = ("multi_label", "single_label")


class LabelAttention(nn.Module):
    """Labels as queries: ``x (B, N, dim)`` document tokens (and optional extra named sources, e.g.
    ``context={"knowledge": (B, M, C)}``) -> ``(B, num_labels, dim)`` label-specific representations.

    ``num_labels`` learned label embeddings, or ``labels`` per call ((c, dim) or (B, c, dim)): label descriptions.
    Scores: :class:`LabelWiseScores` for learned labels, :meth:`relatedness` for given ones; :meth:`probabilities`
    applies the sigmoid per label or the softmax over labels. ``heads`` split the label
    queries as in multi-head attention. ``context_dims`` names the sources (the first is the one ``x`` fills).
    """

    def __init__(self, dim: int, heads: int = 1, *, num_labels: int | None = None,
                 context_dims: Mapping[str, int] | None = None, mode: str = "separate",
                 task: str = "multi_label", bias: bool = False) -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        self.task = check_choice("task", task, TASKS)
        check_choice("mode", mode, MODES)
        dims = dict(context_dims) if context_dims else {"document": dim}
        self.primary = next(iter(dims))
        self.attn = CrossAttention(dim, heads, context_dims=dims, mode=mode, bias=bias)
        self.num_labels = None if num_labels is None else check_int("num_labels", num_labels)
        if self.num_labels is not None:
            self.labels = nn.Parameter(torch.randn(self.num_labels, dim) / math.sqrt(dim))
        else:
            self.register_parameter("labels", None)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_labels={self.num_labels}, sources={self.attn.names}, task={self.task!r}"

    def _queries(self, labels: torch.Tensor | None, B: int) -> torch.Tensor:
        if labels is None:
            if self.labels is None:
                raise ValueError("labels: this layer has no learned labels (num_labels=None); pass the label "
                                 "embeddings, (c, dim) or (B, c, dim)")
            return self.labels.unsqueeze(0).expand(B, -1, -1)
        check_tensor("labels", labels)
        if labels.dim() == 2:
            labels = labels.unsqueeze(0).expand(B, -1, -1)
        if labels.dim() != 3 or labels.shape[0] != B or labels.shape[-1] != self.dim:
            raise ValueError(f"labels: expected (c, {self.dim}) or ({B}, c, {self.dim}), got {tuple(labels.shape)}")
        return labels

    def forward(self, x: torch.Tensor, *, context: Mapping[str, torch.Tensor] | None = None,
                key_padding_mask: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim) document tokens; context {source: (B, M, C)} further sources; key_padding_mask (B, N) for
        x or {source: mask}; labels (c, dim) / (B, c, dim) or the learned ones -> (B, c, dim)."""
        check_module_input(self, x, channels=self.attn.context_dims[self.primary])
        ctx = {self.primary: x}
        if context is not None:
            if not isinstance(context, Mapping) or self.primary in context:
                raise ValueError(f"context: expected a mapping of further sources (x is {self.primary!r}), got "
                                 f"{context if not isinstance(context, Mapping) else list(context)}")
            ctx.update(context)
        masks = key_padding_mask if isinstance(key_padding_mask, Mapping) or key_padding_mask is None else {
            self.primary: key_padding_mask}
        q = self._queries(labels, x.shape[0])  # (B, c, dim)
        return self.attn(q, ctx, key_padding_mask=masks)

    def relatedness(self, representations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, c) logits of given labels: ``L_c . R_c / sqrt(dim)``, each label's embedding with its attended vector."""
        q = self._queries(labels, representations.shape[0])
        return (representations * q).sum(-1) / math.sqrt(self.dim)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, c) probabilities: sigmoid per label (multi_label) or softmax over labels (single_label)."""
        return torch.sigmoid(logits) if self.task == "multi_label" else torch.softmax(logits, dim=-1)


class LabelWiseScores(nn.Module):
    """Label-wise linear scores of learned labels: ``R (B, c, dim)`` -> ``(B, c)``, ``s_c = w_c . R_c + b_c``."""

    def __init__(self, num_labels: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(check_int("num_labels", num_labels), check_int("dim", dim))
                                   / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(num_labels))

    def forward(self, representations: torch.Tensor) -> torch.Tensor:
        check_tensor("representations", representations, ndim=3)
        if tuple(representations.shape[1:]) != tuple(self.weight.shape):
            raise ValueError(f"representations: expected (B, {self.weight.shape[0]}, {self.weight.shape[1]}), got "
                             f"{tuple(representations.shape)}")
        return (representations * self.weight).sum(-1) + self.bias


def _module(dim: int, heads: int, **options: Any):
    return LabelAttention(dim, heads, **LABEL_ATTENTION.resolve_options(options))


LABEL_ATTENTION = register(Mechanism(
    name="label_attention",
    aliases=("kenet", "doc_label_attention"),
    family="cross",
    kind="pooling",
    catalog="P018",
    title="KeNet: Knowledge-enhanced Doc-Label Attention Network for Multi-label text classification",
    arxiv="2403.01767",
    code="(none found)",
    summary="Label embeddings are the queries of a cross-attention over the document (and knowledge) tokens: one "
            "label-specific vector per label, then a score per label (multi-label sigmoid).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(c n d), memory O(c + n) fused",
    module=_module,
    options=(
        Option("num_labels", 16, int, low=1, allow_none=True, doc="learned labels (None: labels given per call)"),
        Option("context_dims", None, dict, allow_none=True,
               doc="{source: width}; the first source is x (None: {'document': dim})"),
        Option("mode", "separate", str, choices=MODES, doc="a softmax per source, or one over all (?)"),
        Option("task", "multi_label", str, choices=TASKS, doc="sigmoid per label, or softmax over labels"),
        Option("bias", False, bool, doc="biases in the projections"),
    ),
    test_options={"num_labels": 5},
    cross=CrossSpec(context_permutation_invariant=True),
    notes="(?) the combination of the document and knowledge attentions and the score head follow the abstract "
          "(no code or full text available). Equals cross-attention with labels as queries; shares its "
          "implementation with crosstune (P068).",
))
