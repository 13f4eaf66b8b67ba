"""Exceptions and the small input checks every public function uses.

Every message names the argument, the value received and what was expected. Nothing is reshaped,
broadcast or cast silently: a check either passes the input through unchanged or raises.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence

import torch


class AttnzooError(Exception):
    """Base class of attnzoo's own errors."""


class UnknownMechanismError(AttnzooError, KeyError):
    """A mechanism name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class UnsupportedPatternError(AttnzooError, ValueError):
    """A mechanism was asked for an attention pattern it does not declare."""


class OptionError(AttnzooError, ValueError):
    """A mechanism option that is unknown or out of its declared range."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean ...?' for the closest names, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def check_tensor(name: str, x: object, *, ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    """Check that ``x`` is a tensor of rank ``ndim`` with a floating dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)} ({x.dim()}-D)")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_qkv(q: object, k: object, v: object) -> tuple[int, int, int, int, int, int, int]:
    """Validate SDPA-layout q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv).

    Returns (B, Hq, Hk, Nq, Nk, D, Dv).
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"k, v: batch size must match q's {B}, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    Hk, Nk = k.shape[1], k.shape[2]
    if k.shape[3] != D:
        raise ValueError(f"k: head dim must equal q's {D}, got k of shape {tuple(k.shape)}")
    if v.shape[1] != Hk or v.shape[2] != Nk:
        raise ValueError(
            f"v: expected (B, Hk, Nk, Dv) = ({B}, {Hk}, {Nk}, Dv) to match k, got {tuple(v.shape)}"
        )
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(
            f"q, k: query heads must be a multiple of key/value heads (grouped-query attention), "
            f"got Hq={Hq}, Hk={Hk}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: devices must match, got {q.device}, {k.device}, {v.device}")
    if Nk == 0:
        raise ValueError(f"k: expected at least one key, got Nk=0 (shape {tuple(k.shape)})")
    return B, Hq, Hk, Nq, Nk, D, v.shape[3]


def check_key_padding_mask(mask: object, batch: int, nk: int, *, name: str = "key_padding_mask",
                           device: torch.device | None = None) -> None:
    """A key-padding mask is a bool tensor (B, Nk) on the inputs' ``device``; True means attend.

    A float mask is refused, not reinterpreted: Hugging Face's additive masks (0 / -inf) and multiplicative
    0/1 weights would both be wrong read as the other, so the message says how to convert.
    """
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool torch.Tensor of shape ({batch}, {nk}), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        hint = ""
        if mask.is_floating_point():
            hint = (" (an additive float mask with 0 = attend and -inf = masked converts with `mask == 0`; "
                    "0/1 weights with `mask > 0`)")
        raise TypeError(f"{name}: expected dtype torch.bool (True = attend), got {mask.dtype}{hint}")
    if tuple(mask.shape) != (batch, nk):
        raise ValueError(f"{name}: expected shape (B, Nk) = ({batch}, {nk}), got {tuple(mask.shape)}")
    if device is not None and mask.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device} (the inputs'), got {mask.device}")


def check_attn_mask(mask: object, shape: Sequence[int], *, name: str = "attn_mask", additive: bool = False) -> None:
    """A dense boolean mask (True = attend), or with ``additive`` a float bias, of shape (Nq, Nk) or
    (B or 1, H or 1, Nq, Nk)."""
    B, H, Nq, Nk = shape
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if additive and not mask.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point additive bias, got dtype {mask.dtype}")
    if not additive and mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool (True = attend), got {mask.dtype}")
    ok = mask.shape == (Nq, Nk) or (
        mask.dim() == 4 and mask.shape[0] in (1, B) and mask.shape[1] in (1, H) and mask.shape[2:] == (Nq, Nk)
    )
    if not ok:
        raise ValueError(
            f"{name}: expected shape ({Nq}, {Nk}) or (B or 1, H or 1, {Nq}, {Nk}) with B={B}, H={H}, "
            f"got {tuple(mask.shape)}"
        )


def check_scale(scale: object) -> None:
    """``scale`` is None (1/sqrt(D)) or a finite positive number (bools refused)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a finite positive float or None, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite positive float or None, got {scale!r}")


# -- the one copy of each scalar check ---------------------------------------------------------------------

BACKENDS: tuple[str, ...] = ("auto", "reference", "fast")
"""The backends of every mechanism: ``auto`` (fast form where it applies, else reference), ``reference``,
``fast`` (error where it does not apply)."""


def check_int(name: str, value: object, *, low: int | None = 1, high: int | None = None) -> int:
    """An int (bools refused) in ``[low, high]``; ``low=None`` / ``high=None`` leave that side open."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int{_range(low, high)}, got {value!r} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: expected an int{_range(low, high)}, got {value!r}")
    return value


def check_float(name: str, value: object, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> float:
    """A finite real number (ints accepted, bools refused) in ``[low, high]`` (``(low, high]`` with
    ``low_open``); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a finite float{_range(low, high, low_open)}, got {value!r} "
                        f"({type(value).__name__})")
    value = float(value)
    bad_low = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or bad_low or (high is not None and value > high):
        raise ValueError(f"{name}: expected a finite float{_range(low, high, low_open)}, got {value!r}")
    return value


def _range(low, high, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def check_pair(name: str, value: object, *, low: int = 1) -> tuple[int, int]:
    """An int or a pair (tuple/list) of ints, each >= ``low`` (bools refused), returned as a pair: kernel sizes,
    dilations, window shapes of 2-D mechanisms."""
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in vals):
        raise ValueError(f"{name}: expected an int >= {low} or a pair of them, got {value!r}")
    return vals  # type: ignore[return-value]


def check_bool(name: str, value: object) -> bool:
    """A real bool (not 0/1, not a tensor)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    """One of ``choices`` (compared with ==; bools are not taken for 0/1)."""
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def check_backend(value: object, name: str = "backend") -> str:
    """One of :data:`BACKENDS`."""
    return check_choice(name, value, BACKENDS)  # type: ignore[return-value]


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Every given tensor on one device (meta included); ``None`` entries are skipped.

    Named by keyword so the message says which argument is elsewhere: ``check_same_device(q=q, k=k)``.
    """
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} ({first_name}'s), got {t.device}")


def check_module_input(module: torch.nn.Module, x: object, *, name: str = "x", layout: str = "(B, N, C)",
                       channels: int | None = None, channel_axis: int = -1) -> torch.Tensor:
    """The input of a module's ``forward``: a floating tensor of ``layout``'s rank, every size >= 1,
    ``channels`` along ``channel_axis``, and the dtype and device of the module's parameters (nothing is
    cast or moved silently). Modules without parameters skip the dtype/device comparison."""
    ndim = layout.count(",") + 1
    check_tensor(name, x, ndim=ndim)
    assert isinstance(x, torch.Tensor)
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name}: expected every size of {layout} to be >= 1, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[channel_axis] != channels:
        want = layout.strip("()").split(", ")
        want[channel_axis] = str(channels)
        raise ValueError(f"{name}: expected ({', '.join(want)}), got shape {tuple(x.shape)}")
    param = next(iter(module.parameters()), None)
    if param is not None:
        if x.dtype != param.dtype:
            raise TypeError(f"{name}: expected dtype {param.dtype} (the module's parameters), got {x.dtype}; "
                            f"convert the module with .to({x.dtype}) or the input with .to({param.dtype})")
        if x.device != param.device:
            raise ValueError(f"{name}: expected device {param.device} (the module's parameters), got {x.device}")
    return x
