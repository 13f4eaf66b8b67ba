"""Shared compute paths for attention on 2-D token grids (neighborhoods, windows, blocks with halos).

Everything here avoids the (H*W) x (H*W) score matrix. The building blocks:

- :func:`tile_attention`: softmax attention of many independent query tiles against their own key tiles,
  ``qt (B, h, T, Q, D)``, ``kt/vt (B, h, T, R, D|Dv)`` with an optional additive bias broadcastable to
  ``(B, h, T, Q, R)`` (``-inf`` = masked; the bias may require grad: relative position tables, dynamic
  position MLPs, query-dependent relative logits). A custom ``autograd.Function`` with a hand-written
  backward: the tile probabilities (O(HW * R), never O((HW)^2)) are kept for the backward while they fit in
  ``_STORE_BYTES``; beyond that only the row log-sum-exp is kept and the backward recomputes each chunk,
  FlashAttention style. Temporary memory is bounded by chunking over tiles.
- :func:`neighborhood_attention_2d` (``na2d``): NATTEN's 2-D neighborhood attention, built from
  :func:`tile_attention`: queries are cut into ``t x t`` tiles; each tile scores the ``(t+k-1) x (t+k-1)``
  region that holds every neighborhood of its queries, masked to each query's own ``k x k`` neighborhood.
  Gathering regions and folding their gradients back are index_select / index_add (autograd).
  Dilation splits the grid into its dilation groups (rows ``r, r+d, ...``), each an undilated problem.
- :func:`neighborhood_2d` and :func:`neighborhood_2d_reference`: the NATTEN neighborhood as a mask
  predicate over flattened grid indices (built from :func:`attnzoo.masks.neighborhood_1d` on each axis)
  and the dense masked reference.

Neighborhood semantics (NATTEN, "Neighborhood Attention Transformer", arXiv 2204.07143, and DiNAT,
arXiv 2209.15001): along each axis, a query at position ``i`` of its dilation group (positions with the same
``i mod d``) sees the ``k`` group members starting at ``clamp(i' - k // 2, 0, group_len - k)`` where ``i'``
is its index inside the group: a window centred on it and shifted inwards at the borders, so every query
sees exactly ``k x k`` keys. The relative position bias ``rpb (heads, 2k-1, 2k-1)`` is read at
``(dy / d + k - 1, dx / d + k - 1)`` with ``dy, dx`` = key position minus query position (NATTEN's
``get_pb_start`` indexing, written as the offset it computes).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..masks import Predicate, materialize, neighborhood_1d
from ..reference import softmax_attention

__all__ = [
    "tile_attention", "neighborhood_attention_2d", "na2d", "neighborhood_2d", "neighborhood_2d_reference",
    "neighborhood_window_start", "pair", "check_grid_qkv", "check_neighborhood", "to_tiles", "from_tiles",
]

# Score tiles of one chunk hold at most this many elements (bounds the temporary memory of both passes).
_TILE_ELEMENTS = 1 << 23
# Keep the tile probabilities for the backward when they take at most this many bytes; recompute otherwise.
_STORE_BYTES = 256 << 20


def pair(name: str, value, low: int = 1) -> tuple[int, int]:
    """An int or a pair of ints (each >= ``low``) as a pair; anything else raises naming ``name``."""
    vals = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in vals):
        raise ValueError(f"{name}: expected an int >= {low} or a pair of them, got {value!r}")
    return vals  # type: ignore[return-value]


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


# --------------------------------------------------------------------------------------------------------
# Neighborhood geometry
# --------------------------------------------------------------------------------------------------------
def neighborhood_window_start(pos: torch.Tensor, length: int, kernel: int) -> torch.Tensor:
    """Undilated NATTEN window start of positions ``pos`` on an axis of ``length``: centred, shifted in."""
    return torch.clamp(pos - kernel // 2, min=0).clamp(max=length - kernel)


def neighborhood_2d(height: int, width: int, kernel_size, dilation=1) -> Predicate:
    """Mask predicate of 2-D neighborhood attention over flattened indices ``i = row * width + col``.

    The product of NATTEN's 1-D neighborhoods (:func:`attnzoo.masks.neighborhood_1d`) on rows and columns:
    every query sees exactly ``kh * kw`` keys of its dilation group, its window shifted inwards at borders.
    """
    kh, kw = pair("kernel_size", kernel_size)
    dh, dw = pair("dilation", dilation)
    rows = neighborhood_1d(height, kh, dilation=dh)
    cols = neighborhood_1d(width, kw, dilation=dw)

    def neighborhood_2d_mask(b, h, q_idx, kv_idx):
        qr, qc = torch.div(q_idx, width, rounding_mode="floor"), torch.remainder(q_idx, width)
        kr, kc = torch.div(kv_idx, width, rounding_mode="floor"), torch.remainder(kv_idx, width)
        return rows(b, h, qr, kr) & cols(b, h, qc, kc)

    return neighborhood_2d_mask


def check_neighborhood(height: int, width: int, kernel: tuple[int, int], dilation: tuple[int, int]) -> None:
    for axis, n, k, d in (("height", height, kernel[0], dilation[0]), ("width", width, kernel[1], dilation[1])):
        if k * d > n:
            raise ValueError(f"kernel_size: kernel_size * dilation = {k} * {d} = {k * d} exceeds the grid {axis} "
                             f"{n}; every query must see exactly kernel_size keys per axis (NATTEN semantics)")


def _rpb_dense(rpb: torch.Tensor, height: int, width: int, kernel, dilation) -> torch.Tensor:
    """Dense (heads, N, N) bias: rpb at (dy/d + k - 1, dx/d + k - 1) for neighbours, 0 elsewhere."""
    kh, kw = kernel
    dh, dw = dilation
    r = torch.arange(height, device=rpb.device)
    c = torch.arange(width, device=rpb.device)
    dy = (r.view(1, height) - r.view(height, 1))  # (Hq, Hk): key row minus query row
    dx = (c.view(1, width) - c.view(width, 1))  # (Wq, Wk)
    iy = (torch.div(dy, dh, rounding_mode="floor") + kh - 1).clamp(0, 2 * kh - 2)
    ix = (torch.div(dx, dw, rounding_mode="floor") + kw - 1).clamp(0, 2 * kw - 2)
    idx = iy.view(height, 1, height, 1) * (2 * kw - 1) + ix.view(1, width, 1, width)  # (Hq, Wq, Hk, Wk)
    n = height * width
    return rpb.reshape(rpb.shape[0], -1)[:, idx.reshape(-1)].view(rpb.shape[0], n, n)  # (heads, N, N)


def neighborhood_2d_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size, dilation=1,
                              rpb: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Dense reference of :func:`na2d`: exact softmax attention over all H*W tokens with the neighborhood mask
    (and the relative position bias scattered into a dense bias). O((HW)^2) memory; for tests and reading."""
    B, heads, H, W, D = q.shape
    kernel, dil = pair("kernel_size", kernel_size), pair("dilation", dilation)
    check_neighborhood(H, W, kernel, dil)
    n = H * W
    mask = materialize(neighborhood_2d(H, W, kernel, dil), 1, 1, n, n, device=q.device)  # (1, 1, N, N)
    bias = None
    if rpb is not None:
        bias = _rpb_dense(rpb, H, W, kernel, dil).unsqueeze(0).to(q.dtype)  # (1, heads, N, N)
    flat = lambda x: x.reshape(B, x.shape[1], n, x.shape[-1])  # (B, heads, N, D)
    out = softmax_attention(flat(q), flat(k), flat(v), attn_mask=mask, bias=bias, scale=scale)  # (B, heads, N, Dv)
    return out.view(B, heads, H, W, v.shape[-1])


