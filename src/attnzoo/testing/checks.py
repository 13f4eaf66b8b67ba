"""Conformance checks of a record on one pattern: shape and dtype, causality, prefix invariance, key padding, batch
independence, permutation, gradients, bfloat16, unsupported patterns, fast == reference, decode == forward,
gradcheck."""

from __future__ import annotations

import contextlib
import math

import torch

from ..functional import pattern_of
from ..masks import materialize
from ..registry import PATTERNS, Mechanism
from .inputs import (
    TOL,
    Sizes,
    assert_close,
    first_output,
    lengths,
    make_module,
    map_tensors,
    module_inputs,
    padding_mask,
    qkv,
    run_functional,
    run_module,
    seeded_generator,
)


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
            out = first_output(run_module(m, mech, x, ctx))
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
            base = first_output(run_module(m, mech, x, ctx))
            if ctx is None:
                x2 = x.clone()
                x2[:, t + 1 :] += 3 * torch.randn_like(x2[:, t + 1 :])
                pert = first_output(run_module(m, mech, x2, None))
            else:
                c2 = ctx.clone()
                c2[:, t + 1 :] += 3 * torch.randn_like(c2[:, t + 1 :])
                pert = first_output(run_module(m, mech, x, c2))
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
        full = first_output(run_module(mod, mech, x, ctx))
        part = first_output(run_module(mod, mech, x[:, :m_], None if ctx is None else ctx[:, : m_ + off]))
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
    base = first_output(run_module(mod, mech, x, ctx, key_padding_mask=mask))
    sel = (~mask).view(s.batch, nk, 1)
    if mech.kind == "pooling":  # the token set is x; every pooled output must ignore its padded tokens
        x2 = torch.where(sel, x + 5 * torch.randn_like(x), x)
        pert = first_output(run_module(mod, mech, x2, None, key_padding_mask=mask))
        err = (base - pert).abs().max().item()
    elif ctx is None:
        x2 = torch.where(sel, x + 5 * torch.randn_like(x), x)
        pert = first_output(run_module(mod, mech, x2, None, key_padding_mask=mask))
        keep = mask.view(s.batch, nk, 1)  # outputs at padded query rows may change; the others may not
        err = ((base - pert) * keep).abs().max().item()
    else:
        c2 = torch.where(sel, ctx + 5 * torch.randn_like(ctx), ctx)
        pert = first_output(run_module(mod, mech, x, c2, key_padding_mask=mask))
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
    full = first_output(run_module(mod, mech, x, ctx))
    for b in range(x.shape[0]):
        one = first_output(run_module(mod, mech, x[b : b + 1], map_tensors(lambda c, b=b: c[b : b + 1], ctx)))
        assert_close(one, full[b : b + 1], torch.float64, f"{mech.name} {pattern}: batch row {b} alone vs in batch")


def check_permutation(mech: Mechanism, pattern: str) -> None:
    """Non-causal, when claimed: permuting keys with their values changes nothing; permuting queries
    permutes outputs."""
    assert pattern.startswith("noncausal") and mech.permutation_equivariant
    g = seeded_generator(7)
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
    base = first_output(run_module(mod, mech, x, ctx))
    px = torch.randperm(x.shape[1], generator=g)
    if ctx is None:
        out = first_output(run_module(mod, mech, x[:, px], None))
    else:
        shuffled = map_tensors(lambda c: c[:, torch.randperm(c.shape[1], generator=g)], ctx)
        out = first_output(run_module(mod, mech, x[:, px], shuffled))
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
        map_tensors(lambda c: c.requires_grad_(True), ctx)
        out = first_output(run_module(mod, mech, x, ctx))
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
        ctx = map_tensors(lambda c: c.to(torch.bfloat16).float(), ctx)
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        hi = first_output(run_module(mod, mech, x, ctx))
        mod = mod.to(torch.bfloat16)
        lo = first_output(run_module(mod, mech, x.to(torch.bfloat16), map_tensors(lambda c: c.to(torch.bfloat16), ctx)))
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
        out = first_output(run_module(mod, mech, xi, ctx))
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
    full = first_output(run_module(mod, mech, x))
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
    ctx = map_tensors(lambda c: c[:1].detach().requires_grad_(True), ctx)
    names = list(ctx) if isinstance(ctx, dict) else None
    inputs = (x,) if ctx is None else (x, *ctx.values()) if names else (x, ctx)

    def fn(x, *c):
        return first_output(run_module(mod, mech, x, dict(zip(names, c)) if names else (c[0] if c else None)))

    assert torch.autograd.gradcheck(fn, inputs, raise_exception=False, fast_mode=True), (
        f"{mech.name} {pattern}: gradcheck failed (module)")
