"""The reliability probes: what every registered mechanism does with bad, empty, extreme and adversarial input.

Where :mod:`attnzoo.testing` checks that a mechanism computes the right thing on good input, these probes check
that it never computes a wrong thing quietly: bad input gets a clear error, empty sizes get the empty result or a
clear error, large logits stay finite, fully masked rows give zeros, a NaN is not hidden, decode states refuse calls
they were not built for and roll back (``crop``) and reorder (``reorder``) exactly. ``tests/reliability`` runs them
over the whole registry; run them on your own mechanism with :func:`run_all` (or :func:`probes` + :func:`run`).

An error is correct only if it is a ``ValueError``/``TypeError`` (or an attnzoo error) whose message names the
argument; anything else (a ``RuntimeError``/``IndexError`` from deep inside, a silent result) fails the probe. A
probe that could kill the interpreter (empty sizes reach integer divisions in C kernels) runs in a subprocess:
:func:`run_isolated` runs a batch of them in one child and survives a crash, charging it to the probe that was
running.

Probe groups (the first part of a probe's name):
- ``attention.*``: ``attnzoo.attention`` with a bad argument (rank, sizes, dtype, device, non-tensor, mask dtype,
  shape and device, scale, causal, backend, each option out of its range).
- ``empty.*``: B = 0 / Nq = 0 give the empty result; N = 0, Nk = 0, D = 0, Dv = 0, no heads, and empty module
  inputs give an error naming the argument (the contract in ARCHITECTURE.md, "Errors").
- ``build.*``, ``module.*``: ``attnzoo.build`` with bad integers; a module's ``forward`` with a bad ``x``,
  ``context`` or mask, and ``x`` of another dtype or device than the module's parameters.
- ``init_state.*``, ``step.*``, ``state.*``: bad integers and dtypes for ``init_state``; ``step`` (or a module's
  ``forward(state=...)``) with bad masks, a scale out of range, and a state built for another batch size, head
  count, head size, dtype or device, or of another type; ``crop``/``reorder`` with bad arguments and their
  semantics (crop then continue == decoding the prefix afresh; reorder == decoding the reordered batch); a state's
  own ``append`` with bad masks.
- ``numeric.*``: large logits (q, k x 100 in float32 and bfloat16 against float64), fully masked rows (zeros, no
  NaN, finite gradients), NaN propagation (a NaN in an input shows in its batch row and stays there), tied scores
  (identical keys: fast == reference, decode == forward), and long sequences (N = 8192 through the fast form with the
  default options; ``slow`` for forms whose complexity is quadratic).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch

from . import registry
from .errors import AttnzooError
from .functional import attention
from .layers import build
from .registry import Mechanism
from .testing import TOL, Sizes, make_module, module_inputs, position_kwargs, qkv, rel_err

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


def _describe(out: object) -> str:
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
    raise ProbeFailure(f"accepted silently: returned {_describe(out)}")


def _guard(call: Callable[[], object], what: str) -> object:
    """Run a call that must succeed; an exception fails the probe with ``what`` said."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001
        raise ProbeFailure(f"{what}: raised {type(e).__name__}: {e}") from None


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    if a.shape != b.shape:
        raise ProbeFailure(f"{what}: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
    err = rel_err(a, b)
    if not (math.isfinite(err) and err <= tol):
        raise ProbeFailure(f"{what}: relative error {err:.3e} > {tol:.1e}")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------------------------------------
def _pattern(mech: Mechanism) -> str:
    return mech.patterns[0]


def _fn(mech: Mechanism, q, k, v, *, causal: bool | None = None, pattern: str | None = None, **kw):
    pattern = pattern or _pattern(mech)
    kw = {**mech.test_options, **kw}
    return attention(q, k, v, mechanism=mech.name, causal=pattern.startswith("causal") if causal is None else causal,
                     **kw)


def _inputs(mech: Mechanism, pattern: str | None = None, dtype=torch.float64, seed: int = 0):
    return qkv(mech, pattern or _pattern(mech), dtype, seed=seed)


def _with_shape(t: torch.Tensor, axis: int, size: int, seed: int = 5) -> torch.Tensor:
    shape = list(t.shape)
    shape[axis] = size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(t.dtype)


def _bad_masks(batch: int, n: int) -> list[tuple[str, object, str | None]]:
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


def _bad_option_values(opt: registry.Option) -> list[tuple[str, object]]:
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


# --------------------------------------------------------------------------------------------------------
# Probes of attnzoo.attention
# --------------------------------------------------------------------------------------------------------
def _attention_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None]]]:
    q, k, v = _inputs(mech)
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    out: list[tuple[str, Callable[[], None]]] = []

    def add(name, call, *names, contains=None):
        out.append((name, lambda: expect_error(call, *names, contains=contains)))

    add("attention.q_list", lambda: _fn(mech, q.tolist(), k, v), "q")
    add("attention.q_rank", lambda: _fn(mech, q[0], k, v), "q")
    add("attention.k_rank", lambda: _fn(mech, q, k.unsqueeze(0), v), "k")
    add("attention.v_rank", lambda: _fn(mech, q, k, v[..., 0]), "v")
    add("attention.q_int", lambda: _fn(mech, q.long(), k.long(), v.long()), "q")
    add("attention.dtype_mix", lambda: _fn(mech, q, k.float(), v), "q", "k", "v")
    add("attention.k_head_dim", lambda: _fn(mech, q, _with_shape(k, 3, D + 1), v), "k")
    add("attention.v_length", lambda: _fn(mech, q, k, _with_shape(v, 2, Nk + 1)), "v")
    add("attention.batch_mismatch", lambda: _fn(mech, q, k[:1], v[:1]) if B > 1 else
        _fn(mech, q, _with_shape(k, 0, 2), _with_shape(v, 0, 2)), "k", "v", "q")
    add("attention.heads_not_divisible", lambda: _fn(mech, _with_shape(q, 1, Hk + 1) if Hk > 1 else q,
                                                      k if Hk > 1 else _with_shape(k, 1, Hq + 1),
                                                      v if Hk > 1 else _with_shape(v, 1, Hq + 1)), "q", "k")
    add("attention.k_meta", lambda: _fn(mech, q, k.to("meta"), v), "k", "q")
    add("attention.v_meta", lambda: _fn(mech, q, k, v.to("meta")), "v", "q")
    for label, value in (("inf", math.inf), ("nan", math.nan), ("zero", 0.0), ("negative", -1.0), ("str", "1"),
                         ("bool", True)):
        add(f"attention.scale_{label}", lambda value=value: _fn(mech, q, k, v, scale=value), "scale")
    add("attention.causal_int", lambda: _fn(mech, q, k, v, causal=1), "causal")
    add("attention.backend", lambda: _fn(mech, q, k, v, backend="gpu"), "backend")
    add("attention.unknown_option", lambda: _fn(mech, q, k, v, no_such_option=1), "no_such_option")
    for label, mask, contains in _bad_masks(B, Nk):
        add(f"attention.mask_{label}", lambda mask=mask: _fn(mech, q, k, v, key_padding_mask=mask),
            "key_padding_mask", contains=contains)
    for opt in mech.options:
        for label, value in _bad_option_values(opt):
            add(f"attention.option_{opt.name}_{label}", lambda opt=opt, value=value: _fn(
                mech, q, k, v, **{opt.name: value}), opt.name)
    return out


