"""Decode states of the long-context / memory mechanisms (``attnzoo.mechanisms.memory``).

Each follows the :class:`~attnzoo.state.base.DecodeState` protocol: ``seq_len``, ``reorder(index)`` (beam
search), ``crop(length)`` (roll back) and ``nbytes()``. What each keeps is what its paper's decoding
needs, and nothing silently dropped: a state that cannot roll back as far as asked raises.
"""

from __future__ import annotations

import torch

from ..errors import check_tensor
from .base import DecodeState
from .kv import KVCache, SlidingWindowCache


def _check_pos_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


class NeuralMemoryState(DecodeState):
    """Titans' neural memory: MLP weights M_t, momentum S_t and the chunk-start weights M_{t'}.

    ``weights``, ``momentum``, ``anchor``: lists over the MLP's layers of (B, H, out, in). ``pos`` counts
    the tokens the memory has consumed (its stream position; chunk boundaries are multiples of
    ``chunk_size``). Inside a chunk the gradients are taken at ``anchor`` (mini-batch gradient descent,
    arXiv 2501.00663 eq. 16), so decoding keeps it next to the running weights. Memory O(1) in the
    sequence length: 3 x the memory's parameters per sequence.
    """

    _tensor_fields = ("weights", "momentum", "anchor")

    def __init__(self, weights: list[torch.Tensor], *, chunk_size: int) -> None:
        super().__init__()
        self.chunk_size = _check_pos_int("chunk_size", chunk_size)
        if not weights or any(not isinstance(w, torch.Tensor) or w.dim() != 4 for w in weights):
            raise ValueError("weights: expected a non-empty list of (B, H, out, in) tensors")
        self.batch = weights[0].shape[0]
        self.weights = list(weights)
        self.momentum = [torch.zeros_like(w) for w in weights]
        self.anchor = list(weights)

    @property
    def pos(self) -> int:
        """Tokens consumed (the memory's stream position); the same as ``seq_len``."""
        return self.seq_len

    @pos.setter
    def pos(self, value: int) -> None:
        self.seq_len = value

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        for name in self._tensor_fields:
            setattr(self, name, [t.index_select(0, index.to(t.device)) for t in getattr(self, name)])
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        if length != self.seq_len:
            raise ValueError(f"length: a neural memory cannot forget tokens it has learned from (holds {self.seq_len}, "
                             f"asked {length}); build the TitansState with history >= {self.seq_len - length}")


