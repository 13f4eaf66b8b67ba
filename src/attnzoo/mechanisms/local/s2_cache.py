"""The decode state of S2-Attention (:mod:`attnzoo.mechanisms.local.s2_attention`, CATALOG P075): :class:`S2Cache`
keeps per key/value head only the blocks a later query can see -- its strided blocks and the last ``local_blocks``
blocks -- about ``N / vert_stride + local_blocks * b`` tokens per sparse head (the paper's KV-cache saving); dense
heads keep everything. Its own file because the mechanism's file would pass 600 lines with it; nothing else uses it.
"""

from __future__ import annotations

import torch

from ...errors import check_append, check_int
from ...state.base import DecodeState

_FAR = 1 << 62  # the position of an empty slot: after every query, so never attended


class _HeadStore:
    """The stored tokens of a group of key/value heads, each head its own run in position order: buffers
    k (B, h, cap, D), v (B, h, cap, Dv), positions (h, cap) (``_FAR`` in empty slots), an optional padding
    mask (B, h, cap); head x fills slots [0, n[x]). Appends write in place (capacity grows by 25%), so a
    decode step copies O(1) tokens, not the store."""

    def __init__(self, batch, heads, head_dim, value_dim, dtype, device):
        self.k = torch.zeros(batch, heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, heads, 0, value_dim, dtype=dtype, device=device)
        self.pos = torch.full((heads, 0), _FAR, dtype=torch.long, device=device)
        self.mask: torch.Tensor | None = None
        self.n = [0] * heads

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.pos] + ([] if self.mask is None else [self.mask])

    def _reserve(self, need: int) -> None:
        cap = self.k.shape[2]
        if need <= cap:
            return
        new = max(need, cap + cap // 4, 16)
        B, h = self.k.shape[:2]
        k = self.k.new_zeros(B, h, new, self.k.shape[3])
        v = self.v.new_zeros(B, h, new, self.v.shape[3])
        pos = self.pos.new_full((h, new), _FAR)
        k[:, :, :cap], v[:, :, :cap], pos[:, :cap] = self.k, self.v, self.pos
        self.k, self.v, self.pos = k, v, pos
        if self.mask is not None:
            m = self.mask.new_ones(B, h, new)
            m[:, :, :cap] = self.mask
            self.mask = m

    def append(self, k, v, key_padding_mask, pos) -> None:
        """k (B, h, T, D), v (B, h, T, Dv), mask (B, T) or None, positions (T,)."""
        B, h, T = k.shape[:3]
        lo, hi = min(self.n), max(self.n)
        self._reserve(hi + T)
        if key_padding_mask is not None and self.mask is None:
            self.mask = torch.ones(B, h, self.k.shape[2], dtype=torch.bool, device=k.device)
        new_mask = None
        if self.mask is not None:
            new_mask = (torch.ones(B, T, dtype=torch.bool, device=k.device) if key_padding_mask is None
                        else key_padding_mask).view(B, 1, T).expand(B, h, T)
        if lo == hi:  # every head equally long: one slice
            self.k[:, :, lo: lo + T] = k
            self.v[:, :, lo: lo + T] = v
            self.pos[:, lo: lo + T] = pos
            if new_mask is not None:
                self.mask[:, :, lo: lo + T] = new_mask
        else:
            idx = torch.tensor(self.n, device=k.device).view(h, 1) + torch.arange(T, device=k.device)  # (h, T)
            self.k.scatter_(2, idx.view(1, h, T, 1).expand(B, h, T, k.shape[3]), k)
            self.v.scatter_(2, idx.view(1, h, T, 1).expand(B, h, T, v.shape[3]), v)
            self.pos.scatter_(1, idx, pos.view(1, T).expand(h, T))
            if new_mask is not None:
                self.mask.scatter_(2, idx.view(1, h, T).expand(B, h, T), new_mask)
        self.n = [n + T for n in self.n]

    def view(self):
        """(k, v, positions, mask) over the slots any head fills: (B, h, L, D), (B, h, L, Dv), (h, L), (B, h, L)."""
        L = max(self.n)
        return (self.k[:, :, :L], self.v[:, :, :L], self.pos[:, :L],
                None if self.mask is None else self.mask[:, :, :L])

    def keep_only(self, x: int, lo: int, keep: torch.Tensor) -> None:
        """Of head x's tokens in slots [lo, n[x]) keep those where ``keep`` is True, moved down to slot lo."""
        idx = torch.nonzero(keep).flatten() + lo
        m, n = idx.numel(), self.n[x]
        self.k[:, x, lo: lo + m] = self.k[:, x].index_select(1, idx)  # index_select copies before the write
        self.v[:, x, lo: lo + m] = self.v[:, x].index_select(1, idx)
        self.pos[x, lo: lo + m] = self.pos[x].index_select(0, idx)
        if self.mask is not None:
            self.mask[:, x, lo: lo + m] = self.mask[:, x].index_select(1, idx)
        self.pos[x, lo + m: n] = _FAR
        self.n[x] = lo + m

    def shrink(self) -> None:
        """Release capacity beyond 1.25x the fullest head once it exceeds twice that (after a long prefill chunk
        was evicted down to the strided blocks and the local window)."""
        need = max(self.n)
        if self.k.shape[2] > 2 * need + 16:
            cap = need + need // 4 + 16
            self.k, self.v, self.pos = self.k[:, :, :cap].clone(), self.v[:, :, :cap].clone(), self.pos[:, :cap].clone()
            if self.mask is not None:
                self.mask = self.mask[:, :, :cap].clone()

    def truncate(self, length: int) -> None:
        """Forget every token at position >= length."""
        for x, n in enumerate(self.n):
            keep = int((self.pos[x, :n] < length).sum())  # positions ascend within a head
            self.pos[x, keep:n] = _FAR
            self.n[x] = keep

    def reorder(self, index: torch.Tensor) -> None:
        self.k = self.k.index_select(0, index.to(self.k.device))
        self.v = self.v.index_select(0, index.to(self.v.device))
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index.to(self.mask.device))


