"""Helpers shared by the dense-family modules: the projection KV cache, the token-history cache, head reshapes
and a masked softmax. Registers nothing; argument checks are the ones of ``attnzoo.errors``.
"""

from __future__ import annotations

import torch

from ...errors import check_int, check_key_padding_mask, check_tensor
from ...state import KVCache


def projection_kv_cache(module: torch.nn.Module, batch_size: int, dtype: torch.dtype | None, device) -> KVCache:
    """An empty KV cache for a causal module with ``q_proj``, ``kv_heads`` and ``head_dim`` (keys and values of
    width head_dim), in the projections' dtype/device unless given."""
    if not module.causal:
        raise ValueError("causal: decoding needs a causal module; build it with causal=True")
    w = module.q_proj.weight
    return KVCache(batch_size, module.kv_heads, module.head_dim, module.head_dim, dtype=dtype or w.dtype,
                   device=device or w.device)


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
            check_int(name, val, low=low)
        super().__init__(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)
        self.features, self.keep, self.extra = features, keep, extra
        self._hist = torch.empty(batch, 0, features, dtype=dtype, device=self.device)  # (B, h, F)
        self._hist_mask = torch.ones(batch, 0, dtype=torch.bool, device=self.device)  # (B, h)

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


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    B, N, F = x.shape
    return x.view(B, N, heads, F // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis with ``mask`` (bool, broadcastable, True = attend); rows with no
    visible key are all zeros (not NaN), as in :func:`attnzoo.reference.softmax_attention`."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(denom > 0, denom, torch.ones_like(denom))


def sinusoid(positions: torch.Tensor, dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding of (possibly negative) positions: (P,) -> (P, dim),
    [sin(p w_0), ..., sin(p w_{dim/2-1}), cos(p w_0), ...] with w_i = base^(-2i/dim) (Transformer-XL order)."""
    half = dim // 2
    inv = base ** (-torch.arange(half, dtype=positions.dtype, device=positions.device) * 2.0 / dim)  # (dim/2,)
    ang = positions.unsqueeze(-1) * inv  # (P, dim/2)
    out = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)  # (P, 2 * (dim/2))
    if dim % 2:
        out = torch.cat([out, torch.zeros_like(out[:, :1])], dim=-1)  # (P, dim)
    return out
