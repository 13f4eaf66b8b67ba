"""Ulysses: all-to-all from sequence shards to head shards and back, for any functional mechanism; and the
hybrid ring x Ulysses layout.

CATALOG P025 (distributed multi-head attention, head-parallel split) with the head sharding of P075
(:mod:`attnzoo.distributed.heads`). DeepSpeed-Ulysses (Jacobs et al., arXiv 2309.14509): every rank holds
``n = N / W`` tokens of all heads; one all-to-all gives every rank *all* N tokens of ``Hq / W`` heads, which it
attends with the mechanism itself -- any functional mechanism, sub-quadratic ones included, since each rank
sees whole sequences -- and a second all-to-all returns the output to sequence shards. Communication per rank
is ``(W - 1) / W`` of its q, k, v and output, independent of the mechanism.

Grouped-query attention: a rank receives each key/value head its query heads read exactly once; repeating a
key/value head for a GQA grouping that does not survive the split happens after the wire. Tokens arrive in
rank order and are put in sequence order (by their global positions, so zig-zag shards work too) before the
mechanism runs, padding removed; the output goes back the same way. The backward of an all-to-all is the
all-to-all with the roles of sender and receiver swapped (:class:`_AllToAll`), so autograd does the rest.

Hybrid (:func:`hybrid_attention`, USP / LoongTrain style): ranks form a ``ring x ulysses`` grid; an all-to-all
inside each Ulysses group gives every rank its heads for the tokens of its whole Ulysses group, ring attention
over the ring group (same heads) does the rest, and an all-to-all returns the output. Masks are evaluated at
global positions and global head indices, so head-dependent masks stay right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import Comm
from .heads import HeadShard, split_heads

__all__ = ["ulysses_attention", "HybridGroups", "hybrid_groups", "SeqToHeads"]


class _AllToAll(torch.autograd.Function):
    """Rows of x (dim 0) to ranks; backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, comm: Comm, send_rows, recv_rows, kind: str):
        ctx.comm, ctx.send_rows, ctx.recv_rows, ctx.kind = comm, send_rows, recv_rows, kind
        return comm.all_to_all(x, send_rows, recv_rows, what=f"all-to-all ({kind})", kind=kind)

    @staticmethod
    def backward(ctx, g):
        out = ctx.comm.all_to_all(g, ctx.recv_rows, ctx.send_rows, what=f"all-to-all ({ctx.kind}, backward)",
                                  kind=ctx.kind + " (backward)")
        return out, None, None, None, None


