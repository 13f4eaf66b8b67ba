"""What a benchmark case is built into (:class:`Built`: the closure to measure), with the pieces every case builder
shares: the dtype names of a spec, the measured modes, the bytes of a decode state and a call's first output.
:mod:`attnzoo.bench.cases` and :mod:`attnzoo.bench.cross` build cases on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
MODES = ("forward", "forward_backward", "decode")


@dataclass
class Built:
    """A case ready to measure: ``run()`` (forward, forward+backward), or ``step(prepare())`` (decode)."""

    run: Callable[[], Any] | None = None
    prepare: Callable[[], Any] | None = None
    step: Callable[[Any], Any] | None = None
    tokens: int = 1  # tokens processed per measured decode call
    info: dict[str, Any] = field(default_factory=dict)


def spec_dtype(spec: dict[str, Any]) -> torch.dtype:
    name = spec.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def state_nbytes(state: Any, _seen: set[int] | None = None) -> int:
    """Bytes of tensor storage held by a decode state of any shape: a DecodeState (``nbytes()``), tensors,
    or containers/objects holding them."""
    seen = set() if _seen is None else _seen
    if state is None or id(state) in seen:
        return 0
    seen.add(id(state))
    if isinstance(state, torch.Tensor):
        return state.untyped_storage().nbytes()
    nb = getattr(state, "nbytes", None)
    if callable(nb):
        return int(nb())
    if isinstance(state, dict):
        return sum(state_nbytes(v, seen) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v, seen) for v in state)
    if hasattr(state, "__dict__"):
        return sum(state_nbytes(v, seen) for v in vars(state).values())
    return 0


def first_output(out):
    """The output of a call that may return (output, extra)."""
    return out[0] if isinstance(out, tuple) else out
