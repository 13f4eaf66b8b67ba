"""Per-head bounded KV cache for mechanisms whose heads have different causal windows (MoA).

MoA (arXiv 2406.14909) gives every attention head its own sliding window ``w_h`` next to ``S`` shared
attention sinks, so a head needs only ``S + w_h - 1`` past keys. With grouped-query attention several query
heads read one key/value head, which must then keep what the widest of them needs:
``W_k = max(w_h for the query heads h of key/value head k)``.

:class:`PerHeadWindowCache` stores the key/value heads in groups of equal ``W_k``; each group is one
:class:`~attnzoo.state.SinkWindowCache` of ``S + W_k - 1 + extra`` tokens, so memory is bounded per head:
``nbytes = sum_k (S + W_k - 1 + extra) * (D + Dv) * itemsize * batch`` once the sequence is longer than the
window (MoA's official runtime stores all heads in one flat buffer with per-head offsets and lengths; the
groups here hold the same entries without padding any head to the longest one).

Editing follows the group caches: ``reorder(index)`` reorders every group (beam search); ``crop(length)``
rolls every group back to ``length`` tokens and raises if a group already evicted keys the next query would
need -- build the cache with ``extra = r`` to allow rolling back ``r`` tokens (speculative decoding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import DecodeState
from .kv import SinkWindowCache


class PerHeadWindowCache(DecodeState):
    """Sinks + a per-key/value-head window: key/value head ``k`` keeps ``sinks + windows[k] - 1 + extra`` tokens.

    Args:
        windows: one causal window (keys including the query's own) per key/value head.
        sinks: leading tokens every head keeps.
        extra: additional recent tokens kept so that ``crop`` can roll back that many.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 windows: Sequence[int], sinks: int, extra: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        windows = list(windows)
        if len(windows) != kv_heads:
            raise ValueError(f"windows: expected one window per key/value head ({kv_heads}), got {len(windows)}")
        for w in windows:
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ValueError(f"windows: expected ints >= 1, got {windows!r}")
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.windows, self.sinks, self.extra = windows, sinks, extra
        self.groups: list[tuple[list[int], SinkWindowCache]] = []
        for w in sorted(set(windows)):
            heads = [h for h in range(kv_heads) if windows[h] == w]
            cache = SinkWindowCache(batch, len(heads), head_dim, self.value_dim, window=w, sinks=sinks, extra=extra,
                                    dtype=dtype, device=device)
            self.groups.append((heads, cache))

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, cache in self.groups for t in cache.tensors()]

    def append(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        """Append T tokens, k (B, Hk, T, D), v (B, Hk, T, Dv); return per group (heads, keys, values, mask)
        with keys (B, |heads|, L_g, D) laid out [sinks | recent] as in SinkWindowCache."""
        if k.dim() != 4 or k.shape[1] != self.kv_heads:
            raise ValueError(f"k: expected (B, Hk, T, D) with Hk = {self.kv_heads}, got {tuple(k.shape)}")
        out = []
        for heads, cache in self.groups:
            idx = torch.tensor(heads, device=k.device)
            keys, values, mask = cache.append(k.index_select(1, idx), v.index_select(1, idx), key_padding_mask)
            out.append((heads, keys, values, mask))
        self.seq_len += k.shape[2]
        return out

    def evict(self) -> None:
        for _, cache in self.groups:
            cache.evict()

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        for _, cache in self.groups:
            cache.reorder(index)
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        for _, cache in self.groups:  # check every group first, so that a crop that fails changes nothing
            recent = cache.length - min(cache.sinks, cache.seq_len)  # SinkWindowCache.crop's condition
            if recent - (cache.seq_len - length) < min(cache.window - 1, max(0, length - cache.sinks)):
                cache.crop(length)  # raises, naming the tokens that are gone and the `extra` needed
        for _, cache in self.groups:
            cache.crop(length)
        self.seq_len = length

    def stored_tokens(self) -> list[int]:
        """Tokens currently stored for each key/value head."""
        out = [0] * self.kv_heads
        for heads, cache in self.groups:
            for h in heads:
                out[h] = cache.length
        return out
