"""Sparse normalisers: sparsemax and alpha-entmax, exact (they sum to 1 and give exact zeros) and differentiable.

alpha-entmax (Peters, Niculae & Martins, "Sparse Sequence-to-Sequence Models", arXiv 1905.05702) maps scores z to
the probability vector ``p_i = [(alpha - 1) z_i - tau]_+^(1 / (alpha - 1))`` with the threshold tau that makes
``sum_i p_i = 1``. alpha = 1 is softmax (the limit), alpha = 2 is sparsemax (Martins & Astudillo, arXiv 1602.02068:
the Euclidean projection of z onto the simplex), alpha = 1.5 has a closed form as well. Entries at or below the
threshold are exactly 0.

- :func:`sparsemax` and :func:`entmax15`: the sort-based exact thresholds. Sort z in decreasing order; for every
  support size k compute the threshold the top k entries would need (sparsemax: ``(cumsum_k - 1) / k``; 1.5-entmax:
  the root of a quadratic from the running mean and variance of z / 2); the support is the largest k whose own k-th
  entry still clears its threshold. O(d log d) per row.
- :func:`entmax` (any alpha >= 1): alpha 1, 1.5 and 2 go to the exact forms; other alphas find tau by bisection on
  ``[max - 1, max - d^(1 - alpha)]`` (after scaling by alpha - 1) to the dtype's precision, then renormalise, so the
  result sums to 1 to rounding and its zeros are exact.
Backward (all three, custom autograd): with ``s = p^(2 - alpha)`` on the support (1 for sparsemax, sqrt(p) for
1.5-entmax), ``dz = s * g - s * (sum s g / sum s)``; zero outside the support. Rows whose every score is ``-inf``
return zeros. Low-precision inputs are computed in float32 and returned in their dtype.
"""

from __future__ import annotations

import math

import torch

from ..errors import check_float, check_int, check_tensor

__all__ = ["sparsemax", "entmax15", "entmax"]


