"""Similarity merging, the classic baseline: ToMe's bipartite soft matching with size tracking and proportional
attention ("Token Merging: Your ViT But Faster", arXiv 2210.09461, https://github.com/facebookresearch/ToMe; not a
CATALOG paper of this family, the baseline the merging papers (P048 MAELRE, P053 MULTI-LANE) build on).

- :func:`bipartite_soft_matching`: split the tokens alternately into sets A (even positions) and B (odd), match
  each A token to its most similar B token (cosine of ``metric``, e.g. the keys), merge the ``r`` A tokens with the
  most similar matches into their B match. Returns an ``assignment`` (every token in exactly one slot) whose slots
  are numbered in the order of each group's first original token (original order kept). ``protected`` leading
  tokens (a [CLS]) are never merged. Ties: the lower A index merges first.
- :func:`tome_merge`: the merge with size tracking (size-weighted mean, sizes add up).
- :func:`proportional_attention`: softmax(q k^T * scale + log s_j) v: a merged token of size s counts as s copies,
  so attention over merged duplicates equals attention over the unmerged tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import check_int, check_qkv, check_scale, check_tensor
from .select import Reduced, merge_tokens


def bipartite_soft_matching(metric: torch.Tensor, r: int, *, protected: int = 0) -> tuple[torch.Tensor, int]:
    """(assignment (B, N), m = N - r) merging ``r`` tokens of metric (B, N, C) by ToMe's bipartite matching."""
    check_tensor("metric", metric, ndim=3)
    B, N, _ = metric.shape
    check_int("protected", protected, low=0, high=N)
    a_pos = torch.arange(0, N, 2, device=metric.device)  # (Na,)
    b_pos = torch.arange(1, N, 2, device=metric.device)  # (Nb,)
    free_a = int((a_pos >= protected).sum())
    check_int("r", r, low=0, high=min(free_a, b_pos.numel()) if b_pos.numel() else 0)
    group = torch.arange(N, device=metric.device).expand(B, N).clone()  # (B, N) each token its own group
    if r > 0:
        m = F.normalize(metric, dim=-1)
        sim = m[:, a_pos] @ m[:, b_pos].transpose(1, 2)  # (B, Na, Nb)
        sim[:, a_pos < protected] = float("-inf")  # protected tokens never merge
        best, match = sim.max(dim=-1)  # (B, Na)
        order = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :r]  # (B, r) A tokens to merge
        src = a_pos[order]  # (B, r) original positions
        dst = b_pos[torch.gather(match, 1, order)]  # (B, r)
        group.scatter_(1, src, dst)
    # number groups by their first original token: representative = smallest position in the group
    first = torch.full((B, N), N, dtype=torch.long, device=metric.device).scatter_reduce_(
        1, group, torch.arange(N, device=metric.device).expand(B, N), reduce="amin")  # (B, N) per group id
    rep = torch.gather(first, 1, group)  # (B, N) representative position of each token's group
    is_rep = torch.zeros(B, N, dtype=torch.long, device=metric.device).scatter_(1, rep, 1)  # (B, N)
    slot_of_pos = torch.cumsum(is_rep, dim=1) - 1  # (B, N) slot index of a representative position
    return torch.gather(slot_of_pos, 1, rep), N - r


def tome_merge(x: torch.Tensor, r: int, *, metric: torch.Tensor | None = None, sizes: torch.Tensor | None = None,
               protected: int = 0) -> Reduced:
    """Merge ``r`` tokens of x (B, N, C) (metric: x itself by default), size-weighted, sizes tracked."""
    assignment, m = bipartite_soft_matching(x if metric is None else metric, r, protected=protected)
    return merge_tokens(x, assignment, m, sizes)


def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: torch.Tensor, *,
                           scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + log sizes_j) v with sizes (B, Nk) > 0; q (B, H, Nq, D), k/v (B, H, Nk, D|Dv).

    Fused SDPA with a (B, 1, 1, Nk) additive bias: no (Nq, Nk) mask is formed."""
    B, Hq, Hk, Nq, Nk, D, _ = check_qkv(q, k, v)
    check_scale(scale)
    if sizes.shape != (B, Nk) or not bool((sizes > 0).all()):
        raise ValueError(f"sizes: expected positive sizes of shape ({B}, {Nk}), got {tuple(sizes.shape)}")
    bias = torch.log(sizes.to(q.dtype)).view(B, 1, 1, Nk)  # (B, 1, 1, Nk)
    scale = 1 / math.sqrt(D) if scale is None else float(scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=Hq != Hk)
