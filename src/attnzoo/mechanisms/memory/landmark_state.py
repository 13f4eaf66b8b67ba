"""The decode states of Landmark Attention (:mod:`attnzoo.mechanisms.memory.landmark`, CATALOG P009):
:class:`LandmarkCache`, the block store of the interleaved sequence that the functional step reads, and
:class:`LandmarkState`, the module's state around it (counting input tokens). Their own file because the
mechanism's file would pass 600 lines with them; nothing else uses them.
"""

from __future__ import annotations

import torch

from ...errors import check_bool, check_int
from ...state.base import DecodeState
from ...state.kv import KVCache


class LandmarkCache(KVCache):
    """Landmark Attention's block store: every key/value of the interleaved sequence (landmarks included).

    Stored contiguously, so block ``b`` is positions ``b*(block_size+1) .. b*(block_size+1)+block_size``
    and the landmark keys are the strided view ``keys[:, :, block_size::block_size+1]``: a decoding query
    scores the landmarks only and gathers the ``top_k`` blocks it retrieves. Memory O(N) (the paper keeps
    every block, possibly offloaded); per-token compute O(N / block_size + top_k * block_size).
    ``seq_len`` counts positions of the interleaved sequence (the functional form's inputs); ``crop(n)``
    keeps its first n positions, exactly the state a fresh decode of them builds (a position's role follows
    from its index alone).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.block_size = check_int("block_size", block_size)
        batch, kv_heads, head_dim = check_int("batch", batch), check_int("kv_heads", kv_heads), check_int(
            "head_dim", head_dim)
        value_dim = None if value_dim is None else check_int("value_dim", value_dim)
        super().__init__(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)

    def _capacity(self, need: int) -> int:
        """Whole blocks (block_size + 1 positions), so that a decoding query reads retrieved blocks as rows of
        the storage."""
        period = self.block_size + 1
        return -(-super()._capacity(need) // period) * period

    @property
    def landmark_keys(self) -> torch.Tensor:
        """Keys of the landmarks of completed blocks, (B, Hk, n_blocks, D) (a strided view)."""
        return self.keys[:, :, self.block_size :: self.block_size + 1]


class LandmarkState(DecodeState):
    """Decode state of :class:`LandmarkAttention`: ``seq_len`` counts input tokens, ``cache`` is the
    :class:`LandmarkCache` of the interleaved sequence (a landmark after every ``block_size`` tokens).

    ``crop(n)`` keeps the first n tokens and the landmarks of the blocks they complete (``n + n //
    block_size`` interleaved positions): the state a fresh decode of those n tokens builds, so a block
    cut short by the crop loses its landmark and gets it back when decoding completes the block again.
    ``interleaved=True`` (the state of an ``interleaved`` layer): the inputs are the interleaved sequence
    itself, so ``seq_len`` and ``crop`` count its positions, landmarks included.
    """

    _tensor_fields = ("_cache_tensors",)

    def __init__(self, cache: LandmarkCache, *, interleaved: bool = False) -> None:
        super().__init__()
        if not isinstance(cache, LandmarkCache):
            raise TypeError(f"cache: expected a LandmarkCache, got {type(cache).__name__}")
        self.cache = cache
        self.interleaved = check_bool("interleaved", interleaved)

    @property
    def _cache_tensors(self) -> list[torch.Tensor]:
        return self.cache.tensors()

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    @property
    def batch(self) -> int:
        return self.cache.batch

    def interleaved_length(self, tokens: int) -> int:
        """Positions of the interleaved sequence that ``tokens`` input tokens occupy (landmarks included)."""
        return tokens if self.interleaved else tokens + tokens // self.block_size

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        self.cache.crop(self.interleaved_length(length))
        self.seq_len = length
