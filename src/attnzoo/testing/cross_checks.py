"""Conformance checks of records with a cross pattern (read from their CrossSpec): visibility by position,
per-source masks, context permutation, decoding against a cached context, source mass."""

from __future__ import annotations

import torch

from ..layers import build
from ..registry import Mechanism
from .inputs import (
    POSITIONS,
    Sizes,
    assert_close,
    context_dims,
    default_positions,
    first_output,
    make_module,
    map_tensors,
    module_inputs,
    padding_mask,
    position_kwargs,
    positional,
    qkv,
    randomize,
    run_functional,
    run_module,
    seeded_generator,
)


# --------------------------------------------------------------------------------------------------------
# Cross checks (records with a cross pattern; see CrossSpec)
# --------------------------------------------------------------------------------------------------------
def _perturb_where(t: torch.Tensor, sel: torch.Tensor, seed: int) -> torch.Tensor:
    """t (B, M, C) with 5 x noise added on the tokens where ``sel`` (M,) or (B, M) is True."""
    g = seeded_generator(seed)
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
    base = first_output(run_module(mod, mech, x, ctx))
    qp = query_positions(mod, mech, x, ctx)
    for t in range(POSITIONS - 1):
        if mech.kind == "pooling":
            x2, c2 = _perturb_where(x, default_positions(x.shape[1]) > t, seed=t), None
        else:
            x2 = x
            c2 = map_tensors(lambda c, t=t: _perturb_where(c, default_positions(c.shape[1]) > t, seed=t), ctx)
        pert = first_output(run_module(mod, mech, x2, c2))
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
        base = first_output(run_module(mod, mech, x, ctx, key_padding_mask={name: mask}))
        moved = {**ctx, name: _perturb_where(c, ~mask, seed=11 + i)}
        pert = first_output(run_module(mod, mech, x, moved, key_padding_mask={name: mask}))
        err = (base - pert).abs().max().item()
        assert err < 1e-10, (f"{mech.name} {pattern}: changing the masked tokens of source {name!r} changed the "
                             f"output by {err:.2e} (mask ignored)")
        free = first_output(run_module(mod, mech, x, moved))
        assert (free - pert).abs().max().item() > 1e-6, (
            f"{mech.name} {pattern}: source {name!r}'s masked tokens change nothing even without the mask; the "
            "check cannot see a dropped mask")


def check_context_permutation(mech: Mechanism, pattern: str) -> None:
    """Permuting the context tokens together with their positions and key-padding masks leaves every output
    unchanged (records whose attention has no order over the context)."""
    s = Sizes.of(mech)
    g = seeded_generator(13)
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
    base = first_output(run_module(mod, mech, x, ctx, **kw))
    if mech.kind == "pooling":  # the token set is x
        p = torch.randperm(x.shape[1], generator=g)
        if "context_pos" in kw:
            kw["context_pos"] = kw["context_pos"][p]
        out = first_output(run_module(mod, mech, x[:, p], None, **kw))
    else:
        perms = map_tensors(lambda c: torch.randperm(c.shape[1], generator=g), ctx)
        if isinstance(ctx, dict):
            c2 = {n: c[:, perms[n]] for n, c in ctx.items()}
            if "context_pos" in kw:
                kw["context_pos"] = {n: p[perms[n]] for n, p in kw["context_pos"].items()}
        else:
            c2 = ctx[:, perms]
            if "context_pos" in kw:
                kw["context_pos"] = kw["context_pos"][perms]
        out = first_output(run_module(mod, mech, x, c2, **kw))
    assert_close(out, base, torch.float64, f"{mech.name} {pattern}: context tokens permuted (with positions)")


def _decode_module(mod, mech: Mechanism, x, ctx, kw: dict, prefill: int) -> torch.Tensor:
    """Decode ``mod`` against a cached context: the context's projections stored once (frames appended in
    position order for records causal by position), then queries in a prefill chunk and one at a time."""
    from ..cross import ContextCache

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
    full = first_output(run_module(mod, mech, x, ctx, **kw))
    prefill = max(1, x.shape[1] // 2)
    if spec.cache:
        got = _decode_module(mod, mech, x, ctx, kw, prefill)
        what = "decoding with a ContextCache"
    else:
        chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, x.shape[1])]
        got = torch.cat([first_output(run_module(mod, mech, x[:, a:b], ctx)) for a, b in chunks], dim=1)
        what = "queries in chunks against the same context"
    assert_close(got, full, torch.float64, f"{mech.name} {pattern}: {what} vs the full run")


def check_source_mass(mech: Mechanism, pattern: str) -> None:
    """``return_source_mass=True``: per source (B, H, Nq) in [0, 1]; in joint mode (built with ``mode="joint"`` when
    the record has a mode option) the masses sum to 1 for every query."""
    overrides = {"mode": "joint"} if any(o.name == "mode" for o in mech.options) else {}
    s = Sizes.of(mech)
    torch.manual_seed(0)
    mod = build(mech.name, s.dim, s.heads, causal=pattern.startswith("causal"), **{**mech.test_options, **overrides})
    randomize(mod, 0)
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
