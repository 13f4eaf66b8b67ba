"""The decode-state protocol shared by every mechanism's ``step``."""

from __future__ import annotations

import torch


class DecodeState:
    """Base class of decode states.

    Subclasses hold tensors whose first axis is the batch, list them in ``_tensor_fields`` and keep
    ``seq_len``, the number of tokens consumed so far (the position of the next token).
    """

    _tensor_fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.seq_len = 0

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for name in self._tensor_fields:
            t = getattr(self, name)
            if isinstance(t, torch.Tensor):
                out.append(t)
            elif isinstance(t, (list, tuple)):
                out.extend(x for x in t if isinstance(x, torch.Tensor))
        return out

    def nbytes(self) -> int:
        """Bytes of tensor storage this state holds (allocated, not only the filled part)."""
        seen, total = set(), 0
        for t in self.tensors():
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    def _check_index(self, index: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point():
            got = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
            raise ValueError(f"index: expected a 1-D integer tensor of batch indices, got {got}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch):
            raise ValueError(f"index: batch indices must lie in [0, {batch}), got min {int(index.min())}, "
                             f"max {int(index.max())}")
        return index

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder batch rows (beam search): row ``i`` becomes old row ``index[i]``."""
        raise NotImplementedError

    def crop(self, length: int) -> None:
        """Forget every token at position >= ``length``."""
        raise NotImplementedError

    def _check_crop(self, length: int) -> int:
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length: expected an int >= 0, got {length!r}")
        if length > self.seq_len:
            raise ValueError(f"length: cannot crop to {length} tokens, the state holds {self.seq_len}")
        return length
