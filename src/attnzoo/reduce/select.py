"""The select/merge step of token reduction, and the two baselines every comparison needs.

A reduction maps N tokens (B, N, C) to M tokens and records where every original token went:

- ``Reduced.tokens`` (B, M, C); ``Reduced.assignment`` (B, N) long: the output slot of each original token, or -1
  when it was dropped (pruning); ``Reduced.sizes`` (B, M): how many original tokens each output token stands for
  (size tracking: merging two merged tokens adds their sizes); ``Reduced.index`` (B, M) for selections: the
  original position of each kept token, ascending (original order kept).
- Selection (:func:`select_tokens`) keeps tokens in their original order; ties in a score are broken towards the
  lower index (:func:`topk_indices`, deterministic).
- Merging (:func:`merge_tokens`) averages each group weighted by size; :func:`unmerge` copies each merged token back
  to every original position it holds (so unmerge inverts merge on groups of equal tokens, and merge inverts
  unmerge always). Output slots are numbered in the order of each group's first original token.
- Baselines at the same budget: :func:`random_indices` (uniform without replacement, sorted) and
  :func:`pool_assignment` (non-overlapping 1-D segments or 2-D grid cells averaged: every token lands in exactly one
  pooled token, unlike overlapping adaptive pooling).

Budgets: :func:`keep_count` turns a keep ratio into ``ceil(ratio * n)`` tokens (at least 1), CATALOG P057's
``ceil((1 - r) N)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import check_float, check_int, check_tensor


@dataclass
class Reduced:
    """Result of a reduction: tokens (B, M, C), assignment (B, N) in [-1, M), sizes (B, M), index (B, M) or None."""

    tokens: torch.Tensor
    assignment: torch.Tensor
    sizes: torch.Tensor
    index: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        return self.tokens.shape[1]


def keep_count(n: int, keep: float | int) -> int:
    """Tokens kept out of ``n``: an int budget as is (1..n), a float ratio in (0, 1] as ceil(ratio * n) >= 1."""
    check_int("n", n, low=1)
    if isinstance(keep, int) and not isinstance(keep, bool):
        return check_int("keep", keep, low=1, high=n)
    ratio = check_float("keep", keep, low=0.0, high=1.0, low_open=True)
    # ceil with a tolerance so that 0.25 * 64 stays 16 despite rounding of the float product
    return max(1, min(n, math.ceil(ratio * n - 1e-9)))


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices of the k highest scores of (B, N), returned in ascending (original) order.

    Ties go to the lower index: a stable descending sort keeps equal scores in index order."""
    check_tensor("scores", scores, ndim=2, floating=True)
    check_int("k", k, low=1, high=scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, N)
    return torch.sort(order[:, :k], dim=1).values  # (B, k)


def _check_tokens(x: object) -> torch.Tensor:
    check_tensor("x", x, ndim=3)
    assert isinstance(x, torch.Tensor)
    if 0 in x.shape:
        raise ValueError(f"x: expected (B, N, C) with every size >= 1, got {tuple(x.shape)}")
    return x


def select_tokens(x: torch.Tensor, index: torch.Tensor, sizes: torch.Tensor | None = None) -> Reduced:
    """Keep tokens ``index`` (B, M) (ascending, unique) of x (B, N, C); the others are dropped (assignment -1)."""
    _check_tokens(x)
    B, N, C = x.shape
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 2 or index.shape[0] != B:
        raise ValueError(f"index: expected a long tensor (B, M) with B={B}, got "
                         f"{getattr(index, 'dtype', type(index).__name__)} {tuple(getattr(index, 'shape', ()))}")
    M = index.shape[1]
    if M and (int(index.min()) < 0 or int(index.max()) >= N):
        raise ValueError(f"index: expected positions in [0, {N}), got min {int(index.min())} max {int(index.max())}")
    if M > 1 and not bool((index[:, 1:] > index[:, :-1]).all()):
        raise ValueError("index: expected strictly increasing positions per row (original order, no repeats)")
    tokens = torch.gather(x, 1, index.unsqueeze(-1).expand(B, M, C))  # (B, M, C)
    assignment = torch.full((B, N), -1, dtype=torch.long, device=x.device)
    assignment.scatter_(1, index, torch.arange(M, device=x.device).expand(B, M))
    base = torch.ones(B, N, dtype=x.dtype, device=x.device) if sizes is None else sizes
    return Reduced(tokens, assignment, torch.gather(base, 1, index), index)


def prune(x: torch.Tensor, scores: torch.Tensor, keep: float | int) -> Reduced:
    """Keep the top ``keep`` tokens of x (B, N, C) by ``scores`` (B, N), in original order."""
    _check_tokens(x)
    return select_tokens(x, topk_indices(scores, keep_count(x.shape[1], keep)))