def _empty_functional_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None]]]:
    pattern = _pattern(mech)
    causal = pattern.startswith("causal")
    out: list[tuple[str, Callable[[], None]]] = []

    def empty_result(q, k, v, pattern):
        def run():
            got = _guard(lambda: _fn(mech, q, k, v, pattern=pattern), "an empty call")
            want = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != want or got.dtype != q.dtype:
                raise ProbeFailure(f"expected an empty result of shape {want}, dtype {q.dtype}; got {_describe(got)}")
        return run

    q, k, v = _inputs(mech)
    out.append(("empty.batch", empty_result(q[:0], k[:0], v[:0], pattern)))
    cross = [p for p in mech.patterns if p.endswith("cross")]
    if cross:
        qc, kc, vc = _inputs(mech, cross[0])
        out.append(("empty.queries", empty_result(qc[:, :, :0], kc, vc, cross[0])))
    for name, (qq, kk, vv), names in (
        ("empty.length", (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ("k", "q")),
        ("empty.keys", (q, k[:, :, :0], v[:, :, :0]), ("k",)),
        ("empty.head_dim", (q[..., :0], k[..., :0], v), ("q", "k")),
        ("empty.value_dim", (q, k, v[..., :0]), ("v",)),
        ("empty.heads", (q[:, :0], k[:, :0], v[:, :0]), ("q", "k")),
    ):
        out.append((name, lambda qq=qq, kk=kk, vv=vv, names=names: expect_error(
            lambda: _fn(mech, qq, kk, vv, causal=causal), *names)))
    return out


# --------------------------------------------------------------------------------------------------------
# Probes of modules (a mechanism's own, or the generic Attention around a functional one)
# --------------------------------------------------------------------------------------------------------
def _module_pattern(mech: Mechanism) -> str:
    return _pattern(mech) if mech.kind in ("sequence", "fusion") else "noncausal_self"


def _module(mech: Mechanism, pattern: str | None = None, dtype=torch.float64):
    return make_module(mech, pattern or _module_pattern(mech), dtype)


def _call_module(mod, mech: Mechanism, x, ctx=None, **kw):
    if mech.kind not in ("sequence", "fusion"):
        return mod(x, **kw)
    return mod(x, ctx, **kw) if ctx is not None else mod(x, **kw)


def _takes_context(mod, mech: Mechanism, x, ctx) -> bool:
    """False when the module refuses a good context with a clear error naming it (a self-attention module of a
    record whose cross pattern belongs to its functional form); True when it takes it."""
    try:
        _call_module(mod, mech, x, ctx)
    except CLEAR_ERRORS as e:
        if names_argument(str(e), "context"):
            return False
        raise ProbeFailure(f"a good context raised {type(e).__name__}: {e}") from None
    return True


def _one_source(ctx, fn):
    """``ctx`` with ``fn`` applied to its one tensor, or to the first source of a {source: tensor} context (the
    others stay good, so an error must come from that source)."""
    if isinstance(ctx, dict):
        first = next(iter(ctx))
        return {**ctx, first: fn(ctx[first])}
    return fn(ctx)


def _source_mask(ctx, mask):
    """A key-padding mask for ``ctx``: the mask itself for one tensor, {first source: mask} for named sources."""
    return {next(iter(ctx)): mask} if isinstance(ctx, dict) else mask


def _context_length(ctx) -> int:
    return (next(iter(ctx.values())) if isinstance(ctx, dict) else ctx).shape[1]


def _build_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None]]]:
    s = Sizes.of(mech)
    out = []
    extra = {} if mech.kind != "sequence" else {"causal": _module_pattern(mech).startswith("causal")}
    for arg, good in (("dim", s.dim), ("heads", s.heads)):
        for label, value in (("zero", 0), ("negative", -good), ("float", float(good)), ("bool", True)):
            args = {"dim": s.dim, "heads": s.heads, arg: value}
            out.append((f"build.{arg}_{label}", lambda args=args, arg=arg: expect_error(
                lambda: build(mech.name, args["dim"], args["heads"], **extra, **mech.test_options), arg)))
    if mech.kind == "sequence":
        out.append(("build.causal_int", lambda: expect_error(
            lambda: build(mech.name, s.dim, s.heads, causal=1, **mech.test_options), "causal")))
    return out


