"""Decode states of the head-level mechanisms (``attnzoo.mechanisms.heads``).

- :class:`DiffKVCache`: Sigma's DiffQKV cache, keys (B, n_k, L, d_k) and values (B, n_v, L, d_v) with
  *different* head counts and head dims (n_k < n_v in the paper), so K takes less memory than V.
- :class:`EchoAttentionCache`: one cache for a group of EchoAtt layers; the leader keeps keys and values,
  every layer that reuses the leader's attention matrix keeps its values only.
- :class:`RoutedKVCache`: a key/value cache plus one per-token feature row (the routing probabilities and
  features an attention-aware / similarity-aware MoE router needs for the tokens already seen).

All are built on :class:`TokenBuffers`: several growable per-token tensors (B, H_i, capacity, D_i) that share
one length, one optional key-padding mask and the reorder/crop/nbytes protocol of
:class:`~attnzoo.state.base.DecodeState`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import check_key_padding_mask, check_tensor
from .base import DecodeState


def _check_positive(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


class TokenBuffers(DecodeState):
    """Growable per-token buffers ``(B, H_i, capacity, D_i)`` sharing one length and one padding mask.

    Writing is two-phase so that a module can fill its buffers one after the other while decoding T new
    tokens (EchoAtt computes a later layer's values only after the earlier layer ran):
    ``write(i, new)`` stores ``new (B, H_i, T, D_i)`` at positions ``length .. length + T - 1`` and returns the
    whole buffer up to there; ``advance(T, key_padding_mask)`` then commits the T tokens. Storage grows by
    doubling; while autograd records through the new tokens, writes concatenate instead (as ``KVCache``).
    """

    _tensor_fields = ("_bufs", "_mask")

    def __init__(self, batch: int, shapes: Sequence[tuple[int, int]], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.batch = _check_positive("batch", batch)
        self.shapes = [(_check_positive("heads", h), _check_positive("dim", d, 0)) for h, d in shapes]
        self.names = list(names) if names is not None else [f"buffer {i}" for i in range(len(self.shapes))]
        self.dtype, self.device = dtype, device
        self._bufs = [torch.empty(batch, h, 0, d, dtype=dtype, device=device) for h, d in self.shapes]
        self._mask: torch.Tensor | None = None  # (B, capacity) bool, only once a padded token arrived
        self.length = 0

    # -- reading ---------------------------------------------------------------------------------------
    def buffer(self, i: int, extra: int = 0) -> torch.Tensor:
        """Buffer ``i`` over the committed tokens plus ``extra`` written but not yet committed."""
        return self._bufs[i][:, :, : self.length + extra]  # (B, H_i, L, D_i)

    @property
    def mask(self) -> torch.Tensor | None:
        return None if self._mask is None else self._mask[:, : self.length]  # (B, L)

    def pending_mask(self, T: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The padding mask over committed + T new tokens (without committing), or None if nothing is padded."""
        check_key_padding_mask(key_padding_mask, self.batch, T)
        if key_padding_mask is None and self._mask is None:
            return None
        old = self.mask if self._mask is not None else torch.ones(self.batch, self.length, dtype=torch.bool,
                                                                   device=key_padding_mask.device)
        new = key_padding_mask if key_padding_mask is not None else torch.ones(
            self.batch, T, dtype=torch.bool, device=old.device)
        return torch.cat([old, new], dim=1)  # (B, L + T)

    # -- writing ---------------------------------------------------------------------------------------
    def write(self, i: int, new: torch.Tensor) -> torch.Tensor:
        """Store ``new (B, H_i, T, D_i)`` after the committed tokens; return buffer ``i`` including it."""
        check_tensor(self.names[i], new, ndim=4)
        h, d = self.shapes[i]
        T = new.shape[2]
        want = (self.batch, h, T, d)
        if tuple(new.shape) != want:
            raise ValueError(f"{self.names[i]}: expected (B, H, T, D) = {want} for this cache, got {tuple(new.shape)}")
        if new.dtype != self.dtype:
            raise TypeError(f"{self.names[i]}: expected dtype {self.dtype} for this cache, got {new.dtype}")
        L = self.length
        buf = self._bufs[i]
        if torch.is_grad_enabled() and (new.requires_grad or buf.requires_grad):
            buf = torch.cat([buf[:, :, :L], new], dim=2)
        else:
            if L + T > buf.shape[2]:
                grown = buf.new_empty(self.batch, h, max(L + T, 2 * buf.shape[2], 16), d)  # (B, H, cap, D)
                grown[:, :, :L] = buf[:, :, :L]
                buf = grown
            buf[:, :, L : L + T] = new
        self._bufs[i] = buf
        return buf[:, :, : L + T]

    def advance(self, T: int, key_padding_mask: torch.Tensor | None = None) -> None:
        """Commit T written tokens (every buffer must have been written), with their padding mask (B, T)."""
        check_key_padding_mask(key_padding_mask, self.batch, T)
        L = self.length
        for name, buf in zip(self.names, self._bufs):
            if buf.shape[2] < L + T:
                raise RuntimeError(f"{name}: not written for the {T} new tokens before advance()")
        if key_padding_mask is not None or self._mask is not None:
            old = self._mask[:, :L] if self._mask is not None else torch.ones(
                self.batch, L, dtype=torch.bool, device=key_padding_mask.device)
            new = key_padding_mask if key_padding_mask is not None else torch.ones(
                self.batch, T, dtype=torch.bool, device=old.device)
            self._mask = torch.cat([old, new], dim=1)
        self.length = L + T
        self.seq_len += T

    # -- editing ---------------------------------------------------------------------------------------
    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        self._bufs = [b.index_select(0, index.to(b.device)) for b in self._bufs]
        if self._mask is not None:
            self._mask = self._mask.index_select(0, index.to(self._mask.device))
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        self.length -= self.seq_len - length
        self.seq_len = length


class DiffKVCache(TokenBuffers):
    """Sigma's DiffQKV cache: keys (B, key_heads, L, key_dim), values (B, value_heads, L, value_dim).

    With the paper's configuration (key_heads < value_heads, key_dim <= value_dim) the key part of the cache
    is smaller than the value part, unlike a GQA cache where both are equal. ``nbytes()`` reports the
    allocated storage.
    """

    def __init__(self, batch: int, key_heads: int, key_dim: int, value_heads: int, value_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(batch, [(key_heads, key_dim), (value_heads, value_dim)], dtype=dtype, device=device,
                         names=["k", "v"])
        self.key_heads, self.key_dim, self.value_heads, self.value_dim = key_heads, key_dim, value_heads, value_dim

    @property
    def keys(self) -> torch.Tensor:
        return self.buffer(0)  # (B, n_k, L, d_k)

    @property
    def values(self) -> torch.Tensor:
        return self.buffer(1)  # (B, n_v, L, d_v)

    def append(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append T tokens, k (B, n_k, T, d_k), v (B, n_v, T, d_v); return (keys, values, mask) of the cache."""
        if k.dim() == 4 and v.dim() == 4 and k.shape[2] != v.shape[2]:
            raise ValueError(f"k, v: expected the same number of new tokens, got {k.shape[2]} and {v.shape[2]}")
        T = k.shape[2] if k.dim() == 4 else 0
        keys = self.write(0, k)
        values = self.write(1, v)
        self.advance(T, key_padding_mask)
        return keys, values, self.mask


class EchoAttentionCache(TokenBuffers):
    """Decode state of an EchoAtt group of ``layers`` attention layers.

    With sharing, buffer 0 holds the leader's keys (B, kv_heads, L, head_dim) and buffer 1 + l the values of
    layer l: the layers that reuse the leader's attention matrix cache no keys at all. Without sharing
    (independent layers) every layer keeps keys and values: buffers 2 l (keys) and 2 l + 1 (values).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, layers: int, *, share: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        _check_positive("layers", layers)
        if share:
            shapes = [(kv_heads, head_dim)] * (1 + layers)
            names = ["leader k"] + [f"layer {i} v" for i in range(layers)]
        else:
            shapes = [(kv_heads, head_dim)] * (2 * layers)
            names = [f"layer {i // 2} {'kv'[i % 2]}" for i in range(2 * layers)]
        super().__init__(batch, shapes, dtype=dtype, device=device, names=names)
        self.layers, self.share = layers, share

    def key_index(self, layer: int) -> int:
        if self.share:
            if layer != 0:
                raise ValueError(f"layer: only the leader (layer 0) caches keys when sharing, got layer {layer}")
            return 0
        return 2 * layer

    def value_index(self, layer: int) -> int:
        return 1 + layer if self.share else 2 * layer + 1


class RoutedKVCache(TokenBuffers):
    """Keys (B, Hk, L, D), values (B, Hk, L, Dv) and one feature row per token (B, 1, L, F).

    Used by the attention-aware / similarity-aware MoE block: the router of a new token mixes the routing
    probabilities (and, for similarity routing, the router features) of every token before it.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int, features: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(batch, [(kv_heads, head_dim), (kv_heads, value_dim), (1, features)], dtype=dtype,
                         device=device, names=["k", "v", "router features"])
