"""Efficiency cases: a JSON-able spec in, the closure to measure out.

The same :func:`build` runs in the timing process and in the memory child (:mod:`attnzoo.bench.forkserver`),
so a spec fully describes a case. Spec keys::

    impl        "mechanism" (the registered mechanism, backend auto), "reference" (its reference form),
                "sdpa" (torch SDPA on the same q/k/v; decode: KV cache + SDPA), "softmax_module" (the
                generic attnzoo Attention layer with softmax, the baseline of module mechanisms),
                "sdpa_masked" (SDPA with the mechanism's static mask materialized), "flex" (compiled
                FlexAttention with its block mask), "local_attention" (the `local-attention` package)
    mechanism   registered name (whose options / mask / module the case uses)
    pattern     one of attnzoo.PATTERNS; mode: "forward", "forward_backward" or "decode"
    kind        "sequence" | "grid" | "channel" | "pooling" | "fusion" (the input layout)
    module      True when the mechanism is a module (module mechanisms and their baseline)
    batch, heads, kv_heads, head_dim, nq, nk, side (grid/channel: the grid is side x side = nq tokens)
    dtype       "float32" | "bfloat16" | "float64";  options: the mechanism's options
    decode_tokens  tokens decoded per measured call (time is reported per token);  seed
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
MODES = ("forward", "forward_backward", "decode")


@dataclass
class Built:
    """A case ready to measure: ``run()`` (forward, forward+backward), or ``step(prepare())`` (decode)."""

    run: Callable[[], Any] | None = None
    prepare: Callable[[], Any] | None = None
    step: Callable[[Any], Any] | None = None
    tokens: int = 1  # tokens processed per measured decode call
    info: dict[str, Any] = field(default_factory=dict)


def _dtype(spec: dict[str, Any]) -> torch.dtype:
    name = spec.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _gen(spec: dict[str, Any]) -> torch.Generator:
    return torch.Generator().manual_seed(int(spec.get("seed", 0)))


def _randn(shape, g, dtype, requires_grad=False) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype).requires_grad_(requires_grad)


def state_nbytes(state: Any, _seen: set[int] | None = None) -> int:
    """Bytes of tensor storage held by a decode state of any shape: a DecodeState (``nbytes()``), tensors,
    or containers/objects holding them."""
    seen = set() if _seen is None else _seen
    if state is None or id(state) in seen:
        return 0
    seen.add(id(state))
    if isinstance(state, torch.Tensor):
        return state.untyped_storage().nbytes()
    nb = getattr(state, "nbytes", None)
    if callable(nb):
        return int(nb())
    if isinstance(state, dict):
        return sum(state_nbytes(v, seen) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v, seen) for v in state)
    if hasattr(state, "__dict__"):
        return sum(state_nbytes(v, seen) for v in vars(state).values())
    return 0


# --------------------------------------------------------------------------------------------------------
# Functional cases (SDPA layout q/k/v)
# --------------------------------------------------------------------------------------------------------
def _qkv(spec, g, dtype, requires_grad=False, nq=None, nk=None):
    B, H, Hk, D = spec["batch"], spec["heads"], spec.get("kv_heads") or spec["heads"], spec["head_dim"]
    nq = spec["nq"] if nq is None else nq
    nk = spec["nk"] if nk is None else nk
    q = _randn((B, H, nq, D), g, dtype, requires_grad)  # (B, Hq, Nq, D)
    k = _randn((B, Hk, nk, D), g, dtype, requires_grad)  # (B, Hk, Nk, D)
    v = _randn((B, Hk, nk, D), g, dtype, requires_grad)  # (B, Hk, Nk, D)
    return q, k, v


def _attention_fn(spec: dict[str, Any]) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
    """(fn(q, k, v) -> out, info) for a functional impl."""
    from .. import registry
    from ..functional import attention
    from ..kernels.sdpa import sdpa

    impl, causal = spec["impl"], spec["pattern"].startswith("causal")
    if impl == "sdpa":
        def fn(q, k, v):
            return sdpa(q, k, v, causal=causal, scale=1.0 / math.sqrt(q.shape[-1]))
        return fn, {"form": "sdpa"}
    mech = registry.get(spec["mechanism"])
    opts = mech.resolve_options(spec.get("options", {}))
    if impl in ("mechanism", "reference"):
        backend = "auto" if impl == "mechanism" else "reference"

        def fn(q, k, v):
            return attention(q, k, v, mechanism=mech.name, causal=causal, backend=backend, **opts)

        return fn, {"form": "reference" if impl == "reference" else None, "select": (mech, backend, opts)}
    if impl == "sdpa_masked":
        from ..masks import materialize

        if mech.mask is None:
            raise ValueError(f"sdpa_masked: mechanism {mech.name!r} declares no static mask")
        heads, kv_heads = spec["heads"], spec.get("kv_heads") or spec["heads"]
        pred = mech.mask(spec["nq"], spec["nk"], causal=causal, heads=heads, kv_heads=kv_heads, **opts)
        mask = materialize(pred, 1, getattr(pred, "heads", 1), spec["nq"], spec["nk"])  # (1, Hq or 1, Nq, Nk) bool

        def fn(q, k, v):
            return sdpa(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))

        return fn, {"form": "sdpa+dense mask"}
    if impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        from ..masks import block_mask

        if mech.mask is None:
            raise ValueError(f"flex: mechanism {mech.name!r} declares no static mask")
        heads, kv_heads = spec["heads"], spec.get("kv_heads") or spec["heads"]
        pred = mech.mask(spec["nq"], spec["nk"], causal=causal, heads=heads, kv_heads=kv_heads, **opts)
        bm = block_mask(pred, None, getattr(pred, "heads", None), spec["nq"], spec["nk"])
        compiled = torch.compile(flex_attention, dynamic=False)
        gqa = (spec.get("kv_heads") or spec["heads"]) != spec["heads"]

        def fn(q, k, v):
            return compiled(q, k, v, block_mask=bm, enable_gqa=gqa)

        return fn, {"form": "flex_attention (torch.compile)"}
    if impl == "local_attention":
        from local_attention import LocalAttention

        window = int(opts["window"])
        if (spec.get("kv_heads") or spec["heads"]) != spec["heads"]:
            raise ValueError("local_attention: the package has no grouped-query heads (kv_heads != heads)")
        if spec["nq"] != spec["nk"]:
            raise ValueError("local_attention: self attention only (Nq == Nk)")
        # The package's exact window of size w sees keys p-w..p (w + 1 keys), ours p-w+1..p: window - 1.
        la = LocalAttention(window_size=max(1, window - 1), causal=causal, look_backward=1,
                            look_forward=0 if causal else 1, exact_windowsize=True, autopad=True)

        def fn(q, k, v):
            return la(q, k, v)

        return fn, {"form": "local_attention.LocalAttention (exact window)"}
    raise ValueError(f"impl: unknown {impl!r}")


def _functional(spec: dict[str, Any]) -> Built:
    from ..functional import select_form

    dtype, g, mode = _dtype(spec), _gen(spec), spec["mode"]
    if mode == "decode":
        return _functional_decode(spec, dtype, g)
    fn, info = _attention_fn(spec)
    grad = mode == "forward_backward"
    q, k, v = _qkv(spec, g, dtype, requires_grad=grad)
    if "select" in info:
        mech, backend, opts = info.pop("select")
        chosen = select_form(mech, backend, q, k, v, spec["pattern"].startswith("causal"), None, opts)
        info["form"] = "fast" if chosen is mech.fast and mech.fast is not None else "reference"
    if not grad:
        def run():
            with torch.no_grad():
                return fn(q, k, v)
        return Built(run=run, info=info)
    gout = None

    def run():
        nonlocal gout
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        if gout is None:
            gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        out.backward(gout)

    return Built(run=run, info=info)


def _functional_decode(spec: dict[str, Any], dtype, g) -> Built:
    from .. import registry
    from ..mechanisms.core.softmax import init_kv_cache, softmax_step

    impl, T = spec["impl"], int(spec.get("decode_tokens", 4))
    if impl == "sdpa":
        init, step, opts = init_kv_cache, softmax_step, {}
        form = "KV cache + sdpa"
    elif impl == "mechanism":
        mech = registry.get(spec["mechanism"])
        if mech.step is None:
            raise ValueError(f"decode: mechanism {mech.name!r} has no step")
        init, step, opts = mech.init_state, mech.step, mech.resolve_options(spec.get("options", {}))
        form = "step"
    else:
        raise ValueError(f"decode: impl {impl!r} has no decode form")
    B, Hk, D = spec["batch"], spec.get("kv_heads") or spec["heads"], spec["head_dim"]
    n = spec["nk"]
    scale = 1.0 / math.sqrt(D)
    qp, kp, vp = _qkv(spec, g, dtype, nq=n, nk=n)  # prefill, (B, H, N, D)
    qt, kt, vt = _qkv(spec, g, dtype, nq=T, nk=T)  # the T decoded tokens
    with torch.no_grad():
        state = init(batch=B, kv_heads=Hk, head_dim=D, value_dim=D, dtype=dtype, device="cpu", **opts)
        # Prefill N - 1 tokens, then decode the N-th: the snapshot is a state in steady decoding (a KV cache
        # has already grown past its prefill size, so no measured call pays for a one-off reallocation).
        if n > 1:
            step(qp[:, :, :-1], kp[:, :, :-1], vp[:, :, :-1], state, scale=scale, **opts)
        step(qp[:, :, -1:], kp[:, :, -1:], vp[:, :, -1:], state, scale=scale, **opts)

    def prepare():
        return copy.deepcopy(state)

    def run(st):
        with torch.no_grad():
            for t in range(T):
                s = slice(t, t + 1)
                step(qt[:, :, s], kt[:, :, s], vt[:, :, s], st, scale=scale, **opts)

    return Built(prepare=prepare, step=run, tokens=T, info={"form": form, "state_bytes": state_nbytes(state)})


# --------------------------------------------------------------------------------------------------------
# Module cases ((B, N, dim) tokens, (B, H, W, C) grids, (B, C, H, W) maps)
# --------------------------------------------------------------------------------------------------------
def _make_module(spec: dict[str, Any], dtype) -> torch.nn.Module:
    from ..layers import build

    heads = spec["heads"]
    dim = heads * spec["head_dim"]
    causal = spec["pattern"].startswith("causal")
    torch.manual_seed(int(spec.get("seed", 0)))
    if spec["impl"] == "softmax_module":
        m = build("softmax", dim, heads, causal=causal)
    else:
        from .. import registry

        mech = registry.get(spec["mechanism"])
        opts = dict(spec.get("options", {}))
        if mech.kind == "sequence":
            kv = spec.get("kv_heads")
            kw = {"kv_heads": kv} if kv and kv != heads else {}
            m = build(mech.name, dim, heads, causal=causal, **kw, **opts)
        else:
            m = build(mech.name, dim, heads, **opts)
    return m.to(dtype)


def _module_inputs(spec: dict[str, Any], g, dtype, requires_grad=False):
    B, dim = spec["batch"], spec["heads"] * spec["head_dim"]
    kind = spec.get("kind", "sequence") if spec["impl"] != "softmax_module" else "sequence"
    if kind == "grid":
        s = spec["side"]
        return _randn((B, s, s, dim), g, dtype, requires_grad), None  # (B, H, W, C)
    if kind == "channel":
        s = spec["side"]
        return _randn((B, dim, s, s), g, dtype, requires_grad), None  # (B, C, H, W)
    x = _randn((B, spec["nq"], dim), g, dtype, requires_grad)  # (B, N, dim)
    ctx = None
    if spec["pattern"].endswith("cross") or kind == "fusion":
        ctx = _randn((B, spec["nk"], dim), g, dtype, requires_grad)  # (B, M, dim)
    return x, ctx


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _module(spec: dict[str, Any]) -> Built:
    dtype, g, mode = _dtype(spec), _gen(spec), spec["mode"]
    module = _make_module(spec, dtype)
    info = {"form": "module" if spec["impl"] != "softmax_module" else "Attention(softmax) module",
            "parameters": sum(p.numel() for p in module.parameters())}
    backend = getattr(module, "backend", None)
    if backend is not None:
        info["backend"] = backend
    if mode == "decode":
        return _module_decode(spec, module, dtype, g, info)
    grad = mode == "forward_backward"
    x, ctx = _module_inputs(spec, g, dtype, requires_grad=grad)
    args = (x,) if ctx is None else (x, ctx)
    if not grad:
        module.eval()

        def run():
            with torch.no_grad():
                return module(*args)

        return Built(run=run, info=info)
    module.train()
    gout = None

    def run():
        nonlocal gout
        module.zero_grad(set_to_none=True)
        for t in args:
            t.grad = None
        out = _first(module(*args))
        loss_terms = []
        aux = getattr(module, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and aux.requires_grad:
            loss_terms.append(aux)
        if gout is None:
            gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        torch.autograd.backward([out, *loss_terms], [gout, *[torch.ones_like(a) for a in loss_terms]])

    return Built(run=run, info=info)


def _module_decode(spec, module, dtype, g, info) -> Built:
    T, B, n = int(spec.get("decode_tokens", 4)), spec["batch"], spec["nk"]
    dim = spec["heads"] * spec["head_dim"]
    if not hasattr(module, "init_state"):
        raise ValueError("decode: the module has no init_state")
    module.eval()
    x = _randn((B, n, dim), g, dtype)  # (B, N, dim) prefill
    xt = _randn((B, T, dim), g, dtype)  # (B, T, dim) decoded tokens
    with torch.no_grad():
        state = module.init_state(B)
        if n > 1:  # prefill N - 1 tokens, decode the N-th: a state in steady decoding (see _functional_decode)
            _, state = module(x[:, :-1], state=state)
        _, state = module(x[:, -1:], state=state)

    def prepare():
        return copy.deepcopy(state)

    def run(st):
        with torch.no_grad():
            for t in range(T):
                _, st = module(xt[:, t: t + 1], state=st)

    info = {**info, "form": info["form"] + " + state", "state_bytes": state_nbytes(state)}
    return Built(prepare=prepare, step=run, tokens=T, info=info)


# --------------------------------------------------------------------------------------------------------
def build(spec: dict[str, Any]) -> Built:
    """The measurable closure of ``spec`` (see the module docstring)."""
    if spec["mode"] not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {spec['mode']!r}")
    if "cross_shape" in spec:  # a cross mechanism at one of its papers' shapes (attnzoo.bench.cross)
        from .cross import build as build_cross

        return build_cross(spec)
    if spec.get("module") or spec["impl"] == "softmax_module":
        return _module(spec)
    return _functional(spec)


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Build ``spec`` and measure the peak memory of one call (run it in a fresh process)."""
    from .measure import measure_peak

    built = build(spec)
    if built.run is not None:
        return measure_peak(built.run)
    return measure_peak(built.step, prepare=built.prepare)
