"""Decode states of the dense-family mechanisms.

- :class:`TokenHistoryCache`: a :class:`KVCache` plus the last few per-token feature rows a mechanism
  needs besides keys and values (RCMHA's causal depthwise convolution reads the previous
  ``kernel_size - 1`` pre-convolution projections; MQSA's L-query pools the previous ``L - 1`` items).
- :class:`PositionState`: only the number of tokens seen, for token-wise mechanisms (GAAM over features)
  whose decode step needs no memory at all.
"""

from __future__ import annotations

import torch

from ..errors import check_key_padding_mask, check_tensor
from .base import DecodeState
from .kv import KVCache


class TokenHistoryCache(KVCache):
    """KV cache plus the last ``keep + extra`` feature rows ``(B, keep + extra, F)`` and their padding mask.

    ``keep`` rows are what the next token needs; ``extra`` more allow ``crop`` to roll back that many
    tokens (speculative decoding). Keys/values are the full :class:`KVCache`.
    """

    _tensor_fields = ("_k", "_v", "_mask", "_hist", "_hist_mask")

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *, features: int,
                 keep: int, extra: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        for name, val, low in (("features", features, 1), ("keep", keep, 0), ("extra", extra, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {val!r}")
        super().__init__(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)
        self.features, self.keep, self.extra = features, keep, extra
        self._hist = torch.empty(batch, 0, features, dtype=dtype, device=device)  # (B, h, F)
        self._hist_mask = torch.ones(batch, 0, dtype=torch.bool, device=device)  # (B, h)

    @property
    def history(self) -> torch.Tensor:
        return self._hist  # (B, h, F), h <= keep + extra

    @property
    def history_mask(self) -> torch.Tensor:
        return self._hist_mask  # (B, h) bool, True = a real (unpadded) token

    def extend_history(self, feats: torch.Tensor, key_padding_mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``[stored history, feats]`` (B, h + T, F) with its mask (B, h + T), and store the last
        ``keep + extra`` rows. Does not advance ``seq_len`` (``append`` of the keys/values does)."""
        check_tensor("feats", feats, ndim=3)
        if feats.shape[0] != self.batch or feats.shape[2] != self.features:
            raise ValueError(f"feats: expected ({self.batch}, T, {self.features}), got {tuple(feats.shape)}")
        if feats.dtype != self.dtype:
            raise TypeError(f"feats: expected dtype {self.dtype} for this cache, got {feats.dtype}")
        T = feats.shape[1]
        check_key_padding_mask(key_padding_mask, self.batch, T)
        new_mask = key_padding_mask if key_padding_mask is not None else torch.ones(
            self.batch, T, dtype=torch.bool, device=feats.device)
        full = torch.cat([self._hist, feats], dim=1)  # (B, h + T, F)
        full_mask = torch.cat([self._hist_mask, new_mask], dim=1)  # (B, h + T)
        room = self.keep + self.extra
        self._hist = full[:, full.shape[1] - min(room, full.shape[1]):]
        self._hist_mask = full_mask[:, full_mask.shape[1] - min(room, full_mask.shape[1]):]
        if not torch.is_grad_enabled() or not self._hist.requires_grad:
            self._hist = self._hist.clone()
        return full, full_mask

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self._hist = self._hist.index_select(0, index.to(self._hist.device))
        self._hist_mask = self._hist_mask.index_select(0, index.to(self._hist_mask.device))

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        drop = self.seq_len - length
        have = self._hist.shape[1]
        if have - drop < min(self.keep, length):
            raise ValueError(
                f"length: cannot crop this TokenHistoryCache to {length} tokens: it keeps the last {have} "
                f"feature rows and the next token needs {min(self.keep, length)} before position {length}; "
                f"build it with extra >= {drop} to allow rolling back {drop} tokens")
        super().crop(length)
        self._hist = self._hist[:, : have - drop]
        self._hist_mask = self._hist_mask[:, : have - drop]


class PositionState(DecodeState):
    """The number of tokens decoded so far and nothing else (token-wise mechanisms)."""

    def __init__(self, batch: int) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        super().__init__()
        self.batch = batch

    def advance(self, tokens: int) -> None:
        self.seq_len += tokens

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        self.seq_len = self._check_crop(length)
