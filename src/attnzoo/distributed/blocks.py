"""Softmax attention of one query block against one key block under a mask predicate, at explicit global
positions, returning the output *and* its log-sum-exp; forward and backward, tile by tile.

CATALOG P025 (sharded attention with log-sum-exp merge): the compute unit of ring attention, the halo
exchange and split-KV decoding. A block's partial result ``(o_p, lse_p)`` merges exactly with the others by
:func:`attnzoo.kernels.merge.merge_attention`.

The mask is any predicate of :mod:`attnzoo.masks` (``(b, h, q_idx, kv_idx) -> bool``, True = attend),
evaluated at *global* positions: query positions ``qpos`` and key positions ``kpos`` (int64), the query head
indices ``heads`` (global indices of the local query heads, so head-dependent masks stay right after the
heads were sharded), and the batch rows. Positions at or beyond the sequence's length are padding: such
queries see nothing and such keys are seen by nobody (the predicate is evaluated at a clamped position and
the result discarded, so predicates that index per-token tensors never go out of range).

Tiles: queries are cut into tiles of ``tq`` rows and keys into tiles of ``tk`` columns (128 each by default);
a :class:`BlockPlan` classifies each tile pair once as *empty* (skipped: never computed), *full* (no mask
applied) or *partial* (the predicate is re-evaluated there). For each query tile, runs of consecutive
non-empty key tiles form *spans* of at most ``TILE_ELEMENTS / (B Hq tq)`` keys, each one matmul, one
masked softmax piece merged online (a banded mask costs one span per query tile). Memory is O((nq + nk) d)
plus one span, never nq x nk. The backward recomputes each span's probabilities from the saved log-sum-exp
(FlashAttention style). The predicate is evaluated for the plan on super-tiles and reduced to tile classes.

Grouped-query attention: the G query heads that share a key/value head are stacked as rows of one
(G tq x d) tile against that head's keys, so keys and values are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import Predicate

__all__ = ["BlockPlan", "plan_block", "needed_keys", "attend_forward", "attend_backward", "BlockAttention",
           "TILE_ELEMENTS", "EMPTY", "PARTIAL", "FULL"]

TILE_ELEMENTS = 1 << 21
"""Score elements of one tile (B * Hq * tq * tk): bounds the temporary memory of every block."""

EMPTY, PARTIAL, FULL = 0, 1, 2


TILE = 128
"""Query and key tile size (the granularity of skipping)."""


def tile_sizes(nq: int, nk: int, rows: int) -> tuple[int, int]:
    """(tq, tk) for a block of nq queries and nk keys with ``rows`` = B * Hq score rows per query."""
    return max(1, min(nq, TILE)), max(1, min(nk, TILE))


@dataclass
class BlockPlan:
    """The mask geometry of one (query block, key block) pair: evaluated lazily per span, classified once."""

    pred: Predicate | None
    batch: int
    heads: torch.Tensor  # (Hq_local,) global query-head indices
    qpos: torch.Tensor  # (nq,) global query positions
    kpos: torch.Tensor  # (nk,) global key positions
    q_limit: int  # positions >= q_limit are padding
    k_limit: int
    tq: int
    tk: int
    classes: torch.Tensor  # (ceil(nq / tq), ceil(nk / tk)) int8: EMPTY / PARTIAL / FULL

    @property
    def nq(self) -> int:
        return self.qpos.numel()

    @property
    def nk(self) -> int:
        return self.kpos.numel()

    def tile_mask(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """(B|1, Hq|1, i1 - i0, j1 - j0) bool, True = attend (structural padding applied)."""
        return _eval(self.pred, self.batch, self.heads, self.qpos[i0:i1], self.kpos[j0:j1], self.q_limit,
                     self.k_limit)

    def nonempty(self) -> bool:
        return bool((self.classes != EMPTY).any())

    def spans(self, a: int, max_keys: int) -> list[tuple[int, int, bool]]:
        """Key spans of query tile ``a``: (j0, j1, masked) over runs of non-empty tiles, each <= max_keys wide
        (at least one tile); ``masked`` when a tile of the span is partial."""
        row = self.classes[a].tolist()
        per = max(1, max_keys // self.tk)
        out, c = [], 0
        while c < len(row):
            if row[c] == EMPTY:
                c += 1
                continue
            start, masked = c, False
            while c < len(row) and row[c] != EMPTY and c - start < per:
                masked = masked or row[c] == PARTIAL
                c += 1
            out.append((start * self.tk, min(self.nk, c * self.tk), masked))
        return out


def _eval(pred, batch: int, heads: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor, q_limit: int,
          k_limit: int) -> torch.Tensor:
    qv = (qp < q_limit).view(1, 1, -1, 1)
    kv = (kp < k_limit).view(1, 1, 1, -1)
    ok = qv & kv
    if pred is None:
        return ok
    b = torch.arange(batch, device=qp.device).view(batch, 1, 1, 1)
    h = heads.view(1, -1, 1, 1)
    qi = qp.clamp(max=q_limit - 1).view(1, 1, -1, 1)
    kj = kp.clamp(max=k_limit - 1).view(1, 1, 1, -1)
    m = pred(b, h, qi, kj)
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        raise TypeError(f"mask: a predicate must return a bool tensor, got {type(m).__name__} "
                        f"{getattr(m, 'dtype', '')}")
    return m & ok


def _tiles(n: int, t: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + t)) for s in range(0, n, t)]


_SUPER = 1 << 22
"""Mask elements evaluated at once while planning (B * H * rows * columns)."""


def _super_tiles(nq: int, nk: int, tq: int, tk: int, rows: int) -> tuple[int, int]:
    """Super-tile sizes (multiples of tq, tk) for planning: as wide as the budget allows."""
    sk = min(nk, max(tk, (_SUPER // max(1, rows * tq)) // tk * tk))
    sq = min(nq, max(tq, (_SUPER // max(1, rows * sk)) // tq * tq))
    return sq, sk


def plan_block(pred: Predicate | None, *, batch: int, heads: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
               q_limit: int, k_limit: int, tq: int | None = None, tk: int | None = None) -> BlockPlan:
    """Classify every (tq x tk) tile of the block: the predicate is evaluated once on the whole block, in
    super-tiles, and reduced per tile."""
    nq, nk = qpos.numel(), kpos.numel()
    dq, dk = tile_sizes(nq, nk, batch * heads.numel())
    tq, tk = tq or dq, tk or dk
    nqt, nkt = -(-nq // tq), -(-nk // tk)
    classes = torch.zeros(nqt, nkt, dtype=torch.int8)
    if nq == 0 or nk == 0:
        return BlockPlan(pred, batch, heads, qpos, kpos, q_limit, k_limit, tq, tk, classes)
    sq, sk = _super_tiles(nq, nk, tq, tk, batch * heads.numel())
    for i0, i1 in _tiles(nq, sq):
        for j0, j1 in _tiles(nk, sk):
            m = _eval(pred, batch, heads, qpos[i0:i1], kpos[j0:j1], q_limit, k_limit)  # (B|1, H|1, rows, cols)
            m = m.flatten(0, 1)  # (BH|1, rows, cols)
            a_n, c_n = -(-(i1 - i0) // tq), -(-(j1 - j0) // tk)
            pad = torch.nn.functional.pad
            anyv = pad(m, (0, c_n * tk - (j1 - j0), 0, a_n * tq - (i1 - i0)), value=False)
            allv = pad(m, (0, c_n * tk - (j1 - j0), 0, a_n * tq - (i1 - i0)), value=True)
            anyv = anyv.view(-1, a_n, tq, c_n, tk).any(dim=4).any(dim=2).any(dim=0)  # (a_n, c_n)
            allv = allv.view(-1, a_n, tq, c_n, tk).all(dim=4).all(dim=2).all(dim=0)
            cls = torch.where(allv, FULL, torch.where(anyv, PARTIAL, EMPTY)).to(torch.int8)
            classes[i0 // tq : i0 // tq + a_n, j0 // tk : j0 // tk + c_n] = cls
    return BlockPlan(pred, batch, heads, qpos, kpos, q_limit, k_limit, tq, tk, classes)


def needed_keys(pred: Predicate | None, *, batch: int, heads: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
                q_limit: int, k_limit: int) -> torch.Tensor:
    """(nk,) bool: the keys that at least one query of the block attends to (for some batch row and head)."""
    nq, nk = qpos.numel(), kpos.numel()
    out = torch.zeros(nk, dtype=torch.bool)
    if nq == 0 or nk == 0:
        return out
    sq, sk = _super_tiles(nq, nk, TILE, TILE, batch * heads.numel())
    for j0, j1 in _tiles(nk, sk):
        for i0, i1 in _tiles(nq, sq):
            m = _eval(pred, batch, heads, qpos[i0:i1], kpos[j0:j1], q_limit, k_limit)  # (B|1, H|1, rows, cols)
            out[j0:j1] |= m.flatten(0, 2).any(dim=0)
            if bool(out[j0:j1].all()):
                break
    return out


# --------------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------------
def _mask5(m: torch.Tensor, hk: int, g: int) -> torch.Tensor:
    """(B|1, Hq|1, tq, tk) -> (B|1, Hk|1, G|1, tq, tk), the layout of the stacked score tile."""
    Bm, Hm, tq, tk = m.shape
    if Hm == 1:
        return m.view(Bm, 1, 1, tq, tk)
    return m.view(Bm, hk, g, tq, tk)


def _span_mask(plan: BlockPlan, masked: bool, i0, i1, j0, j1, kmask, hk, g):
    """The mask of one span in 5-D, or None when nothing is masked."""
    m = plan.tile_mask(i0, i1, j0, j1) if masked else None
    if kmask is not None:
        km = kmask[:, j0:j1].view(kmask.shape[0], 1, 1, j1 - j0)
        m = km if m is None else m & km
    if m is None:
        return None
    m = m.expand(m.shape[0], m.shape[1], i1 - i0, j1 - j0)
    return _mask5(m, hk, g)


def _q_rows(x5: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """(B, Hk, G, nq, D) -> rows i0:i1 of every query head of each group, (B, Hk, G * t, D)."""
    B, Hk, G, _, D = x5.shape
    return x5[:, :, :, i0:i1].reshape(B, Hk, G * (i1 - i0), D)


def _span_keys(B: int, Hq: int, t: int) -> int:
    return max(TILE, TILE_ELEMENTS // max(1, B * Hq * t))


def attend_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float,
                   kmask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, nq, D), k (B, Hk, nk, D), v (B, Hk, nk, Dv), kmask (B, nk) bool or None ->
    out (B, Hq, nq, Dv) and lse (B, Hq, nq), both in float32 (float64 for float64 inputs). Rows that see no
    key get out 0 and lse -inf."""
    B, Hq, nq, D = q.shape
    Hk, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hk
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(B, Hk, G, nq, Dv, dtype=acc, device=q.device)
    lse = torch.full((B, Hk, G, nq, 1), float("-inf"), dtype=acc, device=q.device)
    if nq == 0 or nk == 0 or not plan.nonempty():
        return out.view(B, Hq, nq, Dv), lse.view(B, Hq, nq)
    q5 = q.view(B, Hk, G, nq, D)
    kf, vf = k.to(acc), v.to(acc)
    for a, (i0, i1) in enumerate(_tiles(nq, plan.tq)):
        spans = plan.spans(a, _span_keys(B, Hq, i1 - i0))
        if not spans:
            continue
        t = i1 - i0
        qt = _q_rows(q5, i0, i1).to(acc) * scale  # (B, Hk, G*t, D)
        m = l_ = o = None
        for j0, j1, masked in spans:
            s = torch.matmul(qt, kf[:, :, j0:j1].transpose(-1, -2))  # (B, Hk, G*t, span)
            mk = _span_mask(plan, masked, i0, i1, j0, j1, kmask, Hk, G)
            if mk is not None:
                s.view(B, Hk, G, t, j1 - j0).masked_fill_(~mk, float("-inf"))
            smax = s.amax(dim=-1, keepdim=True)
            m_new = smax if m is None else torch.maximum(m, smax)
            safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = s.sub_(safe).exp_()  # (B, Hk, G*t, span), exp(-inf) = 0 where masked
            pv = torch.matmul(p, vf[:, :, j0:j1])
            if m is None:
                l_, o = p.sum(dim=-1, keepdim=True), pv
            else:
                corr = torch.exp(m - safe)  # 0 while m is -inf
                l_ = l_ * corr + p.sum(dim=-1, keepdim=True)
                o = o * corr + pv
            m = m_new
        safe_l = torch.where(l_ > 0, l_, torch.ones_like(l_))
        out[:, :, :, i0:i1] = (o / safe_l).view(B, Hk, G, t, Dv)
        mf = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lse[:, :, :, i0:i1] = torch.where(l_ > 0, mf + torch.log(safe_l), torch.full_like(m, float("-inf"))).view(
            B, Hk, G, t, 1)
    return out.view(B, Hq, nq, Dv), lse.view(B, Hq, nq)


