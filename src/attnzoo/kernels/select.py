"""Top-k selection that every compute path of a mechanism makes identically.

A mechanism that selects (blocks by landmark score, keys by attention weight) usually has several paths:
a dense reference, a tiled fast form and a decode step. If each path computes its selection scores with
its own kernel, the scores differ in their last bits (a matmul's blocking, its SIMD width and the code
for the tail columns change with the shape and the CPU: on AVX-512 a one-row product and the same row
inside a 40-row product disagree), so equal or nearly equal scores are ordered differently and the
paths retrieve different blocks. Two pieces make the selection path-independent:

- :func:`selection_scores`: dot products in float64 summed by a fixed pairwise tree (fixed by D alone)
  of elementwise multiplies and adds. Elementwise IEEE operations are correctly rounded whatever the SIMD
  width, so the same (query, key) pair gives the same bits in every path, every batch shape and on
  every CPU. Equal keys give exactly equal scores.
- :func:`top_k_indices`: a stable descending sort, so exactly equal scores go to the lower index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SELECT_ELEMENTS = 1 << 18  # float64 products formed at once by selection_scores (2 MB: stays in cache)


def selection_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Dot products of every row of q (..., T, D) with every row of k (..., M, D) -> (..., T, M) float64.

    Leading axes broadcast. Each dot product is a fixed pairwise tree over d: the D products (zero-padded
    to the next power of two W) are summed as ``x[:W/2] + x[W/2:]``, halving until one is left, every step
    an elementwise float64 add. The tree depends on D alone, so the result for a pair of rows does not
    depend on the shapes it was computed with (nor on the CPU). Products are formed for a few query rows
    at a time (about ``SELECT_ELEMENTS`` float64 numbers). Not differentiable: selection is a constant of
    the computation, like a mask.
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k: expected the same last dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    D = q.shape[-1]
    width = 1 << max(0, (D - 1).bit_length())  # D rounded up to a power of two
    qd = F.pad(q.detach().to(torch.float64), (0, width - D)).unsqueeze(-2)  # (..., T, 1, W); exact casts
    kd = F.pad(k.detach().to(torch.float64), (0, width - D)).unsqueeze(-3)  # (..., 1, M, W)
    T, M = q.shape[-2], k.shape[-2]
    lead = math.prod(torch.broadcast_shapes(qd.shape[:-3], kd.shape[:-3]))
    rows = max(1, SELECT_ELEMENTS // max(1, lead * M * width))
    parts = []
    for t0 in range(0, max(T, 1), rows):
        x = qd[..., t0 : t0 + rows, :, :] * kd  # (..., t, M, W) products, each correctly rounded
        while x.shape[-1] > 1:
            half = x.shape[-1] // 2
            x = x[..., :half] + x[..., half:]  # (..., t, M, W / 2^i)
        parts.append(x.squeeze(-1))  # (..., t, M)
    return torch.cat(parts, dim=-2)


def top_k_indices(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Indices of the ``k`` highest scores along ``dim`` (all of them if fewer), highest first; exactly
    equal scores go to the lower index (a stable sort). Paths that must agree compute ``scores`` with
    :func:`selection_scores`, so that "equal" means equal in every path."""
    order = torch.sort(scores.detach(), dim=dim, descending=True, stable=True).indices
    return order.narrow(dim, 0, min(k, scores.shape[dim]))
