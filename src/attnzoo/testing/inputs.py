"""Conformance inputs: tolerances and relative error, seeded q/k/v and module inputs for a record and pattern
(sizes, positions, multi-source contexts), and the calls that run a functional form or a module on them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..functional import attention
from ..layers import build
from ..registry import Mechanism

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


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lengths(mech: Mechanism, pattern: str) -> tuple[int, int]:
    s = Sizes.of(mech)
    return (s.n, s.n) if pattern.endswith("self") else (s.nq, s.nk)


def qkv(mech: Mechanism, pattern: str, dtype=torch.float64, seed: int = 0, requires_grad: bool = False):
    """Random q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) for a functional mechanism."""
    s = Sizes.of(mech)
    nq, nk = lengths(mech, pattern)
    g = seeded_generator(seed)
    q = torch.randn(s.batch, s.heads, nq, s.head_dim, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(s.batch, s.kv_heads, nk, s.head_dim, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(s.batch, s.kv_heads, nk, s.value_dim, generator=g, dtype=torch.float64).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def padding_mask(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    """A key-padding mask with some keys masked in every row, never all (first key always kept)."""
    g = seeded_generator(seed)
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
    randomize(m, seed)
    return m.to(dtype)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Give zero-initialised parameters (gates, biases, LoRA-style deltas) random values, so checks
    exercise every path instead of a degenerate one."""
    g = seeded_generator(seed + 1000)
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
    g = seeded_generator(seed)
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


def map_tensors(fn, ctx):
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


def first_output(out):
    return out[0] if isinstance(out, tuple) else out