class TitansState(DecodeState):
    """Decode state of a Titans layer: its :class:`NeuralMemoryState` plus what its attention needs.

    ``attn``: MAG a :class:`SinkWindowCache` (persistent tokens as sinks), MAL a :class:`SlidingWindowCache`
    over the memory's outputs, LMM/MAC None; it holds ``prefix`` persistent tokens before the inputs. MAC
    keeps the current segment: the memory weights at the segment start (``seg_weights``) and the keys and
    values of the segment's retrieved tokens h and of its tokens (``seg_k``, ``seg_v``: (B, Hk, 2 T, D),
    ``seg_mask`` (B, 2 T)). ``seq_len`` counts input tokens (not the persistent prefix).

    ``history = r`` keeps the memory as it was before each of the last r tokens (and the attention cache
    is built with ``extra = r``), so ``crop`` can roll back up to r tokens (speculative decoding); the layer
    then feeds a multi-token chunk one token at a time. Memory O(1) in the sequence length
    (window/segment sized), plus r copies of the memory.
    """

    _tensor_fields = ("_mem_tensors", "_attn_tensors", "seg_weights", "seg_k", "seg_v", "seg_mask")

    def __init__(self, memory: NeuralMemoryState, attn: DecodeState | None = None, *, prefix: int = 0,
                 history: int = 0) -> None:
        super().__init__()
        self.memory, self.attn = memory, attn
        self.prefix = _check_pos_int("prefix", prefix, low=0)
        self.history = _check_pos_int("history", history, low=0)
        self.seg_weights: list[torch.Tensor] | None = None
        self.seg_k = self.seg_v = self.seg_mask = None
        self._snapshots: list[tuple[int, dict]] = []

    @property
    def batch(self) -> int:
        return self.memory.batch

    @property
    def _mem_tensors(self):
        return self.memory.tensors()

    @property
    def _attn_tensors(self):
        return [] if self.attn is None else self.attn.tensors()

    def nbytes(self) -> int:
        total = super().nbytes()
        seen = {t.untyped_storage().data_ptr() for t in self.tensors()}
        for _, snap in self._snapshots:
            for t in _flatten(snap):
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total

    # -- snapshots for crop (the layer replaces tensors, never writes them in place) ------------------
    def snapshot(self) -> None:
        """Remember the memory and segment before the next token (called by the layer when history > 0)."""
        if self.history == 0:
            return
        mem = self.memory
        snap = {"weights": list(mem.weights), "momentum": list(mem.momentum), "anchor": list(mem.anchor),
                "pos": mem.pos, "seg_weights": self.seg_weights, "seg_k": self.seg_k,
                "seg_v": self.seg_v, "seg_mask": self.seg_mask}
        self._snapshots.append((self.seq_len, snap))
        del self._snapshots[: -self.history]

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        self.memory.reorder(index)
        if self.attn is not None:
            self.attn.reorder(index)
        sel = lambda t: None if t is None else t.index_select(0, index.to(t.device))
        sel_list = lambda ts: None if ts is None else [sel(t) for t in ts]
        self.seg_weights = sel_list(self.seg_weights)
        self.seg_k, self.seg_v, self.seg_mask = sel(self.seg_k), sel(self.seg_v), sel(self.seg_mask)
        for _, snap in self._snapshots:
            for key in ("weights", "momentum", "anchor", "seg_weights"):
                snap[key] = sel_list(snap[key])
            for key in ("seg_k", "seg_v", "seg_mask"):
                snap[key] = sel(snap[key])

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        if length == self.seq_len:
            return
        for i, (n, snap) in enumerate(self._snapshots):
            if n == length:
                if self.attn is not None:
                    self.attn.crop(self.prefix + length)
                mem = self.memory
                mem.weights, mem.momentum, mem.anchor = snap["weights"], snap["momentum"], snap["anchor"]
                mem.pos = snap["pos"]
                self.seg_weights, self.seg_k, self.seg_v, self.seg_mask = (
                    snap["seg_weights"], snap["seg_k"], snap["seg_v"], snap["seg_mask"])
                self.seq_len = length
                del self._snapshots[i:]
                return
        held = [n for n, _ in self._snapshots]
        raise ValueError(f"length: cannot crop this TitansState to {length} tokens: it holds {self.seq_len} and "
                         f"snapshots at {held}; build it with history >= {self.seq_len - length}")


def _flatten(snap: dict) -> list[torch.Tensor]:
    out = []
    for val in snap.values():
        if isinstance(val, torch.Tensor):
            out.append(val)
        elif isinstance(val, list):
            out += [t for t in val if isinstance(t, torch.Tensor)]
    return out


