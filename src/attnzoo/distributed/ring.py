"""Ring attention with log-sum-exp merge, and halo exchange, for softmax attention under any mask predicate.

CATALOG P025 (A Unified View of Long-Sequence Models towards Modeling Million-Scale Dependencies, sharded
multi-head attention: every device computes a partial ``(O_p, lse_p)`` over its key shard, and
``O = sum_p exp(lse_p - lse) O_p`` with ``lse = logsumexp_p lse_p``). The ring form (Liu et al., "Ring
Attention with Blockwise Transformers", arXiv 2310.01889) streams the key/value shards past the queries so that
no rank ever holds more than two of them.

Plan (once per mask and sharding, cached): every rank evaluates the mask predicate of its queries against every
rank's key positions, tile by tile (:mod:`attnzoo.distributed.blocks`), and keeps the *ranges* of each rank's
keys it needs; one gather of these ranges tells every rank what to send to whom. A block the mask leaves
empty is neither sent nor computed: a sliding window over 8 ranks only talks to neighbours, and only the
``window - 1`` boundary keys move; under zig-zag causal sharding a rank receives only the half of an earlier
rank's block it can see.

Ring schedule (W ranks, step t = 1 .. W - 1): rank r sends the keys/values that rank ``r + t`` needs and
receives from rank ``r - t`` -- the blocks rotate by t around the ring, each straight to where it is needed
(nothing is forwarded through ranks that do not need it, so skipped blocks cost no bytes anywhere). Step
t + 1 is posted before step t is computed (communication overlaps compute); each received block's
``(o_p, lse_p)`` is merged into the running output by :func:`attnzoo.kernels.merge.merge_attention`.
Grouped-query attention sends the Hk key/value heads, never the Hq repeated ones.

Backward (:class:`_RingAttention`, a custom autograd function): the same rotation runs again -- keys/values
are re-received, not kept, so memory stays O(n / W) -- and every rank sends the gradients dK, dV of the keys
it used straight back to their owner, who adds them up. dQ stays local. Exact: each block's gradient is
computed from the final log-sum-exp, so the sum over blocks is the gradient of the whole attention.

Halo (:func:`halo_attention`): the same plan, but the needed keys of the other ranks are gathered once (for a
local mask: the ``window - 1`` keys across each shard boundary) and attended with the local ones in one tiled
call; the backward returns the halo keys' gradients to their owners.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels.merge import merge_attention
from ..masks import Predicate
from .blocks import BlockAttention, BlockPlan, attend_backward, attend_forward, needed_keys, plan_block
from .comm import Comm

__all__ = ["ExchangePlan", "build_plan", "needed_ranges", "ring_attention", "halo_attention", "MAX_RANGES"]

MAX_RANGES = 16
"""At most this many key ranges are sent per (sender, receiver) pair; more are merged across the smallest gaps."""

# p2p tags (distinct per message kind, so concurrent messages between one pair never match the wrong buffer)
_T_K, _T_V, _T_M, _T_DK, _T_DV = 11, 12, 13, 14, 15


# --------------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------------
def key_ranges(flags: torch.Tensor, max_ranges: int = MAX_RANGES) -> list[tuple[int, int]]:
    """Runs of True in ``flags`` as [start, stop) ranges, at most ``max_ranges`` (merged over the smallest gaps)."""
    idx = torch.nonzero(flags).flatten().tolist()
    if not idx:
        return []
    ranges = []
    start = prev = idx[0]
    for i in idx[1:]:
        if i != prev + 1:
            ranges.append([start, prev + 1])
            start = i
        prev = i
    ranges.append([start, prev + 1])
    while len(ranges) > max_ranges:
        gaps = [ranges[i + 1][0] - ranges[i][1] for i in range(len(ranges) - 1)]
        i = min(range(len(gaps)), key=gaps.__getitem__)
        ranges[i][1] = ranges[i + 1][1]
        del ranges[i + 1]
    return [(a, b) for a, b in ranges]


def _range_index(ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges]) if ranges else torch.zeros(0, dtype=torch.long)


def _count(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)


def gather_ranges(x: torch.Tensor, ranges: list[tuple[int, int]], dim: int = 2) -> torch.Tensor:
    """The concatenation of ``x``'s slices ``ranges`` along ``dim`` (a view for a single range)."""
    if len(ranges) == 1:
        a, b = ranges[0]
        return x.narrow(dim, a, b - a)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges], dim=dim)


