"""The conformance suite: behavioural checks every registered mechanism must pass.

Each check takes a :class:`~attnzoo.registry.Mechanism` record (and a pattern where it applies) and
raises ``AssertionError`` with a message saying what broke. ``tests/conformance`` runs them over the
whole registry; you can run them on a mechanism of your own with :func:`run_all`.

Checks (DESIGN.md, "Tests"): output shape and dtype; causality (perturbing keys/values after position t
leaves outputs at <= t unchanged); query-prefix invariance for causal patterns; key padding (changing
masked keys changes nothing); batch independence; permutation equivariance where claimed; finite
gradients for every input and parameter; bfloat16 close to float32; unsupported patterns raise;
``step`` decoding == causal forward; ``fast`` == ``reference``; gradcheck in float64.

Cross checks, run over every record with a cross pattern (read from its :class:`~attnzoo.registry.CrossSpec`):
a context token's change never reaches a query that may not see it by position (``cross_visibility``, for
records causal by position, in place of the index-based causality checks); per-source masks are never dropped
(``source_masks``); permuting the context tokens with their positions and masks changes nothing where the paper
says so (``context_permutation``); decoding queries against a fixed (cached) context equals the full run
(``context_decode``, with a ``ContextCache`` and frame appends where the record declares ``cache``); the source
mass sums to 1 per query (``source_mass``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .functional import attention, pattern_of
from .layers import build
from .masks import materialize
from .reference import softmax_attention
from .registry import PATTERNS, Mechanism

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
"""Relative-error tolerances ||a - b|| / ||b|| (DESIGN.md)."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    num = (a - b).norm().item()
    if denom == 0:
        return num
    return num / denom


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str, tol: float | None = None) -> None:
    tol = TOL[dtype] if tol is None else tol
    assert a.shape == b.shape, f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}"
    err = rel_err(a, b)
    assert math.isfinite(err) and err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    value_dim: int = 6
    n: int = 7  # self-attention length
    nq: int = 5  # cross: query length
    nk: int = 9  # cross: key length
    dim: int = 16  # model width for module mechanisms
    height: int = 6
    width: int = 6

    @classmethod
    def of(cls, mech: Mechanism) -> Sizes:
        return cls(**dict(mech.test_sizes))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lengths(mech: Mechanism, pattern: str) -> tuple[int, int]:
    s = Sizes.of(mech)
    return (s.n, s.n) if pattern.endswith("self") else (s.nq, s.nk)


