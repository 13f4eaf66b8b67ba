"""Top-k selection that every compute path of a mechanism makes identically.

A mechanism that selects (blocks by landmark score, keys by attention weight) usually has several paths:
a dense reference, a tiled fast form and a decode step. If each path computes its selection scores with
its own kernel, the scores differ in their last bits (a matmul's blocking, its SIMD width and the code
for the tail columns change with the shape and the CPU: on AVX-512 a one-row product and the same row
inside a 40-row product disagree), so equal or nearly equal scores are ordered differently and the
paths retrieve different blocks. Two pieces make the selection path-independent:

- :func:`selection_scores`: dot products accumulated in float64 in a fixed order (d = 0, 1, ..., D-1),
  one elementwise multiply and one add per step. Elementwise IEEE operations are correctly rounded
  whatever the SIMD width, so the same (query, key) pair gives the same bits in every path, every batch
  shape and on every CPU. Equal keys give exactly equal scores.
- :func:`top_k_indices`: a stable descending sort, so exactly equal scores go to the lower index.
"""

from __future__ import annotations

import torch


def selection_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Dot products of every row of q (..., T, D) with every row of k (..., M, D) -> (..., T, M) float64.

    Leading axes broadcast. Accumulated in float64 in the fixed order d = 0..D-1, so the result of a pair
    of rows does not depend on the shapes it was computed with. O(T M D) elementwise work: meant for
    selection (top-k of landmark scores), not for attention itself. Not differentiable (selection is a
    constant of the computation, like a mask).
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k: expected the same last dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    qd = q.detach().to(torch.float64).unsqueeze(-2)  # (..., T, 1, D); the cast of float32/bfloat16 is exact
    kd = k.detach().to(torch.float64).unsqueeze(-3)  # (..., 1, M, D)
    out = torch.zeros(torch.broadcast_shapes(qd.shape[:-1], kd.shape[:-1]), dtype=torch.float64,
                      device=q.device)  # (..., T, M); 0 + x == x exactly
    for d in range(q.shape[-1]):
        out = out + qd[..., d] * kd[..., d]  # two roundings, never a fused multiply-add
    return out


def top_k_indices(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Indices of the ``k`` highest scores along ``dim`` (all of them if fewer), highest first; exactly
    equal scores go to the lower index (a stable sort). Paths that must agree compute ``scores`` with
    :func:`selection_scores`, so that "equal" means equal in every path."""
    order = torch.sort(scores.detach(), dim=dim, descending=True, stable=True).indices
    return order.narrow(dim, 0, min(k, scores.shape[dim]))
