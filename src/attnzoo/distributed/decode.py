"""Split-KV decoding: a long KV cache partitioned across ranks, merged exactly by log-sum-exp; and the
recurrent family's state partitioned by feature rows, merged by a sum.

CATALOG P089 (Lamina, "Efficient and Economic Large Language Model Inference with Attention Offloading":
the KV cache lives on memory devices, partitioned; each returns ``(o_p, lse_p)`` for the current query; the
results are merged as in P025) and P025 (sharded attention, ``O = sum_p exp(lse_p - lse) O_p``).

:class:`SplitKVCache` (softmax attention and every mechanism defined by a mask predicate: ``softmax``,
``sliding_window``, ``sink_window``, causal ``neighborhood_1d``). Every rank runs the decode step with the same
new tokens (q, k, v replicated, as the rest of the model runs replicated); token at position p is *stored* on
rank ``(p // block) % W`` only. Each rank attends the new queries to its own keys under the mechanism's mask
(at global positions, :mod:`attnzoo.distributed.blocks`), one all-gather of the ``(o_p, lse_p)`` pairs, and
:func:`~attnzoo.kernels.merge.merge_attention` gives every rank the exact output. The keys a mechanism's own
decode state would evict (it reads the window and sinks from the mechanism's ``init_state``: a
``SlidingWindowCache`` keeps ``window - 1`` keys, a ``SinkWindowCache`` also the first ``sinks``) are evicted
here too, so each rank keeps about ``1 / W`` of that mechanism's cache. A context-parallel prefill leaves each
rank with its shard's keys: :meth:`SplitKVCache.prefill_shard` adopts them as they are.

:class:`SplitRecurrentState` (``linear``, ``lightning``, ``based``): the fixed-size state ``S = sum_j phi(k_j)
[v_j, 1]^T`` (F x (Dv + 1) per head) is split by feature rows; ``phi(q) S = sum_p phi(q)[F_p] S[F_p]``, so every
rank keeps a :class:`~attnzoo.state.RecurrentState` of ``F / W`` rows, updated by the family's own
:func:`~attnzoo.mechanisms.linear.linear_attention.linear_state_step`, and one all-reduce sums the partial
numerators and denominators before the normalisation.
"""

from __future__ import annotations

import math

import torch

from .. import registry
from ..errors import check_int, check_key_padding_mask, check_qkv, check_scale
from ..kernels.merge import merge_attention
from ..masks import causal as causal_mask
from ..state import DecodeState, RecurrentState
from .blocks import attend_forward, plan_block
from .comm import DEFAULT_TIMEOUT, Comm, preflight
from .lasp2 import LASP2_MECHANISMS, linear_form

__all__ = ["SplitKVCache", "SplitRecurrentState", "SPLIT_KV_MECHANISMS"]

SPLIT_KV_MECHANISMS = ("softmax", "sliding_window", "sink_window", "neighborhood_1d")


def _decode_state_limits(mech, opts, dtype, device) -> tuple[int | None, int]:
    """(window or None, sinks) of the mechanism's own decode state: what it keeps."""
    probe = mech.init_state(batch=1, kv_heads=1, head_dim=1, value_dim=1, dtype=dtype, device=device, **opts)
    return getattr(probe, "window", None), getattr(probe, "sinks", 0)


