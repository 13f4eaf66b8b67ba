"""Reliability probes of numerics (``numeric.*``): large logits, fully masked rows, NaN propagation, tied scores and
long sequences."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import torch

from ..functional import attention
from ..registry import Mechanism
from ..testing import TOL, Sizes, module_inputs, position_kwargs
from .core import (
    LARGE_LOGITS_TOL,
    LONG_N,
    ProbeFailure,
    call_attention,
    close_enough,
    default_pattern,
    first_output,
    guarded,
    probe_inputs,
)
from .decode import Decoder, decode_chunks
from .entry import call_module, module_pattern, probe_module


# --------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------
def _large_logits(mech: Mechanism, dtype: torch.dtype) -> None:
    pattern = default_pattern(mech)
    q, k, v = (t.to(dtype) for t in probe_inputs(mech, pattern))
    q, k = (q.double() * 100).to(dtype), (k.double() * 100).to(dtype)
    lo = guarded(lambda: call_attention(mech, q, k, v), f"{dtype} with q, k x 100")
    hi = guarded(lambda: call_attention(mech, q.double(), k.double(), v.double()), "float64 with q, k x 100")
    if not bool(torch.isfinite(lo).all()):
        raise ProbeFailure(f"{dtype} with q, k x 100: non-finite output")
    close_enough(lo.double(), hi, LARGE_LOGITS_TOL[dtype], f"{dtype} vs float64 with q, k x 100")


def _fully_masked(mech: Mechanism) -> None:
    """A batch row whose keys are all masked returns zeros (no NaN, finite gradients); causal self attention: query 0
    with key 0 masked too. Every declared pattern."""
    for pattern in mech.patterns:
        _fully_masked_pattern(mech, pattern)


def _fully_masked_pattern(mech: Mechanism, pattern: str) -> None:
    q, k, v = (t.requires_grad_(True) for t in probe_inputs(mech, pattern))
    mask = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool)
    mask[-1] = False
    if pattern == "causal_self":
        mask[0, 0] = False
    out = guarded(lambda: call_attention(mech, q, k, v, pattern=pattern, key_padding_mask=mask),
                  f"{pattern}: masked call")
    if not bool(torch.isfinite(out).all()):
        raise ProbeFailure(f"{pattern}: non-finite output with a fully masked batch row")
    dead = out[-1].abs().max().item()
    if dead != 0:
        raise ProbeFailure(f"{pattern}: the batch row with every key masked returned |out| up to {dead:.3e}, "
                           "expected zeros")
    if pattern == "causal_self" and out[0, :, 0].abs().max().item() != 0:
        raise ProbeFailure(f"{pattern}: query 0 with key 0 masked sees no key but did not return zeros")
    grads = guarded(lambda: torch.autograd.grad(out.square().sum() + out.sum(), (q, k, v)), f"{pattern}: backward")
    for name, g in zip("qkv", grads):
        if not bool(torch.isfinite(g).all()):
            raise ProbeFailure(f"{pattern}: non-finite gradient of {name} with a fully masked batch row")


def _fully_masked_module(mech: Mechanism) -> None:
    """A module with a fully masked batch row: finite output and input gradients, every declared pattern."""
    for pattern in mech.patterns:
        _fully_masked_module_pattern(mech, pattern)


def _fully_masked_module_pattern(mech: Mechanism, pattern: str) -> None:
    mod = probe_module(mech, pattern)
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
    out = first_output(guarded(lambda: call_module(mod, mech, x, ctx, key_padding_mask=mask, **pos),
                        f"{pattern}: masked call"))
    if not bool(torch.isfinite(out).all()):
        raise ProbeFailure(f"{pattern}: non-finite output with a fully masked batch row")
    (g,) = guarded(lambda: torch.autograd.grad(out.square().sum(), (x,)), f"{pattern}: backward")
    if not bool(torch.isfinite(g).all()):
        raise ProbeFailure(f"{pattern}: non-finite gradient with a fully masked batch row")


def _nan_case(clean: torch.Tensor, dirty: torch.Tensor, what: str) -> None:
    if not bool(torch.isnan(dirty[0]).any()):
        raise ProbeFailure(f"a NaN in {what} of batch row 0 vanished: row 0 of the output has no NaN")
    if not bool(torch.isfinite(dirty[1:]).all()):
        raise ProbeFailure(f"a NaN in {what} of batch row 0 leaked into other batch rows")
    close_enough(dirty[1:], clean[1:], TOL[torch.float64], f"other batch rows with a NaN in {what} of row 0")


def _nan_propagation(mech: Mechanism, which: str) -> None:
    """A NaN in the last query of batch row 0 (head 0), or in every key / value of batch row 0 (head 0: a sparse
    mechanism may legitimately never read one given key), shows in row 0 of the output and only there."""
    q, k, v = probe_inputs(mech)
    clean = call_attention(mech, q, k, v)
    t = {"q": q, "k": k, "v": v}[which].clone()
    if which == "q":
        t[0, 0, -1, 0] = float("nan")
    else:
        t[0, 0, :, 0] = float("nan")
    args = {"q": q, "k": k, "v": v, which: t}
    dirty = guarded(lambda: call_attention(mech, args["q"], args["k"], args["v"]), f"a NaN in {which}")
    _nan_case(clean, dirty, "q (last position, head 0)" if which == "q" else f"{which} (head 0, every position)")


def _nan_module(mech: Mechanism) -> None:
    pattern = module_pattern(mech)
    mod = probe_module(mech, pattern)
    mod.eval()
    x, ctx = module_inputs(mech, pattern)
    clean = first_output(call_module(mod, mech, x, ctx))
    x2 = x.clone()
    x2.view(x.shape[0], -1)[0, -1] = float("nan")
    dirty = first_output(guarded(lambda: call_module(mod, mech, x2, ctx), "a NaN in x"))
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
    ref = guarded(lambda: call_attention(mech, q, k, v, pattern=pattern, backend="reference"), f"{pattern}: reference")
    if mech.fast is not None:
        fast = guarded(lambda: call_attention(mech, q, k, v, pattern=pattern, backend="auto"), f"{pattern}: fast")
        close_enough(fast, ref, TOL[torch.float64], f"{pattern}: tied scores, fast vs reference")
    if pattern == "causal_self" and mech.step is not None:
        dec = Decoder(mech, True)
        dec.s = s
        state = dec.init()
        got = guarded(lambda: dec.run((q, k, v), state, 0, s.n), "decoding")
        close_enough(got, ref, TOL[torch.float64], "tied scores, step decoding vs causal reference")


def _tied_module(mech: Mechanism) -> None:
    """Every token equal (all scores tie): module fast == reference, and decoding == the causal forward."""
    s = Sizes.of(mech)
    n = TIE_N if mech.case_options is None else s.n  # case_options: a module built for its test length
    g = torch.Generator().manual_seed(3)
    x = torch.randn(s.batch, 1, s.dim, generator=g, dtype=torch.float64).expand(-1, n, -1).contiguous()
    for pattern in [p for p in mech.patterns if p.endswith("self")]:
        _tied_module_pattern(mech, pattern, x)


def _tied_module_pattern(mech: Mechanism, pattern: str, x: torch.Tensor) -> None:
    mod = probe_module(mech, pattern)
    mod.eval()
    if hasattr(mod, "backend") and mech.fast is not None:
        outs = {}
        for backend in ("reference", "fast"):
            mod.backend = backend
            outs[backend] = first_output(guarded(lambda: mod(x), f"{pattern}: {backend}"))  # noqa: B023 - called now
        close_enough(outs["fast"], outs["reference"], TOL[torch.float64], f"{pattern}: tied scores, fast vs reference")
        mod.backend = "auto"
    if pattern == "causal_self" and mech.decodable and hasattr(mod, "init_state"):
        ref = first_output(guarded(lambda: mod(x), f"{pattern}: forward"))
        state = mod.init_state(x.shape[0])
        chunks = decode_chunks(0, x.shape[1], 0, mech.min_prefill(mech.resolve_options(dict(mech.test_options))))
        steps = [first_output(guarded(lambda a=a, b=b: mod(x[:, a:b], state=state), "decoding")) for a, b in chunks]
        close_enough(torch.cat(steps, 1), ref, TOL[torch.float64], "tied scores, decoding vs causal forward")


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
        out = guarded(lambda: call(q, k, v, "fast"), f"N={LONG_N}")
        if not bool(torch.isfinite(out).all()):
            raise ProbeFailure(f"N={LONG_N}: non-finite output")
        if causal and mech.prefix_invariant:
            m = 512
            ref = call(q[:, :, :m].double(), k[:, :, :m].double(), v[:, :, :m].double(), "reference")
            close_enough(out[:, :, :m].double(), ref, 1e-4, f"N={LONG_N}: first {m} rows vs the reference on them")


def quadratic(mech: Mechanism) -> bool:
    """True when the record's ``complexity`` names a quadratic term (N^2, Nq Nk, N M, (HW)^2): its N = 8192 probe is
    ``slow``; the sub-quadratic forms run it by default."""
    return re.search(r"N\^2|Nq Nk|\bN M\b|\(HW\)\^2", mech.complexity) is not None


def numeric_probes(mech: Mechanism) -> list[tuple[str, Callable[[], None], bool]]:
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