class CCAState(DecodeState):
    """CCA-Attention's decode state: core tokens and a raw window.

    ``cores``: a :class:`KVCache` over query heads holding one pooled key/value per completed group of
    ``group_size`` tokens (its mask marks groups whose keys were all padded); ``raw``: a
    :class:`SlidingWindowCache` keeping the last ``window + group_size - 2 (+ extra)`` raw tokens, enough for
    every future query's local window. Memory O(N / group_size + window).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 group_size: int, window: int, query_heads: int | None = None, extra: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.group_size = _check_pos_int("group_size", group_size)
        self.window = _check_pos_int("window", window)
        self.raw = SlidingWindowCache(batch, kv_heads, head_dim, value_dim, window=window + group_size - 1,
                                      extra=extra, dtype=dtype, device=device)
        self.cores: KVCache | None = None
        self._geometry = (batch, head_dim, self.raw.value_dim, dtype, device)
        if query_heads is not None:
            self.bind_query_heads(query_heads)

    def bind_query_heads(self, heads: int) -> None:
        """Core tokens are per query head; the first step tells how many there are."""
        if self.cores is None:
            if heads % self.raw.kv_heads:
                raise ValueError(f"q: query heads must be a multiple of the state's {self.raw.kv_heads} key/value "
                                 f"heads, got {heads}")
            batch, hd, vd, dtype, device = self._geometry
            self.cores = KVCache(self.raw.batch, heads, hd, vd, dtype=dtype, device=device)
        elif self.cores.kv_heads != heads:
            raise ValueError(f"q: this CCAState holds core tokens for {self.cores.kv_heads} query heads, got {heads}")

    @property
    def seq_len(self) -> int:
        return self.raw.seq_len

    @seq_len.setter
    def seq_len(self, value: int) -> None:  # DecodeState.__init__ compatibility; the raw cache counts
        if value != 0:
            raise AttributeError("seq_len of a CCAState follows its raw cache")

    def tensors(self) -> list[torch.Tensor]:
        return self.raw.tensors() + ([] if self.cores is None else self.cores.tensors())

    def reorder(self, index: torch.Tensor) -> None:
        self.raw.reorder(index)
        if self.cores is not None:
            self.cores.reorder(index)

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        self.raw.crop(length)
        if self.cores is not None:
            self.cores.crop(length // self.group_size)


class LongHeadsState(DecodeState):
    """LongHeads' decode state: every key/value (``kv``, O(N), offloadable in the paper), one summary key
    per completed chunk and query head (``summaries``; its mask marks chunks whose keys were all padded),
    and the queries of the current incomplete chunk (a chunk's summary needs all of its queries).

    ``extra = r`` keeps the queries of the last r tokens as well, so that ``crop`` can roll back into a
    chunk that was already summarised (its summary is recomputed when it completes again).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 chunk_size: int, extra: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.chunk_size = _check_pos_int("chunk_size", chunk_size)
        self.extra = _check_pos_int("extra", extra, low=0)
        self.kv = KVCache(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)
        self.summaries: KVCache | None = None
        self._q: torch.Tensor | None = None  # (B, Hq, L_q, D): queries of positions q_start ..
        self.q_start = 0

    @property
    def seq_len(self) -> int:
        return self.kv.seq_len

    @seq_len.setter
    def seq_len(self, value: int) -> None:
        if value != 0:
            raise AttributeError("seq_len of a LongHeadsState follows its key/value cache")

    def tensors(self) -> list[torch.Tensor]:
        out = self.kv.tensors() + ([] if self.summaries is None else self.summaries.tensors())
        return out + ([] if self._q is None else [self._q])

    def summaries_count(self, heads: int) -> int:
        if self.summaries is not None and self.summaries.kv_heads != heads:
            raise ValueError(f"q: this LongHeadsState holds summaries for {self.summaries.kv_heads} query heads, "
                             f"got {heads}")
        return 0 if self.summaries is None else self.summaries.length

    def push_queries(self, q: torch.Tensor) -> None:
        check_tensor("q", q, ndim=4)
        self._q = q.detach() if self._q is None else torch.cat([self._q, q.detach()], 2)

    def chunk_queries(self, c: int) -> torch.Tensor:
        w = self.chunk_size
        lo = c * w - self.q_start
        if lo < 0:
            raise ValueError(f"the queries of chunk {c} are no longer held (kept from position {self.q_start})")
        return self._q[:, :, lo : lo + w]

    def add_summary(self, c_k: torch.Tensor, valid: torch.Tensor) -> None:
        B, H, _, D = c_k.shape
        if self.summaries is None:
            self.summaries = KVCache(B, H, D, 0, dtype=self.kv.dtype, device=self.kv.device)
        self.summaries.append(c_k.detach().to(self.kv.dtype), c_k.new_empty(B, H, c_k.shape[2], 0).to(self.kv.dtype),
                              None if bool(valid.all()) and self.summaries.mask is None else valid)

    def trim_queries(self) -> None:
        """Drop the queries of completed, summarised chunks (keeping the last ``extra`` tokens' queries)."""
        keep_from = min((self.seq_len // self.chunk_size) * self.chunk_size, max(0, self.seq_len - self.extra))
        if self._q is not None and keep_from > self.q_start:
            self._q = self._q[:, :, keep_from - self.q_start :].clone()
            self.q_start = keep_from

    def reorder(self, index: torch.Tensor) -> None:
        self.kv.reorder(index)
        if self.summaries is not None:
            self.summaries.reorder(index)
        if self._q is not None:
            self._q = self._q.index_select(0, index.to(self._q.device))

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        chunk_start = (length // self.chunk_size) * self.chunk_size
        if chunk_start < self.q_start:
            raise ValueError(f"length: cannot crop this LongHeadsState to {length} tokens: the queries of its chunk "
                             f"(from position {chunk_start}) are gone (kept from {self.q_start}); build it with "
                             f"extra >= {self.seq_len - chunk_start}")
        self.kv.crop(length)
        if self.summaries is not None:
            self.summaries.crop(min(self.summaries.length, length // self.chunk_size))
        if self._q is not None:
            self._q = self._q[:, :, : length - self.q_start]


class RecycledState(DecodeState):
    """Recycled Attention's decode state: the full key/value cache (the paper does not reduce memory) and
    the recycled top-K sets recorded at the last ``keep`` full steps (indices (B, Hk, K) into the cache,
    and whether each index is a real key). ``crop`` can roll back to any length whose anchor (the last
    full step before it) is still held.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 stride: int, start: int = 0, keep: int = 2, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.stride = _check_pos_int("stride", stride)
        self.start = _check_pos_int("start", start, low=0)
        self.keep = _check_pos_int("keep", keep)
        self.kv = KVCache(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)
        self._sets: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._cr: KVCache | None = None  # the paper's recycled cache C_r: the set, then the tokens since
        self._cr_anchor = self._cr_upto = -1

    @property
    def seq_len(self) -> int:
        return self.kv.seq_len

    @seq_len.setter
    def seq_len(self, value: int) -> None:
        if value != 0:
            raise AttributeError("seq_len of a RecycledState follows its key/value cache")

    def tensors(self) -> list[torch.Tensor]:
        out = self.kv.tensors() + [t for _, i, o in self._sets for t in (i, o)]
        return out + ([] if self._cr is None else self._cr.tensors())

    def recycled_kv(self, anchor: int, idx: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The recycled cache C_r: keys/values (B, Hk, K' + upto - anchor - 1, D) of the set recorded at
        ``anchor`` (gathered once) followed by the tokens ``anchor + 1 .. upto - 1`` (appended as they come)."""
        kv = self.kv
        if self._cr is None or self._cr_anchor != anchor or self._cr_upto > upto:
            B, Hk, cap, D = kv._k.shape
            flat = (torch.arange(B * Hk, device=idx.device).view(B, Hk, 1) * cap + idx).flatten()
            gk = kv._k.reshape(B * Hk * cap, D).index_select(0, flat).view(B, Hk, -1, D)
            gv = kv._v.reshape(B * Hk * cap, kv.value_dim).index_select(0, flat).view(B, Hk, -1, kv.value_dim)
            self._cr = KVCache(B, Hk, D, kv.value_dim, dtype=kv.dtype, device=kv.device)
            self._cr.append(gk, gv)
            self._cr_anchor, self._cr_upto = anchor, anchor + 1
        if upto > self._cr_upto:
            self._cr.append(kv.keys[:, :, self._cr_upto : upto], kv.values[:, :, self._cr_upto : upto])
            self._cr_upto = upto
        return self._cr.keys, self._cr.values

    def record(self, anchor: int, idx: torch.Tensor, ok: torch.Tensor) -> None:
        """Keep the recycled set of the full step at position ``anchor``: idx, ok (B, Hk, K')."""
        self._sets = [s for s in self._sets if s[0] < anchor] + [(anchor, idx, ok)]
        del self._sets[: -self.keep]

    def current(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        if not self._sets:
            raise RuntimeError("no full attention step has been recorded yet")
        return self._sets[-1]

    def _anchor(self, p: int) -> int | None:
        a = max(self.start - 1, 0)
        if p <= a or (p - a) % self.stride == 0:
            return None  # a full step: needs no recycled set
        return a + ((p - a) // self.stride) * self.stride

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.kv.batch)
        self.kv.reorder(index)
        self._sets = [(a, i.index_select(0, index.to(i.device)), o.index_select(0, index.to(o.device)))
                      for a, i, o in self._sets]
        self._cr = None

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        need = self._anchor(length)
        held = [a for a, _, _ in self._sets if a < length]
        if need is not None and need not in held:
            raise ValueError(f"length: cannot crop this RecycledState to {length} tokens: position {length} "
                             f"recycles the set of step {need}, which is not held (held: {held}); build it with a "
                             f"larger keep")
        self._sets = [s for s in self._sets if s[0] < length]
        self.kv.crop(length)
        self._cr = None


class FITState(DecodeState):
    """Causal FIT's decode state: the current group's local keys/values, its tokens after local attention
    (``g_h``, read by the group's latents once it completes), the latents' keys/values of the completed
    groups (``latent_kv``) and the latents of the last completed group (``prev_latents``, the write context
    of the current group). Memory O(group_size + N * latents / group_size).
    """

    def __init__(self, batch: int, dim: int, heads: int, kv_heads: int, group_size: int, latents: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.batch, self.dim, self.group_size = batch, dim, _check_pos_int("group_size", group_size)
        hd = dim // heads
        self._empty = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)
        self.g_k, self.g_v = self._empty(batch, kv_heads, 0, hd), self._empty(batch, kv_heads, 0, hd)
        self.g_mask = self._empty(batch, 0, dt=torch.bool)
        self.g_h = self._empty(batch, 0, dim)
        self.latent_kv = KVCache(batch, heads, hd, hd, dtype=dtype, device=device)
        self.prev_latents: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        out = [self.g_k, self.g_v, self.g_mask, self.g_h] + self.latent_kv.tensors()
        return out + ([] if self.prev_latents is None else [self.prev_latents])

    def push_group(self, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor) -> None:
        self.g_k, self.g_v = torch.cat([self.g_k, k], 2), torch.cat([self.g_v, v], 2)
        self.g_mask = torch.cat([self.g_mask, ok], 1)

    def push_h(self, h: torch.Tensor) -> None:
        self.g_h = torch.cat([self.g_h, h], 1)

    def clear_group(self) -> None:
        self.g_k, self.g_v = self.g_k[:, :, :0], self.g_v[:, :, :0]
        self.g_mask, self.g_h = self.g_mask[:, :0], self.g_h[:, :0]

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        sel = lambda t: t.index_select(0, index.to(t.device))
        self.g_k, self.g_v, self.g_mask, self.g_h = map(sel, (self.g_k, self.g_v, self.g_mask, self.g_h))
        self.latent_kv.reorder(index)
        if self.prev_latents is not None:
            self.prev_latents = sel(self.prev_latents)
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        start = (self.seq_len // self.group_size) * self.group_size
        if length < start:
            raise ValueError(f"length: cannot crop this FITState to {length} tokens: the latents of the completed "
                             f"group ending at {start} already include later tokens (crop within the current group, "
                             f"positions >= {start})")
        keep = length - start
        self.g_k, self.g_v = self.g_k[:, :, :keep], self.g_v[:, :, :keep]
        self.g_mask, self.g_h = self.g_mask[:, :keep], self.g_h[:, :keep]
        self.seq_len = length
