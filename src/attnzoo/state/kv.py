"""Key/value caches: the full :class:`KVCache` and the bounded :class:`SlidingWindowCache`."""

from __future__ import annotations

import torch

from ..errors import check_append, check_int
from .base import DecodeState


class KVCache(DecodeState):
    """Every key and value seen so far, k (B, Hk, L, D) and v (B, Hk, L, Dv), plus an optional
    key-padding mask (B, L).

    Storage grows geometrically (by 25%), so appending one token at a time costs amortised O(1) copies per
    token while the allocation stays within 1.25x of what is filled (``nbytes`` reports the allocation).
    When autograd is recording through the new keys, appends concatenate instead of writing in place.
    ``keys_only=True`` keeps keys alone (``value_dim`` 0; append values of shape (B, Hk, T, 0)).
    """

    _tensor_fields = ("_k", "_v", "_mask")

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 keys_only: bool = False) -> None:
        super().__init__()
        if keys_only and value_dim not in (None, 0):
            raise ValueError(f"value_dim: a keys_only cache stores no values, expected None or 0, got {value_dim!r}")
        self.built_for(batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                       value_dim=None if keys_only else head_dim if value_dim is None else value_dim,
                       dtype=dtype, device=device)
        if keys_only:
            self.value_dim = 0  # values of width 0: a cache of keys alone
        device = self.device
        self._k = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)  # (B, Hk, cap, D)
        self._v = torch.empty(batch, kv_heads, 0, self.value_dim, dtype=dtype, device=device)  # (B, Hk, cap, Dv)
        self._mask: torch.Tensor | None = None  # (B, cap) bool, only once a padded token arrived
        self.length = 0  # tokens stored (== seq_len for a full cache)

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, : self.length]  # (B, Hk, L, D)

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, : self.length]  # (B, Hk, L, Dv)

    @property
    def mask(self) -> torch.Tensor | None:
        return None if self._mask is None else self._mask[:, : self.length]  # (B, L)

    # -- writing ---------------------------------------------------------------------------------------
    def _check_new(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> int:
        return check_append(self, k, v, key_padding_mask)

    def append(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append T new tokens, k (B, Hk, T, D), v (B, Hk, T, Dv), mask (B, T); return the whole cache
        (keys, values, mask)."""
        T = self._check_new(k, v, key_padding_mask)
        L = self.length
        if key_padding_mask is not None and self._mask is None:
            self._mask = torch.ones(self.batch, self._k.shape[2], dtype=torch.bool, device=k.device)
        grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or self._k.requires_grad)
        if grad:
            self._k = torch.cat([self.keys, k], dim=2)
            self._v = torch.cat([self.values, v], dim=2)
            if self._mask is not None:
                new = key_padding_mask if key_padding_mask is not None else k.new_ones(self.batch, T, dtype=torch.bool)
                self._mask = torch.cat([self.mask, new], dim=1)
        else:
            if L + T > self._k.shape[2]:  # grow by 25%: amortised O(1) copies per token, at most 1.25x slack
                self._grow(max(L + T, self._k.shape[2] + self._k.shape[2] // 4, 16))
            self._k[:, :, L : L + T] = k
            self._v[:, :, L : L + T] = v
            if self._mask is not None:
                self._mask[:, L : L + T] = True if key_padding_mask is None else key_padding_mask
        self.length = L + T
        self.seq_len += T
        return self.keys, self.values, self.mask

    def _grow(self, capacity: int) -> None:
        L = self.length
        k = self._k.new_empty(self.batch, self.kv_heads, capacity, self.head_dim)  # (B, Hk, cap, D)
        v = self._v.new_empty(self.batch, self.kv_heads, capacity, self.value_dim)  # (B, Hk, cap, Dv)
        k[:, :, :L] = self._k[:, :, :L]
        v[:, :, :L] = self._v[:, :, :L]
        self._k, self._v = k, v
        if self._mask is not None:
            m = torch.ones(self.batch, capacity, dtype=torch.bool, device=self._mask.device)
            m[:, :L] = self._mask[:, :L]
            self._mask = m

    # -- editing ---------------------------------------------------------------------------------------
    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        self._k = self._k.index_select(0, index.to(self._k.device))
        self._v = self._v.index_select(0, index.to(self._v.device))
        if self._mask is not None:
            self._mask = self._mask.index_select(0, index.to(self._mask.device))
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        drop = self.seq_len - length
        self.length -= drop
        self.seq_len = length


class SlidingWindowCache(KVCache):
    """The last ``window - 1 + extra`` keys/values: what a causal window of ``window`` keys needs.

    Memory is bounded by the window, not the sequence. ``crop(length)`` can roll back at most ``extra``
    tokens (keys older than that are gone): ask for ``extra`` when decoding speculatively.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 window: int, extra: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        check_int("window", window)
        check_int("extra", extra, low=0)
        super().__init__(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)
        self.window, self.extra = window, extra

    @property
    def start(self) -> int:
        """Absolute position of the oldest stored token."""
        return self.seq_len - self.length

    def evict(self) -> None:
        """Drop keys no future query can see (called by ``step`` after attending)."""
        keep = self.window - 1 + self.extra
        if self.length <= keep:
            return
        drop = self.length - keep
        self._k = self._k[:, :, drop : self.length].clone() if keep else self._k[:, :, :0].clone()
        self._v = self._v[:, :, drop : self.length].clone() if keep else self._v[:, :, :0].clone()
        if self._mask is not None:
            self._mask = self._mask[:, drop : self.length].clone()
        self.length = keep

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        drop = self.seq_len - length
        if self.length - drop < min(self.window - 1, length):
            raise ValueError(
                f"length: cannot crop this SlidingWindowCache to {length} tokens: it holds positions "
                f"{self.start}..{self.seq_len - 1} and the next query would need {self.window - 1} earlier keys; "
                f"build it with extra >= {drop} to allow rolling back {drop} tokens"
            )
        self.length -= drop
        self.seq_len = length


class SinkWindowCache(SlidingWindowCache):
    """The first ``sinks`` keys/values (attention sinks) plus the last ``window - 1 + extra``.

    StreamingLLM's cache (arXiv 2309.17453): memory bounded by ``sinks + window``. The stored keys are
    [sinks | recent]; the recent part is contiguous in position, so a query's window in cache order is
    its window in sequence order, and the sinks are scored separately.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 window: int, sinks: int, extra: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        check_int("sinks", sinks, low=0)
        super().__init__(batch, kv_heads, head_dim, value_dim, window=window, extra=extra, dtype=dtype,
                         device=device)
        self.sinks = sinks

    @property
    def start(self) -> int:
        """Absolute position of the oldest stored non-sink token."""
        return self.seq_len - (self.length - min(self.sinks, self.seq_len))

    def evict(self) -> None:
        keep = self.window - 1 + self.extra
        S = min(self.sinks, self.length)
        if self.length <= S + keep:
            return
        idx = torch.cat([torch.arange(S), torch.arange(self.length - keep, self.length)]).to(self._k.device)
        self._k = self._k.index_select(2, idx)
        self._v = self._v.index_select(2, idx)
        if self._mask is not None:
            self._mask = self._mask.index_select(1, idx)
        self.length = S + keep

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        drop = self.seq_len - length
        recent = self.length - min(self.sinks, self.seq_len)
        needed = min(self.window - 1, max(0, length - self.sinks))
        if recent - drop < needed:
            raise ValueError(
                f"length: cannot crop this SinkWindowCache to {length} tokens: its recent part holds positions "
                f"{self.start}..{self.seq_len - 1} and the next query would need {needed} of them; "
                f"build it with extra >= {drop} to allow rolling back {drop} tokens"
            )
        self.length -= drop
        self.seq_len = length
