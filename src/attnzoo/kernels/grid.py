"""Shared compute paths for attention on 2-D token grids (neighborhoods, windows, blocks with halos).

Everything here avoids the (H*W) x (H*W) score matrix. The building blocks:

- :func:`tile_attention`: softmax attention of many independent query tiles against their own key tiles,
  ``qt (B, h, T, Q, D)``, ``kt/vt (B, h, T, R, D|Dv)`` with an optional additive bias broadcastable to
  ``(B, h, T, Q, R)`` (``-inf`` = masked; the bias may require grad: relative position tables, dynamic
  position MLPs, query-dependent relative logits). A custom ``autograd.Function`` with a hand-written
  backward: the tile probabilities (O(HW * R), never O((HW)^2)) are kept for the backward while they fit in
  ``_STORE_BYTES``; beyond that only the row log-sum-exp is kept and the backward recomputes each chunk,
  FlashAttention style. Temporary memory is bounded by chunking over tiles.
- :func:`to_tiles` / :func:`from_tiles`: cut a (B, h, L1, L2, D) grid into query tiles (zero-padded at the
  bottom/right) and put them back.

Users: NATTEN's neighborhood attention (``attnzoo.mechanisms.local.neighborhood_2d``: query tiles against the
key regions holding their neighborhoods), HaloNet's blocks with halos, HAT's windows, CrossFormer's groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["tile_attention", "to_tiles", "from_tiles"]

# Score tiles of one chunk hold at most this many elements (bounds the temporary memory of both passes).
_TILE_ELEMENTS = 1 << 23
# Keep the tile probabilities for the backward when they take at most this many bytes; recompute otherwise.
_STORE_BYTES = 256 << 20


# --------------------------------------------------------------------------------------------------------
# Tiled attention with recomputation
# --------------------------------------------------------------------------------------------------------
def _units(B: int, h: int, T: int, Q: int, R: int) -> list[tuple[slice, slice, slice]]:
    """Pieces of work as (batch, head, tile) slices. Everything at once when the scores fit in
    ``_TILE_ELEMENTS``; otherwise one (batch, head) pair at a time, split along the tiles, so that every
    piece of a contiguous (B, h, T, ...) tensor is itself contiguous (strided batched matmuls are slow)."""
    if B * h * T * Q * R <= _TILE_ELEMENTS:
        return [(slice(None), slice(None), slice(None))]
    step = max(1, _TILE_ELEMENTS // (Q * R))
    return [(slice(b, b + 1), slice(j, j + 1), slice(s, min(T, s + step)))
            for b in range(B) for j in range(h) for s in range(0, T, step)]


def _piece(x: torch.Tensor | None, unit) -> torch.Tensor | None:
    """The part of a (B|1, h|1, T|1, ...) tensor that a unit reads (broadcast axes stay whole)."""
    if x is None:
        return None
    return x[tuple(sl if n > 1 else slice(None) for sl, n in zip(unit, x.shape[:3]))]


def _reduce_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``g`` over the axes where ``shape`` broadcasts (size 1)."""
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1]
    return g.sum(dim=dims, keepdim=True) if dims else g


