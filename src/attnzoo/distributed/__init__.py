"""Context parallelism on torch.distributed: the same attention, sharded over processes, equal to one process.

CATALOG P025 (A Unified View of Long-Sequence Models towards Modeling Million-Scale Dependencies: sharded
multi-head attention merged by log-sum-exp; ring, halo and head-parallel splits), P117 (LASP-2: sequence
parallelism for linear attention by one all-gather of chunk states), P089 (Lamina: attention offloading, a KV
cache partitioned across devices and merged exactly), P075 (S2-Attention: heterogeneous context sharding
among heads). gloo on CPU, NCCL on GPU: the same code.

    import torch.distributed as dist, attnzoo.distributed as cp
    dist.init_process_group("gloo")                       # torchrun sets the environment
    sh = cp.Sharding(seq_len=N, world=dist.get_world_size(), scheme="zigzag")
    q_r, k_r, v_r = (sh.shard(x, dist.get_rank()) for x in (q, k, v))
    out_r = cp.attention(q_r, k_r, v_r, mechanism="sliding_window", window=256, causal=True,
                         layout="ring", sharding=sh)      # (B, Hq, n, Dv): this rank's shard

Modules: :mod:`~.api` (the entry point), :mod:`~.ring` (ring + halo), :mod:`~.blocks` (masked tiles with
log-sum-exp), :mod:`~.ulysses` (all-to-all, hybrid), :mod:`~.heads` (head sharding), :mod:`~.lasp2`,
:mod:`~.decode` (split-KV and split recurrent states), :mod:`~.module` (:class:`ContextParallel`),
:mod:`~.comm` (byte counters, timeouts, pre-flight checks), :mod:`~.sharding`, :mod:`~.launch` (local worlds),
:mod:`~.checks` (distributed == single-process checks), ``python -m attnzoo.distributed.demo``.
"""

from .api import LAYOUTS, attention, mask_predicate
from .comm import (
    DEFAULT_TIMEOUT,
    CommStats,
    DistributedError,
    RankMismatchError,
    comm_stats,
    reset_comm_stats,
)
from .decode import SPLIT_KV_MECHANISMS, SplitKVCache, SplitRecurrentState
from .heads import HEAD_COUPLED, HeadShard, shard_heads, split_heads
from .lasp2 import LASP2_MECHANISMS
from .module import ContextParallel
from .sharding import SCHEMES, Sharding
from .ulysses import HybridGroups, hybrid_groups

__all__ = [
    "attention", "LAYOUTS", "mask_predicate", "Sharding", "SCHEMES", "ContextParallel", "SplitKVCache",
    "SplitRecurrentState", "SPLIT_KV_MECHANISMS", "LASP2_MECHANISMS", "HybridGroups", "hybrid_groups",
    "HeadShard", "split_heads", "shard_heads", "HEAD_COUPLED", "DistributedError", "RankMismatchError",
    "CommStats", "comm_stats", "reset_comm_stats", "DEFAULT_TIMEOUT",
]
