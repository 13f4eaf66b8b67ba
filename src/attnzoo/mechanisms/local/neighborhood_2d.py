"""Neighborhood attention in 2-D (NAT / DiNAT; NATTEN semantics).

Papers: "Neighborhood Attention Transformer", Hassani et al., arXiv 2204.07143; "Dilated Neighborhood
Attention Transformer", Hassani & Shi, arXiv 2209.15001; "Faster Neighborhood Attention: Reducing the O(n^2)
Cost of Self Attention at the Threadblock Level", Hassani et al., arXiv 2403.04690 (catalog P066).
Official code: https://github.com/SHI-Labs/NATTEN
Each query of an H x W grid attends to exactly kh x kw keys: the window centred on it inside its dilation
group, shifted inwards at the borders (never zero-padded), plus an optional relative position bias
``rpb (heads, 2kh-1, 2kw-1)``. O(HW k^2 d) time and O(HW d) memory.

Forms:
- ``na2d(q, k, v, kernel_size, dilation, rpb, scale, backend, layout)``: the functional op, for users who bring
  their own projections. Layout: NATTEN's own, heads last, ``(B, H, W, heads, D)`` (``layout="heads_last"``,
  the default, as ``natten.functional.na2d`` since NATTEN 0.17), or heads first ``(B, heads, H, W, D)``
  (``layout="heads_first"``, the layout of the kernels here and of NATTEN's older ``natten2dqkrpb``).
- :class:`NeighborhoodAttention2d`: NATTEN's ``NeighborhoodAttention2D`` module: ``qkv`` Linear (bias by
  default), learnable ``rpb`` (trunc-normal std 0.02), scale head_dim^-0.5 applied to q, ``proj`` Linear.
- ``reference`` (:func:`na2d_dense_reference`): dense softmax over all H*W tokens with the neighborhood mask
  :func:`attnzoo.masks.neighborhood_2d` (the product of two :func:`attnzoo.masks.neighborhood_1d`).
- ``fast`` (:func:`na2d_tiled`): queries are cut into ``t x t`` tiles; each tile scores the ``(t+k-1) x
  (t+k-1)`` region holding every neighborhood of its queries, masked to each query's own ``k x k``, through the
  shared tile engine :func:`attnzoo.kernels.grid.tile_attention` (hand-written backward with recomputation;
  trains on CPU). Dilation splits the grid into its dilation groups (rows ``r, r+d, ...``), each an undilated
  problem.

Neighborhood semantics (NATTEN, "Neighborhood Attention Transformer", arXiv 2204.07143, and DiNAT,
arXiv 2209.15001): along each axis, a query at position ``i`` of its dilation group (positions with the same
``i mod d``) sees the ``k`` group members starting at ``clamp(i' - k // 2, 0, group_len - k)`` where ``i'``
is its index inside the group: a window centred on it and shifted inwards at the borders, so every query
sees exactly ``k x k`` keys. The relative position bias ``rpb (heads, 2k-1, 2k-1)`` is read at
``(dy / d + k - 1, dx / d + k - 1)`` with ``dy, dx`` = key position minus query position (NATTEN's
``get_pb_start`` indexing, written as the offset it computes).

Choices where the papers are silent or NATTEN differs by version:
- A grid smaller than ``kernel_size * dilation`` on an axis is zero-padded at the bottom/right to that size, as
  NATTEN's original ``NeighborhoodAttention2D`` module does (the 0.17+ functional API rejects it), but the padded
  keys are masked out (NATTEN let them in as zero tokens) and the padded queries are cropped: every query then
  sees all real tokens of its (dilation group's) axis. Larger grids are untouched. Even kernel sizes follow the
  same window rule (start ``i - k // 2``); the relative position bias then still has 2k - 1 entries per axis.
- FlexAttention is not used: on CPU it compiles only a forward pass, and that compiled forward (block mask
  of the same neighborhood, BLOCK_SIZE 128) was measured about 6x slower than the tiled forward for 7 x 7 on
  a 64 x 64 grid (torch 2.13, 2 cores), slower even than dense SDPA; the tiled path serves inference and
  training alike.
- Grouped-query attention in ``na2d`` (kv heads < heads) repeats each key/value head for its group.
- The module is channels-last on the grid, ``x (B, H, W, C)``, as NATTEN's ``NeighborhoodAttention2D``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import (
    check_backend,
    check_bool,
    check_choice,
    check_heads,
    check_module_input,
    check_pair,
    check_scale,
    check_tensor,
)
from ...kernels.grid import from_tiles, tile_attention, to_tiles
from ...masks import materialize, neighborhood_2d
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register

LAYOUTS = ("heads_last", "heads_first")
"""``heads_last``: (B, H, W, heads, D), NATTEN's ``na2d`` layout; ``heads_first``: (B, heads, H, W, D)."""


