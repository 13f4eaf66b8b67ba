"""Reliability probes of the entry points: ``attnzoo.attention`` (``attention.*``, ``empty.*``), ``attnzoo.build``
and modules' ``forward`` (``build.*``, ``module.*``), with the multi-source context of cross modules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..layers import build
from ..registry import Mechanism
from ..testing import Sizes, make_module, module_inputs
from .core import (
    CLEAR_ERRORS,
    ProbeFailure,
    bad_masks,
    bad_option_values,
    call_attention,
    default_pattern,
    describe_output,
    expect_error,
    guarded,
    names_argument,
    probe_inputs,
    with_shape,
)


# --------------------------------------------------------------------------------------------------------
# Probes of attnzoo.attention
# --------------------------------------------------------------------------------------------------------
def attention_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None]]]:
    q, k, v = probe_inputs(mech)
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    out: list[tuple[str, Callable[[], None]]] = []

    def add(name, call, *names, contains=None):
        out.append((name, lambda: expect_error(call, *names, contains=contains)))

    add("attention.q_list", lambda: call_attention(mech, q.tolist(), k, v), "q")
    add("attention.q_rank", lambda: call_attention(mech, q[0], k, v), "q")
    add("attention.k_rank", lambda: call_attention(mech, q, k.unsqueeze(0), v), "k")
    add("attention.v_rank", lambda: call_attention(mech, q, k, v[..., 0]), "v")
    add("attention.q_int", lambda: call_attention(mech, q.long(), k.long(), v.long()), "q")
    add("attention.dtype_mix", lambda: call_attention(mech, q, k.float(), v), "q", "k", "v")
    add("attention.k_head_dim", lambda: call_attention(mech, q, with_shape(k, 3, D + 1), v), "k")
    add("attention.v_length", lambda: call_attention(mech, q, k, with_shape(v, 2, Nk + 1)), "v")
    add("attention.batch_mismatch", lambda: call_attention(mech, q, k[:1], v[:1]) if B > 1 else
        call_attention(mech, q, with_shape(k, 0, 2), with_shape(v, 0, 2)), "k", "v", "q")
    add("attention.heads_not_divisible", lambda: call_attention(mech, with_shape(q, 1, Hk + 1) if Hk > 1 else q,
                                                      k if Hk > 1 else with_shape(k, 1, Hq + 1),
                                                      v if Hk > 1 else with_shape(v, 1, Hq + 1)), "q", "k")
    add("attention.k_meta", lambda: call_attention(mech, q, k.to("meta"), v), "k", "q")
    add("attention.v_meta", lambda: call_attention(mech, q, k, v.to("meta")), "v", "q")
    for label, value in (("inf", math.inf), ("nan", math.nan), ("zero", 0.0), ("negative", -1.0), ("str", "1"),
                         ("bool", True)):
        add(f"attention.scale_{label}", lambda value=value: call_attention(mech, q, k, v, scale=value), "scale")
    add("attention.causal_int", lambda: call_attention(mech, q, k, v, causal=1), "causal")
    add("attention.backend", lambda: call_attention(mech, q, k, v, backend="gpu"), "backend")
    add("attention.unknown_option", lambda: call_attention(mech, q, k, v, no_such_option=1), "no_such_option")
    for label, mask, contains in bad_masks(B, Nk):
        add(f"attention.mask_{label}", lambda mask=mask: call_attention(mech, q, k, v, key_padding_mask=mask),
            "key_padding_mask", contains=contains)
    for opt in mech.options:
        for label, value in bad_option_values(opt):
            add(f"attention.option_{opt.name}_{label}", lambda opt=opt, value=value: call_attention(
                mech, q, k, v, **{opt.name: value}), opt.name)
    return out


def empty_functional_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None]]]:
    pattern = default_pattern(mech)
    causal = pattern.startswith("causal")
    out: list[tuple[str, Callable[[], None]]] = []

    def empty_result(q, k, v, pattern):
        def run():
            got = guarded(lambda: call_attention(mech, q, k, v, pattern=pattern), "an empty call")
            want = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != want or got.dtype != q.dtype:
                raise ProbeFailure(f"expected an empty result of shape {want}, dtype {q.dtype}; "
                                   f"got {describe_output(got)}")
        return run

    q, k, v = probe_inputs(mech)
    out.append(("empty.batch", empty_result(q[:0], k[:0], v[:0], pattern)))
    cross = [p for p in mech.patterns if p.endswith("cross")]
    if cross:
        qc, kc, vc = probe_inputs(mech, cross[0])
        out.append(("empty.queries", empty_result(qc[:, :, :0], kc, vc, cross[0])))
    for name, (qq, kk, vv), names in (
        ("empty.length", (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ("k", "q")),
        ("empty.keys", (q, k[:, :, :0], v[:, :, :0]), ("k",)),
        ("empty.head_dim", (q[..., :0], k[..., :0], v), ("q", "k")),
        ("empty.value_dim", (q, k, v[..., :0]), ("v",)),
        ("empty.heads", (q[:, :0], k[:, :0], v[:, :0]), ("q", "k")),
    ):
        out.append((name, lambda qq=qq, kk=kk, vv=vv, names=names: expect_error(
            lambda: call_attention(mech, qq, kk, vv, causal=causal), *names)))
    return out


# --------------------------------------------------------------------------------------------------------
# Probes of modules (a mechanism's own, or the generic Attention around a functional one)
# --------------------------------------------------------------------------------------------------------
def module_pattern(mech: Mechanism) -> str:
    return default_pattern(mech) if mech.kind in ("sequence", "fusion") else "noncausal_self"


def probe_module(mech: Mechanism, pattern: str | None = None, dtype=torch.float64):
    return make_module(mech, pattern or module_pattern(mech), dtype)


def call_module(mod, mech: Mechanism, x, ctx=None, **kw):
    if mech.kind not in ("sequence", "fusion"):
        return mod(x, **kw)
    return mod(x, ctx, **kw) if ctx is not None else mod(x, **kw)


def _takes_context(mod, mech: Mechanism, x, ctx) -> bool:
    """False when the module refuses a good context with a clear error naming it (a self-attention module of a
    record whose cross pattern belongs to its functional form); True when it takes it."""
    try:
        call_module(mod, mech, x, ctx)
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


def build_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None]]]:
    s = Sizes.of(mech)
    out = []
    extra = {} if mech.kind != "sequence" else {"causal": module_pattern(mech).startswith("causal")}
    for arg, good in (("dim", s.dim), ("heads", s.heads)):
        for label, value in (("zero", 0), ("negative", -good), ("float", float(good)), ("bool", True)):
            args = {"dim": s.dim, "heads": s.heads, arg: value}
            out.append((f"build.{arg}_{label}", lambda args=args, arg=arg: expect_error(
                lambda: build(mech.name, args["dim"], args["heads"], **extra, **mech.test_options), arg)))
    if mech.kind == "sequence":
        out.append(("build.causal_int", lambda: expect_error(
            lambda: build(mech.name, s.dim, s.heads, causal=1, **mech.test_options), "causal")))
    return out


def module_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None]]]:
    pattern = module_pattern(mech)
    mod = probe_module(mech, pattern)
    x, ctx = module_inputs(mech, pattern)  # a context when the module's first pattern is cross
    caxis = 1 if mech.kind == "channel" else -1
    out: list[tuple[str, Callable[[], None]]] = []

    def add(name, call, *names, contains=None):
        out.append((name, lambda: expect_error(call, *names, contains=contains)))

    add("module.x_list", lambda: call_module(mod, mech, x.tolist(), ctx), "x")
    add("module.x_rank", lambda: call_module(mod, mech, x[0], ctx), "x")
    add("module.x_channels", lambda: call_module(mod, mech, with_shape(x, caxis, x.shape[caxis] + 1), ctx), "x")
    add("module.x_int", lambda: call_module(mod, mech, x.long(), ctx), "x")
    add("module.x_dtype", lambda: call_module(mod, mech, x.float(), ctx), "x")
    add("module.x_meta", lambda: call_module(mod, mech, x.to("meta"), ctx), "x")
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

        for label, mask, contains in bad_masks(xx.shape[0], n):
            out.append((f"{prefix}_{label}", probe(lambda mask=mask: call_module(
                m, mech, xx, cc, key_padding_mask=mask if cc is None else _source_mask(cc, mask)), contains)))
        if isinstance(cc, dict):
            good = torch.ones(xx.shape[0], n, dtype=torch.bool)
            out.append((f"{prefix}_unknown_source", probe(lambda: call_module(m, mech, xx, cc, key_padding_mask={
                "no_such_source": good}))))

    mask_probes("module.mask", mod, x, ctx)
    cross = [p for p in mech.patterns if p.endswith("cross")]
    if cross:
        cmod = mod if ctx is not None else probe_module(mech, cross[0])
        xc, cc = (x, ctx) if ctx is not None else module_inputs(mech, cross[0])
        if ctx is None:  # the module's first pattern is self: its context masks too, if its forward takes one
            mask_probes("module.context_mask", cmod, xc, cc, only_if=lambda: _takes_context(cmod, mech, xc, cc))

        def bad(fn):
            return lambda: call_module(cmod, mech, xc, _one_source(cc, fn))

        add("module.context_list", bad(lambda c: c.tolist()), "context")
        add("module.context_channels", bad(lambda c: with_shape(c, 2, c.shape[2] + 1)), "context")
        add("module.context_batch", bad(lambda c: with_shape(c, 0, c.shape[0] + 1)), "context")
        add("module.context_dtype", bad(lambda c: c.float()), "context")
        add("module.context_int", bad(lambda c: c.long()), "context")
        add("module.context_meta", bad(lambda c: c.to("meta")), "context")
        add("module.context_rank", bad(lambda c: c[0]), "context")
        if isinstance(cc, dict):
            add("module.context_unknown_source", lambda: call_module(
                cmod, mech, xc, {**cc, "no_such_source": next(iter(cc.values()))}), "context")
    return out


def empty_module_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None]]]:
    pattern = module_pattern(mech)
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
            mod = probe_module(mech, pattern)
            expect_error(lambda: call_module(mod, mech, x.narrow(axis, 0, 0), ctx), "x")
        out.append((f"empty.module_{label}", run))
    cross = [p for p in mech.patterns if p.endswith("cross")] if mech.kind == "sequence" else []
    if cross:
        def run_ctx():
            mod = probe_module(mech, cross[0])
            xc, ctx = module_inputs(mech, cross[0])
            expect_error(lambda: call_module(mod, mech, xc, _one_source(ctx, lambda c: c[:, :0])), "context")
        out.append(("empty.module_context", run_ctx))
    return out
