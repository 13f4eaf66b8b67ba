"""The fixed-size state of recurrent (linear-attention family) mechanisms.

A recurrent mechanism summarises every token it has seen in tensors whose size does not depend on the
number of tokens: linear attention keeps ``kv = sum_j phi(k_j) v_j^T`` (B, H, F, Dv) and, when it
normalises, ``z = sum_j phi(k_j)`` (B, H, F); Aaren keeps a running (max, sum, weighted sum) triple; a
short convolution keeps its last ``kernel - 1`` inputs. :class:`RecurrentState` holds such named tensors.

What ``crop`` means for a state
    A KV cache forgets the last tokens by shortening itself. A recurrent state cannot: the tokens are
    added into one tensor and cannot be subtracted back out exactly (with a decay, not at all). So
    ``crop(length)`` works only to a length the state has *been at* and still remembers:

    - ``length == seq_len`` (nothing to forget) and ``length == 0`` (back to the empty state) always;
    - the length at the end of one of the last ``snapshots`` calls to ``step`` when the state keeps
      snapshots (``RecurrentState(..., snapshots=k)`` or ``state.keep_snapshots(k)``). A snapshot is a
      reference to the tensors of that moment, not a copy: updates replace tensors, they never write in
      place, so keeping ``k`` snapshots costs ``k`` states of memory and no copying.

    Any other length raises ``ValueError`` naming the lengths it can return to. For speculative
    decoding, verify the draft one token per step (or keep snapshots) so every prefix is a step boundary.

``reorder(index)`` selects batch rows (beam search) of the current state, of the snapshots and of the
empty state alike.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..errors import check_int
from .base import DecodeState


class RecurrentState(DecodeState):
    """Named fixed-size tensors, batch first, updated by replacement (never in place).

    Args:
        snapshots: how many past step boundaries ``crop`` can return to (0 = only 0 and the current
            length).
        **tensors: the empty (initial) state, e.g. ``kv=torch.zeros(B, H, F, Dv)``; every tensor's
            first axis is the batch.

    ``state["kv"]`` reads a tensor; ``state.update(kv=..., z=...)`` replaces tensors; a mechanism's
    ``step`` calls ``state.advance(T)`` after consuming T tokens, which records a snapshot when asked.
    """

    def __init__(self, *, snapshots: int = 0, **tensors: torch.Tensor) -> None:
        super().__init__()
        if not tensors:
            raise ValueError("tensors: a RecurrentState needs at least one named tensor, got none")
        batch = None
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dim() < 1:
                raise TypeError(f"{name}: expected a tensor with a leading batch axis, got {type(t).__name__}")
            if batch is None:
                batch = t.shape[0]
            elif t.shape[0] != batch:
                raise ValueError(f"{name}: batch axis {t.shape[0]} differs from the other tensors' {batch}")
        self.batch = int(batch)
        self._tensors: dict[str, torch.Tensor] = dict(tensors)
        self._initial: dict[str, torch.Tensor] = dict(tensors)
        self._snapshots: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.snapshots = 0
        self.keep_snapshots(snapshots)

    # -- reading ---------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise KeyError(f"RecurrentState has no tensor {name!r}; it holds {sorted(self._tensors)}")
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def tensors(self) -> list[torch.Tensor]:
        out = list(self._tensors.values())
        for snap in self._snapshots.values():
            out.extend(snap.values())
        return out

    def state_nbytes(self) -> int:
        """Bytes of the current state alone (without snapshots): constant in the sequence length."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self._tensors.items())
        return f"RecurrentState(seq_len={self.seq_len}, {shapes}, snapshots={self.snapshots})"

    # -- writing ---------------------------------------------------------------------------------------
    def update(self, **tensors: torch.Tensor) -> None:
        """Replace named tensors by new ones of the same shape (the step's new state)."""
        for name, t in tensors.items():
            old = self[name]
            if not isinstance(t, torch.Tensor) or t.shape != old.shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a tensor of shape {tuple(old.shape)}, got {got}")
            self._tensors[name] = t

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` consumed (called by ``step`` after :meth:`update`); records a snapshot."""
        self.seq_len += tokens
        if self.snapshots:
            self._snapshots[self.seq_len] = dict(self._tensors)
            while len(self._snapshots) > self.snapshots:
                self._snapshots.popitem(last=False)

    def keep_snapshots(self, count: int) -> None:
        """Remember the state after each of the last ``count`` steps so that ``crop`` can return there."""
        check_int("snapshots", count, low=0)
        self.snapshots = count
        while len(self._snapshots) > count:
            self._snapshots.popitem(last=False)

    @property
    def crop_points(self) -> list[int]:
        """The lengths ``crop`` can return to."""
        return sorted({0, self.seq_len, *self._snapshots})

    # -- editing ---------------------------------------------------------------------------------------
    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)

        def sel(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: t.index_select(0, index.to(t.device)) for k, t in d.items()}

        self._tensors = sel(self._tensors)
        self._initial = sel(self._initial)
        self._snapshots = OrderedDict((n, sel(s)) for n, s in self._snapshots.items())
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        if length == self.seq_len:
            return
        if length == 0:
            self._tensors = dict(self._initial)
        elif length in self._snapshots:
            self._tensors = dict(self._snapshots[length])
        else:
            raise ValueError(
                f"length: cannot crop this RecurrentState to {length} tokens: a recurrent state sums every token "
                f"into fixed-size tensors and cannot forget the last {self.seq_len - length}; it can return to "
                f"{self.crop_points} only. Keep snapshots (state.keep_snapshots(k)) to return to any of the last k "
                "step boundaries"
            )
        for n in [n for n in self._snapshots if n > length]:
            del self._snapshots[n]
        self.seq_len = length

    def reset(self) -> None:
        """Back to the empty state (``crop(0)``)."""
        self.crop(0)