def _module_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None]]]:
    pattern = _module_pattern(mech)
    mod = _module(mech, pattern)
    x, ctx = module_inputs(mech, pattern)  # a context when the module's first pattern is cross
    caxis = 1 if mech.kind == "channel" else -1
    out: list[tuple[str, Callable[[], None]]] = []

    def add(name, call, *names, contains=None):
        out.append((name, lambda: expect_error(call, *names, contains=contains)))

    add("module.x_list", lambda: _call_module(mod, mech, x.tolist(), ctx), "x")
    add("module.x_rank", lambda: _call_module(mod, mech, x[0], ctx), "x")
    add("module.x_channels", lambda: _call_module(mod, mech, _with_shape(x, caxis, x.shape[caxis] + 1), ctx), "x")
    add("module.x_int", lambda: _call_module(mod, mech, x.long(), ctx), "x")
    add("module.x_dtype", lambda: _call_module(mod, mech, x.float(), ctx), "x")
    add("module.x_meta", lambda: _call_module(mod, mech, x.to("meta"), ctx), "x")
    if mech.kind != "sequence":
        return out

    def mask_probes(prefix, m, xx, cc, only_if=None):
        """Bad key-padding masks: over x for self patterns, over the context (one source's, by name, for named
        sources) for cross patterns. ``only_if()`` False: the probe has nothing to check (passes)."""
        n = xx.shape[1] if cc is None else _context_length(cc)

        def probe(call, contains=None):
            def run():
                if only_if is None or only_if():
                    expect_error(call, "key_padding_mask", contains=contains)
            return run

        for label, mask, contains in _bad_masks(xx.shape[0], n):
            out.append((f"{prefix}_{label}", probe(lambda mask=mask: _call_module(
                m, mech, xx, cc, key_padding_mask=mask if cc is None else _source_mask(cc, mask)), contains)))
        if isinstance(cc, dict):
            good = torch.ones(xx.shape[0], n, dtype=torch.bool)
            out.append((f"{prefix}_unknown_source", probe(lambda: _call_module(m, mech, xx, cc, key_padding_mask={
                "no_such_source": good}))))

    mask_probes("module.mask", mod, x, ctx)
    cross = [p for p in mech.patterns if p.endswith("cross")]
    if cross:
        cmod = mod if ctx is not None else _module(mech, cross[0])
        xc, cc = (x, ctx) if ctx is not None else module_inputs(mech, cross[0])
        if ctx is None:  # the module's first pattern is self: its context masks too, if its forward takes one
            mask_probes("module.context_mask", cmod, xc, cc, only_if=lambda: _takes_context(cmod, mech, xc, cc))

        def bad(fn):
            return lambda: _call_module(cmod, mech, xc, _one_source(cc, fn))

        add("module.context_list", bad(lambda c: c.tolist()), "context")
        add("module.context_channels", bad(lambda c: _with_shape(c, 2, c.shape[2] + 1)), "context")
        add("module.context_batch", bad(lambda c: _with_shape(c, 0, c.shape[0] + 1)), "context")
        add("module.context_dtype", bad(lambda c: c.float()), "context")
        add("module.context_int", bad(lambda c: c.long()), "context")
        add("module.context_meta", bad(lambda c: c.to("meta")), "context")
        add("module.context_rank", bad(lambda c: c[0]), "context")
        if isinstance(cc, dict):
            add("module.context_unknown_source", lambda: _call_module(
                cmod, mech, xc, {**cc, "no_such_source": next(iter(cc.values()))}), "context")
    return out


def _empty_module_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None]]]:
    pattern = _module_pattern(mech)
    x, ctx = module_inputs(mech, pattern)
    out = []
    axes = {"batch": 0}
    if mech.kind in ("sequence", "pooling"):
        axes["length"] = 1
    elif mech.kind == "grid":
        axes.update(height=1, width=2)
    elif mech.kind == "channel":
        axes.update(height=2, width=3)
    for label, axis in axes.items():
        def run(axis=axis):
            mod = _module(mech, pattern)
            expect_error(lambda: _call_module(mod, mech, x.narrow(axis, 0, 0), ctx), "x")
        out.append((f"empty.module_{label}", run))
    cross = [p for p in mech.patterns if p.endswith("cross")] if mech.kind == "sequence" else []
    if cross:
        def run_ctx():
            mod = _module(mech, cross[0])
            xc, ctx = module_inputs(mech, cross[0])
            expect_error(lambda: _call_module(mod, mech, xc, _one_source(ctx, lambda c: c[:, :0])), "context")
        out.append(("empty.module_context", run_ctx))
    return out