class S2Cache(DecodeState):
    """Per key/value head, the keys a later query can still see: the head's strided blocks and the last
    ``local_blocks`` blocks (dense heads: everything).

    Sparse heads hold about ``N / vert_stride + (local_blocks + 1) * block_size (+ extra)`` tokens. Heads keep
    different blocks, so each sparse key/value head is its own run of slots in one buffer for all sparse heads
    (a step attends to all of them in one call, masking each head's empty and invisible slots), the dense heads
    (the last ``num_dense_heads``) share another. Appends write in place; eviction moves a head's local window
    down by a block once per block of tokens. ``crop(length)`` drops tokens at positions >= length and raises if
    local blocks the next query needs were evicted: build the cache with ``extra = r`` to roll back up to r
    tokens.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *, block_size: int,
                 local_blocks: int, vert_stride: int, num_dense_heads: int = 0, head_sliding_step=None,
                 head_sliding_offset: int = 0, homo_head: bool = False, extra: int = 0,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.extra = check_int("extra", extra, low=0)
        self.built_for(batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                       value_dim=head_dim if value_dim is None else value_dim, dtype=dtype, device=device)
        check_int("num_dense_heads", num_dense_heads, low=0, high=self.kv_heads)
        self.pattern = dict(block_size=block_size, local_blocks=local_blocks, vert_stride=vert_stride,
                            num_dense_heads=num_dense_heads, head_sliding_step=head_sliding_step,
                            head_sliding_offset=head_sliding_offset, homo_head=homo_head)
        self.shifts: list[int | None] | None = None  # per key/value head, fixed at the first step (needs Hq)
        self.n_sparse = self.kv_heads - num_dense_heads
        args = (self.batch, self.head_dim, self.value_dim, self.dtype, self.device)
        self.sparse = _HeadStore(args[0], self.n_sparse, *args[1:]) if self.n_sparse else None
        self.dense = _HeadStore(args[0], num_dense_heads, *args[1:]) if num_dense_heads else None
        self._lo = [0] * self.n_sparse  # per sparse head: first slot at a position >= kept_from_block * block_size
        self.kept_from_block = 0  # every key in blocks >= this (below seq_len) is still stored

    def tensors(self) -> list[torch.Tensor]:
        return [t for st in (self.sparse, self.dense) if st is not None for t in st.tensors()]

    def configure(self, shifts: list[int | None]) -> None:
        """Fix each key/value head's stride shift c_x (None = dense head, the last ``num_dense_heads``);
        S2-Attention's step computes them from the number of query heads at the first call."""
        if len(shifts) != self.kv_heads:
            raise ValueError(f"shifts: expected one per key/value head ({self.kv_heads}), got {len(shifts)}")
        if [c is None for c in shifts] != [x >= self.n_sparse for x in range(self.kv_heads)]:
            raise ValueError(f"shifts: expected None exactly for the last {self.kv_heads - self.n_sparse} (dense) "
                             f"heads, got {list(shifts)}")
        self.shifts = list(shifts)

    def append(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> None:
        """Append T tokens, k (B, Hk, T, D), v (B, Hk, T, Dv), mask (B, T) bool (True = attend)."""
        T = check_append(self, k, v, key_padding_mask)
        pos = torch.arange(self.seq_len, self.seq_len + T, device=k.device)
        ns = self.n_sparse
        if self.sparse is not None:
            self.sparse.append(k[:, :ns], v[:, :ns], key_padding_mask, pos)
        if self.dense is not None:
            self.dense.append(k[:, ns:], v[:, ns:], key_padding_mask, pos)
        self.seq_len += T

    def evict(self) -> None:
        """Drop keys no later query (position >= seq_len - extra) can see: once per block of tokens, the
        non-strided blocks that left every sparse head's local window."""
        p = self.pattern
        b, L, V = p["block_size"], p["local_blocks"], p["vert_stride"]
        boundary = max(0, (self.seq_len - self.extra) // b - L + 1)
        if boundary <= self.kept_from_block:
            return
        for x in range(self.n_sparse):
            st, lo = self.sparse, self._lo[x]
            kb = torch.div(st.pos[x, lo: st.n[x]], b, rounding_mode="floor")
            old = kb < boundary
            keep = ~old | (torch.remainder(kb + self.shifts[x], V) == 0)
            kept_old = int((old & keep).sum())
            if not bool(keep.all()):
                st.keep_only(x, lo, keep)
            self._lo[x] = lo + kept_old
        if self.sparse is not None:
            self.sparse.shrink()
        self.kept_from_block = boundary

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        for st in (self.sparse, self.dense):
            if st is not None:
                st.reorder(index)
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        b, L = self.pattern["block_size"], self.pattern["local_blocks"]
        needed = max(0, length // b - L + 1)
        if needed < self.kept_from_block:
            raise ValueError(
                f"length: cannot crop this S2Cache to {length} tokens: the next query needs key blocks from {needed} "
                f"on, but blocks before {self.kept_from_block} were evicted; build it with extra >= "
                f"{self.seq_len - length} to allow rolling back {self.seq_len - length} tokens")
        for st in (self.sparse, self.dense):
            if st is not None:
                st.truncate(length)
        if self.sparse is not None:
            self._lo = [min(lo, n) for lo, n in zip(self._lo, self.sparse.n)]
        self.seq_len = length

    def stored_tokens(self) -> list[int]:
        return (self.sparse.n if self.sparse is not None else []) + (self.dense.n if self.dense is not None else [])
