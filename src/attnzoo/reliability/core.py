"""Reliability probes: the outcome rules (a clear error names the argument), the probe record and the call helpers
shared by every probe group."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import registry
from ..errors import AttnzooError
from ..functional import attention
from ..registry import Mechanism
from ..testing import TOL, qkv, rel_err

CLEAR_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, AttnzooError)
"""The exception types a bad input may raise (with a message naming the argument)."""

LARGE_LOGITS_TOL = TOL
"""Relative error allowed with q and k scaled by 100 against float64 on the same rounded inputs: the usual
tolerances (float32 1e-5, bfloat16 2e-2); a softmax of logits ~1e4 is one-hot, so a form that subtracts its row
maximum meets them, and one that overflows or underflows does not."""

LONG_N = 8192
"""The sequence length of the long-sequence probe (``slow``)."""


class ProbeFailure(AssertionError):
    """A probe found a crash inside, a silent wrong answer, or an error that does not name its argument."""


@dataclass(frozen=True)
class Probe:
    """One probe of one mechanism: ``run()`` returns on success and raises :class:`ProbeFailure` otherwise."""

    mech: str
    name: str
    run: Callable[[], None]
    isolate: bool = False  # may kill the interpreter: run it in a subprocess (run_isolated)
    slow: bool = False

    @property
    def id(self) -> str:
        return f"{self.mech}::{self.name}"


# --------------------------------------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------------------------------------
def names_argument(message: str, name: str) -> bool:
    """True when ``message`` names ``name`` as a word (``k`` in ``"k, v: batch size ..."``, not in ``"keys"``)."""
    return re.search(r"(?<![\w.])" + re.escape(name) + r"(?![\w])", message) is not None


def describe_output(out: object) -> str:
    if isinstance(out, tuple):
        out = out[0]
    if isinstance(out, torch.Tensor):
        finite = "" if out.device.type == "meta" or not out.is_floating_point() else (
            ", finite" if bool(torch.isfinite(out).all()) else ", NOT finite")
        return f"a tensor of shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}{finite}"
    return type(out).__name__


def expect_error(call: Callable[[], object], *names: str, contains: str | None = None) -> None:
    """``call()`` must raise a clear error (:data:`CLEAR_ERRORS`) naming one of ``names`` (and holding
    ``contains``); a silent result, another exception or an unnamed argument fails."""
    try:
        out = call()
    except CLEAR_ERRORS as e:
        msg = str(e)
        if not any(names_argument(msg, n) for n in names):
            raise ProbeFailure(f"{type(e).__name__} does not name {' or '.join(names)}: {msg}") from None
        if contains is not None and contains not in msg:
            raise ProbeFailure(f"{type(e).__name__} does not say {contains!r}: {msg}") from None
        return
    except Exception as e:  # noqa: BLE001 - the point: anything else is a crash inside
        raise ProbeFailure(f"crashed inside with {type(e).__name__}: {e}") from None
    raise ProbeFailure(f"accepted silently: returned {describe_output(out)}")


def guarded(call: Callable[[], object], what: str) -> object:
    """Run a call that must succeed; an exception fails the probe with ``what`` said."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001
        raise ProbeFailure(f"{what}: raised {type(e).__name__}: {e}") from None


def close_enough(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    if a.shape != b.shape:
        raise ProbeFailure(f"{what}: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
    err = rel_err(a, b)
    if not (math.isfinite(err) and err <= tol):
        raise ProbeFailure(f"{what}: relative error {err:.3e} > {tol:.1e}")


def first_output(out):
    return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------------------------------------
def default_pattern(mech: Mechanism) -> str:
    return mech.patterns[0]


def call_attention(mech: Mechanism, q, k, v, *, causal: bool | None = None, pattern: str | None = None, **kw):
    pattern = pattern or default_pattern(mech)
    kw = {**mech.test_options, **kw}
    return attention(q, k, v, mechanism=mech.name, causal=pattern.startswith("causal") if causal is None else causal,
                     **kw)


def probe_inputs(mech: Mechanism, pattern: str | None = None, dtype=torch.float64, seed: int = 0):
    return qkv(mech, pattern or default_pattern(mech), dtype, seed=seed)


def with_shape(t: torch.Tensor, axis: int, size: int, seed: int = 5) -> torch.Tensor:
    shape = list(t.shape)
    shape[axis] = size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(t.dtype)


def bad_masks(batch: int, n: int) -> list[tuple[str, object, str | None]]:
    """(name, mask, required text) of key-padding masks that must be refused."""
    ones = torch.ones(batch, n)
    additive = torch.zeros(batch, n)
    additive[:, -1] = float("-inf")
    return [
        ("float", ones, "mask > 0"),
        ("additive", additive, "mask == 0"),
        ("int", torch.ones(batch, n, dtype=torch.long), None),
        ("shape", torch.ones(batch, n + 1, dtype=torch.bool), None),
        ("rank", torch.ones(n, dtype=torch.bool), None),
        ("meta", torch.ones(batch, n, dtype=torch.bool, device="meta"), None),
        ("list", [[True] * n] * batch, None),
    ]


def bad_option_values(opt: registry.Option) -> list[tuple[str, object]]:
    types = opt.type if isinstance(opt.type, tuple) else (opt.type,)
    out: list[tuple[str, object]] = []
    if bool not in types:
        out.append(("bool", True))
    if str not in types:
        out.append(("str", "x"))
    elif opt.choices is not None:
        out.append(("choice", "no_such_choice"))
    if not opt.allow_none and opt.default is not None:
        out.append(("none", None))
    if opt.low is not None:
        low = opt.low - 1 if int in types and float not in types else opt.low - 0.5
        out.append(("low", type(opt.default)(low) if isinstance(opt.default, (int, float)) and not isinstance(
            opt.default, bool) else low))
    if opt.high is not None:
        high = opt.high + 1 if int in types and float not in types else opt.high + 0.5
        out.append(("high", high))
    return out