def _softmax_backward(dp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """p * (dp - rowsum(dp * p)): the gradient of the scores, fused where PyTorch exposes it."""
    fused = getattr(torch, "_softmax_backward_data", None)
    if fused is not None:
        return fused(dp, p, -1, p.dtype)
    return p * (dp - (dp * p).sum(dim=-1, keepdim=True))


def _scores(q_, k_, bias, mask):
    """Scaled, biased, masked scores of one unit; q_ is already scaled. (b, h, g, Q, R)."""
    sc = torch.matmul(q_, k_.transpose(-1, -2))
    if bias is not None:
        sc = sc.add_(bias)
    if mask is not None:
        sc = sc.masked_fill_(~mask, float("-inf"))
    return sc


class _TileAttention(torch.autograd.Function):
    """Two regimes, chosen in the forward by the size of the probability tiles:

    - stored: the probabilities P (B, h, T, Q, R) are kept for the backward when they fit in
      ``_STORE_BYTES`` (they are O(HW * R), not O((HW)^2)); the backward recomputes nothing;
    - recomputed: otherwise only the row log-sum-exp is kept and each piece of P is rebuilt, FlashAttention
      style, so the extra memory of training is O(HW) beyond the inputs.
    Either way the temporaries of one pass are bounded by ``_TILE_ELEMENTS`` scores (see :func:`_units`).
    """

    @staticmethod
    def forward(ctx, qt, kt, vt, bias, mask, scale, rows_nonempty):
        qt, kt, vt = qt.contiguous(), kt.contiguous(), vt.contiguous()
        B, h, T, Q, D = qt.shape
        R, Dv = kt.shape[3], vt.shape[4]
        acc = torch.promote_types(qt.dtype, torch.float32)
        bias_a = None if bias is None else bias.to(acc)
        # Rows whose keys are all masked return zeros; the fused softmax would give NaN there.
        empty_rows = not rows_nonempty and (
            (bias_a is not None and bool(torch.isneginf(bias_a).all(dim=-1).any()))
            or (mask is not None and bool((~mask).all(dim=-1).any())))
        store = B * h * T * Q * R * torch.finfo(acc).bits // 8 <= _STORE_BYTES and not empty_rows
        units = _units(B, h, T, Q, R)
        whole = len(units) == 1
        out = None if whole else torch.empty(B, h, T, Q, Dv, dtype=acc, device=qt.device)  # (B, h, T, Q, Dv)
        probs = []
        lse = None if store else torch.empty(B, h, T, Q, 1, dtype=acc, device=qt.device)
        for u in units:
            q_ = qt[u].to(acc) * scale  # scale folded into the (smaller) query tile
            sc = _scores(q_, kt[u].to(acc), _piece(bias_a, u), _piece(mask, u))  # (b, h, g, Q, R)
            if store:
                p = torch.softmax(sc, dim=-1)
                probs.append(p)
                o = torch.matmul(p, vt[u].to(acc))  # (b, h, g, Q, Dv)
            else:
                m = sc.amax(dim=-1, keepdim=True)
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row with no key gives zeros
                p = sc.sub_(m).exp_()  # unnormalised
                denom = p.sum(dim=-1, keepdim=True)
                o = torch.matmul(p, vt[u].to(acc)).div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
                lse[u] = m + torch.log(denom)
            if whole:
                out = o
            else:
                out[u] = o
        result = out.to(qt.dtype)
        ctx.save_for_backward(qt, kt, vt, bias, mask, result, *(probs if store else [lse]))
        ctx.scale, ctx.store, ctx.units = scale, store, units
        return result

    @staticmethod
    def backward(ctx, dout):
        qt, kt, vt, bias, mask, out, *saved = ctx.saved_tensors
        scale, store, units = ctx.scale, ctx.store, ctx.units
        whole = len(units) == 1
        acc = torch.promote_types(qt.dtype, torch.float32)
        bias_a = None if bias is None or store else bias.to(acc)
        want_bias = bias is not None and ctx.needs_input_grad[3]
        do = dout.to(acc).contiguous()
        if not store:
            lse = torch.where(torch.isfinite(saved[0]), saved[0], torch.zeros_like(saved[0]))
            delta = (do * out.to(acc)).sum(dim=-1, keepdim=True)  # (B, h, T, Q, 1) = rowsum(dP * P)
        if not whole:
            dq = torch.empty(qt.shape, dtype=acc, device=qt.device)
            dk = torch.empty(kt.shape, dtype=acc, device=qt.device)
            dv = torch.empty(vt.shape, dtype=acc, device=qt.device)
        dbias = torch.zeros(bias.shape, dtype=acc, device=qt.device) if want_bias else None
        for i, u in enumerate(units):
            q_, k_, v_, do_ = qt[u].to(acc) * scale, kt[u].to(acc), vt[u].to(acc), do[u]
            dp = torch.matmul(do_, v_.transpose(-1, -2))  # (b, h, g, Q, R)
            if store:
                p = saved[i]  # probabilities
                ds = _softmax_backward(dp, p)  # dL/dscore
            else:
                p = _scores(q_, k_, _piece(bias_a, u), _piece(mask, u)).sub_(lse[u]).exp_()  # probabilities
                ds = dp.sub_(delta[u]).mul_(p)
            parts = (torch.matmul(ds, k_), torch.matmul(ds.transpose(-1, -2), q_),
                     torch.matmul(p.transpose(-1, -2), do_))
            if whole:
                dq, dk, dv = parts
            else:
                dq[u], dk[u], dv[u] = parts
            if want_bias:
                target = _piece(dbias, u)
                target += _reduce_to(ds, target.shape)
        dq = dq.mul_(scale) if not whole else dq * scale
        return (dq.to(qt.dtype), dk.to(kt.dtype), dv.to(vt.dtype),
                None if dbias is None else dbias.to(bias.dtype), None, None, None)


def tile_attention(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, *, scale: float,
                   bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   rows_nonempty: bool = False) -> torch.Tensor:
    """Softmax attention inside independent tiles, with a hand-written backward.

    Args:
        qt: (B, h, T, Q, D) queries of T tiles; kt: (B, h, T, R, D) and vt: (B, h, T, R, Dv) their keys/values.
        scale: multiplies q . k.
        bias: additive scores broadcastable to (B, h, T, Q, R), each axis full or 1; ``-inf`` masks a key.
            It may require grad (the gradient is reduced to its shape).
        mask: bool, broadcastable like ``bias``, True = attend (a cheaper way to mask than a -inf bias).
        rows_nonempty: the caller guarantees every query row keeps at least one key (skips a check).

    Returns:
        (B, h, T, Q, Dv); a query row whose keys are all masked returns zeros.
    """
    full = (*qt.shape[:4], kt.shape[3])
    for name, t in (("bias", bias), ("mask", mask)):
        if t is not None and (t.dim() != 5 or any(b not in (1, f) for b, f in zip(t.shape, full))):
            raise ValueError(f"{name}: expected a shape broadcastable to {full} with full or size-1 axes, "
                             f"got {tuple(t.shape)}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool (True = attend), got {mask.dtype}")
    return _TileAttention.apply(qt, kt, vt, bias, mask, float(scale), bool(rows_nonempty))


def to_tiles(x: torch.Tensor, t1: int, t2: int, n1: int, n2: int) -> torch.Tensor:
    """(B, h, L1, L2, D) -> (B, h, n1*n2, t1*t2, D), zero-padded at the bottom/right."""
    B, h, L1, L2, D = x.shape
    if n1 * t1 != L1 or n2 * t2 != L2:
        x = F.pad(x, (0, 0, 0, n2 * t2 - L2, 0, n1 * t1 - L1))  # (B, h, n1*t1, n2*t2, D)
    x = x.view(B, h, n1, t1, n2, t2, D).permute(0, 1, 2, 4, 3, 5, 6)  # (B, h, n1, n2, t1, t2, D)
    return x.reshape(B, h, n1 * n2, t1 * t2, D)


def from_tiles(xt: torch.Tensor, t1: int, t2: int, n1: int, n2: int, L1: int, L2: int) -> torch.Tensor:
    """Inverse of :func:`to_tiles`: (B, h, n1*n2, t1*t2, D) -> (B, h, L1, L2, D)."""
    B, h, _, _, D = xt.shape
    x = xt.view(B, h, n1, n2, t1, t2, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, h, n1 * t1, n2 * t2, D)
    return x if (n1 * t1, n2 * t2) == (L1, L2) else x[:, :, :L1, :L2]
