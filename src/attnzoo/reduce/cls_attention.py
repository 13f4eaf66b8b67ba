"""[CLS]-attention scores for visual token pruning.

- P057 FasterVLM -- "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
  Faster", arXiv 2412.01818, https://github.com/Theia-4869/FasterVLM. Score a_i = mean_h softmax(q_cls K^T *
  scale)_i over the patch tokens of the vision encoder's penultimate layer; keep the top ceil(keep * N) patches in
  their original order (the official code keeps a boolean index mask over the patches).
- P085 VTC-CLS -- "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs", arXiv 2412.05819,
  https://github.com/THU-MIG/VTC-CLS. Score a_i = sum_{l in L} w_l mean_h A^l_{cls,i}: the official code sums
  (w_l = 1) the head-mean [CLS] rows of layers ``start_layer`` .. penultimate; keep the top-k, original order.

Choices: the [CLS] row comes from ``attnzoo.reduce.importance.attention_row`` (q_cls, K, log-sum-exp; no n x n
matrix, works under SDPA) or from eager attentions, whichever the caller has; ``dinov2_cls_rows`` computes it for a
transformers ``Dinov2Model`` from its hidden states. Ties go to the lower patch index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import check_int, check_tensor
from .importance import attention_row
from .registry import Reduction, register_reduction
from .select import Reduced, keep_count, select_tokens, topk_indices


def cls_scores(cls_row: torch.Tensor, *, cls_index: int = 0) -> torch.Tensor:
    """(B, N - 1): the head-mean attention of the [CLS] row (B, H, N) on every other token (the patches)."""
    check_tensor("cls_row", cls_row, ndim=3)
    n = cls_row.shape[-1]
    check_int("cls_index", cls_index, low=0, high=n - 1)
    mean = cls_row.mean(dim=1)  # (B, N)
    return torch.cat([mean[:, :cls_index], mean[:, cls_index + 1:]], dim=1)  # (B, N - 1)


def fastervlm_scores(cls_rows: Sequence[torch.Tensor], *, layer: int = -2, cls_index: int = 0) -> torch.Tensor:
    """P057: patch scores from the [CLS] rows of every layer (each (B, H, N)): the ``layer`` one (penultimate)."""
    if not cls_rows:
        raise ValueError("cls_rows: expected one [CLS] row (B, H, N) per layer, got none")
    return cls_scores(cls_rows[layer], cls_index=cls_index)


def vtc_cls_scores(cls_rows: Sequence[torch.Tensor], *, layers: Sequence[int] | None = None,
                   weights: Sequence[float] | None = None, cls_index: int = 0) -> torch.Tensor:
    """P085: sum_l w_l * head-mean [CLS] row of layer l. Default layers: all but the last (the official code's
    ``attentions[start_layer:-1]`` with start_layer 0); default weights 1."""
    if not cls_rows:
        raise ValueError("cls_rows: expected one [CLS] row (B, H, N) per layer, got none")
    layers = list(range(len(cls_rows) - 1)) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers: expected at least one layer")
    weights = [1.0] * len(layers) if weights is None else list(weights)
    if len(weights) != len(layers):
        raise ValueError(f"weights: expected one per layer ({len(layers)}), got {len(weights)}")
    return sum(w * cls_scores(cls_rows[i], cls_index=cls_index) for w, i in zip(weights, layers))


def prune_patches(patches: torch.Tensor, scores: torch.Tensor, keep: float | int) -> Reduced:
    """Keep the top ``keep`` patches (B, P, C) by ``scores`` (B, P), original order (FasterVLM / VTC-CLS step 2)."""
    check_tensor("patches", patches, ndim=3)
    if scores.shape != patches.shape[:2]:
        raise ValueError(f"scores: expected {tuple(patches.shape[:2])} (one per patch), got {tuple(scores.shape)}")
    return select_tokens(patches, topk_indices(scores, keep_count(patches.shape[1], keep)))


def fastervlm(patches: torch.Tensor, cls_rows: Sequence[torch.Tensor], keep: float | int) -> Reduced:
    """P057 FasterVLM: prune patches (B, P, C) by the penultimate layer's [CLS] attention (rows (B, H, 1 + P))."""
    return prune_patches(patches, fastervlm_scores(cls_rows), keep)


def vtc_cls(patches: torch.Tensor, cls_rows: Sequence[torch.Tensor], keep: float | int, *,
            layers: Sequence[int] | None = None) -> Reduced:
    """P085 VTC-CLS: prune patches by the [CLS] attention summed over ``layers`` (default: all but the last)."""
    return prune_patches(patches, vtc_cls_scores(cls_rows, layers=layers), keep)


def dinov2_cls_rows(model, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([CLS] attention row (B, H, 1 + P) of every layer, last_hidden_state) of a transformers ``Dinov2Model``,
    recomputed from each layer's q_cls, K and log-sum-exp (any attn_implementation; no attention matrix)."""
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        rows = []
        for layer, h in zip(model.encoder.layer, out.hidden_states[:-1]):
            att = layer.attention
            x = layer.norm1(h)  # (B, N, C)
            B, N, C = x.shape
            H = model.config.num_attention_heads
            q = att.q_proj(x[:, :1]).view(B, 1, H, C // H).transpose(1, 2)  # (B, H, 1, D)
            k = att.k_proj(x).view(B, N, H, C // H).transpose(1, 2)  # (B, H, N, D)
            rows.append(attention_row(q, k, rows=[0]).squeeze(2))  # (B, H, N)
    return rows, out.last_hidden_state


register_reduction(Reduction(
    name="fastervlm", catalog="P057",
    title="[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster",
    arxiv="2412.01818", code="https://github.com/Theia-4869/FasterVLM", step="prune",
    scores="[CLS] attention of the vision encoder's penultimate layer, mean over heads, over the patch tokens",
    keeps="the top ceil(keep * N) patch tokens, in original order", training_free=True, entry=fastervlm,
))
register_reduction(Reduction(
    name="vtc_cls", catalog="P085", title="[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs",
    arxiv="2412.05819", code="https://github.com/THU-MIG/VTC-CLS", step="prune",
    scores="sum over several vision-encoder layers (default all but the last, weight 1) of the head-mean [CLS] "
           "attention over the patch tokens",
    keeps="the top-k patch tokens, in original order", training_free=True, entry=vtc_cls,
))
