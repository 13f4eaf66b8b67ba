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
    """Validate SDPA-layout q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) on one device, of one dtype.

    Empty sizes: B = 0 and Nq = 0 pass (the result is empty); Hq, Hk, Nk, D and Dv must be >= 1 (no heads, no key
    to attend to or no features has no defined result). Returns (B, Hq, Hk, Nq, Nk, D, Dv).
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
    if Hq == 0 or Hk == 0 or Hq % Hk != 0:
        raise ValueError(
            f"q, k: query heads must be a positive multiple of key/value heads (grouped-query attention), "
            f"got Hq={Hq}, Hk={Hk}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if Nk == 0:
        raise ValueError(f"k: expected at least one key, got Nk=0 (shape {tuple(k.shape)})")
    if D == 0:
        raise ValueError(f"q, k: expected a head dim >= 1, got D=0 (q of shape {tuple(q.shape)})")
    if v.shape[3] == 0:
        raise ValueError(f"v: expected a value dim >= 1, got Dv=0 (shape {tuple(v.shape)})")
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
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is not None:
        if x.dtype != param.dtype:
            raise TypeError(f"{name}: expected dtype {param.dtype} (the module's parameters), got {x.dtype}; "
                            f"convert the module with .to({x.dtype}) or the input with .to({param.dtype})")
        if x.device != param.device:
            raise ValueError(f"{name}: expected device {param.device} (the module's parameters), got {x.device}")
    return x


def check_context(module: torch.nn.Module, x: torch.Tensor, context: object, *, channels: int | None = None
                  ) -> torch.Tensor:
    """The ``context`` (B, M, C) of a cross-attention module: ``x``'s batch, M >= 1, ``channels`` channels, and the
    module's dtype and device (as :func:`check_module_input`)."""
    check_module_input(module, context, name="context", channels=channels)
    assert isinstance(context, torch.Tensor)
    if context.shape[0] != x.shape[0]:
        raise ValueError(f"context: expected batch size {x.shape[0]} (x's), got shape {tuple(context.shape)}")
    if context.dtype != x.dtype:
        raise TypeError(f"context: expected dtype {x.dtype} (x's), got {context.dtype}")
    check_same_device(x=x, context=context)
    return context


def check_sequence_call(module: torch.nn.Module, x: object, context: object = None, *, key_padding_mask: object = None,
                        state: object = None, state_type: type | tuple[type, ...] | None = None,
                        channels: int | None = None, context_channels: int | None = None, mech=None) -> torch.Tensor:
    """The arguments of a sequence module's ``forward(x, context=None, *, key_padding_mask=None, state=None)``.

    ``x`` (B, N, ``channels``) and ``context`` (B, M, ``context_channels``) as :func:`check_module_input` (defaults:
    the module's ``dim`` and ``context_dim`` attributes); the mask bool (B, M or N) on x's device; a state only for
    causal self attention (``module.causal``), of ``state_type``, built for x's batch, dtype and device
    (:func:`check_state`); with ``mech`` (the registry record) and no state, the call's pattern must be one it
    supports. Returns the key/value source (``context`` or ``x``).
    """
    channels = getattr(module, "dim", None) if channels is None else channels
    if context_channels is None:
        context_channels = getattr(module, "context_dim", None) or channels
    check_module_input(module, x, channels=channels)
    assert isinstance(x, torch.Tensor)
    if context is not None:
        check_context(module, x, context, channels=context_channels)
    src = x if context is None else context
    assert isinstance(src, torch.Tensor)
    check_key_padding_mask(key_padding_mask, x.shape[0], src.shape[1], device=x.device)
    causal = getattr(module, "causal", None)  # None: a module without the flag (causal-only designs, say)
    if state is not None:
        if context is not None:
            raise ValueError("context: decoding with a state is causal self attention; got a context")
        if causal is False:
            raise ValueError("state: decoding needs a causal layer; build it with causal=True")
        check_state(state, batch=x.shape[0], dtype=x.dtype, device=x.device, state_type=state_type)
    elif mech is not None and causal is not None:
        mech.check_pattern(("causal_" if causal else "noncausal_") + ("self" if context is None else "cross"))
    return src