class SplitKVCache(DecodeState):
    """A KV cache spread over the ranks of ``group`` (see the module docstring).

    Args:
        group: the process group (None = default).
        batch, kv_heads, head_dim, value_dim: the cache's sizes (value_dim defaults to head_dim).
        mechanism: one of :data:`SPLIT_KV_MECHANISMS` (causal decoding); ``**options`` its options.
        block: tokens stored together on one rank before moving to the next (round robin).
        timeout: seconds any wait may take before :class:`~attnzoo.distributed.DistributedError` is raised.
    """

    def __init__(self, group=None, *, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None,
                 mechanism: str = "softmax", dtype: torch.dtype = torch.float32, device=None, block: int = 1,
                 timeout: float = DEFAULT_TIMEOUT, **options) -> None:
        super().__init__()
        self.comm = Comm(group, timeout=timeout)
        self.mech = registry.get(mechanism)
        if self.mech.name not in SPLIT_KV_MECHANISMS:
            raise ValueError(f"mechanism: split-KV decoding covers {list(SPLIT_KV_MECHANISMS)} (softmax attention "
                             f"under a mask predicate), got {mechanism!r}; recurrent mechanisms use "
                             "SplitRecurrentState")
        self.options = self.mech.resolve_options(options)
        self.batch, self.kv_heads = check_int("batch", batch), check_int("kv_heads", kv_heads)
        self.head_dim = check_int("head_dim", head_dim)
        self.value_dim = head_dim if value_dim is None else check_int("value_dim", value_dim)
        self.block = check_int("block", block)
        self.dtype, self.device = dtype, device
        self.window, self.sinks = _decode_state_limits(self.mech, self.options, dtype, device)
        self.keys = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)  # (B, Hk, L_r, D)
        self.values = torch.empty(batch, kv_heads, 0, self.value_dim, dtype=dtype, device=device)
        self.positions = torch.zeros(0, dtype=torch.long)  # (L_r,) global positions of the local keys
        self.mask: torch.Tensor | None = None  # (B, L_r) bool once a padded token arrived

    _tensor_fields = ("keys", "values", "mask")

    # -- storage ---------------------------------------------------------------------------------------
    def owner(self, position: int) -> int:
        return (position // self.block) % self.comm.world

    def _store(self, k, v, pos, mask) -> None:
        if mask is not None and self.mask is None:
            self.mask = torch.ones(self.batch, self.positions.numel(), dtype=torch.bool, device=k.device)
        if self.mask is not None:
            new = mask if mask is not None else torch.ones(self.batch, pos.numel(), dtype=torch.bool, device=k.device)
            self.mask = torch.cat([self.mask, new], dim=1)
        self.keys = torch.cat([self.keys, k], dim=2)
        self.values = torch.cat([self.values, v], dim=2)
        self.positions = torch.cat([self.positions, pos])

    def _keep(self, idx: torch.Tensor) -> None:
        self.keys = self.keys.index_select(2, idx.to(self.keys.device))
        self.values = self.values.index_select(2, idx.to(self.values.device))
        self.positions = self.positions[idx]
        if self.mask is not None:
            self.mask = self.mask.index_select(1, idx.to(self.mask.device))

    def evict(self) -> None:
        """Drop the local keys no later query can see (what the mechanism's own decode state drops)."""
        if self.window is None:
            return
        keep = (self.positions >= self.seq_len - (self.window - 1)) | (self.positions < self.sinks)
        if not bool(keep.all()):
            self._keep(torch.nonzero(keep).flatten())

    def prefill_shard(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, seq_len: int,
                      key_padding_mask: torch.Tensor | None = None) -> None:
        """Adopt this rank's shard of a context-parallel prefill: k (B, Hk, n, D), v (B, Hk, n, Dv) at global
        ``positions`` (n,) (>= seq_len = padding, dropped); ``seq_len`` tokens now precede the next one. An empty
        cache only; every rank calls it. Later tokens go round robin."""
        if self.seq_len or self.positions.numel():
            raise ValueError("prefill_shard: the cache already holds tokens; call it on an empty cache")
        check_int("seq_len", seq_len, low=1)
        real = positions < seq_len
        idx = torch.nonzero(real).flatten()
        mask = None if key_padding_mask is None else key_padding_mask.index_select(1, idx.to(k.device))
        self._store(k.index_select(2, idx.to(k.device)), v.index_select(2, idx.to(v.device)), positions[idx], mask)
        self.seq_len = seq_len
        preflight(self.comm, {"op": "SplitKVCache.prefill_shard", "seq_len": seq_len, "batch": self.batch})
        self.evict()

    # -- decoding --------------------------------------------------------------------------------------
    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
             key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decode T new tokens (identical on every rank): q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, Dv),
        key_padding_mask (B, T). Returns (B, Hq, T, Dv) on every rank, equal to the single-process step."""
        B, Hq, Hk, T, _, D, Dv = check_qkv(q, k, v)
        if (B, Hk, D, Dv) != (self.batch, self.kv_heads, self.head_dim, self.value_dim):
            raise ValueError(f"k, v: expected (B, Hk, T, D), (B, Hk, T, Dv) with B={self.batch}, Hk={self.kv_heads}, "
                             f"D={self.head_dim}, Dv={self.value_dim} for this cache, got {tuple(k.shape)}, "
                             f"{tuple(v.shape)}")
        if q.shape[2] != T:
            raise ValueError(f"q: expected T={T} new queries (as many as new keys), got shape {tuple(q.shape)}")
        check_key_padding_mask(key_padding_mask, B, T, device=q.device)
        check_scale(scale)
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        preflight(self.comm, {"op": "SplitKVCache.step", "mechanism": self.mech.name, "options": self.options,
                              "shape": (B, Hq, Hk, T, D, Dv), "dtype": str(q.dtype), "scale": scale,
                              "seq_len": self.seq_len, "mask": key_padding_mask is not None})
        start = self.seq_len
        pos = torch.arange(start, start + T)
        mine = torch.tensor([self.owner(int(p)) == self.comm.rank for p in pos])
        idx = torch.nonzero(mine).flatten()
        if idx.numel():
            self._store(k.index_select(2, idx.to(k.device)), v.index_select(2, idx.to(v.device)), pos[idx],
                        None if key_padding_mask is None else key_padding_mask.index_select(1, idx.to(q.device)))
        self.seq_len = start + T
        L = self.seq_len
        if self.mech.name == "softmax":
            pred = causal_mask(L - T)
        else:
            pred = self.mech.mask(T, L, causal=True, **self.options)
        # the predicate's query i sits at position i + L - T: evaluate it with local query indices
        plan = plan_block(pred, batch=B, heads=torch.arange(Hq), qpos=torch.arange(T), kpos=self.positions,
                          q_limit=T, k_limit=L)
        out, lse = attend_forward(q, self.keys, self.values, plan, scale, self.mask)
        both = torch.cat([out, lse.unsqueeze(-1)], dim=-1)  # (B, Hq, T, Dv + 1)
        allp = self.comm.all_gather(both, what="split-KV all-gather of (o_p, lse_p)", kind="split-kv partials")
        merged, _ = merge_attention(list(allp[..., :-1].unbind(0)), list(allp[..., -1].unbind(0)))
        self.evict()
        return merged.to(q.dtype)

    # -- editing ---------------------------------------------------------------------------------------
    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        self.keys = self.keys.index_select(0, index.to(self.keys.device))
        self.values = self.values.index_select(0, index.to(self.values.device))
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index.to(self.mask.device))
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        if self.window is not None and length < self.seq_len:
            need_from = max(self.sinks, length - (self.window - 1))  # keys the next query would read
            have_from = max(self.sinks, self.seq_len - (self.window - 1))  # recent keys still stored
            if need_from < length and need_from < have_from:
                raise ValueError(f"length: cannot crop this SplitKVCache to {length} tokens: the next query would "
                                 f"need keys from position {need_from}, but positions below {have_from} (other than "
                                 f"the {self.sinks} sinks) were evicted")
        self._keep(torch.nonzero(self.positions < length).flatten())
        self.seq_len = length

    def local_tokens(self) -> int:
        return self.positions.numel()


class SplitRecurrentState(DecodeState):
    """The recurrent state of ``linear`` / ``lightning`` / ``based`` split by feature rows over ``group``.

    Every rank holds a :class:`~attnzoo.state.RecurrentState` with ``kv`` (B, Hk, F_r, Dv [+ 1]) for its rows
    ``F_r`` of the feature dimension (the normaliser's column included when the mechanism normalises)."""

    def __init__(self, group=None, *, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None,
                 mechanism: str, dtype: torch.dtype = torch.float32, device=None, timeout: float = DEFAULT_TIMEOUT,
                 **options) -> None:
        super().__init__()
        self.comm = Comm(group, timeout=timeout)
        self.mech = registry.get(mechanism)
        if self.mech.name not in LASP2_MECHANISMS:
            raise ValueError(f"mechanism: SplitRecurrentState covers {list(LASP2_MECHANISMS)}, got {mechanism!r}")
        self.options = self.mech.resolve_options(options)
        self.batch, self.kv_heads = check_int("batch", batch), check_int("kv_heads", kv_heads)
        self.head_dim = check_int("head_dim", head_dim)
        self.value_dim = head_dim if value_dim is None else check_int("value_dim", value_dim)
        feats = head_dim
        if self.mech.name == "based":
            from ..mechanisms.linear.based import taylor_feature_dim

            feats = taylor_feature_dim(head_dim)
        W, r = self.comm.world, self.comm.rank
        self.rows = ((r * feats) // W, ((r + 1) * feats) // W)
        self.features = feats
        normalize = self.mech.name != "lightning" and self.options["normalize"]
        acc = torch.promote_types(dtype, torch.float32)
        width = self.value_dim + (1 if normalize else 0)
        self.state = RecurrentState(kv=torch.zeros(batch, kv_heads, self.rows[1] - self.rows[0], width, dtype=acc,
                                                   device=device))

    def tensors(self) -> list[torch.Tensor]:
        return self.state.tensors()

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
             key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decode T new tokens (identical on every rank); returns (B, Hq, T, Dv) on every rank."""
        from ..mechanisms.linear.linear_attention import linear_state_step

        B, Hq, Hk, T, _, D, Dv = check_qkv(q, k, v)
        if (B, Hk, D, Dv) != (self.batch, self.kv_heads, self.head_dim, self.value_dim):
            raise ValueError(f"k, v: expected B={self.batch}, Hk={self.kv_heads}, D={self.head_dim}, "
                             f"Dv={self.value_dim} for this state, got {tuple(k.shape)}, {tuple(v.shape)}")
        check_key_padding_mask(key_padding_mask, B, T, device=q.device)
        check_scale(scale)
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        preflight(self.comm, {"op": "SplitRecurrentState.step", "mechanism": self.mech.name, "options": self.options,
                              "shape": (B, Hq, Hk, T, D, Dv), "dtype": str(q.dtype), "scale": scale,
                              "seq_len": self.seq_len, "mask": key_padding_mask is not None})
        form = linear_form(self.mech.name, q, k, scale=scale, causal=True, options=self.options)
        qf, kf = form.query_features(form.q), form.query_features(form.k)  # (B, H, T, F)
        a, b = self.rows
        acc = qf.dtype
        vv = v.to(acc)
        if form.normalize:
            vv = torch.cat([vv, vv.new_ones(B, Hk, T, 1)], dim=-1)
        part = linear_state_step(qf[..., a:b], kf[..., a:b], vv, self.state, decay=form.decay, normalize=False,
                                 eps=0.0, key_padding_mask=key_padding_mask, chunk=form.chunk)  # (B, Hq, T, Dv')
        total = self.comm.all_reduce(part, what="split recurrent-state all-reduce of the partial outputs",
                                     kind="split-state partials")
        self.seq_len += T
        if form.normalize:
            total = total[..., :-1] / (total[..., -1:] + form.eps)
        return total.to(q.dtype)

    def reorder(self, index: torch.Tensor) -> None:
        self.state.reorder(index)
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        self.state.crop(length)
        self.seq_len = length