# --------------------------------------------------------------------------------------------------------
# Decoding: a uniform view of functional steps and module states
# --------------------------------------------------------------------------------------------------------
def decode_chunks(start: int, stop: int, pos: int, prefill: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) that decode tokens ``start .. stop - 1`` into a state holding ``pos`` positions: one token
    each, except a first step reaching position ``prefill`` (:meth:`Mechanism.min_prefill`: a bidirectional region
    that decoding must take in one step) while the state holds fewer."""
    out, t = [], start
    while t < stop:
        size = max(1, min(stop - t, prefill - pos)) if t == start else 1
        out.append((t, t + size))
        t += size
    return out


def _seq_len(state, prefill: int) -> int:
    return 0 if prefill <= 1 else state.seq_len


class _Decoder:
    """Decode through ``mech.step`` (functional) or ``module(x, state=...)`` on token slices."""

    def __init__(self, mech: Mechanism, functional: bool, batch: int | None = None) -> None:
        self.mech, self.functional = mech, functional
        self.s = replace(Sizes.of(mech), **({} if batch is None else {"batch": batch}))
        self.opts = mech.resolve_options(dict(mech.test_options))
        self.scale = 1.0 / math.sqrt(self.s.head_dim)
        self.prefill = mech.min_prefill(self.opts)
        if not functional:
            self.mod = _module(mech, "causal_self")
            self.mod.eval()

    def tokens(self, n: int, seed: int = 0, batch: int | None = None):
        s = self.s
        B = s.batch if batch is None else batch
        g = torch.Generator().manual_seed(seed)
        if self.functional:
            return tuple(torch.randn(B, h, n, d, generator=g, dtype=torch.float64) for h, d in (
                (s.heads, s.head_dim), (s.kv_heads, s.head_dim), (s.kv_heads, s.value_dim)))
        return torch.randn(B, n, s.dim, generator=g, dtype=torch.float64)

    @staticmethod
    def take(tok, a: int, b: int, index: torch.Tensor | None = None):
        if isinstance(tok, tuple):
            return tuple(_Decoder.take(t, a, b, index) for t in tok)
        t = tok[:, :, a:b] if tok.dim() == 4 else tok[:, a:b]
        return t if index is None else t.index_select(0, index)

    def init(self, batch: int | None = None, **overrides):
        s = self.s
        if self.functional:
            kw = dict(batch=s.batch if batch is None else batch, kv_heads=s.kv_heads, head_dim=s.head_dim,
                      value_dim=s.value_dim, dtype=torch.float64, device=torch.device("cpu"))
            kw.update(overrides)
            return self.mech.init_state(**kw, **self.opts)
        return self.mod.init_state(s.batch if batch is None else batch, **overrides)

    def step(self, tok, state, **kw):
        if self.functional:
            q, k, v = tok
            return self.mech.step(q, k, v, state, **{"scale": self.scale, **kw}, **self.opts)
        return _first(self.mod(tok, state=state, **kw))

    def run(self, tok, state, start: int, stop: int, index=None) -> torch.Tensor | None:
        """Decode tokens ``start .. stop - 1`` one at a time, after a first step reaching the record's
        ``min_prefill`` when the state holds fewer positions (None when there are none)."""
        outs = [self.step(self.take(tok, a, b, index), state)
                for a, b in decode_chunks(start, stop, _seq_len(state, self.prefill), self.prefill)]
        return torch.cat(outs, dim=2 if self.functional else 1) if outs else None


def _kpm_probe_state(dec: _Decoder):
    """A fresh state and one token of input for the step probes."""
    return dec.init(), dec.take(dec.tokens(1), 0, 1)


def _decode_probes(mech: Mechanism, functional: bool) -> list[tuple[str, Callable[[], None]]]:
    pre = "" if functional else "module_"
    prefix = pre + "step"
    dec = _Decoder(mech, functional)
    s = dec.s
    out: list[tuple[str, Callable[[], None]]] = []

    def add(name, call, *names, contains=None):
        out.append((name, lambda: expect_error(call, *names, contains=contains)))

    # init_state: bad integers and dtypes
    if functional:
        for arg in ("batch", "kv_heads", "head_dim", "value_dim"):
            for label, value in (("zero", 0), ("negative", -1), ("bool", True), ("float", 2.0)):
                add(f"init_state.{arg}_{label}", lambda arg=arg, value=value: dec.init(**{arg: value}), arg)
        add("init_state.dtype_int", lambda: dec.init(dtype=torch.int64), "dtype")
        add("init_state.dtype_str", lambda: dec.init(dtype="float32"), "dtype")
    else:
        for label, value in (("zero", 0), ("negative", -1), ("bool", True), ("float", 2.0)):
            add(f"module_init_state.batch_{label}", lambda value=value: dec.init(batch=value), "batch_size", "batch")

    # masks and scale at step time
    for label, mask, contains in _bad_masks(s.batch, 1):
        def call(mask=mask):
            state, tok = _kpm_probe_state(dec)
            return dec.step(tok, state, key_padding_mask=mask)
        add(f"{prefix}.mask_{label}", call, "key_padding_mask", contains=contains)
    if functional:
        for label, value in (("inf", math.inf), ("zero", 0.0), ("nan", math.nan)):
            def call(value=value):
                state, tok = _kpm_probe_state(dec)
                return dec.step(tok, state, scale=value)
            add(f"step.scale_{label}", call, "scale")
        add("step.q_rank", lambda: dec.step((dec.tokens(1)[0][0],) + dec.tokens(1)[1:], dec.init()), "q")
        add("step.length_mismatch", lambda: dec.step(
            (dec.tokens(2)[0],) + dec.take(dec.tokens(1), 0, 1)[1:], dec.init()), "q", "k", "v")
        add("step.no_tokens", lambda: dec.step(dec.take(dec.tokens(1), 0, 0), dec.init()), "q", "k", "v")
        add("step.k_meta", lambda: dec.step(tuple(t.to("meta") if i == 1 else t for i, t in enumerate(
            dec.tokens(1))), dec.init()), "k", "q")

    # a state built for another call
    tok = dec.take(dec.tokens(1), 0, 1)
    add(f"{prefix}.state_wrong_type", lambda: dec.step(tok, object()), "state")
    add(f"{prefix}.state_batch", lambda: dec.step(tok, dec.init(batch=s.batch + 1)), "state")
    if functional:
        add("step.state_kv_heads", lambda: dec.step(tok, dec.init(kv_heads=s.kv_heads * 2)), "state")
        add("step.state_head_dim", lambda: dec.step(tok, dec.init(head_dim=s.head_dim + 1)), "state")
        add("step.state_value_dim", lambda: dec.step(tok, dec.init(value_dim=s.value_dim + 1)), "state")
        add("step.state_dtype", lambda: dec.step(tok, dec.init(dtype=torch.float32)), "state")
        add("step.state_meta", lambda: dec.step(tok, dec.init(device=torch.device("meta"))), "state")
    else:
        params = inspect.signature(dec.mod.init_state).parameters
        takes = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        for label, kw, bad in (("dtype", {"dtype": torch.float32}, lambda t: t.is_floating_point()
                                and t.dtype != torch.float64),
                               ("meta", {"device": torch.device("meta")}, lambda t: t.device.type == "meta")):
            if label == "dtype" and "dtype" not in takes or label == "meta" and "device" not in takes:
                continue

            def run(kw=kw, bad=bad):
                try:
                    state = dec.init(**kw)
                except CLEAR_ERRORS as e:  # refused when built: fine, if it says so
                    if not any(names_argument(str(e), n) for n in ("dtype", "device", "state")):
                        raise ProbeFailure(f"init_state({kw}) raised {type(e).__name__} not naming dtype/device: "
                                           f"{e}") from None
                    return
                try:
                    dec.step(tok, state)
                except CLEAR_ERRORS as e:
                    if not names_argument(str(e), "state"):
                        raise ProbeFailure(f"{type(e).__name__} does not name state: {e}") from None
                    return
                except Exception as e:  # noqa: BLE001
                    raise ProbeFailure(f"crashed inside with {type(e).__name__}: {e}") from None
                used = [t for t in state.tensors() if bad(t)]
                if used:
                    raise ProbeFailure(f"accepted a state built with {kw} and computed with it "
                                       f"({len(used)} of its tensors are {used[0].dtype} on {used[0].device})")
            out.append((f"module_step.state_{label}", run))

    # crop / reorder arguments
    decoded_len = max(2, dec.prefill)  # a state holding this many positions (at least the record's prefill)

    def decoded():
        state = dec.init()
        dec.run(dec.tokens(decoded_len), state, 0, decoded_len)
        return state

    for label, value in (("negative", -1), ("beyond", decoded_len + 1), ("float", 1.5), ("bool", True)):
        add(f"{pre}state.crop_{label}", lambda value=value: decoded().crop(value), "length")
    for label, value in (("out_of_range", torch.tensor([0, s.batch])), ("negative", torch.tensor([-1])),
                         ("float", torch.tensor([0.0])), ("rank", torch.zeros(1, 1, dtype=torch.long)),
                         ("list", [0])):
        add(f"{pre}state.reorder_{label}", lambda value=value: decoded().reorder(value), "index")

    # a state's own append (KV-style caches): bad masks
    try:
        append = getattr(dec.init(), "append", None)
    except Exception:  # noqa: BLE001 - init_state's own probes report it
        append = None
    if functional and append is not None and list(inspect.signature(append).parameters)[:3] == [
            "k", "v", "key_padding_mask"]:
        for label, mask, contains in _bad_masks(s.batch, 1):
            def call(mask=mask):
                _, k, v = dec.take(dec.tokens(1), 0, 1)
                return dec.init().append(k, v, mask)
            add(f"state.append_mask_{label}", call, "key_padding_mask", contains=contains)

    # semantics
    out.append((f"{pre}state.crop_continue", lambda: _crop_continue(dec, partial=True)))
    out.append((f"{pre}state.crop_zero", lambda: _crop_continue(dec, partial=False)))
    out.append((f"{pre}state.reorder_continue", lambda: _reorder_continue(dec)))
    return out


def _crop_continue(dec: _Decoder, *, partial: bool) -> None:
    """Decode n tokens, crop to m, decode new tokens == decode the first m then the new tokens afresh (a crop may be
    refused with an error naming ``length``)."""
    n = max(dec.s.n, 4, 2 * dec.prefill + 2)  # the cut (crop point, reorder point) lies past the prefill
    m = n - 2 if partial else 0
    tok, new = dec.tokens(n, seed=0), dec.tokens(n - m, seed=7)
    state = dec.init()
    _guard(lambda: dec.run(tok, state, 0, n), "decoding")
    try:
        state.crop(m)
    except CLEAR_ERRORS as e:
        if names_argument(str(e), "length"):
            return  # refused: this state cannot roll back that far, and says so
        raise ProbeFailure(f"crop({m}) raised {type(e).__name__} not naming length: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ProbeFailure(f"crop({m}) crashed inside with {type(e).__name__}: {e}") from None
    if state.seq_len != m:
        raise ProbeFailure(f"after crop({m}) seq_len is {state.seq_len}")
    got = _guard(lambda: dec.run(new, state, 0, n - m), f"decoding after crop({m})")
    fresh = dec.init()
    _guard(lambda: dec.run(tok, fresh, 0, m), "decoding the prefix afresh")
    want = _guard(lambda: dec.run(new, fresh, 0, n - m), "decoding the prefix afresh")
    _close(got, want, TOL[torch.float64], f"crop({m}) then new tokens vs the prefix decoded afresh")


def _reorder_continue(dec: _Decoder) -> None:
    """Decode B rows, reorder with [last, 0, 0], decode new tokens == decoding the reordered rows afresh."""
    n = max(dec.s.n, 4, 2 * dec.prefill + 2)  # the cut (crop point, reorder point) lies past the prefill
    t = n // 2
    B = dec.s.batch
    index = torch.tensor([B - 1, 0, 0])
    tok, new = dec.tokens(t, seed=0), dec.tokens(n - t, seed=7, batch=3)
    state = dec.init()
    _guard(lambda: dec.run(tok, state, 0, t), "decoding")
    try:
        state.reorder(index)
    except Exception as e:  # noqa: BLE001
        raise ProbeFailure(f"reorder({index.tolist()}) raised {type(e).__name__}: {e}") from None
    got = _guard(lambda: dec.run(new, state, 0, n - t), "decoding after reorder")
    fresh = dec.init(batch=3)
    _guard(lambda: dec.run(tok, fresh, 0, t, index=index), "decoding the reordered rows afresh")
    want = _guard(lambda: dec.run(new, fresh, 0, n - t), "decoding the reordered rows afresh")
    _close(got, want, TOL[torch.float64], f"reorder({index.tolist()}) then new tokens vs the reordered rows afresh")


# --------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------
def _large_logits(mech: Mechanism, dtype: torch.dtype) -> None:
    pattern = _pattern(mech)
    q, k, v = (t.to(dtype) for t in _inputs(mech, pattern))
    q, k = (q.double() * 100).to(dtype), (k.double() * 100).to(dtype)
    lo = _guard(lambda: _fn(mech, q, k, v), f"{dtype} with q, k x 100")
    hi = _guard(lambda: _fn(mech, q.double(), k.double(), v.double()), "float64 with q, k x 100")
    if not bool(torch.isfinite(lo).all()):
        raise ProbeFailure(f"{dtype} with q, k x 100: non-finite output")
    _close(lo.double(), hi, LARGE_LOGITS_TOL[dtype], f"{dtype} vs float64 with q, k x 100")


def _fully_masked(mech: Mechanism) -> None:
    """A batch row whose keys are all masked returns zeros (no NaN, finite gradients); causal self attention: query 0
    with key 0 masked too. Every declared pattern."""
    for pattern in mech.patterns:
        _fully_masked_pattern(mech, pattern)


def _fully_masked_pattern(mech: Mechanism, pattern: str) -> None:
    q, k, v = (t.requires_grad_(True) for t in _inputs(mech, pattern))
    mask = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool)
    mask[-1] = False
    if pattern == "causal_self":
        mask[0, 0] = False
    out = _guard(lambda: _fn(mech, q, k, v, pattern=pattern, key_padding_mask=mask), f"{pattern}: masked call")
    if not bool(torch.isfinite(out).all()):
        raise ProbeFailure(f"{pattern}: non-finite output with a fully masked batch row")
    dead = out[-1].abs().max().item()
    if dead != 0:
        raise ProbeFailure(f"{pattern}: the batch row with every key masked returned |out| up to {dead:.3e}, "
                           "expected zeros")
    if pattern == "causal_self" and out[0, :, 0].abs().max().item() != 0:
        raise ProbeFailure(f"{pattern}: query 0 with key 0 masked sees no key but did not return zeros")
    grads = _guard(lambda: torch.autograd.grad(out.square().sum() + out.sum(), (q, k, v)), f"{pattern}: backward")
    for name, g in zip("qkv", grads):
        if not bool(torch.isfinite(g).all()):
            raise ProbeFailure(f"{pattern}: non-finite gradient of {name} with a fully masked batch row")


def _fully_masked_module(mech: Mechanism) -> None:
    """A module with a fully masked batch row: finite output and input gradients, every declared pattern."""
    for pattern in mech.patterns:
        _fully_masked_module_pattern(mech, pattern)


def _fully_masked_module_pattern(mech: Mechanism, pattern: str) -> None:
    mod = _module(mech, pattern)
    x, ctx = module_inputs(mech, pattern)
    x.requires_grad_(True)

    def masked(n):
        mask = torch.ones(x.shape[0], n, dtype=torch.bool)
        mask[-1] = False
        return mask

    if ctx is None:
        mask = masked(x.shape[1])
    elif isinstance(ctx, dict):  # every source masked in the last batch row
        mask = {name: masked(c.shape[1]) for name, c in ctx.items()}
    else:
        mask = masked(ctx.shape[1])
    pos = position_kwargs(mod, mech, x, ctx)
    out = _first(_guard(lambda: _call_module(mod, mech, x, ctx, key_padding_mask=mask, **pos),
                        f"{pattern}: masked call"))
    if not bool(torch.isfinite(out).all()):
        raise ProbeFailure(f"{pattern}: non-finite output with a fully masked batch row")
    (g,) = _guard(lambda: torch.autograd.grad(out.square().sum(), (x,)), f"{pattern}: backward")
    if not bool(torch.isfinite(g).all()):
        raise ProbeFailure(f"{pattern}: non-finite gradient with a fully masked batch row")


def _nan_case(clean: torch.Tensor, dirty: torch.Tensor, what: str) -> None:
    if not bool(torch.isnan(dirty[0]).any()):
        raise ProbeFailure(f"a NaN in {what} of batch row 0 vanished: row 0 of the output has no NaN")
    if not bool(torch.isfinite(dirty[1:]).all()):
        raise ProbeFailure(f"a NaN in {what} of batch row 0 leaked into other batch rows")
    _close(dirty[1:], clean[1:], TOL[torch.float64], f"other batch rows with a NaN in {what} of row 0")


def _nan_propagation(mech: Mechanism, which: str) -> None:
    """A NaN in the last query of batch row 0 (head 0), or in every key / value of batch row 0 (head 0: a sparse
    mechanism may legitimately never read one given key), shows in row 0 of the output and only there."""
    q, k, v = _inputs(mech)
    clean = _fn(mech, q, k, v)
    t = {"q": q, "k": k, "v": v}[which].clone()
    if which == "q":
        t[0, 0, -1, 0] = float("nan")
    else:
        t[0, 0, :, 0] = float("nan")
    args = {"q": q, "k": k, "v": v, which: t}
    dirty = _guard(lambda: _fn(mech, args["q"], args["k"], args["v"]), f"a NaN in {which}")
    _nan_case(clean, dirty, "q (last position, head 0)" if which == "q" else f"{which} (head 0, every position)")


def _nan_module(mech: Mechanism) -> None:
    pattern = _module_pattern(mech)
    mod = _module(mech, pattern)
    mod.eval()
    x, ctx = module_inputs(mech, pattern)
    clean = _first(_call_module(mod, mech, x, ctx))
    x2 = x.clone()
    x2.view(x.shape[0], -1)[0, -1] = float("nan")
    dirty = _first(_guard(lambda: _call_module(mod, mech, x2, ctx), "a NaN in x"))
    _nan_case(clean, dirty, "x (last element)")


TIE_N = 40
"""Sequence length of the tied-score probes (long enough for several blocks/chunks of the test options)."""


def _tied_functional(mech: Mechanism) -> None:
    """Every key equal (all scores tie): fast == reference, and step decoding == the causal reference."""
    s = replace(Sizes.of(mech), n=TIE_N)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(s.batch, s.heads, s.n, s.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(s.batch, s.kv_heads, 1, s.head_dim, generator=g, dtype=torch.float64).expand(-1, -1, s.n, -1)
    v = torch.randn(s.batch, s.kv_heads, s.n, s.value_dim, generator=g, dtype=torch.float64)
    for pattern in [p for p in mech.patterns if p.endswith("self")]:
        _tied_functional_pattern(mech, pattern, s, q, k.contiguous(), v)


def _tied_functional_pattern(mech: Mechanism, pattern: str, s: Sizes, q, k, v) -> None:
    ref = _guard(lambda: _fn(mech, q, k, v, pattern=pattern, backend="reference"), f"{pattern}: reference")
    if mech.fast is not None:
        fast = _guard(lambda: _fn(mech, q, k, v, pattern=pattern, backend="auto"), f"{pattern}: fast")
        _close(fast, ref, TOL[torch.float64], f"{pattern}: tied scores, fast vs reference")
    if pattern == "causal_self" and mech.step is not None:
        dec = _Decoder(mech, True)
        dec.s = s
        state = dec.init()
        got = _guard(lambda: dec.run((q, k, v), state, 0, s.n), "decoding")
        _close(got, ref, TOL[torch.float64], "tied scores, step decoding vs causal reference")


def _tied_module(mech: Mechanism) -> None:
    """Every token equal (all scores tie): module fast == reference, and decoding == the causal forward."""
    s = Sizes.of(mech)
    n = TIE_N if mech.case_options is None else s.n  # case_options: a module built for its test length
    g = torch.Generator().manual_seed(3)
    x = torch.randn(s.batch, 1, s.dim, generator=g, dtype=torch.float64).expand(-1, n, -1).contiguous()
    for pattern in [p for p in mech.patterns if p.endswith("self")]:
        _tied_module_pattern(mech, pattern, x)


def _tied_module_pattern(mech: Mechanism, pattern: str, x: torch.Tensor) -> None:
    mod = _module(mech, pattern)
    mod.eval()
    if hasattr(mod, "backend") and mech.fast is not None:
        outs = {}
        for backend in ("reference", "fast"):
            mod.backend = backend
            outs[backend] = _first(_guard(lambda: mod(x), f"{pattern}: {backend}"))  # noqa: B023 - called now
        _close(outs["fast"], outs["reference"], TOL[torch.float64], f"{pattern}: tied scores, fast vs reference")
        mod.backend = "auto"
    if pattern == "causal_self" and mech.decodable and hasattr(mod, "init_state"):
        ref = _first(_guard(lambda: mod(x), f"{pattern}: forward"))
        state = mod.init_state(x.shape[0])
        chunks = decode_chunks(0, x.shape[1], 0, mech.min_prefill(mech.resolve_options(dict(mech.test_options))))
        steps = [_first(_guard(lambda a=a, b=b: mod(x[:, a:b], state=state), "decoding")) for a, b in chunks]
        _close(torch.cat(steps, 1), ref, TOL[torch.float64], "tied scores, decoding vs causal forward")


def _long(mech: Mechanism) -> None:
    """N = 8192 through the fast form with the default options (those of a real run): runs, finite; causal: the
    first 512 rows == the reference on that prefix (float32 against float64)."""
    causal = "causal_self" in mech.patterns
    opts, heads = mech.fit_case({}, n=LONG_N, side=None, heads=4, causal=causal)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, heads, LONG_N, 16, generator=g)
    k = torch.randn(1, max(1, heads // 2), LONG_N, 16, generator=g)
    v = torch.randn(1, max(1, heads // 2), LONG_N, 16, generator=g)
    call = lambda q, k, v, backend: attention(q, k, v, mechanism=mech.name, causal=causal, backend=backend, **opts)
    with torch.no_grad():
        out = _guard(lambda: call(q, k, v, "fast"), f"N={LONG_N}")
        if not bool(torch.isfinite(out).all()):
            raise ProbeFailure(f"N={LONG_N}: non-finite output")
        if causal and mech.prefix_invariant:
            m = 512
            ref = call(q[:, :, :m].double(), k[:, :, :m].double(), v[:, :, :m].double(), "reference")
            _close(out[:, :, :m].double(), ref, 1e-4, f"N={LONG_N}: first {m} rows vs the reference on them")


def quadratic(mech: Mechanism) -> bool:
    """True when the record's ``complexity`` names a quadratic term (N^2, Nq Nk, N M, (HW)^2): its N = 8192 probe is
    ``slow``; the sub-quadratic forms run it by default."""
    return re.search(r"N\^2|Nq Nk|\bN M\b|\(HW\)\^2", mech.complexity) is not None


def _numeric_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None], bool]]:
    out: list[tuple[str, Callable[[], None], bool]] = []
    if mech.functional:
        out += [("numeric.large_logits_float32", lambda: _large_logits(mech, torch.float32), False),
                ("numeric.large_logits_bfloat16", lambda: _large_logits(mech, torch.bfloat16), False)]
        if mech.supports_key_padding:
            out.append(("numeric.fully_masked", lambda: _fully_masked(mech), False))
        for which in "qkv":
            out.append((f"numeric.nan_{which}", lambda which=which: _nan_propagation(mech, which), False))
        out.append(("numeric.tied_scores", lambda: _tied_functional(mech), False))
        if mech.fast is not None and any(p.endswith("self") for p in mech.patterns):
            out.append(("numeric.long_sequence", lambda: _long(mech), quadratic(mech)))
    else:
        if mech.kind == "sequence" and mech.supports_key_padding:
            out.append(("numeric.fully_masked", lambda: _fully_masked_module(mech), False))
        out.append(("numeric.nan_x", lambda: _nan_module(mech), False))
        if mech.kind == "sequence":
            out.append(("numeric.tied_scores", lambda: _tied_module(mech), False))
    return out


# --------------------------------------------------------------------------------------------------------
# Assembly and running
# --------------------------------------------------------------------------------------------------------
def probes(mech: Mechanism | str) -> list[Probe]:
    """Every probe that applies to ``mech`` (a record or a registered name), in a stable order."""
    mech = registry.get(mech) if isinstance(mech, str) else mech
    out: list[Probe] = []

    def extend(pairs: Iterable[tuple[str, Callable[[], None]]], **kw) -> None:
        out.extend(Probe(mech.name, name, fn, **kw) for name, fn in pairs)

    if mech.functional:
        extend(_attention_probes(mech))
        extend(_empty_functional_probes(mech), isolate=True)
    extend(_build_probes(mech))
    if mech.kind == "sequence" or mech.module is not None:
        extend(_module_probes(mech))
        extend(_empty_module_probes(mech), isolate=True)
    if "causal_self" in mech.patterns:
        if mech.functional and mech.step is not None:
            extend(_decode_probes(mech, functional=True))
        if mech.decodable and (mech.module is not None or mech.step is not None):
            extend(_decode_probes(mech, functional=False))
    for name, fn, slow in _numeric_probes(mech):
        out.append(Probe(mech.name, name, fn, slow=slow))
    return out


_FOUND: dict[str, list[Probe]] = {}


def find(probe_id: str) -> Probe:
    """The probe named ``mech::name``."""
    mech, _, name = probe_id.partition("::")
    if mech not in _FOUND:
        _FOUND[mech] = probes(mech)
    for p in _FOUND[mech]:
        if p.name == name:
            return p
    raise KeyError(f"probe: no probe {name!r} for mechanism {mech!r}")


def run(probe: Probe) -> str | None:
    """Run one probe in this process: None if it passed, else the failure message."""
    try:
        probe.run()
    except ProbeFailure as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a probe's own setup crashing is a failure too
        return f"probe setup crashed with {type(e).__name__}: {e}"
    return None


_CHILD = r"""
import json, sys
imports = json.loads(sys.argv[1])
if imports:
    from attnzoo.bench.forkserver import import_extra
    for name in imports:
        import_extra(name)