# --------------------------------------------------------------------------------------------------------
# Neighborhood geometry and the dense reference
# --------------------------------------------------------------------------------------------------------
def neighborhood_window_start(pos: torch.Tensor, length: int, kernel: int) -> torch.Tensor:
    """Undilated NATTEN window start of positions ``pos`` on an axis of ``length``: centred, shifted in."""
    return torch.clamp(pos - kernel // 2, min=0).clamp(max=length - kernel)


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


def na2d_dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size, dilation=1,
                              rpb: torch.Tensor | None = None, scale: float | None = None,
                              key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The readable reference on heads-first tensors: exact softmax attention over all H*W tokens with the
    neighborhood mask (:func:`attnzoo.masks.neighborhood_2d`) and the relative position bias scattered into a
    dense bias. ``key_valid`` (H, W) bool: False for padded positions, never attended. O((HW)^2) memory; for tests
    and reading."""
    B, heads, H, W, D = q.shape
    kernel, dil = check_pair("kernel_size", kernel_size), check_pair("dilation", dilation)
    check_neighborhood(H, W, kernel, dil)
    n = H * W
    mask = materialize(neighborhood_2d(H, W, kernel, dil), 1, 1, n, n, device=q.device)  # (1, 1, N, N)
    if key_valid is not None:
        mask = mask & key_valid.reshape(1, 1, 1, n)
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


def _na2d_undilated(q, k, v, kernel, rpb, scale, tile, valid=None):
    """Neighborhood attention with dilation 1 on (B, h, L1, L2, D); ``valid`` (B|1, 1, L1, L2, 1) bool masks keys."""
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
    if valid is not None:  # padded keys: never attended (padded query rows may then see nothing: zeros)
        vk = valid.reshape(valid.shape[0], L1 * L2).index_select(1, kidx).view(valid.shape[0], 1, T, 1, R)
        mask = vk if mask is None else mask & vk
    ot = tile_attention(qt, kt, vt, scale=scale, bias=bias, mask=mask,
                        rows_nonempty=valid is None)  # (B, h, T, Q, Dv)
    return from_tiles(ot, t1, t2, n1, n2, L1, L2)  # (B, h, L1, L2, Dv)


def _groups(length: int, d: int) -> list[torch.Tensor]:
    """Dilation groups of an axis, bucketed by group length: a list of (count, len) index tensors."""
    by_len: dict[int, list[list[int]]] = {}
    for r in range(d):
        idx = list(range(r, length, d))
        by_len.setdefault(len(idx), []).append(idx)
    return [torch.tensor(v) for v in by_len.values()]


def na2d_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size, dilation=1,
                              rpb: torch.Tensor | None = None, scale: float | None = None,
                              tile: tuple[int, int] | None = None,
                              key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The fast form: 2-D neighborhood attention without the (HW x HW) matrix, forward and backward, on
    heads-first tensors (inputs validated by :func:`na2d`).

    Args:
        q: (B, heads, H, W, D); k: (B, kv_heads, H, W, D); v: (B, kv_heads, H, W, Dv), heads % kv_heads == 0.
        kernel_size: int or (kh, kw); every query sees exactly kh * kw keys.
        dilation: int or (dh, dw); neighbours are taken inside the query's dilation group.
        rpb: optional relative position bias (heads, 2kh-1, 2kw-1), learnable (gradients flow to it).
        scale: multiplies q . k, default D ** -0.5.
        tile: query tile (th, tw); default about the kernel size.
        key_valid: optional (H, W) bool, False for padded positions (never attended).

    Returns:
        (B, heads, H, W, Dv) in q's dtype.
    """
    B, heads, H, W, D = q.shape
    kernel, dil = check_pair("kernel_size", kernel_size), check_pair("dilation", dilation)
    check_neighborhood(H, W, kernel, dil)
    if rpb is not None:
        want = (heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1)
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != want:
            got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"rpb: expected a tensor of shape (heads, 2kh-1, 2kw-1) = {want}, got {got}")
    if tile is not None:
        tile = check_pair("tile", tile)
    scale = D ** -0.5 if scale is None else float(scale)
    if k.shape[1] != heads:
        g = heads // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, heads, H, W, D)
    dh, dw = dil
    valid = None if key_valid is None else key_valid.view(1, 1, H, W, 1).expand(B, 1, H, W, 1)
    if dh == 1 and dw == 1:
        return _na2d_undilated(q, k, v, kernel, rpb, scale, tile, valid)
    if H % dh == 0 and W % dw == 0:
        # All dilation groups have the same shape: fold them into the batch.
        def split(x):  # (B, h, H, W, D) -> (B*dh*dw, h, H/dh, W/dw, D); row = i*dh + r
            Bx, hx, _, _, Dx = x.shape
            x = x.view(Bx, hx, H // dh, dh, W // dw, dw, Dx).permute(0, 3, 5, 1, 2, 4, 6)
            return x.reshape(Bx * dh * dw, hx, H // dh, W // dw, Dx)

        o = _na2d_undilated(split(q), split(k), split(v), kernel, rpb, scale, tile,
                            None if valid is None else split(valid))
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

            o = _na2d_undilated(sub(q), sub(k), sub(v), kernel, rpb, scale, tile,
                                None if valid is None else sub(valid))  # (B*nr*nc, h, lr, lc, Dv)
            o = o.view(B, nr, nc, heads, lr, lc, -1).permute(0, 3, 1, 4, 2, 5, 6)  # (B, h, nr, lr, nc, lc, Dv)
            outs.append(o.reshape(B, heads, nr * lr * nc * lc, -1))
            flat = rows_d.view(nr, lr, 1, 1) * W + cols_d.view(1, 1, nc, lc)  # (nr, lr, nc, lc) grid indices
            order.append(flat.reshape(-1))
    inverse = torch.argsort(torch.cat(order))  # (H*W,)
    return torch.cat(outs, dim=2)[:, :, inverse].view(B, heads, H, W, -1)


def check_grid_qkv(q, k, v, layout: str) -> tuple[int, int, int, int, int]:
    """Validate ``na2d``'s q, k, v in ``layout``; returns (B, heads, H, W, D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=5)
    first = layout == "heads_first"
    shape = "(B, heads, H, W, D)" if first else "(B, H, W, heads, D)"
    B, heads, H, W, D = q.shape if first else (q.shape[0], q.shape[3], q.shape[1], q.shape[2], q.shape[4])
    kv = lambda x: (x.shape[0], x.shape[1], x.shape[2], x.shape[3]) if first else \
        (x.shape[0], x.shape[3], x.shape[1], x.shape[2])  # (B, kv_heads, H, W)
    if any(s == 0 for s in q.shape):
        raise ValueError(f"q: expected every size of {shape} to be >= 1, got {tuple(q.shape)}")
    Bk, hk, Hk, Wk = kv(k)
    if (Bk, Hk, Wk) != (B, H, W) or k.shape[4] != D:
        raise ValueError(f"k: expected {shape.replace('heads', 'kv_heads')} = ({B}, {H}, {W}, D={D}) in layout "
                         f"{layout!r}, got {tuple(k.shape)}")
    if kv(v) != kv(k):
        raise ValueError(f"v: expected the (B, kv_heads, H, W) of k in layout {layout!r}, got {tuple(v.shape)}")
    if hk == 0 or heads % hk:
        raise ValueError(f"q, k: query heads must be a multiple of key/value heads, got {heads} and {hk}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: devices must match, got {q.device}, {k.device}, {v.device}")
    return B, heads, H, W, D


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size, dilation=1,
         rpb: torch.Tensor | None = None, scale: float | None = None, backend: str = "auto",
         layout: str = "heads_last") -> torch.Tensor:
    """2-D neighborhood attention, NATTEN's ``na2d``.

    Args:
        q: (B, H, W, heads, D) (``layout="heads_last"``, NATTEN's) or (B, heads, H, W, D) (``"heads_first"``);
            k: the same with kv_heads; v: the same with Dv; heads % kv_heads == 0.
        kernel_size: int or (kh, kw); an axis shorter than kh * dh (kw * dw) is padded to it, the padding masked.
        dilation: int or (dh, dw).
        rpb: optional relative position bias (heads, 2kh-1, 2kw-1).
        scale: multiplies q . k, default D ** -0.5 (finite and positive).
        backend: "auto"/"fast" (tiled, no HW x HW matrix) or "reference" (dense masked softmax).
        layout: "heads_last" (default) or "heads_first"; the output has the inputs' layout.

    Returns:
        (B, H, W, heads, Dv) or (B, heads, H, W, Dv), as the inputs.
    """
    check_backend(backend)
    check_choice("layout", layout, LAYOUTS)
    B, heads, H, W, D = check_grid_qkv(q, k, v, layout)
    check_scale(scale)
    if layout == "heads_last":
        q, k, v = (x.permute(0, 3, 1, 2, 4) for x in (q, k, v))  # (B, heads, H, W, D)
    kernel, dil = check_pair("kernel_size", kernel_size), check_pair("dilation", dilation)
    if rpb is not None:
        want = (heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1)
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != want:
            got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"rpb: expected a tensor of shape (heads, 2kh-1, 2kw-1) = {want}, got {got}")
    if k.shape[1] != heads:
        g = heads // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, heads, H, W, D)
    Hp, Wp = max(H, kernel[0] * dil[0]), max(W, kernel[1] * dil[1])  # NATTEN's module pads a grid this small
    valid = None
    if (Hp, Wp) != (H, W):
        q, k, v = (F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H)) for x in (q, k, v))  # (B, heads, Hp, Wp, D)
        valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=q.device)
        valid[:H, :W] = True
    form = na2d_dense_reference if backend == "reference" else na2d_tiled
    out = form(q, k, v, kernel_size=kernel, dilation=dil, rpb=rpb, scale=scale,
               key_valid=valid)[:, :, :H, :W]  # (B, heads, H, W, Dv)
    return out.permute(0, 2, 3, 1, 4) if layout == "heads_last" else out


def na2d_reference(q, k, v, *, kernel_size, dilation=1, rpb=None, scale=None, layout="heads_last"):
    """Dense masked reference of :func:`na2d` (O((HW)^2) memory)."""
    return na2d(q, k, v, kernel_size=kernel_size, dilation=dilation, rpb=rpb, scale=scale, backend="reference",
                layout=layout)


def na2d_fast(q, k, v, *, kernel_size, dilation=1, rpb=None, scale=None, layout="heads_last"):
    """Tiled :func:`na2d` with a hand-written backward (O(HW d) memory)."""
    return na2d(q, k, v, kernel_size=kernel_size, dilation=dilation, rpb=rpb, scale=scale, backend="fast",
                layout=layout)


class NeighborhoodAttention2d(nn.Module):
    """2-D neighborhood self attention on channels-last grids ``x (B, H, W, dim) -> (B, H, W, dim)``.

    Args:
        dim: channels; heads: attention heads (dim % heads == 0).
        kernel_size: int or (kh, kw), default 7. dilation: int or (dh, dw), default 1.
        rel_pos_bias: learnable relative position bias (heads, 2kh-1, 2kw-1), default True (NAT/DiNAT).
        qkv_bias: bias of the qkv projection, default True.
        backend: "auto", "fast" or "reference" (read at forward time).
    """

    def __init__(self, dim: int, heads: int, *, kernel_size=7, dilation=1, rel_pos_bias: bool = True,
                 qkv_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        dim, heads, _, _ = check_heads(dim, heads)
        check_bool("rel_pos_bias", rel_pos_bias)
        check_bool("qkv_bias", qkv_bias)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.kernel_size = check_pair("kernel_size", kernel_size)
        self.dilation = check_pair("dilation", dilation)
        self.backend = check_backend(backend)
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_pos_bias:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.empty(heads, 2 * kh - 1, 2 * kw - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rel_pos_bias={self.rpb is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_module_input(self, x, layout="(B, H, W, C)", channels=self.dim)
        B, H, W, C = x.shape
        check_backend(self.backend)
        qkv = self.qkv(x).view(B, H, W, 3, self.heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)  # (3, B, h, H, W, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, H, W, hd)
        out = na2d(q, k, v, kernel_size=self.kernel_size, dilation=self.dilation, rpb=self.rpb, scale=self.scale,
                   backend=self.backend, layout="heads_first")  # (B, h, H, W, hd)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))  # (B, H, W, dim)


NEIGHBORHOOD_2D = register(Mechanism(
    name="neighborhood_2d",
    aliases=("na2d", "nat", "dinat", "neighborhood_attention_2d"),
    family="local",
    kind="grid",
    catalog="P066",
    title="Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
    arxiv="2403.04690",
    code="https://github.com/SHI-Labs/NATTEN",
    summary="Each grid query attends to its k x k nearest neighbours (dilated; window shifted inwards at "
            "borders) with a relative position bias.",
    patterns=("noncausal_self",),
    exact=True,
    complexity="time O(HW k^2 d), memory O(HW d)",
    reference=na2d_reference,
    fast=na2d_fast,
    module=NeighborhoodAttention2d,
    options=(
        Option("kernel_size", 7, int, low=1, doc="neighbours per axis (every query sees kernel_size^2 keys); "
                                                 "a pair (kh, kw) is accepted by the module"),
        Option("dilation", 1, int, low=1, doc="dilation per axis (DiNAT); a pair is accepted by the module"),
        Option("rel_pos_bias", True, bool, doc="learnable relative position bias (heads, 2k-1, 2k-1)"),
        Option("qkv_bias", True, bool, doc="bias of the qkv projection"),
    ),
    test_options={"kernel_size": 3, "dilation": 2},
    test_sizes={"height": 7, "width": 6},
    notes="kind 'grid': x (B, H, W, C) -> (B, H, W, C). The functional op `na2d` (attnzoo.mechanisms.local."
          "neighborhood_2d) takes NATTEN's (B, H, W, heads, D), or (B, heads, H, W, D) with layout='heads_first'. "
          "kernel_size = grid and dilation 1 is exact attention over all tokens.",
))
