"""Attention rollout and VL-SAM's regularised attention flow (CATALOG P113), on any mechanism's effective operator.

Paper: "Training-Free Open-Ended Object Detection and Segmentation via Attention as Prompts" (VL-SAM), Lin, Wang,
Zhang et al., NeurIPS 2024 (arXiv 2411.05961); no official code found. Attention rollout: Abnar & Zuidema,
"Quantifying Attention Flow in Transformers", arXiv 2005.00928.

VL-SAM turns a VLM's attention into a query-specific heatmap in two steps, both here:

1. head aggregation: per layer, heads are weighted by how peaked they are -- ``w_h = mean_j max_i A_h[i, j]``
   (the mean over keys of the largest weight any query gives them: "mean-max", our reading of the paper's head
   weights) -- and averaged, ``A_l = sum_h w_h A_h / sum_h w_h`` (rows stay stochastic); uniform weights give the
   plain head mean of standard rollout;
2. attention flow: the layers are chained like rollout, ``F_l = Abar_l F_{l-1}`` with ``Abar = (1 - r) A + r I``
   (the residual stream; r = 0.5 as Abnar & Zuidema), F_0 = I, but regularised against the collapse a causal mask
   causes (early keys are seen by more queries and soak up the flow): each column of Abar is divided by the number
   of queries that can see it and the rows renormalised (``regularize=True``). Bidirectional encoders (DINOv2) see
   every key from every query, so there the regularisation is the identity and the flow is rollout.

The heatmap of query i is row i of the last F (for a ViT: the [CLS] row over the patches). The point-sampling
prompt generator for SAM is not implemented (no SAM model here). Choices above are marked where the paper is silent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import check_float, check_tensor

__all__ = ["head_weights", "aggregate_heads", "attention_flow", "patch_heatmap"]


def head_weights(weights: torch.Tensor) -> torch.Tensor:
    """VL-SAM's mean-max head weights: weights (..., H, Nq, Nk) -> (..., H), ``mean_j max_i A[i, j]``."""
    check_tensor("weights", weights)
    return weights.amax(-2).mean(-1)


def aggregate_heads(weights: torch.Tensor, how: str = "meanmax") -> torch.Tensor:
    """(H, Nq, Nk) -> (Nq, Nk): the head average weighted by :func:`head_weights` (``"meanmax"``) or uniform."""
    check_tensor("weights", weights, ndim=3)
    if how == "uniform":
        return weights.mean(0)
    if how != "meanmax":
        raise ValueError(f"how: expected 'meanmax' or 'uniform', got {how!r}")
    w = head_weights(weights)  # (H,)
    return (weights * w.view(-1, 1, 1)).sum(0) / w.sum().clamp_min(1e-300)


def _regularize(a: torch.Tensor, causal: bool) -> torch.Tensor:
    if not causal:
        return a
    n = a.shape[-1]
    seen = torch.arange(n, 0, -1, dtype=a.dtype, device=a.device)  # key j is seen by n - j queries
    r = a / seen.view(1, n)
    return r / r.sum(-1, keepdim=True).clamp_min(1e-300)


def attention_flow(layers: Sequence[torch.Tensor], *, residual: float = 0.5, heads: str = "meanmax",
                   regularize: bool = True, causal: bool = False) -> torch.Tensor:
    """Flow through the layers: ``layers`` = per layer (H, N, N) weights (any effective operator) or (N, N) already
    aggregated; returns F (N, N), rows summing to 1 when every layer's rows do. ``heads="uniform"``,
    ``regularize=False`` is standard attention rollout."""
    check_float("residual", residual, low=0.0, high=1.0)
    if not layers:
        raise ValueError("layers: expected at least one layer's attention")
    flow = None
    for i, a in enumerate(layers):
        check_tensor(f"layers[{i}]", a)
        a = aggregate_heads(a, heads) if a.dim() == 3 else a
        if a.dim() != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"layers[{i}]: expected (H, N, N) or (N, N) self-attention, got {tuple(a.shape)}")
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        bar = (1 - residual) * a + residual * eye
        if regularize:
            bar = _regularize(bar, causal)
        flow = bar if flow is None else bar @ flow
    return flow


def patch_heatmap(row: torch.Tensor, grid: tuple[int, int], *, skip: int = 1, clip: float | None = None
                  ) -> torch.Tensor:
    """A flow/attention row over [CLS] + patches -> (gh, gw) patch map normalised to [0, 1] (``skip`` leading
    non-patch tokens). ``clip`` (a quantile, e.g. 0.98) saturates the few patches above it first, for display: a ViT's
    high-norm artifact patches would otherwise take the whole colour range."""
    check_tensor("row", row, ndim=1)
    gh, gw = grid
    if row.numel() != skip + gh * gw:
        raise ValueError(f"row: expected {skip} + {gh} x {gw} = {skip + gh * gw} tokens, got {row.numel()}")
    m = row[skip:].reshape(gh, gw).double()
    if clip is not None:
        check_float("clip", clip, low=0.0, high=1.0)
        m = m.clamp(max=float(torch.quantile(m.flatten(), clip)))
    m = m - m.min()
    return m / m.max().clamp_min(1e-300)