# -- decode states -----------------------------------------------------------------------------------------

def check_dtype(name: str, dtype: object) -> torch.dtype:
    """A floating-point ``torch.dtype`` (what a decode state computes in)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point torch.dtype, got {dtype!r}")
    return dtype


def check_device(name: str, device: object) -> torch.device:
    """A ``torch.device`` or a name of one (None: the default device); returned as the device tensors land on."""
    try:
        return torch.empty(0, device=device).device  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name}: expected a torch.device or a device name, got {device!r} ({e})") from None


def check_init_state(*, batch: object, kv_heads: object = None, head_dim: object = None, value_dim: object = None,
                     dtype: object = None, device: object = None) -> dict:
    """The arguments of ``init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, ...)``: ints >= 1 (bools
    refused; None skips one), a floating dtype, a device. Returns them with the device resolved, ready for
    :meth:`attnzoo.state.DecodeState.built_for`."""
    out: dict = {"batch": check_int("batch", batch)}
    for name, value in (("kv_heads", kv_heads), ("head_dim", head_dim), ("value_dim", value_dim)):
        out[name] = None if value is None else check_int(name, value)
    out["dtype"] = None if dtype is None else check_dtype("dtype", dtype)
    out["device"] = check_device("device", device)
    return out


def check_state(state: object, *, batch: int, kv_heads: int | None = None, head_dim: int | None = None,
                value_dim: int | None = None, dtype: torch.dtype | None = None, device: torch.device | None = None,
                state_type: type | tuple[type, ...] | None = None, name: str = "state") -> None:
    """A decode state serves this call: of ``state_type`` (if given), and built for the call's batch size, key/value
    heads, head and value dims, dtype and device -- each compared where the state records it
    (:class:`attnzoo.state.DecodeState` attributes ``batch``, ``kv_heads``, ``head_dim``, ``value_dim``, ``dtype``,
    ``device``; None = not recorded) and the call gives it."""
    if state_type is not None and not isinstance(state, state_type):
        types = state_type if isinstance(state_type, tuple) else (state_type,)
        want = " or ".join(t.__name__ for t in types)
        raise TypeError(f"{name}: expected a {want} (from this mechanism's init_state), got {type(state).__name__}")
    for what, want in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("value_dim", value_dim),
                       ("dtype", dtype)):
        have = getattr(state, what, None)
        if want is not None and have is not None and have != want:
            raise ValueError(f"{name}: this {type(state).__name__} was built for {what}={have}, the call has "
                             f"{what}={want}; build a state for this call with init_state")
    have = getattr(state, "device", None)
    if device is not None and have is not None and torch.device(have) != torch.device(device):
        raise ValueError(f"{name}: this {type(state).__name__} lives on device {have}, the call's inputs on {device}")


def check_step(q: object, k: object, v: object, state: object, key_padding_mask: object = None, *,
               scale: object, state_type: type | tuple[type, ...] | None = None) -> tuple[int, int, int, int, int, int]:
    """The arguments of a decode ``step(q, k, v, state, *, scale, key_padding_mask)``: the T >= 1 new tokens q (B, Hq,
    T, D), k (B, Hk, T, D), v (B, Hk, T, Dv) as :func:`check_qkv`, a bool mask (B, T) on their device, a finite
    positive scale, and a state of ``state_type`` built for this batch, heads, dims, dtype and device
    (:func:`check_state`). Returns (B, Hq, Hk, T, D, Dv)."""
    B, Hq, Hk, T, Tk, D, Dv = check_qkv(q, k, v)
    assert isinstance(q, torch.Tensor)
    if T != Tk:
        raise ValueError(f"q, k: a decode step takes as many new queries as new keys, got {T} and {Tk}")
    if T == 0:
        raise ValueError(f"q: a decode step takes T >= 1 new tokens, got shape {tuple(q.shape)}")
    check_scale(scale)
    if scale is None:
        raise TypeError("scale: a decode step takes the score scale explicitly (a finite positive float), got None")
    check_key_padding_mask(key_padding_mask, B, T, device=q.device)
    check_state(state, batch=B, kv_heads=Hk, head_dim=D, value_dim=Dv, dtype=q.dtype, device=q.device,
                state_type=state_type)
    return B, Hq, Hk, T, D, Dv


def check_append(state: object, k: object, v: object, key_padding_mask: object = None) -> int:
    """The T new tokens of a key/value state's ``append(k, v, key_padding_mask)``: k (B, Hk, T, D) and v (B, Hk, T,
    Dv) with the state's recorded batch, kv_heads, head_dim, value_dim, dtype and device, and a bool mask (B, T) on
    that device. Returns T."""
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    assert isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    batch, heads = state.batch, state.kv_heads
    T = k.shape[2]
    want_k = (batch, heads, T, state.head_dim)
    want_v = (batch, heads, T, state.value_dim)
    kind = type(state).__name__
    if tuple(k.shape) != want_k:
        raise ValueError(f"k: expected (B, Hk, T, D) = {want_k} for this cache ({kind}), got {tuple(k.shape)}")
    if tuple(v.shape) != want_v:
        raise ValueError(f"v: expected (B, Hk, T, Dv) = {want_v} for this cache ({kind}), got {tuple(v.shape)}")
    dtype, device = getattr(state, "dtype", None), getattr(state, "device", None)
    if dtype is not None and (k.dtype != dtype or v.dtype != dtype):
        raise TypeError(f"k, v: expected dtype {dtype} for this cache ({kind}), got {k.dtype}, {v.dtype}")
    check_same_device(k=k, v=v)
    if device is not None and k.device != device:
        raise ValueError(f"k, v: expected device {device} (this {type(state).__name__}'s), got {k.device}")
    check_key_padding_mask(key_padding_mask, batch, T, device=k.device)
    return T


# -- module construction -----------------------------------------------------------------------------------

def check_heads(dim: object, heads: object, kv_heads: object = None, *, head_dim: object = None, gqa: bool = True,
                what: str = "this mechanism") -> tuple[int, int, int, int]:
    """(dim, heads, kv_heads, head_dim) of a multi-head module: ints >= 1 (bools refused), ``heads`` a multiple of
    ``kv_heads`` (None: = heads; ``gqa=False`` refuses any other value), ``head_dim`` = dim / heads unless given."""
    dim = check_int("dim", dim)
    heads = check_int("heads", heads)
    kv_heads = heads if kv_heads is None else check_int("kv_heads", kv_heads)
    if not gqa and kv_heads != heads:
        raise ValueError(f"kv_heads: {what} has no grouped-query form; expected None or {heads}, got {kv_heads}")
    if heads % kv_heads:
        raise ValueError(f"kv_heads: heads ({heads}) must be a multiple of kv_heads, got kv_heads={kv_heads}")
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"heads: dim ({dim}) must be divisible by heads, got heads={heads}; "
                             "or pass head_dim explicitly")
        head_dim = dim // heads
    return dim, heads, kv_heads, check_int("head_dim", head_dim)


def check_pattern_flag(mech, causal: object) -> bool:
    """``causal`` of a module's constructor: a bool, and ``mech`` (its registry record) supports at least one
    pattern of that kind."""
    check_bool("causal", causal)
    prefix = "causal_" if causal else "noncausal_"
    if not any(p.startswith(prefix) for p in mech.patterns):
        mech.check_pattern(prefix + "self")  # raises, naming the patterns it does support
    return bool(causal)