def add_ranges(dst: torch.Tensor, src: torch.Tensor, ranges: list[tuple[int, int]], dim: int = 2) -> None:
    """``dst[ranges] += src`` along ``dim`` (adjoint of :func:`gather_ranges`)."""
    off = 0
    for a, b in ranges:
        dst.narrow(dim, a, b - a).add_(src.narrow(dim, off, b - a))
        off += b - a


@dataclass
class ExchangePlan:
    """What rank ``rank`` of a ring of ``world`` needs from every rank (``recv[o]``: ranges of rank o's keys),
    what every rank needs from it (``send[d]``), and the tile plan of its queries against each received key set
    (``blocks[o]``, keys in the order of ``recv[o]``)."""

    rank: int
    world: int
    recv: list[list[tuple[int, int]]]
    send: list[list[tuple[int, int]]]
    blocks: list[BlockPlan]
    needed: list[list[list[tuple[int, int]]]] = field(default_factory=list)  # needed[r][o], every rank's recv
    halo: BlockPlan | None = None  # the halo layout's tile plan against the gathered keys

    def keys_received(self) -> int:
        return sum(_count(self.recv[o]) for o in range(self.world) if o != self.rank)

    def keys_sent(self) -> int:
        return sum(_count(self.send[d]) for d in range(self.world) if d != self.rank)


def needed_ranges(pred: Predicate | None, *, batch: int, heads: torch.Tensor, qpos: torch.Tensor,
                  k_positions: list[torch.Tensor], q_limit: int, k_limit: int) -> list[list[tuple[int, int]]]:
    """For queries at ``qpos``: the ranges of every rank's keys (``k_positions[o]``) they attend to."""
    return [key_ranges(needed_keys(pred, batch=batch, heads=heads, qpos=qpos, kpos=kpos, q_limit=q_limit,
                                   k_limit=k_limit)) for kpos in k_positions]


def build_plan(comm: Comm, pred: Predicate | None, *, batch: int, heads: torch.Tensor, q_positions: list[torch.Tensor],
               k_positions: list[torch.Tensor], q_limit: int, k_limit: int) -> ExchangePlan:
    """Evaluate the mask of this rank's queries against every rank's keys; one gather of the ranges."""
    r, W = comm.rank, comm.world
    qpos = q_positions[r]
    recv = needed_ranges(pred, batch=batch, heads=heads, qpos=qpos, k_positions=k_positions, q_limit=q_limit,
                         k_limit=k_limit)
    everyone = comm.gather_objects(recv, what="ring/halo plan (key ranges each rank needs)")
    send = [everyone[d][r] for d in range(W)]
    blocks = []
    for o in range(W):
        kpos = k_positions[o][_range_index(recv[o])]
        blocks.append(plan_block(pred, batch=batch, heads=heads, qpos=qpos, kpos=kpos, q_limit=q_limit,
                                 k_limit=k_limit))
    return ExchangePlan(r, W, recv, send, blocks, everyone)