# --------------------------------------------------------------------------------------------------------
# Fast neighborhood attention: tiles + regions
# --------------------------------------------------------------------------------------------------------
def _tile_size(kernel: int, length: int) -> int:
    """Query tile side: about the kernel size (region (t+k-1)^2 holds ~2k x 2k keys), at most the axis."""
    return max(1, min(length, max(4, kernel + 1)))


@functools.lru_cache(maxsize=64)
def _axis_plan(length: int, kernel: int, tile: int, device: str):
    """Per-axis geometry: region start indices (n, R), in-window mask (n, t, R), rpb offset index (n, t, R)."""
    dev = torch.device(device)
    n = -(-length // tile)
    R = min(tile + kernel - 1, length)
    pos = torch.arange(n * tile, device=dev).clamp(max=length - 1).view(n, tile)  # padded queries copy the last
    start = neighborhood_window_start(pos, length, kernel)  # (n, t)
    rstart = start[:, 0].clamp(max=length - R)  # (n,)
    region = rstart.view(n, 1) + torch.arange(R, device=dev).view(1, R)  # (n, R) key positions
    key = region.view(n, 1, R)
    inside = (key >= start.view(n, tile, 1)) & (key < start.view(n, tile, 1) + kernel)  # (n, t, R)
    rel = (key - pos.view(n, tile, 1) + kernel - 1).clamp(0, 2 * kernel - 2)  # (n, t, R)
    return n, R, region, inside, rel


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


@functools.lru_cache(maxsize=32)
def _tile_plan(L1: int, L2: int, k1: int, k2: int, t1: int, t2: int, device: str):
    """Geometry of the tiling of an (L1, L2) grid by (t1, t2) query tiles (queries padded to whole tiles).

    Returns (kidx (T*R,) flat key index of every tile region, inside (1, 1, T, Q, R) bool, per-axis bias
    table indices rel1 (n1, 1, t1, 1, R1, 1) and rel2 (1, n2, 1, t2, 1, R2) that point at an extra -inf
    row/column outside the neighborhood, n1, n2, T, Q, R)."""
    n1, R1, rows, in1, rel1 = _axis_plan(L1, k1, t1, device)
    n2, R2, cols, in2, rel2 = _axis_plan(L2, k2, t2, device)
    T, Q, R = n1 * n2, t1 * t2, R1 * R2
    kidx = (rows.view(n1, 1, R1, 1) * L2 + cols.view(1, n2, 1, R2)).reshape(-1)  # (T*R,)
    inside = in1.view(n1, 1, t1, 1, R1, 1) & in2.view(1, n2, 1, t2, 1, R2)  # (n1, n2, t1, t2, R1, R2)
    rel1 = torch.where(in1, rel1, 2 * k1 - 1).view(n1, 1, t1, 1, R1, 1)  # outside -> the -inf row
    rel2 = torch.where(in2, rel2, 2 * k2 - 1).view(1, n2, 1, t2, 1, R2)  # outside -> the -inf column
    return kidx, inside.reshape(1, 1, T, Q, R), rel1, rel2, n1, n2, T, Q, R


def _na2d_undilated(q, k, v, kernel, rpb, scale, tile):
    """Neighborhood attention with dilation 1 on (B, h, L1, L2, D)."""
    B, h, L1, L2, D = q.shape
    k1, k2 = kernel
    t1 = tile[0] if tile else _tile_size(k1, L1)
    t2 = tile[1] if tile else _tile_size(k2, L2)
    kidx, inside, rel1, rel2, n1, n2, T, Q, R = _tile_plan(L1, L2, k1, k2, t1, t2, str(q.device))
    # 3-D index_select (rows of D contiguous values) is much faster than the 4-D one in PyTorch's CPU kernels.
    gather = lambda x: x.reshape(B * h, L1 * L2, x.shape[-1]).index_select(1, kidx).view(B, h, T, R, x.shape[-1])
    qt = to_tiles(q, t1, t2, n1, n2)  # (B, h, T, Q, D); zero queries in the padding, their outputs dropped
    kt, vt = gather(k), gather(v)  # (B, h, T, R, D|Dv) key regions
    acc = torch.promote_types(q.dtype, torch.float32)
    bias = mask = None
    if rpb is None:
        mask = inside  # (1, 1, T, Q, R) bool
    else:
        table = F.pad(rpb.to(acc), (0, 1, 0, 1), value=float("-inf"))  # (heads, 2k1, 2k2), last row/col -inf
        bias = table[:, rel1, rel2].reshape(1, rpb.shape[0], T, Q, R)  # (1, h, T, Q, R), -inf outside
    ot = tile_attention(qt, kt, vt, scale=scale, bias=bias, mask=mask, rows_nonempty=True)  # (B, h, T, Q, Dv)
    return from_tiles(ot, t1, t2, n1, n2, L1, L2)  # (B, h, L1, L2, Dv)


def _groups(length: int, d: int) -> list[torch.Tensor]:
    """Dilation groups of an axis, bucketed by group length: a list of (count, len) index tensors."""
    by_len: dict[int, list[list[int]]] = {}
    for r in range(d):
        idx = list(range(r, length, d))
        by_len.setdefault(len(idx), []).append(idx)
    return [torch.tensor(v) for v in by_len.values()]


def neighborhood_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size, dilation=1,
                              rpb: torch.Tensor | None = None, scale: float | None = None,
                              tile: tuple[int, int] | None = None) -> torch.Tensor:
    """2-D neighborhood attention (NATTEN's ``na2d``) without the (HW x HW) matrix, forward and backward.

    Args:
        q: (B, heads, H, W, D); k: (B, kv_heads, H, W, D); v: (B, kv_heads, H, W, Dv), heads % kv_heads == 0.
        kernel_size: int or (kh, kw); every query sees exactly kh * kw keys.
        dilation: int or (dh, dw); neighbours are taken inside the query's dilation group.
        rpb: optional relative position bias (heads, 2kh-1, 2kw-1), learnable (gradients flow to it).
        scale: multiplies q . k, default D ** -0.5.
        tile: query tile (th, tw); default about the kernel size.

    Returns:
        (B, heads, H, W, Dv) in q's dtype.
    """
    B, heads, H, W, D = check_grid_qkv(q, k, v)
    kernel, dil = pair("kernel_size", kernel_size), pair("dilation", dilation)
    check_neighborhood(H, W, kernel, dil)
    if rpb is not None:
        want = (heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1)
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != want:
            got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"rpb: expected a tensor of shape (heads, 2kh-1, 2kw-1) = {want}, got {got}")
    if tile is not None:
        tile = pair("tile", tile)
    scale = D ** -0.5 if scale is None else float(scale)
    if k.shape[1] != heads:
        g = heads // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, heads, H, W, D)
    dh, dw = dil
    if dh == 1 and dw == 1:
        return _na2d_undilated(q, k, v, kernel, rpb, scale, tile)
    if H % dh == 0 and W % dw == 0:
        # All dilation groups have the same shape: fold them into the batch.
        def split(x):  # (B, h, H, W, D) -> (B*dh*dw, h, H/dh, W/dw, D); row = i*dh + r
            Bx, hx, _, _, Dx = x.shape
            x = x.view(Bx, hx, H // dh, dh, W // dw, dw, Dx).permute(0, 3, 5, 1, 2, 4, 6)
            return x.reshape(Bx * dh * dw, hx, H // dh, W // dw, Dx)

        o = _na2d_undilated(split(q), split(k), split(v), kernel, rpb, scale, tile)
        o = o.view(B, dh, dw, heads, H // dh, W // dw, -1).permute(0, 3, 4, 1, 5, 2, 6)
        return o.reshape(B, heads, H, W, -1)
    # Uneven groups: at most two group lengths per axis, processed as up to four batches, then the
    # flattened outputs are put back in grid order by one inverse permutation.
    outs, order = [], []
    for rows in _groups(H, dh):
        for cols in _groups(W, dw):
            rows_d, cols_d = rows.to(q.device), cols.to(q.device)
            nr, lr = rows_d.shape
            nc, lc = cols_d.shape

            def sub(x, rows_d=rows_d, cols_d=cols_d, nr=nr, lr=lr, nc=nc, lc=lc):
                Bx, hx, _, _, Dx = x.shape
                y = x.index_select(2, rows_d.reshape(-1)).index_select(3, cols_d.reshape(-1))  # (B, h, nr*lr, nc*lc, D)
                y = y.view(Bx, hx, nr, lr, nc, lc, Dx).permute(0, 2, 4, 1, 3, 5, 6)  # (B, nr, nc, h, lr, lc, D)
                return y.reshape(Bx * nr * nc, hx, lr, lc, Dx)

            o = _na2d_undilated(sub(q), sub(k), sub(v), kernel, rpb, scale, tile)  # (B*nr*nc, h, lr, lc, Dv)
            o = o.view(B, nr, nc, heads, lr, lc, -1).permute(0, 3, 1, 4, 2, 5, 6)  # (B, h, nr, lr, nc, lc, Dv)
            outs.append(o.reshape(B, heads, nr * lr * nc * lc, -1))
            flat = rows_d.view(nr, lr, 1, 1) * W + cols_d.view(1, 1, nc, lc)  # (nr, lr, nc, lc) grid indices
            order.append(flat.reshape(-1))
    inverse = torch.argsort(torch.cat(order))  # (H*W,)
    return torch.cat(outs, dim=2)[:, :, inverse].view(B, heads, H, W, -1)


na2d = neighborhood_attention_2d


def check_grid_qkv(q, k, v):
    from ..errors import check_tensor

    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=5)
    B, heads, H, W, D = q.shape
    if k.shape[0] != B or k.shape[2:4] != (H, W) or k.shape[4] != D:
        raise ValueError(f"k: expected (B, kv_heads, H, W, D) = ({B}, kv_heads, {H}, {W}, {D}), got {tuple(k.shape)}")
    if v.shape[:4] != k.shape[:4]:
        raise ValueError(f"v: expected (B, kv_heads, H, W, Dv) matching k {tuple(k.shape[:4])}, got {tuple(v.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"q, k: query heads must be a multiple of key/value heads, got {heads} and {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, heads, H, W, D
