"""The decode-state protocol shared by every mechanism's ``step``."""

from __future__ import annotations

import torch

from ..errors import check_init_state, check_int


class DecodeState:
    """Base class of decode states.

    Subclasses hold tensors whose first axis is the batch, list them in ``_tensor_fields`` and keep
    ``seq_len``, the number of tokens consumed so far (the position of the next token).

    A state records what it was built for -- ``batch``, ``kv_heads``, ``head_dim``, ``value_dim``, ``dtype``,
    ``device`` (None: not recorded) -- so that a step or module call with other inputs is refused
    (:func:`attnzoo.errors.check_state`) instead of broadcasting or casting silently. Constructors record them with
    :meth:`built_for`, which validates them first (ints >= 1, a floating dtype, a device).
    """

    _tensor_fields: tuple[str, ...] = ()
    batch: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    value_dim: int | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None

    def __init__(self) -> None:
        self.seq_len = 0

    def built_for(self, *, batch, kv_heads=None, head_dim=None, value_dim=None, dtype=None, device=None):
        """Validate and record the call geometry this state serves; returns the state."""
        spec = check_init_state(batch=batch, kv_heads=kv_heads, head_dim=head_dim, value_dim=value_dim, dtype=dtype,
                                device=device)
        for name, value in spec.items():
            setattr(self, name, value)
        return self

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
        if (not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point()
                or index.dtype == torch.bool or index.is_complex()):
            got = (f"shape {tuple(index.shape)}, dtype {index.dtype}" if isinstance(index, torch.Tensor)
                   else type(index).__name__)
            raise ValueError(f"index: expected a 1-D integer tensor of batch indices, got {got}")
        if index.numel() == 0:
            raise ValueError("index: expected at least one batch index (a state holds B >= 1 rows), got none")
        if index.device.type == "meta":
            raise ValueError("index: expected batch indices with values, got a tensor on the meta device")
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
        check_int("length", length, low=0)
        if length > self.seq_len:
            raise ValueError(f"length: cannot crop to {length} tokens, the state holds {self.seq_len}")
        return length