class PlanCache:
    """A small LRU cache of plans. The key includes everything the plan depends on; an entry keeps its
    predicate alive so an ``id`` in a key can never be reused by another object while the entry exists."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._d: OrderedDict[Any, tuple[Any, ExchangePlan]] = OrderedDict()

    def get(self, key):
        hit = self._d.get(key)
        if hit is None:
            return None
        self._d.move_to_end(key)
        return hit[1]

    def put(self, key, keep, plan: ExchangePlan) -> None:
        self._d[key] = (keep, plan)
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def discard(self, key) -> None:
        self._d.pop(key, None)

    def clear(self) -> None:
        self._d.clear()


PLANS = PlanCache()


# --------------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------------
class _Exchange:
    """Keys, values (and key masks) of one step: sends to ``dst`` what it needs, receives from ``src``."""

    def __init__(self, comm: Comm, plan: ExchangePlan, k, v, kmask, src: int, dst: int, kind: str,
                 grads: tuple[int, int] | None = None) -> None:
        self.works: list = []
        self.src, self.dst = src, dst
        self.k = self.v = self.m = None
        B, Hk, _, D = k.shape
        Dv = v.shape[3]
        out_ranges, in_ranges = plan.send[dst], plan.recv[src]
        self._keep = []
        if out_ranges:
            pieces = [gather_ranges(k, out_ranges).contiguous(), gather_ranges(v, out_ranges).contiguous()]
            if kmask is not None:
                pieces.append(gather_ranges(kmask, out_ranges, dim=1).to(torch.uint8).contiguous())
            for t, tag in zip(pieces, (_T_K, _T_V, _T_M)):
                self.works.append((comm.isend(t, dst, tag, kind=kind), f"{kind}: send", f"to rank {dst}"))
            self._keep += pieces
        if in_ranges:
            L = _count(in_ranges)
            self.k = k.new_empty(B, Hk, L, D)
            self.v = v.new_empty(B, Hk, L, Dv)
            bufs = [self.k, self.v]
            if kmask is not None:
                self.m = torch.empty(B, L, dtype=torch.uint8, device=k.device)
                bufs.append(self.m)
            for t, tag in zip(bufs, (_T_K, _T_V, _T_M)):
                self.works.append((comm.irecv(t, src, tag), f"{kind}: receive", f"from rank {src}"))
        # gradients of the keys this rank sent to dst come back from dst (backward only)
        self.dk = self.dv = None
        if grads is not None and out_ranges:
            L = _count(out_ranges)
            self.dk = torch.empty(B, Hk, L, D, dtype=grads[0], device=k.device)
            self.dv = torch.empty(B, Hk, L, Dv, dtype=grads[0], device=k.device)
            self.grad_works = [(comm.irecv(self.dk, dst, _T_DK), "ring gradients: receive", f"from rank {dst}"),
                               (comm.irecv(self.dv, dst, _T_DV), "ring gradients: receive", f"from rank {dst}")]

    @property
    def kmask(self) -> torch.Tensor | None:
        return None if self.m is None else self.m.bool()


def _own(plan: ExchangePlan, k, v, kmask):
    rg = plan.recv[plan.rank]
    if not rg:
        return None, None, None
    km = None if kmask is None else gather_ranges(kmask, rg, dim=1)
    return gather_ranges(k, rg), gather_ranges(v, rg), km


# --------------------------------------------------------------------------------------------------------
# Ring
# --------------------------------------------------------------------------------------------------------
@dataclass
class RingRun:
    comm: Comm
    plan: ExchangePlan
    scale: float


def _ring_forward(q, k, v, kmask, run: RingRun):
    comm, plan = run.comm, run.plan
    r, W = plan.rank, plan.world
    B, Hq, nq, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    ko, vo, mo = _own(plan, k, v, kmask)
    if ko is not None:
        out, lse = attend_forward(q, ko, vo, plan.blocks[r], run.scale, mo)
    else:
        out = torch.zeros(B, Hq, nq, v.shape[3], dtype=acc, device=q.device)
        lse = torch.full((B, Hq, nq), float("-inf"), dtype=acc, device=q.device)
    pending = _Exchange(comm, plan, k, v, kmask, (r - 1) % W, (r + 1) % W, "ring kv") if W > 1 else None
    for t in range(1, W):
        ex = pending
        comm.wait(ex.works)
        pending = _Exchange(comm, plan, k, v, kmask, (r - t - 1) % W, (r + t + 1) % W, "ring kv") if t + 1 < W \
            else None
        if ex.k is not None:
            o, lo = attend_forward(q, ex.k, ex.v, plan.blocks[ex.src], run.scale, ex.kmask)
            out, lse = merge_attention([out, o], [lse, lo])
    return out, lse


def _ring_backward(q, k, v, kmask, out, lse, dout, dlse, run: RingRun):
    comm, plan = run.comm, run.plan
    r, W = plan.rank, plan.world
    acc = out.dtype
    dout = dout.to(acc)
    delta = (dout * out).sum(dim=-1)  # (B, Hq, nq)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.to(acc), torch.zeros_like(delta))
    B, Hq, nq, D = q.shape
    dq = torch.zeros(B, Hq, nq, D, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    ko, vo, mo = _own(plan, k, v, kmask)
    if ko is not None:
        dqo, dko, dvo = attend_backward(q, ko, vo, dout, delta, lse, plan.blocks[r], run.scale, mo)
        dq += dqo
        add_ranges(dk, dko, plan.recv[r])
        add_ranges(dv, dvo, plan.recv[r])
    sends = []

    def post(t):
        return _Exchange(comm, plan, k, v, kmask, (r - t) % W, (r + t) % W, "ring kv (backward)", grads=(acc,))

    pending = post(1) if W > 1 else None
    for t in range(1, W):
        ex = pending
        comm.wait(ex.works)
        pending = post(t + 1) if t + 1 < W else None
        if ex.k is not None:
            dqb, dkb, dvb = attend_backward(q, ex.k, ex.v, dout, delta, lse, plan.blocks[ex.src], run.scale, ex.kmask)
            dq += dqb
            for t_, tag in ((dkb, _T_DK), (dvb, _T_DV)):
                sends.append((comm.isend(t_, ex.src, tag, kind="ring gradients"), "ring gradients: send",
                              f"to rank {ex.src}"))
        if ex.dk is not None:
            comm.wait(ex.grad_works)
            add_ranges(dk, ex.dk, plan.send[ex.dst])
            add_ranges(dv, ex.dv, plan.send[ex.dst])
    comm.wait(sends)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kmask, run: RingRun):
        out, lse = _ring_forward(q, k, v, kmask, run)
        ctx.save_for_backward(q, k, v, kmask, out, lse)
        ctx.run, ctx.has_kmask = run, kmask is not None
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, kmask, out, lse = ctx.saved_tensors
        kmask = kmask if ctx.has_kmask else None
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(q, k, v, kmask, out, lse, dout, dlse, ctx.run)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def ring_attention(q, k, v, kmask, *, comm: Comm, plan: ExchangePlan, scale: float):
    """q (B, Hq, nq, D), k (B, Hk, nk, D), v (B, Hk, nk, Dv) local shards; kmask (B, nk) bool or None.
    Returns (out (B, Hq, nq, Dv) in q's dtype, lse (B, Hq, nq) in float32 / float64), differentiable."""
    return _RingAttention.apply(q, k, v, kmask, RingRun(comm, plan, scale))


# --------------------------------------------------------------------------------------------------------
# Halo
# --------------------------------------------------------------------------------------------------------
class _HaloExchange(torch.autograd.Function):
    """(k, v) local -> (k_all, v_all): the needed keys of every rank (own included), in rank order; the
    backward sends the received keys' gradients back to their owners and adds what comes back."""

    @staticmethod
    def forward(ctx, k, v, kmask, comm: Comm, plan: ExchangePlan):
        r, W = plan.rank, plan.world
        exchanges = []
        for t in range(1, W):  # post everything at once: the halo is small
            exchanges.append(_Exchange(comm, plan, k, v, kmask, (r - t) % W, (r + t) % W, "halo kv"))
        comm.wait([w for ex in exchanges for w in ex.works])
        by_src = {ex.src: ex for ex in exchanges}
        ks, vs, ms = [], [], []
        for o in range(W):
            if o == r:
                ko, vo, mo = _own(plan, k, v, kmask)
                if ko is not None:
                    ks.append(ko)
                    vs.append(vo)
                    ms.append(mo)
            elif by_src[o].k is not None:
                ks.append(by_src[o].k)
                vs.append(by_src[o].v)
                ms.append(by_src[o].kmask)
        if not ks:
            B, Hk, _, D = k.shape
            ks, vs = [k.new_zeros(B, Hk, 0, D)], [v.new_zeros(B, Hk, 0, v.shape[3])]
            ms = [None if kmask is None else kmask.new_zeros(B, 0)]
        k_all = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)
        v_all = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
        m_all = None if kmask is None else (ms[0] if len(ms) == 1 else torch.cat(ms, dim=1))
        ctx.comm, ctx.plan = comm, plan
        ctx.kshape, ctx.vshape = k.shape, v.shape
        # a custom function must not return views of its inputs: copy a slice of the local keys
        if k_all.untyped_storage().data_ptr() == k.untyped_storage().data_ptr():
            k_all, v_all = k_all.clone(), v_all.clone()
        if m_all is not None and kmask is not None and \
                m_all.untyped_storage().data_ptr() == kmask.untyped_storage().data_ptr():
            m_all = m_all.clone()
        if m_all is not None:
            ctx.mark_non_differentiable(m_all)
        return k_all, v_all, m_all

    @staticmethod
    def backward(ctx, dk_all, dv_all, _dm):
        comm, plan = ctx.comm, ctx.plan
        r, W = plan.rank, plan.world
        if dk_all is None or dv_all is None:  # every rank must still take part in the exchange
            L = sum(_count(plan.recv[o]) for o in range(W))
            ref = dv_all if dk_all is None else dk_all
            shape = (ctx.kshape[0], ctx.kshape[1], L)
            dk_all = ref.new_zeros(*shape, ctx.kshape[3]) if dk_all is None else dk_all
            dv_all = ref.new_zeros(*shape, ctx.vshape[3]) if dv_all is None else dv_all
        dk = dk_all.new_zeros(ctx.kshape)
        dv = dv_all.new_zeros(ctx.vshape)
        off, sends, recvs = 0, [], []
        for o in range(W):
            L = _count(plan.recv[o])
            if L == 0:
                continue
            gk, gv = dk_all[:, :, off : off + L], dv_all[:, :, off : off + L]
            off += L
            if o == r:
                add_ranges(dk, gk, plan.recv[r])
                add_ranges(dv, gv, plan.recv[r])
            else:
                sends.append((comm.isend(gk.contiguous(), o, _T_DK, kind="halo gradients"), "halo gradients: send",
                              f"to rank {o}"))
                sends.append((comm.isend(gv.contiguous(), o, _T_DV, kind="halo gradients"), "halo gradients: send",
                              f"to rank {o}"))
        bufs = []
        for d in range(W):
            L = _count(plan.send[d])
            if d == r or L == 0:
                continue
            bk = dk.new_empty(dk.shape[0], dk.shape[1], L, dk.shape[3])
            bv = dv.new_empty(dv.shape[0], dv.shape[1], L, dv.shape[3])
            recvs += [(comm.irecv(bk, d, _T_DK), "halo gradients: receive", f"from rank {d}"),
                      (comm.irecv(bv, d, _T_DV), "halo gradients: receive", f"from rank {d}")]
            bufs.append((d, bk, bv))
        comm.wait(recvs)
        for d, bk, bv in bufs:
            add_ranges(dk, bk, plan.send[d])
            add_ranges(dv, bv, plan.send[d])
        comm.wait(sends)
        return dk, dv, None, None, None


def halo_attention(q, k, v, kmask, *, comm: Comm, plan: ExchangePlan, halo_block: BlockPlan, scale: float):
    """Gather the needed keys of the other ranks (for a local mask: the boundary keys), attend in one tiled call.
    ``halo_block`` is the tile plan of this rank's queries against the gathered keys (:func:`halo_block_plan`)."""
    k_all, v_all, m_all = _HaloExchange.apply(k, v, kmask, comm, plan)
    return BlockAttention.apply(q, k_all, v_all, halo_block, scale, m_all)


def halo_block_plan(plan: ExchangePlan, pred, *, batch: int, heads: torch.Tensor, qpos: torch.Tensor,
                    k_positions: list[torch.Tensor], q_limit: int, k_limit: int) -> BlockPlan:
    """The tile plan of the queries against the keys :class:`_HaloExchange` gathers (rank order)."""
    kpos = torch.cat([k_positions[o][_range_index(plan.recv[o])] for o in range(plan.world)])
    return plan_block(pred, batch=batch, heads=heads, qpos=qpos, kpos=kpos, q_limit=q_limit, k_limit=k_limit)
