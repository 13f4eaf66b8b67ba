"""Head sharding: which query and key/value heads each rank computes, and the options a head subset needs.

CATALOG P075 (S2-Attention: "Efficient LLM Training and Serving with Heterogeneous Context Sharding among
Attention Heads", arXiv 2407.17678) and P025 (distributed multi-head attention, head-parallel split). Heads
are independent in every functional mechanism of attnzoo, so a rank can compute a subset of the heads over
the whole sequence and the union equals the single-process result -- provided the subset keeps each head's
own parameters: the decay of a Lightning head, the strided-block shift of an S2-Attention head (the paper's
point: each head sees its own shard of the context, so a rank holding a few heads keeps only their blocks in
its KV cache), the window of a MoA head. :func:`local_options` rewrites those options for a subset.

Split: query heads as evenly as possible (rank g gets ``[g Hq / W, (g + 1) Hq / W)``); a rank receives the
key/value heads its query heads read, once each. When its query heads do not form whole GQA groups of those
key/value heads, the key/value heads are repeated locally (never on the wire) so that every local query head
reads its own global key/value head. Fewer query heads than ranks is refused: a rank would have no work
(use the ring or the hybrid ring x Ulysses layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HeadShard", "split_heads", "local_options", "HEAD_COUPLED", "shard_heads"]


@dataclass(frozen=True)
class HeadShard:
    """The heads of one rank: query heads ``q_start .. q_stop - 1`` (global indices), the key/value heads it
    receives (``kv_recv``, global, each once) and the global key/value head of each *local* key/value head
    (``kv_local``: ``kv_recv`` itself when the query heads form whole groups, else one per query head)."""

    q_start: int
    q_stop: int
    kv_recv: tuple[int, ...]
    kv_local: tuple[int, ...]

    @property
    def q_heads(self) -> int:
        return self.q_stop - self.q_start

    def q_index(self) -> torch.Tensor:
        return torch.arange(self.q_start, self.q_stop)

    def expand_index(self) -> list[int] | None:
        """Indices into the received key/value heads giving the local ones, or None when they are the same."""
        if self.kv_local == self.kv_recv:
            return None
        return [self.kv_recv.index(x) for x in self.kv_local]


def split_heads(hq: int, hk: int, world: int) -> list[HeadShard]:
    """The head shard of every rank (see the module docstring)."""
    if hq < world:
        raise ValueError(
            f"heads: head sharding (Ulysses) gives every rank at least one query head; got Hq={hq} query heads for "
            f"{world} ranks. Use layout='ring' (shards the sequence only) or a hybrid layout with a Ulysses group "
            f"of at most {hq} ranks")
    G = hq // hk
    out = []
    for g in range(world):
        a, b = (g * hq) // world, ((g + 1) * hq) // world
        per_q = [h // G for h in range(a, b)]
        recv = tuple(sorted(set(per_q)))
        Gl = (b - a) // len(recv)
        whole = Gl * len(recv) == b - a and all(recv[(h - a) // Gl] == x for h, x in zip(range(a, b), per_q))
        out.append(HeadShard(a, b, recv, recv if whole else tuple(per_q)))
    return out


# --------------------------------------------------------------------------------------------------------
# Per-head options
# --------------------------------------------------------------------------------------------------------
HEAD_COUPLED: dict[str, str] = {
    "hyperattention": "its sampled key columns are drawn for all Hq heads from one seeded stream, so a subset of "
                      "heads draws different samples than the same heads in the full computation",
}
"""Functional mechanisms whose heads are not independent: head sharding (Ulysses) refuses them."""


def _lightning(opts: dict, shard: HeadShard, hq: int, hk: int) -> dict:
    from ..mechanisms.linear.lightning import resolve_decay

    lam = resolve_decay(opts.get("decay"), hk)
    if lam is None:
        return {**opts, "decay": 1.0}
    return {**opts, "decay": lam[list(shard.kv_local)]}


def _s2(opts: dict, shard: HeadShard, hq: int, hk: int) -> dict:
    from ..mechanisms.local.s2_attention import s2_head_offsets

    if opts["homo_head"]:
        return opts
    V = opts["vert_stride"]
    step = max(1, V // hq) if opts["head_sliding_step"] is None else opts["head_sliding_step"]
    kv = list(shard.kv_local)
    if kv != list(range(kv[0], kv[0] + len(kv))):
        raise ValueError(
            f"heads: S2-Attention's strided-block shifts are per key/value head; this rank's query heads "
            f"{shard.q_start}..{shard.q_stop - 1} need key/value heads {kv}, which a shifted pattern cannot express. "
            f"Choose a world size for which each rank holds whole GQA groups (Hq={hq}, Hk={hk})")
    dense_from = hk - opts["num_dense_heads"]
    local = {**opts, "head_sliding_step": step, "head_sliding_offset": kv[0] * step + opts["head_sliding_offset"],
             "num_dense_heads": sum(1 for x in kv if x >= dense_from)}
    # the rewritten options give exactly the global shifts of these heads
    want = [s for i, s in enumerate(s2_head_offsets(hq, hk, vert_stride=V, num_dense_heads=opts["num_dense_heads"],
                                                    head_sliding_step=opts["head_sliding_step"],
                                                    head_sliding_offset=opts["head_sliding_offset"])) if i in kv]
    got = s2_head_offsets(shard.q_heads, len(kv), vert_stride=V, num_dense_heads=local["num_dense_heads"],
                          head_sliding_step=step, head_sliding_offset=local["head_sliding_offset"])
    if want != got:  # pragma: no cover - guards the rewrite above
        raise AssertionError(f"S2 head shifts {got} != {want}")
    return local


def _moa(opts: dict, shard: HeadShard, hq: int, hk: int) -> dict:
    out = dict(opts)
    for name in ("alphas", "betas"):
        val = opts[name]
        if isinstance(val, (tuple, list)):
            if len(val) != hq:
                raise ValueError(f"{name}: expected one value per query head ({hq}), got {len(val)}: {val!r}")
            out[name] = tuple(val[shard.q_start : shard.q_stop])
    return out


HEAD_OPTIONS: dict[str, Callable[[dict, HeadShard, int, int], dict]] = {
    "lightning": _lightning,
    "s2_attention": _s2,
    "moa": _moa,
}
"""Mechanisms with per-head options: the rewrite of their options for a head subset."""


def local_options(mechanism: str, opts: dict[str, Any], shard: HeadShard, hq: int, hk: int) -> dict[str, Any]:
    """The options that make ``mechanism`` on the heads of ``shard`` equal those heads of the full computation."""
    if mechanism in HEAD_COUPLED:
        raise ValueError(f"mechanism: {mechanism!r} cannot be sharded by heads (layout 'ulysses' / 'heads'): "
                         f"{HEAD_COUPLED[mechanism]}. Use it on one process")
    fn = HEAD_OPTIONS.get(mechanism)
    return dict(opts) if fn is None else fn(dict(opts), shard, hq, hk)


def shard_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, world: int):
    """This rank's heads of full q (B, Hq, N, D), k, v (B, Hk, N, *): (q_local, k_local, v_local, shard), with
    the key/value heads already repeated where the local GQA grouping needs it."""
    shard = split_heads(q.shape[1], k.shape[1], world)[rank]
    idx = torch.tensor(shard.kv_local, device=k.device)
    return (q[:, shard.q_start : shard.q_stop], k.index_select(1, idx), v.index_select(1, idx), shard)
