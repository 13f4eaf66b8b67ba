"""What the head-level mechanisms share: :class:`TokenBuffers`, the growable per-token buffers their decode states
(Sigma's ``DiffKVCache``, EchoAtt's ``EchoAttentionCache``, the attention-aware MoE's ``RoutedKVCache``, each in its
mechanism's file) are built on: several tensors (B, H_i, capacity, D_i) that share one length, one optional
key-padding mask and the reorder/crop/nbytes protocol of :class:`~attnzoo.state.base.DecodeState`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import check_int, check_key_padding_mask, check_tensor
from ...state.base import DecodeState


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
        self.built_for(batch=batch, dtype=dtype, device=device)
        self.shapes = [(check_int("heads", h), check_int("dim", d, low=0)) for h, d in shapes]
        self.names = list(names) if names is not None else [f"buffer {i}" for i in range(len(self.shapes))]
        self._bufs = [torch.empty(batch, h, 0, d, dtype=dtype, device=self.device) for h, d in self.shapes]
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
        check_key_padding_mask(key_padding_mask, self.batch, T, device=self.device)
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
        if new.device != self.device:
            raise ValueError(f"{self.names[i]}: expected device {self.device} (this cache's), got {new.device}")
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
        check_key_padding_mask(key_padding_mask, self.batch, T, device=self.device)
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