@dataclass
class SeqToHeads:
    """The all-to-all of one group: sequence shards of ``n`` tokens (every rank's positions known) <-> all
    ``W n`` tokens of this rank's head shard (tokens kept in rank order; ``order`` sorts them)."""

    comm: Comm
    shards: list[HeadShard]
    positions: list[torch.Tensor]  # every member's token positions, in group-rank order

    @property
    def mine(self) -> HeadShard:
        return self.shards[self.comm.rank]

    @property
    def gathered_positions(self) -> torch.Tensor:
        return torch.cat(self.positions)

    def heads_in(self, x: torch.Tensor, kv: bool, kind: str) -> torch.Tensor:
        """(B, H, n, D) sequence shard -> (B, h_mine, W n, D): this rank's heads (kv: its received key/value
        heads) for every member's tokens, in member order."""
        W, r = self.comm.world, self.comm.rank
        B, _, n, D = x.shape
        per = [list(s.kv_recv) if kv else list(range(s.q_start, s.q_stop)) for s in self.shards]
        flat = [h for hs in per for h in hs]
        rows = x.transpose(0, 1)  # (H, B, n, D)
        contiguous = flat == list(range(x.shape[1]))
        send = rows if contiguous else rows.index_select(0, torch.tensor(flat, device=x.device))
        send = send.reshape(len(flat), B * n * D)
        mine = len(per[r])
        got = _AllToAll.apply(send, self.comm, [len(p) for p in per], [mine] * W, kind)  # (W * mine, B*n*D)
        got = got.view(W, mine, B, n, D).permute(2, 1, 0, 3, 4)  # (B, mine, W, n, D)
        return got.reshape(B, mine, W * n, D)

    def heads_out(self, y: torch.Tensor, kind: str) -> torch.Tensor:
        """Inverse of :meth:`heads_in` for query heads: (B, h_mine, W n, Dv) -> (B, Hq, n, Dv)."""
        W = self.comm.world
        B, mine, Wn, Dv = y.shape
        n = Wn // W
        send = y.view(B, mine, W, n, Dv).permute(2, 1, 0, 3, 4).reshape(W * mine, B * n * Dv)
        counts = [s.q_heads for s in self.shards]
        got = _AllToAll.apply(send, self.comm, [mine] * W, counts, kind)  # (Hq, B*n*Dv)
        return got.view(sum(counts), B, n, Dv).transpose(0, 1)

    def gather_mask(self, kmask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, n) bool key mask -> (B, W n) in member order (one small all-gather)."""
        if kmask is None:
            return None
        allm = self.comm.all_gather(kmask.to(torch.uint8), what="all-gather of the key padding mask",
                                    kind="key padding mask")  # (W, B, n)
        return allm.permute(1, 0, 2).reshape(kmask.shape[0], -1).bool()


def _expand(x: torch.Tensor, shard: HeadShard) -> torch.Tensor:
    idx = shard.expand_index()
    return x if idx is None else x.index_select(1, torch.tensor(idx, device=x.device))


def ulysses_attention(q, k, v, kmask, *, comm: Comm, q_positions: list[torch.Tensor], k_positions: list[torch.Tensor],
                      nq: int, nk: int, run):
    """Sequence shards -> head shards -> ``run(q, k, v, key_padding_mask, shard)`` on whole sequences (natural
    order, padding removed) -> sequence shards. q (B, Hq, n_q, D), k/v (B, Hk, n_k, *), kmask (B, n_k) or None."""
    Hq, Hk = q.shape[1], k.shape[1]
    shards = split_heads(Hq, Hk, comm.world)
    sq = SeqToHeads(comm, shards, q_positions)
    sk = SeqToHeads(comm, shards, k_positions)
    qh = sq.heads_in(q, kv=False, kind="ulysses q")  # (B, hq, W n_q, D)
    kh = sk.heads_in(k, kv=True, kind="ulysses k")
    vh = sk.heads_in(v, kv=True, kind="ulysses v")
    mh = sk.gather_mask(kmask)
    qorder = torch.argsort(sq.gathered_positions)[:nq].to(q.device)
    korder = torch.argsort(sk.gathered_positions)[:nk].to(k.device)
    shard = sq.mine
    qn = qh.index_select(2, qorder)  # (B, hq, Nq, D) in sequence order
    kn = _expand(kh.index_select(2, korder), shard)
    vn = _expand(vh.index_select(2, korder), shard)
    mn = None if mh is None else mh.index_select(1, korder)
    out = run(qn, kn, vn, mn, shard)  # (B, hq, Nq, Dv)
    padded = F.pad(out, (0, 0, 0, qh.shape[2] - nq))  # zeros at the padded positions nq ..
    back = padded.index_select(2, sq.gathered_positions.to(out.device))  # member order
    return sq.heads_out(back, "ulysses out")


# --------------------------------------------------------------------------------------------------------
# Hybrid ring x Ulysses
# --------------------------------------------------------------------------------------------------------
@dataclass
class HybridGroups:
    """A ``ring x ulysses`` grid of process groups: global rank ``g = i * ulysses + u`` is member ``u`` of Ulysses
    group ``i`` and member ``i`` of ring group ``u``. Build it with :func:`hybrid_groups`."""

    ring: object
    ulysses: object
    ring_size: int
    ulysses_size: int
    group: object = None

    @property
    def world(self) -> int:
        return self.ring_size * self.ulysses_size


def hybrid_groups(ulysses_size: int, group=None) -> HybridGroups:
    """Create the ring and Ulysses subgroups (a collective: every rank of ``group`` must call it, in the same
    order as any other group creation)."""
    from ..errors import check_int

    check_int("ulysses_size", ulysses_size, low=1)
    W = dist.get_world_size(group)
    if W % ulysses_size:
        raise ValueError(f"ulysses_size: must divide the world size {W}, got {ulysses_size}")
    R = W // ulysses_size
    ranks = list(range(W)) if group is None else [dist.get_global_rank(group, r) for r in range(W)]
    me = dist.get_rank()
    ring = uly = None
    for u in range(ulysses_size):  # ring groups: the same Ulysses index
        members = [ranks[i * ulysses_size + u] for i in range(R)]
        pg = dist.new_group(members)
        if me in members:
            ring = pg
    for i in range(R):  # Ulysses groups: consecutive ranks
        members = [ranks[i * ulysses_size + u] for u in range(ulysses_size)]
        pg = dist.new_group(members)
        if me in members:
            uly = pg
    return HybridGroups(ring, uly, R, ulysses_size, group)