def attend_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, delta: torch.Tensor,
                    lse: torch.Tensor, plan: BlockPlan, scale: float, kmask: torch.Tensor | None = None,
                    *, need_dq: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* (merged) ``lse`` (B, Hq, nq) and ``delta = rowsum(dout * out) -
    dlse`` (B, Hq, nq) of the whole attention: the block's share of dq (B, Hq, nq, D) and its keys' dk
    (B, Hk, nk, D), dv (B, Hk, nk, Dv), in the accumulation dtype."""
    B, Hq, nq, D = q.shape
    Hk, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hk
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(B, Hk, G, nq, D, dtype=acc, device=q.device) if need_dq else None
    dk = torch.zeros(B, Hk, nk, D, dtype=acc, device=q.device)
    dv = torch.zeros(B, Hk, nk, Dv, dtype=acc, device=q.device)
    if nq == 0 or nk == 0 or not plan.nonempty():
        return (None if dq is None else dq.view(B, Hq, nq, D)), dk, dv
    q5 = q.view(B, Hk, G, nq, D)
    do5 = dout.to(acc).view(B, Hk, G, nq, Dv)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(acc).view(B, Hk, G, nq, 1)
    delta = delta.to(acc).view(B, Hk, G, nq, 1)
    kf, vf = k.to(acc), v.to(acc)
    for a, (i0, i1) in enumerate(_tiles(nq, plan.tq)):
        spans = plan.spans(a, _span_keys(B, Hq, i1 - i0))
        if not spans:
            continue
        t = i1 - i0
        qt = _q_rows(q5, i0, i1).to(acc) * scale  # (B, Hk, G*t, D)
        dot = _q_rows(do5, i0, i1)  # (B, Hk, G*t, Dv)
        lt = _q_rows(lse, i0, i1)  # (B, Hk, G*t, 1)
        dt = _q_rows(delta, i0, i1)
        dqt = None
        for j0, j1, masked in spans:
            s = torch.matmul(qt, kf[:, :, j0:j1].transpose(-1, -2))  # (B, Hk, G*t, span)
            mk = _span_mask(plan, masked, i0, i1, j0, j1, kmask, Hk, G)
            if mk is not None:
                s.view(B, Hk, G, t, j1 - j0).masked_fill_(~mk, float("-inf"))
            p = s.sub_(lt).exp_()  # probabilities under the final normaliser
            dv[:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), dot)
            ds = torch.matmul(dot, vf[:, :, j0:j1].transpose(-1, -2)).sub_(dt).mul_(p)  # dL/d(scaled score)
            g = torch.matmul(ds, kf[:, :, j0:j1])
            dqt = g if dqt is None else dqt.add_(g)
            dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qt)
        if dq is not None:
            dq[:, :, :, i0:i1] = (dqt * scale).view(B, Hk, G, t, D)
    return (None if dq is None else dq.view(B, Hq, nq, D)), dk, dv


class BlockAttention(torch.autograd.Function):
    """One block as a differentiable function: ``(q, k, v) -> (out, lse)`` under ``plan`` (out in q's dtype,
    lse in the accumulation dtype; a gradient of lse is honoured)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, kmask):
        out, lse = attend_forward(q, k, v, plan, scale, kmask)
        ctx.save_for_backward(q, k, v, out, lse, kmask)
        ctx.plan, ctx.scale, ctx.has_kmask = plan, scale, kmask is not None
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kmask = ctx.saved_tensors
        kmask = kmask if ctx.has_kmask else None
        acc = out.dtype
        dout = torch.zeros_like(out) if dout is None else dout.to(acc)
        delta = (dout * out).sum(dim=-1)  # (B, Hq, nq)
        if dlse is not None:
            delta = delta - torch.where(torch.isfinite(lse), dlse.to(acc), torch.zeros_like(delta))
        dq, dk, dv = attend_backward(q, k, v, dout, delta, lse, ctx.plan, ctx.scale, kmask)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None