from attnzoo import reliability
for line in sys.stdin:
    pid = line.strip()
    if not pid:
        continue
    print("START " + pid, flush=True)
    print("DONE " + json.dumps([pid, reliability.run(reliability.find(pid))]), flush=True)
"""


def run_isolated(ids: list[str], *, imports: Iterable[str] = (), timeout: float = 600) -> dict[str, str | None]:
    """Run the probes ``ids`` (``mech::name``) in a child interpreter; a probe that kills it (a signal, an abort)
    or hangs past ``timeout`` seconds fails with that said, and the rest continue in a new child.

    ``imports``: modules or ``.py`` files the child imports first (where your own mechanisms register).
    Returns {id: None or failure message}.
    """
    results: dict[str, str | None] = {}
    todo = list(ids)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(list(imports))], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            stdout, stderr = proc.communicate("\n".join(todo) + "\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        current = None
        for line in stdout.splitlines():
            if line.startswith("START "):
                current = line[6:]
            elif line.startswith("DONE "):
                pid, msg = json.loads(line[5:])
                results[pid] = msg
                current = None
        todo = [p for p in todo if p not in results]
        if not todo:
            break
        if current is None:  # died before starting a probe: report it on all that remain
            for p in todo:
                results[p] = f"the probe child died before running it: {stderr.strip()[-500:]}"
            break
        code = proc.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        results[current] = f"killed the interpreter ({how}): {stderr.strip()[-300:]}"
        todo.remove(current)
    return results


def run_all(mech: Mechanism | str, *, slow: bool = False, imports: Iterable[str] = ()) -> dict[str, str]:
    """Run every probe of ``mech`` (isolated ones in a child; ``slow`` ones only with ``slow=True``);
    returns {probe name: failure message} for the probes that failed."""
    ps = [p for p in probes(mech) if slow or not p.slow]
    failures = {p.name: msg for p in ps if not p.isolate and (msg := run(p)) is not None}
    isolated = run_isolated([p.id for p in ps if p.isolate], imports=imports)
    failures.update({pid.partition("::")[2]: msg for pid, msg in isolated.items() if msg is not None})
    return failures


def main(argv: list[str] | None = None) -> int:
    """``python -m attnzoo.reliability [NAME ...] [--slow] [--import MODULE] [--json PATH]``: run the probes of the
    named mechanisms (default: all registered), print each failure and a summary; exit 1 if any failed."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m attnzoo.reliability", description=main.__doc__)
    parser.add_argument("names", nargs="*", help="mechanisms to probe (default: every registered one)")
    parser.add_argument("--slow", action="store_true", help="also run the slow probes (N = 8192)")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        help="a module or .py file registering your own mechanisms (repeatable)")
    parser.add_argument("--json", help="write {probe id: failure message or null} to this file")
    args = parser.parse_args(argv)
    from .bench.forkserver import import_extra

    for name in args.imports:
        import_extra(name)
    mechs = [registry.get(n) for n in args.names] or registry.mechanisms()
    results: dict[str, str | None] = {}
    isolated: list[str] = []
    for mech in mechs:
        ps = [p for p in probes(mech) if args.slow or not p.slow]
        results.update({p.id: run(p) for p in ps if not p.isolate})
        isolated += [p.id for p in ps if p.isolate]
    results.update(run_isolated(isolated, imports=args.imports))  # one child for all of them
    failed = {k: v for k, v in results.items() if v is not None}
    for pid, msg in failed.items():
        print(f"FAIL {pid}: {msg}")
    print(f"{len(results)} probes over {len(mechs)} mechanisms: {len(results) - len(failed)} passed, "
          f"{len(failed)} failed ({100 * len(failed) / max(1, len(results)):.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
