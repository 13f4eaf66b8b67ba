"""``ContextCache``: the projected keys/values of named context sources, computed once for decoding.

Cross-attention against a fixed context (an encoder's output, image tokens, retrieved passages) needs the
context's keys and values at every decoding step. They depend only on the context, so a layer projects them
once into a :class:`ContextCache` and every step reads them from there; nothing is recomputed per token.
For causal cross-attention by position (Video-CCAM's frames, Flamingo's media), new context tokens arrive
over time: :meth:`ContextCache.append` adds them (with their positions) at the end of a source.

One cache serves one attention layer (as a ``KVCache`` does); a model keeps one per layer.

    cache = ContextCache()
    cache.set("audio", k, v, key_padding_mask=mask)            # k (B, Hk, M, D), v (B, Hk, M, Dv)
    out = cache.attend(q)                                      # cross_attention over the cached sources
    cache.reorder(beam_index)                                  # beam search: rows follow their beams
    cache.append("frames", k_new, v_new, positions=t_new)      # causal cross: new frames at later times
    cache.crop(0, source="frames")                             # forget a source's tokens (undo appends)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..errors import check_key_padding_mask, check_tensor
from .base import DecodeState
from .kv import KVCache

__all__ = ["ContextCache", "check_positions"]


def check_positions(name: str, pos: object, batch: int, n: int, *, device: torch.device | None = None) -> None:
    """Positions of ``n`` tokens: a real-valued (integer or floating, not bool) tensor of shape (n,), shared by
    the batch, or (batch, n); on ``device``. Used for causal cross-attention by position."""
    if pos is None:
        return
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of positions, shape ({n},) or ({batch}, {n}), "
                        f"got {type(pos).__name__}")
    if pos.dtype == torch.bool or pos.is_complex():
        raise TypeError(f"{name}: expected integer or floating positions, got dtype {pos.dtype}")
    if tuple(pos.shape) not in ((n,), (batch, n)):
        raise ValueError(f"{name}: expected shape ({n},) or ({batch}, {n}), got {tuple(pos.shape)}")
    if device is not None and pos.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device} (the inputs'), got {pos.device}")


class ContextCache(DecodeState):
    """Keys/values of named context sources, each k (B, Hk, M, D) and v (B, Hk, M, Dv), with an optional
    key-padding mask (B, M) (bool, True = attend) and optional positions (M,) or (B, M).

    ``seq_len`` counts the query tokens decoded against the cache (layers advance it); ``crop(length)``
    rolls that count back (the context is fixed and stays). ``crop(length, source=name)`` keeps the first
    ``length`` tokens of a source (undoing :meth:`append`). ``reorder(index)`` selects batch rows in every
    source (beam search). Appends grow storage geometrically (a ``KVCache`` per source). ``info`` is a dict for the
    owning layer's metadata.
    """

    def __init__(self) -> None:
        super().__init__()
        self._kv: dict[str, KVCache] = {}
        self._pos: dict[str, torch.Tensor | None] = {}
        self.info: dict[str, Any] = {}  # the owner's metadata (e.g. Video-CCAM's frame count); kept by reorder/crop

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The cached sources, in insertion order."""
        return tuple(self._kv)

    def __contains__(self, name: object) -> bool:
        return name in self._kv

    def __iter__(self) -> Iterator[str]:
        return iter(self._kv)

    def __len__(self) -> int:
        return len(self._kv)

    @property
    def batch(self) -> int | None:
        """Batch size of the cached sources (None while empty)."""
        return next(iter(self._kv.values())).batch if self._kv else None

    def _get(self, name: str) -> KVCache:
        if name not in self._kv:
            raise KeyError(f"source: {name!r} is not in this ContextCache (it holds {list(self._kv)})")
        return self._kv[name]

    def keys(self, name: str) -> torch.Tensor:
        """(B, Hk, M, D) keys of source ``name``."""
        return self._get(name).keys

    def values(self, name: str) -> torch.Tensor:
        """(B, Hk, M, Dv) values of source ``name``."""
        return self._get(name).values

    def mask(self, name: str) -> torch.Tensor | None:
        """(B, M) key-padding mask of source ``name`` (None when no token of it was padded)."""
        return self._get(name).mask

    def positions(self, name: str) -> torch.Tensor | None:
        """(M,) or (B, M) positions of source ``name`` (None when it has none)."""
        self._get(name)
        return self._pos[name]

    def length(self, name: str) -> int:
        """Tokens held for source ``name``."""
        return self._get(name).length

    def sources(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (k, v)}, the ``sources`` argument of :func:`attnzoo.cross_attention`."""
        return {n: (c.keys, c.values) for n, c in self._kv.items()}

    def masks(self) -> dict[str, torch.Tensor]:
        """{name: key-padding mask} for the sources that have one (the ``masks`` argument)."""
        return {n: c.mask for n, c in self._kv.items() if c.mask is not None}

    def kv_positions(self) -> dict[str, torch.Tensor]:
        """{name: positions} for the sources that have them (the ``kv_pos`` argument)."""
        return {n: p for n, p in self._pos.items() if p is not None}

    def attend(self, q: torch.Tensor, **kwargs: Any):
        """:func:`attnzoo.cross_attention` of ``q`` (B, Hq, Nq, D) over the cached sources, with their masks and
        positions; other keyword arguments (mode, scales, region_masks, q_pos, scale, ...) are passed on."""
        from ..cross import cross_attention

        for taken in ("masks", "kv_pos"):
            if taken in kwargs:
                raise TypeError(f"{taken}: ContextCache.attend uses the cached {taken}; pass them to set/append")
        return cross_attention(q, self.sources(), masks=self.masks() or None, kv_pos=self.kv_positions() or None,
                               **kwargs)

    # -- writing ---------------------------------------------------------------------------------------
    def _check_new(self, name: str, k: torch.Tensor, v: torch.Tensor, key_padding_mask, positions) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name: expected a non-empty source name (str), got {name!r}")
        check_tensor("k", k, ndim=4)
        check_tensor("v", v, ndim=4)
        if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
            raise ValueError(f"k, v: expected (B, Hk, M, D) and (B, Hk, M, Dv) with equal B, Hk, M, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if self.batch is not None and k.shape[0] != self.batch:
            raise ValueError(f"k: expected batch {self.batch} (the cache's), got shape {tuple(k.shape)}")
        check_key_padding_mask(key_padding_mask, k.shape[0], k.shape[2], device=k.device)
        check_positions("positions", positions, k.shape[0], k.shape[2], device=k.device)

    def set(self, name: str, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
            positions: torch.Tensor | None = None) -> None:
        """Store source ``name``: k (B, Hk, M, D), v (B, Hk, M, Dv), key_padding_mask (B, M) bool, positions
        (M,) or (B, M). The source must not be cached yet (use :meth:`append` to extend it)."""
        if name in self._kv:
            raise ValueError(f"name: source {name!r} is already cached; append to it, or crop it first")
        self._check_new(name, k, v, key_padding_mask, positions)
        B, Hk, _, D = k.shape
        cache = KVCache(B, Hk, D, v.shape[3], dtype=k.dtype, device=k.device)
        cache.append(k, v, key_padding_mask)
        self._kv[name] = cache
        self._pos[name] = positions

    def append(self, name: str, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> None:
        """Append new tokens to source ``name`` (created if absent): k (B, Hk, T, D), v (B, Hk, T, Dv).

        A source with positions needs positions for the new tokens, none of them earlier than the source's
        last position (new frames come later); a source without positions takes none."""
        if name not in self._kv:
            self.set(name, k, v, key_padding_mask=key_padding_mask, positions=positions)
            return
        self._check_new(name, k, v, key_padding_mask, positions)
        old = self._pos[name]
        if (old is None) != (positions is None):
            have = "has positions" if old is not None else "has no positions"
            raise ValueError(f"positions: source {name!r} {have}; the appended tokens must match, got "
                             f"{'None' if positions is None else 'positions'}")
        if old is not None:
            assert positions is not None
            if positions.dim() != old.dim():
                raise ValueError(f"positions: source {name!r} holds positions of shape {tuple(old.shape)}; "
                                 f"expected the new ones as {'(T,)' if old.dim() == 1 else '(B, T)'}, got "
                                 f"{tuple(positions.shape)}")
            if old.shape[-1] and positions.shape[-1] and bool((positions.amin(-1) < old[..., -1]).any()):
                raise ValueError(f"positions: appended tokens of source {name!r} must not come before its last "
                                 f"position {old[..., -1].tolist()}, got minimum {positions.amin(-1).tolist()}")
        self._kv[name].append(k, v, key_padding_mask)
        if old is not None:
            self._pos[name] = torch.cat([old, positions.to(old.dtype)], dim=-1)  # type: ignore[union-attr]

    # -- editing ---------------------------------------------------------------------------------------
    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` of every source becomes old row ``index[i]`` (beam search)."""
        if not self._kv:
            return
        index = self._check_index(index, self.batch or 0)
        for name, cache in self._kv.items():
            cache.reorder(index)
            pos = self._pos[name]
            if pos is not None and pos.dim() == 2:
                self._pos[name] = pos.index_select(0, index.to(pos.device))

    def crop(self, length: int, *, source: str | None = None) -> None:
        """Without ``source``: roll the decoded-query count back to ``length`` (the DecodeState protocol; the
        fixed context stays). With ``source``: keep the first ``length`` tokens of that source."""
        if source is None:
            self.seq_len = self._check_crop(length)
            return
        cache = self._get(source)
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= cache.length:
            raise ValueError(f"length: expected an int in [0, {cache.length}] (tokens of source {source!r}), "
                             f"got {length!r}")
        cache.crop(length)
        pos = self._pos[source]
        if pos is not None:
            self._pos[source] = pos[..., :length]

    def remove(self, name: str) -> None:
        """Forget source ``name`` entirely."""
        self._get(name)
        del self._kv[name], self._pos[name]

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for name, cache in self._kv.items():
            out.extend(cache.tensors())
            if self._pos[name] is not None:
                out.append(self._pos[name])  # type: ignore[arg-type]
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {c.length} tokens" for n, c in self._kv.items())
        return f"ContextCache({parts}; seq_len={self.seq_len})"