def qkv(mech: Mechanism, pattern: str, dtype=torch.float64, seed: int = 0, requires_grad: bool = False):
    """Random q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) for a functional mechanism."""
    s = Sizes.of(mech)
    nq, nk = lengths(mech, pattern)
    g = _gen(seed)
    q = torch.randn(s.batch, s.heads, nq, s.head_dim, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(s.batch, s.kv_heads, nk, s.head_dim, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(s.batch, s.kv_heads, nk, s.value_dim, generator=g, dtype=torch.float64).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def padding_mask(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    """A key-padding mask with some keys masked in every row, never all (first key always kept)."""
    g = _gen(seed)
    m = torch.rand(batch, n, generator=g) > 0.35
    m[:, 0] = True
    m[0, -1] = False
    return m


def run_functional(mech: Mechanism, pattern: str, q, k, v, *, backend: str = "auto",
                   key_padding_mask=None, **overrides) -> torch.Tensor:
    opts = {**mech.test_options, **overrides}
    return attention(q, k, v, mechanism=mech.name, causal=pattern.startswith("causal"), backend=backend,
                     key_padding_mask=key_padding_mask, **opts)


def make_module(mech: Mechanism, pattern: str, dtype=torch.float64, seed: int = 0) -> torch.nn.Module:
    s = Sizes.of(mech)
    torch.manual_seed(seed)
    if mech.kind == "sequence":
        m = build(mech.name, s.dim, s.heads, kv_heads=s.kv_heads if mech.module is None else None,
                  causal=pattern.startswith("causal"), **mech.test_options)
    elif mech.kind == "pooling" and any(p.startswith("causal") for p in mech.patterns):
        m = build(mech.name, s.dim, s.heads, causal=pattern.startswith("causal"), **mech.test_options)
    else:
        m = build(mech.name, s.dim, s.heads, **mech.test_options)
    _randomize(m, seed)
    return m.to(dtype)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Give zero-initialised parameters (gates, biases, LoRA-style deltas) random values, so checks
    exercise every path instead of a degenerate one."""
    g = _gen(seed + 1000)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.numel() and bool((p == 0).all()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


POSITIONS = 4
"""Distinct positions (frames) of the conformance inputs of records causal by position."""


def default_positions(n: int, frames: int = POSITIONS) -> torch.Tensor:
    """(n,) sorted positions spreading n tokens over ``frames`` frames: ``arange(n) * frames // n``. A prefix of
    the positions of n tokens is not the positions of fewer tokens; checks slice positions, never recompute."""
    return torch.arange(n) * frames // n


def context_dims(mech: Mechanism) -> dict[str, int]:
    """{source: width} of a multi-source module's test contexts (``test_options['context_dims']`` or the model
    width); empty for a single-context record."""
    spec = mech.cross_spec()
    if spec is None or not spec.sources:
        return {}
    given = mech.test_options.get("context_dims") or {}
    return {n: given.get(n, Sizes.of(mech).dim) for n in spec.sources}


def source_lengths(mech: Mechanism) -> dict[str, int]:
    """{source: tokens}: distinct lengths per source (nk, nk - 2, ...; at least 3) so a mix-up shows."""
    nk = Sizes.of(mech).nk
    return {n: max(3, nk - 2 * i) for i, n in enumerate(context_dims(mech))}


def module_inputs(mech: Mechanism, pattern: str, dtype=torch.float64, seed: int = 0):
    """(x, context) for a module mechanism: tokens (B, N, dim), grids (B, H, W, dim), maps (B, dim, H, W).

    Cross patterns: a context (B, Nk, context_dim), or {source: (B, M_s, C_s)} for a record with named sources; a
    pooling module (its queries are its own) takes the token set as x (B, Nk, dim) and no context; a fusion
    module takes two token streams (x, context)."""
    s = Sizes.of(mech)
    g = _gen(seed)
    if mech.kind == "grid":
        return torch.randn(s.batch, s.height, s.width, s.dim, generator=g, dtype=torch.float64).to(dtype), None
    if mech.kind == "channel":
        return torch.randn(s.batch, s.dim, s.height, s.width, generator=g, dtype=torch.float64).to(dtype), None
    nq, nk = lengths(mech, pattern)
    if mech.kind == "pooling":  # the token set, of the width the module pools (its context_dim option if any)
        n = nk if pattern.endswith("cross") else nq
        width = mech.test_options.get("context_dim") or s.dim
        return torch.randn(s.batch, n, width, generator=g, dtype=torch.float64).to(dtype), None
    x = torch.randn(s.batch, nq, s.dim, generator=g, dtype=torch.float64).to(dtype)
    ctx = None
    if pattern.endswith("cross"):
        dims = context_dims(mech)
        if dims:
            ctx = {n: torch.randn(s.batch, m, dims[n], generator=g, dtype=torch.float64).to(dtype)
                   for n, m in source_lengths(mech).items()}
        else:
            cdim = mech.test_options.get("context_dim") or s.dim
            ctx = torch.randn(s.batch, nk, cdim, generator=g, dtype=torch.float64).to(dtype)
    return x, ctx


def _tmap(fn, ctx):
    """``fn`` applied to a context tensor or to every tensor of a {source: tensor} context."""
    if ctx is None:
        return None
    if isinstance(ctx, dict):
        return {n: fn(c) for n, c in ctx.items()}
    return fn(ctx)


def positional(module, mech: Mechanism) -> bool:
    """True when ``module`` is causal by position (its forward needs positions)."""
    spec = mech.cross_spec()
    return bool(spec is not None and spec.positions and getattr(module, "causal", False))


def position_kwargs(module, mech: Mechanism, x, ctx) -> dict:
    """The default positions a causal-by-position module is called with: tokens spread over ``POSITIONS`` frames
    (:func:`default_positions`); a sequence module's queries likewise."""
    if not positional(module, mech):
        return {}
    if mech.kind == "pooling":
        return {"context_pos": default_positions(x.shape[1]), "num_frames": POSITIONS}
    kw = {"q_pos": default_positions(x.shape[1])}
    if isinstance(ctx, dict):
        kw["context_pos"] = {n: default_positions(c.shape[1]) for n, c in ctx.items()}
    elif ctx is not None:
        kw["context_pos"] = default_positions(ctx.shape[1])
    return kw


def run_module(module, mech: Mechanism, x, ctx=None, key_padding_mask=None, **extra):
    """Call a module the way its kind takes inputs; positions of causal-by-position modules default to
    :func:`position_kwargs` (``extra`` overrides them)."""
    if mech.kind == "fusion":
        return module(x, ctx)
    if mech.kind not in ("sequence", "pooling"):
        return module(x)
    kw = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
    kw.update(position_kwargs(module, mech, x, ctx))
    kw.update(extra)
    if mech.kind == "pooling":
        return module(x, **kw)
    return module(x, ctx, **kw) if ctx is not None else module(x, **kw)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------
def check_shape_dtype(mech: Mechanism, pattern: str) -> None:
    for dtype in (torch.float32, torch.float64):
        if mech.functional:
            q, k, v = qkv(mech, pattern, dtype)
            out = run_functional(mech, pattern, q, k, v)
            want = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        else:
            m = make_module(mech, pattern, dtype)
            x, ctx = module_inputs(mech, pattern, dtype)
            out = _first(run_module(m, mech, x, ctx))
            want = tuple(x.shape) if mech.kind not in ("pooling", "fusion") else None
        if want is not None:
            assert tuple(out.shape) == want, f"{mech.name} {pattern}: output shape {tuple(out.shape)}, expected {want}"
        assert out.dtype == dtype, f"{mech.name} {pattern}: output dtype {out.dtype}, expected {dtype}"
        assert torch.isfinite(out).all(), f"{mech.name} {pattern}: non-finite output on finite input"


def check_noncontiguous(mech: Mechanism, pattern: str) -> None:
    """Functional mechanisms accept strided views, e.g. q/k/v as (B, N, H, D).transpose(1, 2) -- the layout
    Hugging Face models hand to attention functions -- and give the same result as on contiguous tensors."""
    q, k, v = qkv(mech, pattern)
    s = Sizes.of(mech)
    mask = padding_mask(s.batch, k.shape[2]) if mech.supports_key_padding else None
    base = run_functional(mech, pattern, q, k, v, key_padding_mask=mask)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not strided[0].is_contiguous()
    for backend in ("reference", "auto"):
        out = run_functional(mech, pattern, *strided, backend=backend, key_padding_mask=mask)
        ref = base if backend == "auto" else run_functional(mech, pattern, q, k, v, backend="reference",
                                                             key_padding_mask=mask)
        assert_close(out, ref, torch.float64, f"{mech.name} {pattern}: transposed-view inputs ({backend})")


def _blind_rows(mech: Mechanism, pattern: str, nq: int, nk: int, t: int) -> torch.Tensor:
    """(B, Nq) bool: the query rows whose outputs may not depend on keys after position ``t``: the rows at
    positions <= t; for a functional mechanism that declares its mask, only those whose mask sees no key after t (a
    modality mask lets a visual token see the later tokens of its span; this is the mask it must honour)."""
    s = Sizes.of(mech)
    off = nk - nq
    rows = (torch.arange(nq) + off <= t).view(1, nq).expand(s.batch, nq)
    if mech.mask is not None and mech.functional:
        pred = mech.mask(nq, nk, causal=True, **mech.resolve_options(dict(mech.test_options)))
        sees_later = materialize(pred, s.batch, 1, nq, nk)[:, 0, :, t + 1 :].any(-1)  # (B, Nq)
        rows = rows & ~sees_later
    return rows


def check_causality(mech: Mechanism, pattern: str) -> None:
    """Perturbing keys/values after key position t leaves every query at position <= t unchanged (for a mechanism
    with a declared mask: every such query whose mask sees no key after t)."""
    assert pattern.startswith("causal")
    nq, nk = lengths(mech, pattern)
    off = nk - nq
    for t in sorted({max(off, 0), (nk - 1) // 2 + max(off, 0) // 2, nk - 2}):
        if not 0 <= t < nk - 1:
            continue
        if mech.functional:
            q, k, v = qkv(mech, pattern)
            base = run_functional(mech, pattern, q, k, v)
            k2, v2 = k.clone(), v.clone()
            k2[:, :, t + 1 :] += 3 * torch.randn_like(k2[:, :, t + 1 :])
            v2[:, :, t + 1 :] += 3 * torch.randn_like(v2[:, :, t + 1 :])
            pert = run_functional(mech, pattern, q, k2, v2)
            keep = _blind_rows(mech, pattern, nq, nk, t).view(base.shape[0], 1, nq, 1)
            if not keep.any():
                continue
            a, b = base * keep, pert * keep
        else:
            m = make_module(mech, pattern)
            x, ctx = module_inputs(mech, pattern)
            base = _first(run_module(m, mech, x, ctx))
            if ctx is None:
                x2 = x.clone()
                x2[:, t + 1 :] += 3 * torch.randn_like(x2[:, t + 1 :])
                pert = _first(run_module(m, mech, x2, None))
            else:
                c2 = ctx.clone()
                c2[:, t + 1 :] += 3 * torch.randn_like(c2[:, t + 1 :])
                pert = _first(run_module(m, mech, x, c2))
            rows = t - off + 1
            if rows <= 0:
                continue
            a, b = base[:, :rows], pert[:, :rows]
        err = (a - b).abs().max().item()
        assert err < 1e-10, (f"{mech.name} {pattern}: outputs at positions <= {t} changed by {err:.2e} "
                             f"when keys after {t} changed (future leak)")


def check_prefix_invariance(mech: Mechanism, pattern: str) -> None:
    """Causal: the first m queries' outputs equal a run on only the first m queries (and their keys); for a
    mechanism with a declared mask, those of the m queries whose mask sees no key beyond the truncation."""
    assert pattern.startswith("causal")
    nq, nk = lengths(mech, pattern)
    off = nk - nq
    m_ = max(1, nq // 2 + 1)
    if mech.functional:
        q, k, v = qkv(mech, pattern)
        full = run_functional(mech, pattern, q, k, v)
        part = run_functional(mech, pattern, q[:, :, :m_], k[:, :, : m_ + off], v[:, :, : m_ + off])
        keep = _blind_rows(mech, pattern, nq, nk, m_ + off - 1)[:, :m_].view(q.shape[0], 1, m_, 1)
        part, a = part * keep, full[:, :, :m_] * keep
    else:
        mod = make_module(mech, pattern)
        x, ctx = module_inputs(mech, pattern)
        full = _first(run_module(mod, mech, x, ctx))
        part = _first(run_module(mod, mech, x[:, :m_], None if ctx is None else ctx[:, : m_ + off]))
        a = full[:, :m_]
    assert_close(part, a, torch.float64, f"{mech.name} {pattern}: first {m_} queries, truncated vs full run")


def check_key_padding(mech: Mechanism, pattern: str) -> None:
    """Changing masked keys/values changes nothing (outputs of unmasked query rows for self modules)."""
    s = Sizes.of(mech)
    nq, nk = lengths(mech, pattern)
    mask = padding_mask(s.batch, nk)
    if mech.functional:
        q, k, v = qkv(mech, pattern)
        if not mech.supports_key_padding:
            with _raises(mech, pattern, "a key_padding_mask it does not support"):
                run_functional(mech, pattern, q, k, v, key_padding_mask=mask)
            return
        base = run_functional(mech, pattern, q, k, v, key_padding_mask=mask)
        noise_k = 5 * torch.randn(k.shape, dtype=k.dtype)
        noise_v = 5 * torch.randn(v.shape, dtype=v.dtype)
        sel = (~mask).view(s.batch, 1, nk, 1)
        k2 = torch.where(sel, k + noise_k, k)
        v2 = torch.where(sel, v + noise_v, v)
        pert = run_functional(mech, pattern, q, k2, v2, key_padding_mask=mask)
        err = (base - pert).abs().max().item()
        unmasked = run_functional(mech, pattern, q, k2, v2)
        assert err < 1e-10, (f"{mech.name} {pattern}: changing masked keys changed the output by {err:.2e} "
                             "(mask ignored)")
        assert (unmasked - pert).abs().max().item() > 1e-6, (
            f"{mech.name} {pattern}: the perturbation of masked keys changes nothing even without the mask; "
            "the check cannot see a dropped mask")
        if pattern.endswith("self"):
            # Self attention: a padded position is padding as a query too. Its query must not reach the
            # outputs of real positions (mechanisms that group queries into blocks could leak it).
            q2 = torch.where((~mask).view(s.batch, 1, nk, 1), q + 5 * torch.randn(q.shape, dtype=q.dtype), q)
            pert_q = run_functional(mech, pattern, q2, k2, v2, key_padding_mask=mask)
            keep = mask.view(s.batch, 1, nk, 1)
            err = ((base - pert_q) * keep).abs().max().item()
            assert err < 1e-10, (f"{mech.name} {pattern}: changing the queries at padded positions changed real "
                                 f"outputs by {err:.2e} (padding leaks through query grouping)")
        return
    if mech.kind not in ("sequence", "pooling"):
        return
    mod = make_module(mech, pattern)
    x, ctx = module_inputs(mech, pattern)
    if mech.kind == "pooling":
        nk = x.shape[1]
        mask = padding_mask(s.batch, nk)
    if not mech.supports_key_padding:
        with _raises(mech, pattern, "a key_padding_mask it does not support"):
            run_module(mod, mech, x, ctx, key_padding_mask=mask)
        return
    base = _first(run_module(mod, mech, x, ctx, key_padding_mask=mask))
    sel = (~mask).view(s.batch, nk, 1)
    if mech.kind == "pooling":  # the token set is x; every pooled output must ignore its padded tokens
        x2 = torch.where(sel, x + 5 * torch.randn_like(x), x)
        pert = _first(run_module(mod, mech, x2, None, key_padding_mask=mask))
        err = (base - pert).abs().max().item()
    elif ctx is None:
        x2 = torch.where(sel, x + 5 * torch.randn_like(x), x)
        pert = _first(run_module(mod, mech, x2, None, key_padding_mask=mask))
        keep = mask.view(s.batch, nk, 1)  # outputs at padded query rows may change; the others may not
        err = ((base - pert) * keep).abs().max().item()
    else:
        c2 = torch.where(sel, ctx + 5 * torch.randn_like(ctx), ctx)
        pert = _first(run_module(mod, mech, x, c2, key_padding_mask=mask))
        err = (base - pert).abs().max().item()
    assert err < 1e-10, (f"{mech.name} {pattern}: changing masked tokens changed unmasked outputs by {err:.2e} "
                         "(mask ignored)")


def check_batch_independence(mech: Mechanism, pattern: str) -> None:
    """Each batch row's output equals running that row alone."""
    if mech.functional:
        q, k, v = qkv(mech, pattern)
        full = run_functional(mech, pattern, q, k, v)
        for b in range(q.shape[0]):
            one = run_functional(mech, pattern, q[b : b + 1], k[b : b + 1], v[b : b + 1])
            assert_close(one, full[b : b + 1], torch.float64, f"{mech.name} {pattern}: batch row {b} alone vs in batch")
        return
    mod = make_module(mech, pattern)
    mod.eval()
    x, ctx = module_inputs(mech, pattern)
    full = _first(run_module(mod, mech, x, ctx))
    for b in range(x.shape[0]):
        one = _first(run_module(mod, mech, x[b : b + 1], _tmap(lambda c, b=b: c[b : b + 1], ctx)))
        assert_close(one, full[b : b + 1], torch.float64, f"{mech.name} {pattern}: batch row {b} alone vs in batch")


def check_permutation(mech: Mechanism, pattern: str) -> None:
    """Non-causal, when claimed: permuting keys with their values changes nothing; permuting queries
    permutes outputs."""
    assert pattern.startswith("noncausal") and mech.permutation_equivariant
    g = _gen(7)
    if mech.functional:
        q, k, v = qkv(mech, pattern)
        base = run_functional(mech, pattern, q, k, v)
        pk = torch.randperm(k.shape[2], generator=g)
        pq = torch.randperm(q.shape[2], generator=g)
        out = run_functional(mech, pattern, q[:, :, pq], k[:, :, pk], v[:, :, pk])
        assert_close(out, base[:, :, pq], torch.float64, f"{mech.name} {pattern}: permuted inputs")
        return
    mod = make_module(mech, pattern)
    x, ctx = module_inputs(mech, pattern)
    base = _first(run_module(mod, mech, x, ctx))
    px = torch.randperm(x.shape[1], generator=g)
    if ctx is None:
        out = _first(run_module(mod, mech, x[:, px], None))
    else:
        out = _first(run_module(mod, mech, x[:, px], _tmap(lambda c: c[:, torch.randperm(c.shape[1], generator=g)],
                                                             ctx)))
    assert_close(out, base[:, px], torch.float64, f"{mech.name} {pattern}: permuted tokens")


def check_gradients(mech: Mechanism, pattern: str) -> None:
    """Finite, non-zero-everywhere gradients for every input and parameter (float32)."""
    if mech.functional:
        q, k, v = qkv(mech, pattern, torch.float32, requires_grad=True)
        out = run_functional(mech, pattern, q, k, v)
        out.square().sum().backward()
        named = {"q": q, "k": k, "v": v}
    else:
        mod = make_module(mech, pattern, torch.float32)
        x, ctx = module_inputs(mech, pattern, torch.float32)
        x.requires_grad_(True)
        _tmap(lambda c: c.requires_grad_(True), ctx)
        out = _first(run_module(mod, mech, x, ctx))
        loss = out.square().sum()
        aux = getattr(mod, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            loss = loss + aux
        loss.backward()
        named = {"x": x}
        if isinstance(ctx, dict):
            named.update({f"context[{n!r}]": c for n, c in ctx.items()})
        elif ctx is not None:
            named["context"] = ctx
        named.update({f"parameter {n}": p for n, p in mod.named_parameters() if p.requires_grad})
    for name, t in named.items():
        if t.grad is None:
            raise AssertionError(f"{mech.name} {pattern}: no gradient reached {name}")
        assert torch.isfinite(t.grad).all(), f"{mech.name} {pattern}: non-finite gradient for {name}"


def check_bfloat16(mech: Mechanism, pattern: str) -> None:
    """bfloat16 output close to float32 output on the same (bf16-representable) inputs."""
    if mech.functional:
        q, k, v = (t.to(torch.bfloat16) for t in qkv(mech, pattern, torch.float64))
        lo = run_functional(mech, pattern, q, k, v)
        hi = run_functional(mech, pattern, q.float(), k.float(), v.float())
    else:
        mod = make_module(mech, pattern, torch.float32)
        mod.eval()
        x, ctx = module_inputs(mech, pattern, torch.float32)
        x = x.to(torch.bfloat16).float()
        ctx = _tmap(lambda c: c.to(torch.bfloat16).float(), ctx)
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        hi = _first(run_module(mod, mech, x, ctx))
        mod = mod.to(torch.bfloat16)
        lo = _first(run_module(mod, mech, x.to(torch.bfloat16), _tmap(lambda c: c.to(torch.bfloat16), ctx)))
    assert lo.dtype == torch.bfloat16, f"{mech.name} {pattern}: bfloat16 inputs gave {lo.dtype} output"
    assert_close(lo.float(), hi, torch.bfloat16, f"{mech.name} {pattern}: bfloat16 vs float32")


@contextlib.contextmanager
def _raises(mech: Mechanism, pattern: str, what: str):
    try:
        yield
    except (ValueError, TypeError, NotImplementedError):
        return
    raise AssertionError(f"{mech.name}: {what} ({pattern}) did not raise")


def check_unsupported_patterns(mech: Mechanism) -> None:
    """Every pattern the record does not declare raises a clear error."""
    for pattern in PATTERNS:
        if mech.supports(pattern) or mech.kind != "sequence":
            continue
        if mech.functional:
            q, k, v = qkv(mech, pattern)
            assert pattern_of(q.shape[2], k.shape[2], pattern.startswith("causal")) == pattern
            with _raises(mech, pattern, "an undeclared pattern"):
                run_functional(mech, pattern, q, k, v)
        else:
            with _raises(mech, pattern, "an undeclared pattern"):
                mod = make_module(mech, pattern)
                x, ctx = module_inputs(mech, pattern)
                if pattern.endswith("cross") and ctx is None:
                    raise AssertionError("no context")
                run_module(mod, mech, x, ctx)


def check_fast_matches_reference(mech: Mechanism, pattern: str) -> None:
    """``fast`` == ``reference``: outputs in float64 and float32, gradients in float64."""
    assert mech.fast is not None
    for dtype in (torch.float64, torch.float32):
        q, k, v = qkv(mech, pattern, dtype, requires_grad=dtype == torch.float64)
        s = Sizes.of(mech)
        for mask in (None, padding_mask(s.batch, k.shape[2]) if mech.supports_key_padding else None):
            ref = run_functional(mech, pattern, q, k, v, backend="reference", key_padding_mask=mask)
            fast = run_functional(mech, pattern, q, k, v, backend="fast", key_padding_mask=mask)
            what = f"{mech.name} {pattern}: fast vs reference ({dtype}, mask={mask is not None})"
            assert_close(fast, ref, dtype, what)
            if dtype == torch.float64:
                g = torch.randn_like(ref)
                gr = torch.autograd.grad(ref, (q, k, v), g)
                gf = torch.autograd.grad(fast, (q, k, v), g)
                for name, a, b in zip("qkv", gf, gr):
                    assert_close(a, b, dtype, f"{mech.name} {pattern}: fast vs reference gradient of {name}")


def check_module_fast_matches_reference(mech: Mechanism, pattern: str) -> None:
    """Modules with a fast form: ``module.backend = "fast"`` == ``"reference"`` (outputs, input and
    parameter gradients, float64)."""
    mod = make_module(mech, pattern)
    assert hasattr(mod, "backend"), f"{mech.name}: a module with a fast form must have a `backend` attribute"
    x, ctx = module_inputs(mech, pattern)
    results = {}
    for backend in ("reference", "fast"):
        mod.backend = backend
        mod.zero_grad()
        xi = x.detach().clone().requires_grad_(True)
        out = _first(run_module(mod, mech, xi, ctx))
        out.backward(torch.ones_like(out) + torch.linspace(0, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads = [xi.grad] + [p.grad for p in mod.parameters() if p.grad is not None]
        results[backend] = (out.detach(), [g.clone() for g in grads])
    (ro, rg), (fo, fg) = results["reference"], results["fast"]
    assert_close(fo, ro, torch.float64, f"{mech.name} {pattern}: module fast vs reference output")
    assert len(rg) == len(fg), f"{mech.name} {pattern}: fast and reference reach different parameters"
    largest = max(g.norm().item() for g in rg)
    for i, (a, b) in enumerate(zip(fg, rg)):
        what = f"{mech.name} {pattern}: module fast vs reference gradient #{i}"
        if b.norm().item() <= 1e-12 * largest:
            # An analytically zero gradient (a bias added to every logit of a softmax row, such as a key bias
            # or the last bias of a position-bias MLP) is rounding noise in both forms; a relative error of
            # noise against noise means nothing, so compare it against the largest gradient instead.
            err = (a - b).norm().item() / largest
            assert err <= TOL[torch.float64], f"{what}: |fast - reference| = {err:.3e} of the largest gradient"
            continue
        assert_close(a, b, torch.float64, what)


def check_decode(mech: Mechanism) -> None:
    """Prefill then token-by-token decoding equals the causal forward over the whole sequence."""
    pattern = "causal_self"
    if mech.functional and mech.step is not None:
        q, k, v = qkv(mech, pattern)
        full = run_functional(mech, pattern, q, k, v)
        s = Sizes.of(mech)
        state = mech.init_state(batch=s.batch, kv_heads=s.kv_heads, head_dim=s.head_dim, value_dim=s.value_dim,
                                dtype=q.dtype, device=q.device, **mech.resolve_options(dict(mech.test_options)))
        opts = mech.resolve_options(dict(mech.test_options))
        scale = 1.0 / math.sqrt(s.head_dim)
        n = q.shape[2]
        prefill = max(n // 2, mech.min_prefill(opts))
        outs = [mech.step(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], state, scale=scale, **opts)]
        for t in range(prefill, n):
            sl = slice(t, t + 1)
            outs.append(mech.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, scale=scale, **opts))
        got = torch.cat(outs, dim=2)
        assert_close(got, full, torch.float64, f"{mech.name}: step decoding (prefill {prefill}) vs causal forward")
        assert state.seq_len == n, f"{mech.name}: state.seq_len {state.seq_len} after {n} tokens"
        return
    mod = make_module(mech, pattern)
    mod.eval()
    x, _ = module_inputs(mech, pattern)
    full = _first(run_module(mod, mech, x))
    state = mod.init_state(x.shape[0])
    n = x.shape[1]
    prefill = max(n // 2, mech.min_prefill(mech.resolve_options(dict(mech.test_options))))
    out, state = mod(x[:, :prefill], state=state)
    outs = [out]
    for t in range(prefill, n):
        out, state = mod(x[:, t : t + 1], state=state)
        outs.append(out)
    got = torch.cat(outs, dim=1)
    assert_close(got, full, torch.float64, f"{mech.name}: step decoding (prefill {prefill}) vs causal forward")


def check_gradcheck(mech: Mechanism, pattern: str) -> None:
    """torch.autograd.gradcheck of the reference (and fast form) in float64 on tiny sizes."""
    if mech.functional:
        q, k, v = qkv(mech, pattern, torch.float64, requires_grad=True)
        q, k, v = (t[:1].detach().requires_grad_(True) for t in (q, k, v))
        backends = ["reference"] + (["fast"] if mech.fast is not None else [])
        for backend in backends:
            fn = lambda q, k, v, backend=backend: run_functional(mech, pattern, q, k, v, backend=backend)
            assert torch.autograd.gradcheck(fn, (q, k, v), raise_exception=False, fast_mode=True), (
                f"{mech.name} {pattern}: gradcheck failed ({backend})")
        return
    mod = make_module(mech, pattern)
    x, ctx = module_inputs(mech, pattern)
    x = x[:1].detach().requires_grad_(True)
    ctx = _tmap(lambda c: c[:1].detach().requires_grad_(True), ctx)
    names = list(ctx) if isinstance(ctx, dict) else None
    inputs = (x,) if ctx is None else (x, *ctx.values()) if names else (x, ctx)

    def fn(x, *c):
        return _first(run_module(mod, mech, x, dict(zip(names, c)) if names else (c[0] if c else None)))

    assert torch.autograd.gradcheck(fn, inputs, raise_exception=False, fast_mode=True), (
        f"{mech.name} {pattern}: gradcheck failed (module)")


# --------------------------------------------------------------------------------------------------------
# Cross checks (records with a cross pattern; see CrossSpec)
# --------------------------------------------------------------------------------------------------------
def _perturb_where(t: torch.Tensor, sel: torch.Tensor, seed: int) -> torch.Tensor:
    """t (B, M, C) with 5 x noise added on the tokens where ``sel`` (M,) or (B, M) is True."""
    g = _gen(seed)
    noise = 5 * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
    sel = sel.view(1, -1, 1) if sel.dim() == 1 else sel.unsqueeze(-1)
    return torch.where(sel, t + noise, t)


def query_positions(module, mech: Mechanism, x, ctx) -> torch.Tensor:
    """(Nq,) positions of the queries a causal-by-position module is run with by default (a pooling module
    reports its own through ``query_positions(num_frames)``)."""
    if mech.kind == "pooling":
        return module.query_positions(POSITIONS)
    return position_kwargs(module, mech, x, ctx)["q_pos"]


def check_cross_visibility(mech: Mechanism, pattern: str) -> None:
    """Causal by position: perturbing context tokens at positions > t leaves every query at position <= t
    unchanged, and does change some query at a later position (the check can see a leak)."""
    mod = make_module(mech, pattern)
    x, ctx = module_inputs(mech, pattern)
    assert positional(mod, mech), f"{mech.name} {pattern}: the module is not causal by position (no .causal)"
    base = _first(run_module(mod, mech, x, ctx))
    qp = query_positions(mod, mech, x, ctx)
    for t in range(POSITIONS - 1):
        if mech.kind == "pooling":
            x2, c2 = _perturb_where(x, default_positions(x.shape[1]) > t, seed=t), None
        else:
            x2 = x
            c2 = _tmap(lambda c, t=t: _perturb_where(c, default_positions(c.shape[1]) > t, seed=t), ctx)
        pert = _first(run_module(mod, mech, x2, c2))
        seen, later = qp <= t, qp > t
        err = (base[:, seen] - pert[:, seen]).abs().max().item() if seen.any() else 0.0
        assert err < 1e-10, (f"{mech.name} {pattern}: queries at positions <= {t} changed by {err:.2e} when context "
                             f"tokens at positions > {t} changed (a query sees a token placed after it)")
        if later.any():
            moved = (base[:, later] - pert[:, later]).abs().max().item()
            assert moved > 1e-6, (f"{mech.name} {pattern}: context tokens after position {t} reach no later query; "
                                  "the check cannot see a leak")


def check_source_masks(mech: Mechanism, pattern: str) -> None:
    """Named sources: each source's key-padding mask is honoured (changing its masked tokens changes nothing)
    and applies to that source only (the same change without the mask does change the output)."""
    s = Sizes.of(mech)
    mod = make_module(mech, pattern)
    x, ctx = module_inputs(mech, pattern)
    assert isinstance(ctx, dict), f"{mech.name} {pattern}: expected named sources {list(context_dims(mech))}"
    for i, (name, c) in enumerate(ctx.items()):
        mask = padding_mask(s.batch, c.shape[1], seed=3 + i)
        base = _first(run_module(mod, mech, x, ctx, key_padding_mask={name: mask}))
        moved = {**ctx, name: _perturb_where(c, ~mask, seed=11 + i)}
        pert = _first(run_module(mod, mech, x, moved, key_padding_mask={name: mask}))
        err = (base - pert).abs().max().item()
        assert err < 1e-10, (f"{mech.name} {pattern}: changing the masked tokens of source {name!r} changed the "
                             f"output by {err:.2e} (mask ignored)")
        free = _first(run_module(mod, mech, x, moved))
        assert (free - pert).abs().max().item() > 1e-6, (
            f"{mech.name} {pattern}: source {name!r}'s masked tokens change nothing even without the mask; the "
            "check cannot see a dropped mask")


def check_context_permutation(mech: Mechanism, pattern: str) -> None:
    """Permuting the context tokens together with their positions and key-padding masks leaves every output
    unchanged (records whose attention has no order over the context)."""
    s = Sizes.of(mech)
    g = _gen(13)
    if mech.functional:
        q, k, v = qkv(mech, pattern)
        mask = padding_mask(s.batch, k.shape[2]) if mech.supports_key_padding else None
        base = run_functional(mech, pattern, q, k, v, key_padding_mask=mask)
        pk = torch.randperm(k.shape[2], generator=g)
        out = run_functional(mech, pattern, q, k[:, :, pk], v[:, :, pk],
                             key_padding_mask=None if mask is None else mask[:, pk])
        assert_close(out, base, torch.float64, f"{mech.name} {pattern}: context tokens permuted")
        return
    mod = make_module(mech, pattern)
    x, ctx = module_inputs(mech, pattern)
    kw = position_kwargs(mod, mech, x, ctx)
    base = _first(run_module(mod, mech, x, ctx, **kw))
    if mech.kind == "pooling":  # the token set is x
        p = torch.randperm(x.shape[1], generator=g)
        if "context_pos" in kw:
            kw["context_pos"] = kw["context_pos"][p]
        out = _first(run_module(mod, mech, x[:, p], None, **kw))
    else:
        perms = _tmap(lambda c: torch.randperm(c.shape[1], generator=g), ctx)
        if isinstance(ctx, dict):
            c2 = {n: c[:, perms[n]] for n, c in ctx.items()}
            if "context_pos" in kw:
                kw["context_pos"] = {n: p[perms[n]] for n, p in kw["context_pos"].items()}
        else:
            c2 = ctx[:, perms]
            if "context_pos" in kw:
                kw["context_pos"] = kw["context_pos"][perms]
        out = _first(run_module(mod, mech, x, c2, **kw))
    assert_close(out, base, torch.float64, f"{mech.name} {pattern}: context tokens permuted (with positions)")


def _decode_module(mod, mech: Mechanism, x, ctx, kw: dict, prefill: int) -> torch.Tensor:
    """Decode ``mod`` against a cached context: the context's projections stored once (frames appended in
    position order for records causal by position), then queries in a prefill chunk and one at a time."""
    from .state.context import ContextCache

    state = ContextCache()
    if mech.kind == "pooling":  # learned queries: each call appends a frame and returns the queries it completes
        pos = kw["context_pos"]
        outs = []
        for t in range(POSITIONS):
            sel = pos == t
            out, state = mod(x[:, sel], context_pos=pos[sel], num_frames=kw["num_frames"], state=state)
            outs.append(out)
        return torch.cat(outs, dim=1)
    if "q_pos" not in kw:
        out, state = mod(x[:, :prefill], ctx, state=state)
        outs = [out] + [mod(x[:, t : t + 1], state=state)[0] for t in range(prefill, x.shape[1])]
        return torch.cat(outs, dim=1)
    # causal by position: append each frame's context tokens, then decode the queries at that position
    qp, cp = kw["q_pos"], kw["context_pos"]
    rows = []
    for t in range(POSITIONS):
        if isinstance(ctx, dict):
            new = {n: c[:, cp[n] == t] for n, c in ctx.items() if bool((cp[n] == t).any())}
            new_pos = {n: cp[n][cp[n] == t] for n in new}
        else:
            new, new_pos = ({"x": ctx[:, cp == t]}, {"x": cp[cp == t]}) if bool((cp == t).any()) else ({}, {})
            new, new_pos = (new["x"], new_pos["x"]) if new else (None, None)
        if new:
            mod.extend_context(state, new, context_pos=new_pos)
        for i in torch.nonzero(qp == t).flatten().tolist():
            rows.append((i, mod(x[:, i : i + 1], q_pos=qp[i : i + 1], state=state)[0]))
    order = [i for i, _ in rows]
    assert order == sorted(order), "query positions must be sorted for this check"
    return torch.cat([r for _, r in rows], dim=1)


def check_context_decode(mech: Mechanism, pattern: str) -> None:
    """Decoding against a fixed context equals the full run: functional records take the queries in a prefill chunk
    and then one at a time against the same keys/values; modules declaring ``cache`` decode with a ContextCache
    (the context projected once; frames appended in order when causal by position); other modules run their
    queries in chunks against the same context."""
    s = Sizes.of(mech)
    if mech.functional:
        q, k, v = qkv(mech, pattern)
        mask = padding_mask(s.batch, k.shape[2]) if mech.supports_key_padding else None
        full = run_functional(mech, pattern, q, k, v, key_padding_mask=mask)
        n = q.shape[2]
        prefill = max(1, n // 2)
        outs = [run_functional(mech, pattern, q[:, :, :prefill], k, v, key_padding_mask=mask)]
        outs += [run_functional(mech, pattern, q[:, :, t : t + 1], k, v, key_padding_mask=mask)
                 for t in range(prefill, n)]
        assert_close(torch.cat(outs, dim=2), full, torch.float64,
                     f"{mech.name} {pattern}: queries decoded against fixed keys/values vs all at once")
        return
    spec = mech.cross_spec()
    mod = make_module(mech, pattern)
    mod.eval()
    x, ctx = module_inputs(mech, pattern)
    kw = position_kwargs(mod, mech, x, ctx)
    full = _first(run_module(mod, mech, x, ctx, **kw))
    prefill = max(1, x.shape[1] // 2)
    if spec.cache:
        got = _decode_module(mod, mech, x, ctx, kw, prefill)
        what = "decoding with a ContextCache"
    else:
        chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, x.shape[1])]
        got = torch.cat([_first(run_module(mod, mech, x[:, a:b], ctx)) for a, b in chunks], dim=1)
        what = "queries in chunks against the same context"
    assert_close(got, full, torch.float64, f"{mech.name} {pattern}: {what} vs the full run")


def check_source_mass(mech: Mechanism, pattern: str) -> None:
    """``return_source_mass=True``: per source (B, H, Nq) in [0, 1]; in joint mode (built with ``mode="joint"`` when
    the record has a mode option) the masses sum to 1 for every query."""
    overrides = {"mode": "joint"} if any(o.name == "mode" for o in mech.options) else {}
    s = Sizes.of(mech)
    torch.manual_seed(0)
    mod = build(mech.name, s.dim, s.heads, causal=pattern.startswith("causal"), **{**mech.test_options, **overrides})
    _randomize(mod, 0)
    mod = mod.double()
    x, ctx = module_inputs(mech, pattern)
    res = run_module(mod, mech, x, ctx, return_source_mass=True)
    assert isinstance(res, tuple) and isinstance(res[1], dict), (
        f"{mech.name} {pattern}: return_source_mass=True must return (out, {{source: mass}})")
    mass = res[1]
    total = sum(mass.values())
    assert all(((m >= 0) & (m <= 1 + 1e-12)).all() for m in mass.values()), f"{mech.name}: mass outside [0, 1]"
    err = (total - 1).abs().max().item()
    assert err < 1e-10, f"{mech.name} {pattern}: joint source masses sum to 1 +- {err:.2e} per query"


# --------------------------------------------------------------------------------------------------------
# Which checks apply to a record
# --------------------------------------------------------------------------------------------------------
PatternCheck = Callable[[Mechanism, str], None]
def check_declared_mask(mech: Mechanism, pattern: str) -> None:
    """A declared static mask (registry ``mask``) reproduces the reference: softmax attention under it, per head,
    equals the mechanism's reference (the bench runs FlexAttention and masked SDPA from it; the analysis draws it)."""
    q, k, v = qkv(mech, pattern, torch.float64)
    opts = mech.resolve_options(dict(mech.test_options))
    causal = pattern.startswith("causal")
    ref = run_functional(mech, pattern, q, k, v, backend="reference")
    pred = mech.mask(q.shape[2], k.shape[2], causal=causal, heads=q.shape[1], kv_heads=k.shape[1], **opts)
    mask = materialize(pred, 1, q.shape[1], q.shape[2], k.shape[2])  # (1, Hq, Nq, Nk)
    dense = softmax_attention(q, k, v, attn_mask=mask)
    assert_close(dense, ref, torch.float64, f"{mech.name} {pattern}: softmax under the declared mask vs reference")


MechCheck = Callable[[Mechanism], None]


def cases(mech: Mechanism) -> list[tuple[str, str | None, Callable[..., None]]]:
    """(check name, pattern or None, check function) for every check that applies to ``mech``."""
    out: list[tuple[str, str | None, Callable[..., None]]] = []
    spec = mech.cross_spec()
    if mech.kind in ("sequence", "pooling", "fusion") and spec is not None:
        patterns = mech.patterns
    else:
        patterns = mech.patterns if mech.kind == "sequence" else ("noncausal_self",)
    for p in patterns:
        cross = spec is not None and p.endswith("cross")
        by_position = cross and spec.positions and p.startswith("causal")
        out += [("shape_dtype", p, check_shape_dtype), ("batch_independence", p, check_batch_independence),
                ("gradients", p, check_gradients), ("bfloat16", p, check_bfloat16),
                ("gradcheck", p, check_gradcheck)]
        if cross and spec.sources:
            out.append(("source_masks", p, check_source_masks))
        elif mech.kind in ("sequence", "pooling"):
            out.append(("key_padding", p, check_key_padding))
        if mech.functional:
            out.append(("noncontiguous", p, check_noncontiguous))
        if by_position:
            out.append(("cross_visibility", p, check_cross_visibility))
        elif p.startswith("causal"):
            out.append(("causality", p, check_causality))
            if mech.prefix_invariant:
                out.append(("prefix_invariance", p, check_prefix_invariance))
        elif mech.permutation_equivariant:
            out.append(("permutation", p, check_permutation))
        if mech.mask is not None and mech.functional:
            out.append(("declared_mask", p, check_declared_mask))
        if cross and (p.startswith("noncausal") or by_position):
            if spec.context_permutation_invariant:
                out.append(("context_permutation", p, check_context_permutation))
            if mech.kind == "pooling" and spec.cache and by_position:  # frames appended, query groups emitted
                out.append(("context_decode", p, check_context_decode))
            elif mech.kind != "pooling" and (spec.cache or spec.query_independent):
                out.append(("context_decode", p, check_context_decode))
        if cross and spec.source_mass:
            out.append(("source_mass", p, check_source_mass))
        if mech.fast is not None and mech.functional:
            out.append(("fast_vs_reference", p, check_fast_matches_reference))
        elif mech.fast is not None:
            out.append(("fast_vs_reference", p, check_module_fast_matches_reference))
    if mech.kind == "sequence":
        out.append(("unsupported_patterns", None, check_unsupported_patterns))
    if mech.decodable and "causal_self" in mech.patterns:
        out.append(("decode", None, check_decode))
    return out


def run_all(mech: Mechanism) -> dict[str, str]:
    """Run every applicable check; returns {case id: failure message} (empty when all pass)."""
    failures = {}
    for name, pattern, fn in cases(mech):
        cid = f"{name}[{pattern}]" if pattern else name
        try:
            fn(mech, pattern) if pattern is not None else fn(mech)
        except AssertionError as e:
            failures[cid] = str(e)
    return failures

