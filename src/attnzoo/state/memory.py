"""Decode states of the long-context / memory mechanisms (``attnzoo.mechanisms.memory``).

Each follows the :class:`~attnzoo.state.base.DecodeState` protocol: ``seq_len``, ``reorder(index)`` (beam
search), ``crop(length)`` (roll back) and ``nbytes()``. What each keeps is what its paper's decoding
needs, and nothing silently dropped: a state that cannot roll back as far as asked raises.
"""

from __future__ import annotations

import torch

from ..errors import check_int
from .kv import KVCache


class LandmarkCache(KVCache):
    """Landmark Attention's block store: every key/value of the interleaved sequence (landmarks included).

    Stored contiguously, so block ``b`` is positions ``b*(block_size+1) .. b*(block_size+1)+block_size``
    and the landmark keys are the strided view ``keys[:, :, block_size::block_size+1]``: a decoding query
    scores the landmarks only and gathers the ``top_k`` blocks it retrieves. Memory O(N) (the paper keeps
    every block, possibly offloaded); per-token compute O(N / block_size + top_k * block_size).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.block_size = check_int("block_size", block_size)
        super().__init__(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)

    @property
    def landmark_keys(self) -> torch.Tensor:
        """Keys of the landmarks of completed blocks, (B, Hk, n_blocks, D) (a strided view)."""
        return self.keys[:, :, self.block_size :: self.block_size + 1]