def _prepare(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x moved to the last axis, in a computing dtype, shifted by its (finite) row max; and the all -inf rows."""
    z = x.movedim(dim, -1)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    m = z.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(m)  # (..., 1) rows with no finite score
    z = z - torch.where(empty, torch.zeros_like(m), m)  # (..., d) max 0
    return z, empty


def _finish(p: torch.Tensor, empty: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    p = torch.where(empty, torch.zeros_like(p), p)
    return p.to(like.dtype).movedim(-1, dim)


def _support_backward(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """dz = s g - s (sum s g / sum s) along the last axis; s >= 0 vanishes off the support."""
    sg = s * g
    denom = s.sum(dim=-1, keepdim=True)
    q = sg.sum(dim=-1, keepdim=True) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return sg - q * s


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        z, empty = _prepare(x, dim)  # (..., d)
        d = z.shape[-1]
        zs, _ = torch.sort(z, dim=-1, descending=True)  # (..., d)
        cs = zs.cumsum(dim=-1)  # (..., d)
        k = torch.arange(1, d + 1, device=z.device, dtype=z.dtype)  # (d,)
        support = (1 + k * zs > cs).sum(dim=-1, keepdim=True).clamp_min(1)  # (..., 1) support size
        tau = (cs.gather(-1, support - 1) - 1) / support.to(z.dtype)  # (..., 1)
        p = torch.clamp(z - tau, min=0)  # (..., d)
        p = _finish(p, empty, x, dim)
        ctx.save_for_backward(p)
        ctx.dim = dim
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (p,) = ctx.saved_tensors
        pl, gl = p.movedim(ctx.dim, -1), g.movedim(ctx.dim, -1)
        s = (pl > 0).to(gl.dtype)
        return _support_backward(gl, s).movedim(-1, ctx.dim), None


class _Entmax15(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        z, empty = _prepare(x, dim)
        z = z / 2  # (alpha - 1) z
        d = z.shape[-1]
        zs, _ = torch.sort(z, dim=-1, descending=True)  # (..., d)
        k = torch.arange(1, d + 1, device=z.device, dtype=z.dtype)
        mean = zs.cumsum(dim=-1) / k  # (..., d) mean of the top k
        mean_sq = (zs * zs).cumsum(dim=-1) / k
        ss = k * (mean_sq - mean * mean)  # sum of squared deviations of the top k
        delta = torch.clamp((1 - ss) / k, min=0)
        tau = mean - torch.sqrt(delta)  # the threshold if the support were the top k: sum (z_i - tau)^2 = 1
        support = (tau <= zs).sum(dim=-1, keepdim=True).clamp_min(1)  # (..., 1)
        tau_star = tau.gather(-1, support - 1)
        p = torch.clamp(z - tau_star, min=0) ** 2
        p = _finish(p, empty, x, dim)
        ctx.save_for_backward(p)
        ctx.dim = dim
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (p,) = ctx.saved_tensors
        pl, gl = p.movedim(ctx.dim, -1), g.movedim(ctx.dim, -1)
        return _support_backward(gl, pl.to(gl.dtype).sqrt()).movedim(-1, ctx.dim), None


class _EntmaxBisect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
        z, empty = _prepare(x, dim)
        z = z * (alpha - 1)  # max 0
        d = z.shape[-1]
        inv = 1.0 / (alpha - 1)
        # p_i = (z_i - tau)_+^inv; sum p = 1 has its root in [max - 1, max - d^(1 - alpha)] = [-1, -d^(1 - alpha)]
        lo = torch.full_like(z[..., :1], -1.0)
        hi = torch.full_like(z[..., :1], -(d ** (1 - alpha)))
        for _ in range(int(-math.log2(torch.finfo(z.dtype).eps)) + 8):  # halve to the dtype's precision
            mid = (lo + hi) / 2
            f = (torch.clamp(z - mid, min=0) ** inv).sum(dim=-1, keepdim=True) - 1  # decreasing in tau
            above = f >= 0
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        p = torch.clamp(z - lo, min=0) ** inv
        p = p / p.sum(dim=-1, keepdim=True)
        p = _finish(p, empty, x, dim)
        ctx.save_for_backward(p)
        ctx.alpha, ctx.dim = alpha, dim
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (p,) = ctx.saved_tensors
        pl, gl = p.movedim(ctx.dim, -1).to(g.dtype), g.movedim(ctx.dim, -1)
        s = torch.where(pl > 0, pl.clamp_min(torch.finfo(pl.dtype).tiny) ** (2 - ctx.alpha), torch.zeros_like(pl))
        return _support_backward(gl, s).movedim(-1, ctx.dim), None, None


def _check(x: object, dim: object) -> tuple[torch.Tensor, int]:
    x = check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x: expected at least one dimension to normalise over, got a 0-D tensor")
    dim = check_int("dim", dim, low=-x.dim(), high=x.dim() - 1)
    return x, dim % x.dim()


def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax along ``dim``: the Euclidean projection onto the simplex (exact, sort-based)."""
    x, dim = _check(x, dim)
    return _Sparsemax.apply(x, dim)


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax along ``dim`` (exact, sort-based): ``p = [z / 2 - tau]_+^2``."""
    x, dim = _check(x, dim)
    return _Entmax15.apply(x, dim)


def entmax(x: torch.Tensor, alpha: float = 1.5, dim: int = -1) -> torch.Tensor:
    """alpha-entmax along ``dim`` for alpha >= 1: softmax (1), exact 1.5-entmax, sparsemax (2), else bisection on the
    threshold to the dtype's precision (sums to 1, exact zeros)."""
    x, dim = _check(x, dim)
    alpha = check_float("alpha", alpha, low=1.0)
    if alpha == 1.0:
        return torch.softmax(x, dim=dim)
    if alpha == 1.5:
        return _Entmax15.apply(x, dim)
    if alpha == 2.0:
        return _Sparsemax.apply(x, dim)
    return _EntmaxBisect.apply(x, alpha, dim)