def merge_tokens(x: torch.Tensor, assignment: torch.Tensor, m: int, sizes: torch.Tensor | None = None) -> Reduced:
    """Size-weighted average of the tokens of x (B, N, C) sharing an output slot of ``assignment`` (B, N) in [0, m)
    (every token lands in exactly one slot; every slot gets >= 1 token). ``sizes`` (B, N): current sizes (1)."""
    _check_tokens(x)
    B, N, C = x.shape
    if not isinstance(assignment, torch.Tensor) or assignment.dtype != torch.long or assignment.shape != (B, N):
        raise ValueError(f"assignment: expected a long tensor of shape ({B}, {N}), got "
                         f"{getattr(assignment, 'dtype', None)} {tuple(getattr(assignment, 'shape', ()))}")
    check_int("m", m, low=1, high=N)
    if int(assignment.min()) < 0 or int(assignment.max()) >= m:
        raise ValueError(f"assignment: expected every token in a slot of [0, {m}), got values in "
                         f"[{int(assignment.min())}, {int(assignment.max())}]")
    w = torch.ones(B, N, dtype=x.dtype, device=x.device) if sizes is None else sizes.to(x.dtype)  # (B, N)
    size = torch.zeros(B, m, dtype=x.dtype, device=x.device).scatter_add_(1, assignment, w)  # (B, m)
    if bool((size == 0).any()):
        raise ValueError("assignment: every output slot must receive at least one token")
    total = torch.zeros(B, m, C, dtype=x.dtype, device=x.device).scatter_add_(
        1, assignment.unsqueeze(-1).expand(B, N, C), x * w.unsqueeze(-1))  # (B, m, C)
    return Reduced(total / size.unsqueeze(-1), assignment, size)


def unmerge(tokens: torch.Tensor, assignment: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """(B, N, C): each original position gets its output token (``fill`` where it was dropped, assignment -1)."""
    check_tensor("tokens", tokens, ndim=3)
    B, M, C = tokens.shape
    if assignment.dim() != 2 or assignment.shape[0] != B or int(assignment.max()) >= M:
        raise ValueError(f"assignment: expected (B, N) with B={B} and slots < {M}, got {tuple(assignment.shape)}")
    out = torch.gather(tokens, 1, assignment.clamp_min(0).unsqueeze(-1).expand(B, assignment.shape[1], C))
    return torch.where((assignment >= 0).unsqueeze(-1), out, torch.full_like(out, fill))


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Assignment of a reduction applied after another: original -> first's slot -> second's slot (-1 stays)."""
    out = torch.gather(second, 1, first.clamp_min(0))
    return torch.where(first >= 0, out, torch.full_like(out, -1))


def random_indices(batch: int, n: int, keep: float | int, *, generator: torch.Generator | None = None,
                   device=None) -> torch.Tensor:
    """(B, k): k uniformly random positions of n per row (without replacement), ascending. The baseline."""
    k = keep_count(n, keep)
    noise = torch.rand(batch, n, generator=generator, device=device)
    return torch.sort(torch.topk(noise, k, dim=1).indices, dim=1).values


def pool_grid(h: int, w: int, budget: int) -> tuple[int, int]:
    """The pooled grid (h', w') with h' <= h, w' <= w and the most cells h' * w' <= budget (ties: most square)."""
    best = (1, 1)
    for hh in range(1, h + 1):
        ww = min(w, budget // hh)
        if ww < 1:
            break
        if hh * ww > best[0] * best[1] or (hh * ww == best[0] * best[1] and abs(hh - ww) < abs(best[0] - best[1])):
            best = (hh, ww)
    return best


def pool_assignment(n: int, keep: float | int, *, grid: tuple[int, int] | None = None,
                    device=None) -> tuple[torch.Tensor, int]:
    """(assignment (n,), m): spatial pooling at a budget as a merge. 1-D: n tokens into m = keep_count contiguous
    segments (token i -> floor(i * m / n)). 2-D ``grid`` (h, w), row-major, h * w == n: cells of a (h', w') grid
    (:func:`pool_grid`; m = h' * w' <= budget, as close as the grid allows)."""
    budget = keep_count(n, keep)
    if grid is None:
        i = torch.arange(n, device=device)
        return (i * budget) // n, budget
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid: expected h * w == n = {n}, got {grid}")
    hh, ww = pool_grid(h, w, budget)
    r = (torch.arange(h, device=device) * hh) // h  # (h,)
    c = (torch.arange(w, device=device) * ww) // w  # (w,)
    return (r.view(h, 1) * ww + c.view(1, w)).reshape(n), hh * ww


def pool_tokens(x: torch.Tensor, keep: float | int, *, grid: tuple[int, int] | None = None) -> Reduced:
    """The pooling baseline: mean of each segment / grid cell of x (B, N, C) (see :func:`pool_assignment`)."""
    _check_tokens(x)
    a, m = pool_assignment(x.shape[1], keep, grid=grid, device=x.device)
    return merge_tokens(x, a.expand(x.shape[0], -1).contiguous(), m)
