"""Exceptions and the small input checks every public function uses.

Every message names the argument, the value received and what was expected. Nothing is reshaped,
broadcast or cast silently: a check either passes the input through unchanged or raises.
"""

from __future__ import annotations

import difflib
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


def check_key_padding_mask(mask: object, batch: int, nk: int, *, name: str = "key_padding_mask") -> None:
    """A key-padding mask is a bool tensor (B, Nk); True means attend."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool torch.Tensor of shape ({batch}, {nk}), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool (True = attend), got {mask.dtype}")
    if tuple(mask.shape) != (batch, nk):
        raise ValueError(f"{name}: expected shape (B, Nk) = ({batch}, {nk}), got {tuple(mask.shape)}")


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
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a positive float or None, got {scale!r}")
    if not scale > 0:
        raise ValueError(f"scale: expected a positive float or None, got {scale!r}")
