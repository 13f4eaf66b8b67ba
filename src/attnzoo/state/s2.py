"""Decode state of S2-Attention (arXiv 2407.17678): per key/value head, only the blocks a later query sees.

A sparse head ``x`` of S2-Attention sees, causally, its last ``local_blocks`` blocks and every block ``kb`` with
``(kb + c_x) % vert_stride == 0``. Older keys outside those strided blocks are never read again, so
:class:`S2Cache` evicts them: a sparse head stores about ``N / vert_stride + (local_blocks + 1) * block_size``
tokens, a dense head everything. Heads store different positions, hence one tensor per key/value head.
"""

from __future__ import annotations

import torch

from .base import DecodeState


class S2Cache(DecodeState):
    """Per key/value head, the keys a later query can still see: the head's strided blocks and the last
    ``local_blocks`` blocks (dense heads: everything).

    Sparse heads hold about ``N / vert_stride + (local_blocks + 1) * block_size (+ extra)`` tokens. Heads keep
    different blocks, so each key/value head is stored separately: ``keys[x]`` (B, L_x, D), ``values[x]``,
    ``positions[x]`` (L_x,) absolute positions, ``masks[x]`` (B, L_x) or None. ``crop(length)`` drops tokens at
    positions >= length and raises if local blocks the next query needs were evicted: build the cache with
    ``extra = r`` to roll back up to r tokens.
    """

    _tensor_fields = ("keys", "values", "positions", "masks")

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *, block_size: int,
                 local_blocks: int, vert_stride: int, num_dense_heads: int = 0, head_sliding_step=None,
                 head_sliding_offset: int = 0, homo_head: bool = False, extra: int = 0,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
            raise ValueError(f"extra: expected an int >= 0, got {extra!r}")
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.pattern = dict(block_size=block_size, local_blocks=local_blocks, vert_stride=vert_stride,
                            num_dense_heads=num_dense_heads, head_sliding_step=head_sliding_step,
                            head_sliding_offset=head_sliding_offset, homo_head=homo_head)
        self.extra, self.dtype, self.device = extra, dtype, device
        self.shifts: list[int | None] | None = None  # per key/value head, fixed at the first step (needs Hq)
        self.keys = [torch.empty(batch, 0, head_dim, dtype=dtype, device=device) for _ in range(kv_heads)]
        self.values = [torch.empty(batch, 0, self.value_dim, dtype=dtype, device=device) for _ in range(kv_heads)]
        self.positions = [torch.empty(0, dtype=torch.long, device=device) for _ in range(kv_heads)]
        self.masks: list[torch.Tensor | None] = [None] * kv_heads
        self.kept_from_block = 0  # every key in blocks >= this (below seq_len) is still stored

    def configure(self, shifts: list[int | None]) -> None:
        """Fix each key/value head's stride shift c_x (None = dense head); S2-Attention's step computes them
        from the number of query heads at the first call."""
        if len(shifts) != self.kv_heads:
            raise ValueError(f"shifts: expected one per key/value head ({self.kv_heads}), got {len(shifts)}")
        self.shifts = list(shifts)

    def append(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> None:
        T = k.shape[2]
        if tuple(k.shape) != (self.batch, self.kv_heads, T, self.head_dim):
            raise ValueError(f"k: expected (B, Hk, T, D) = ({self.batch}, {self.kv_heads}, T, {self.head_dim}), "
                             f"got {tuple(k.shape)}")
        if tuple(v.shape) != (self.batch, self.kv_heads, T, self.value_dim):
            raise ValueError(f"v: expected (B, Hk, T, Dv) = ({self.batch}, {self.kv_heads}, T, {self.value_dim}), "
                             f"got {tuple(v.shape)}")
        pos = torch.arange(self.seq_len, self.seq_len + T, device=k.device)
        for x in range(self.kv_heads):
            self.keys[x] = torch.cat([self.keys[x], k[:, x]], dim=1)
            self.values[x] = torch.cat([self.values[x], v[:, x]], dim=1)
            if key_padding_mask is not None or self.masks[x] is not None:
                old = self.masks[x]
                if old is None:
                    old = torch.ones(self.batch, self.positions[x].numel(), dtype=torch.bool, device=k.device)
                new = key_padding_mask if key_padding_mask is not None else torch.ones(
                    self.batch, T, dtype=torch.bool, device=k.device)
                self.masks[x] = torch.cat([old, new], dim=1)
            self.positions[x] = torch.cat([self.positions[x], pos])
        self.seq_len += T

    def head_mask(self, x: int, query_positions: torch.Tensor) -> torch.Tensor:
        """(T, L_x) bool: which stored keys of key/value head x each query position sees."""
        p = self.pattern
        b, L, V = p["block_size"], p["local_blocks"], p["vert_stride"]
        pos = self.positions[x].view(1, -1)
        qp = query_positions.view(-1, 1)
        ok = pos <= qp
        if self.shifts[x] is None:
            return ok
        qb, kb = torch.div(qp, b, rounding_mode="floor"), torch.div(pos, b, rounding_mode="floor")
        return ok & ((qb - kb < L) | (torch.remainder(kb + self.shifts[x], V) == 0))

    def evict(self) -> None:
        """Drop keys no later query (position >= seq_len - extra) can see."""
        p = self.pattern
        b, L, V = p["block_size"], p["local_blocks"], p["vert_stride"]
        boundary = max(0, (self.seq_len - self.extra) // b - L + 1)
        self.kept_from_block = max(self.kept_from_block, boundary)
        for x in range(self.kv_heads):
            if self.shifts[x] is None:
                continue
            kb = torch.div(self.positions[x], b, rounding_mode="floor")
            keep = (kb >= boundary) | (torch.remainder(kb + self.shifts[x], V) == 0)
            if bool(keep.all()):
                continue
            idx = torch.nonzero(keep).flatten()
            self.keys[x] = self.keys[x].index_select(1, idx)
            self.values[x] = self.values[x].index_select(1, idx)
            self.positions[x] = self.positions[x].index_select(0, idx)
            if self.masks[x] is not None:
                self.masks[x] = self.masks[x].index_select(1, idx)

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        for x in range(self.kv_heads):
            self.keys[x] = self.keys[x].index_select(0, index.to(self.keys[x].device))
            self.values[x] = self.values[x].index_select(0, index.to(self.values[x].device))
            if self.masks[x] is not None:
                self.masks[x] = self.masks[x].index_select(0, index.to(self.masks[x].device))
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
        for x in range(self.kv_heads):
            keep = self.positions[x] < length
            n = int(keep.sum())
            self.keys[x], self.values[x] = self.keys[x][:, :n], self.values[x][:, :n]
            self.positions[x] = self.positions[x][:n]
            if self.masks[x] is not None:
                self.masks[x] = self.masks[x][:, :n]
        self.seq_len = length

    def stored_tokens(self) -> list[int]:
        return [int(p.numel()) for p in self.positions]
