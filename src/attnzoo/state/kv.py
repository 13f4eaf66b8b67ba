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
        self._off = 0  # storage slot of the first stored token (bounded caches slide it instead of copying)

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, self._off: self._off + self.length]  # (B, Hk, L, D)

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, self._off: self._off + self.length]  # (B, Hk, L, Dv)

    @property
    def mask(self) -> torch.Tensor | None:
        return None if self._mask is None else self._mask[:, self._off: self._off + self.length]  # (B, L)

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
            self._off = 0
        else:
            if self._off + L + T > self._k.shape[2]:  # amortised O(1) copies per token
                self._grow(self._capacity(L + T))
            e = self._off + L
            # index_copy_ rather than a slice assignment: torch.compile (compile_decode) keeps it an in-place
            # write of T slots, where slice assignments here and in the sink move became a whole-buffer rewrite
            idx = torch.arange(e, e + T, device=self._k.device)
            self._k.index_copy_(2, idx, k)
            self._v.index_copy_(2, idx, v)
            if self._mask is not None:
                self._mask[:, e: e + T] = True if key_padding_mask is None else key_padding_mask
        self.length = L + T
        self.seq_len += T
        return self.keys, self.values, self.mask

    def _capacity(self, need: int) -> int:
        """Slots to allocate when ``need`` tokens do not fit: grow by 25% (at most 1.25x slack)."""
        return max(need, self._k.shape[2] + self._k.shape[2] // 4, 16)

    def _grow(self, capacity: int) -> None:
        """Move the stored tokens to the front of a new buffer of ``capacity`` slots."""
        L, o = self.length, self._off
        k = self._k.new_empty(self.batch, self.kv_heads, capacity, self.head_dim)  # (B, Hk, cap, D)
        v = self._v.new_empty(self.batch, self.kv_heads, capacity, self.value_dim)  # (B, Hk, cap, Dv)
        k[:, :, :L] = self._k[:, :, o: o + L]
        v[:, :, :L] = self._v[:, :, o: o + L]
        self._k, self._v = k, v
        if self._mask is not None:
            m = torch.ones(self.batch, capacity, dtype=torch.bool, device=self._mask.device)
            m[:, :L] = self._mask[:, o: o + L]
            self._mask = m
        self._off = 0

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

    Decoding costs no copy of the window per token: the buffer holds the window plus a slack of a quarter
    of it, eviction slides the start of the stored run forward (copying only the sinks of a
    :class:`SinkWindowCache`), and the run moves back to the front of the buffer once per slack of tokens.
    ``keys``/``values`` stay contiguous views in position order.
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

    def _bound(self) -> int:
        """Most tokens stored after an eviction."""
        return self.window - 1 + self.extra

    def _capacity(self, need: int) -> int:
        """The bound plus a slack of a quarter of it (at least 4 slots): a move to the front every slack."""
        bound = self._bound()
        return max(need, bound + max(4, bound // 4))

    def _drop_oldest(self, drop: int, sinks: int) -> None:
        """Forget the ``drop`` oldest tokens after the first ``sinks`` stored ones: the run's start slides
        forward and the sinks (a few tokens) move with it; the window itself is not copied."""
        o = self._off
        if sinks:
            for name in ("_k", "_v", "_mask"):
                t = getattr(self, name)
                if t is None:
                    continue
                lead = (slice(None), slice(None)) if t.dim() == 4 else (slice(None),)
                idx = torch.arange(o + drop, o + drop + sinks, device=t.device)  # index_copy_: see append
                t.index_copy_(len(lead), idx, t[(*lead, slice(o, o + sinks))].clone())
        self._off = o + drop
        self.length -= drop
        if self._k.shape[2] > 2 * self._capacity(self.length) and not self._k.requires_grad:
            self._grow(self._capacity(self.length))  # a long prefill's buffer shrinks back to the bound

    def evict(self) -> None:
        """Drop keys no future query can see (called by ``step`` after attending)."""
        keep = self._bound()
        if self.length <= keep:
            return
        if self._k.requires_grad or self._v.requires_grad:  # autograd: new tensors, no in-place writes
            drop = self.length - keep
            ks, vs = self.keys, self.values
            self._k, self._v = ks[:, :, drop:].clone(), vs[:, :, drop:].clone()
            if self._mask is not None:
                self._mask = self.mask[:, drop:].clone()
            self._off, self.length = 0, keep
            return
        self._drop_oldest(self.length - keep, 0)

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

    def _bound(self) -> int:
        return self.sinks + self.window - 1 + self.extra

    def evict(self) -> None:
        keep = self.window - 1 + self.extra
        S = min(self.sinks, self.length)
        if self.length <= S + keep:
            return
        if self._k.requires_grad or self._v.requires_grad:  # autograd: new tensors, no in-place writes
            idx = torch.cat([torch.arange(S), torch.arange(self.length - keep, self.length)]).to(self._k.device)
            self._k, self._v = self.keys.index_select(2, idx), self.values.index_select(2, idx)
            if self._mask is not None:
                self._mask = self.mask.index_select(1, idx)
            self._off, self.length = 0, S + keep
            return
        self._drop_oldest(self.length - S - keep, S)

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
