"""Cross mechanisms in ``attnzoo bench``: their papers' shapes, named-source inputs, baselines on the same shapes.

A mechanism listed in :data:`SHAPES` is planned here instead of over ``cfg.lengths`` (the efficiency planner calls
:func:`plan`): each case is one of its papers' shapes (IP-Adapter: 4096 latent queries x 77 text + 4..256 image
tokens; Video-CCAM: 64 learned queries x T frames x 256 tokens; ...), in each cross pattern it supports, forward and
forward+backward, beside the softmax ``Attention`` layer (one fused SDPA call) with the same queries over all its
context tokens (``impl="softmax_module"``). Records that decode against a ``ContextCache`` (``cross.cache``) also get
``decode`` cases: ``decode_tokens`` steps reading the cached context, beside the same module recomputing the
context's projections at every step (``impl="context_recompute"``); Video-CCAM appends one frame per step and its
recomputing baseline re-runs the projector over the frames so far.

Spec keys beyond :mod:`attnzoo.bench.cases`': ``cross_shape`` = {"queries": Nq, "sources": {name: M}} (sequence,
fusion), {"tokens": M, ...} (pooling), {"frames": T, "tokens_per_frame": n_f} (frames); ``nk``/``n`` = all context
tokens.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

SHAPES: dict[str, dict[str, list[dict[str, Any]]]] = {
    # pattern -> shapes; "quick" takes the first shape of each pattern, "full" all of them
    "ip_adapter": {"noncausal_cross": [{"queries": 4096, "sources": {"text": 77, "image": 4}},
                                       {"queries": 4096, "sources": {"text": 77, "image": 256}}]},
    "cross_attention": {"noncausal_cross": [{"queries": 4096, "sources": {"text": 77, "image": 256}}],
                        "causal_cross": [{"queries": 1024, "sources": {"text": 77, "image": 1024}, "frames": 16}]},
    "freeedit_drra": {"noncausal_cross": [{"queries": 1024, "sources": {"reference": 1024}}]},
    "crossvit": {"noncausal_cross": [{"queries": 1 + 400, "sources": {"context": 196}}]},
    "dcal_pwca": {"noncausal_cross": [{"queries": 785, "sources": {"context": 785}}]},
    "fcaformer": {"noncausal_cross": [{"queries": 196, "sources": {"context": 128}}]},
    "video_ccam": {"causal_cross": [{"queries": 64, "frames": 16, "tokens_per_frame": 256},
                                    {"queries": 64, "frames": 4, "tokens_per_frame": 256}],
                   "noncausal_cross": [{"queries": 64, "frames": 16, "tokens_per_frame": 256}]},
    "acmil": {"noncausal_cross": [{"queries": 5, "tokens": 4096}]},
    "filip": {"noncausal_cross": [{"queries": 197, "sources": {"context": 77}}]},
    "multilayer_pooling": {"noncausal_cross": [{"queries": 768, "tokens": 32}]},
    "label_attention": {"noncausal_cross": [{"queries": 54, "tokens": 512}]},
    "crosstune": {"noncausal_cross": [{"queries": 4, "tokens": 128}]},
    "texthawk_resa": {"noncausal_cross": [{"queries": 144, "tokens": 576}]},
}
"""Per mechanism and pattern, the shapes of its papers: queries x context tokens per source (or the pooled set)."""


def applies(name: str) -> bool:
    return name in SHAPES


def _options(name: str, shape: dict[str, Any], dim: int) -> dict[str, Any]:
    """Options a shape needs (widths of the named sources = the model width; query counts)."""
    q = shape["queries"]
    return {
        "ip_adapter": {"context_dims": {n: dim for n in shape.get("sources", {})}},
        "cross_attention": {"context_dims": {n: dim for n in shape.get("sources", {})}},
        "fcaformer": {"cross_tokens": sum(shape.get("sources", {}).values()) or 1},
        "video_ccam": {"num_queries": q},
        "acmil": {"branches": q},
        "multilayer_pooling": {"num_latents": q, "num_layers": shape.get("tokens", 1)},
        "label_attention": {"num_labels": q},
        "crosstune": {"num_labels": q},
        "texthawk_resa": {"num_queries": q},
    }.get(name, {})


def _tokens(shape: dict[str, Any]) -> int:
    if "frames" in shape and "tokens_per_frame" in shape:
        return shape["frames"] * shape["tokens_per_frame"]
    if "sources" in shape:
        return sum(shape["sources"].values())
    return shape["tokens"]


def plan(mech, cfg) -> list[dict[str, Any]]:
    """The cases of a cross mechanism at its papers' shapes (efficiency.plan delegates here)."""
    spec_cross = mech.cross_spec()
    specs = []
    dim = cfg.heads * cfg.head_dim
    for pattern, shapes in SHAPES[mech.name].items():
        if pattern not in mech.patterns or (cfg.patterns is not None and pattern not in cfg.patterns):
            continue
        for shape in shapes if cfg.profile == "full" else shapes[:1]:
            modes = [m for m in ("forward", "decode", "forward_backward") if m in cfg.modes]
            for mode in modes:
                if mode == "decode" and not (spec_cross is not None and spec_cross.cache):
                    continue
                if mode == "decode" and mech.kind == "pooling" and not pattern.startswith("causal"):
                    continue
                n = _tokens(shape)
                opts = {**_options(mech.name, shape, dim), **cfg.options.get(mech.name, {})}
                specs.append({
                    "impl": "mechanism", "mechanism": mech.name, "kind": mech.kind, "module": True,
                    "pattern": pattern, "mode": mode, "nq": shape["queries"], "nk": n, "n": n,
                    "batch": cfg.batch, "heads": cfg.heads, "kv_heads": cfg.heads, "head_dim": cfg.head_dim,
                    "dtype": cfg.dtype, "options": mech.resolve_options(opts), "seed": 0,
                    "decode_tokens": cfg.decode_tokens, "cross_shape": dict(shape),
                })
        if cfg.primary_pattern_only and specs:
            break
    return specs


def baseline_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The softmax layer on the same queries and context tokens; decode: the mechanism recomputing its context."""
    if spec["mode"] == "decode":
        return {**spec, "impl": "context_recompute"}
    shape = spec["cross_shape"]
    return {"impl": "softmax_module", "mechanism": "softmax", "kind": "sequence", "module": True,
            "pattern": "noncausal_cross", "mode": spec["mode"], "nq": spec["nq"], "nk": spec["nk"], "n": spec["n"],
            "batch": spec["batch"], "heads": spec["heads"], "kv_heads": spec["heads"], "head_dim": spec["head_dim"],
            "dtype": spec["dtype"], "options": {}, "seed": 0, "decode_tokens": spec["decode_tokens"],
            "cross_shape": {"queries": shape["queries"], "sources": {"context": spec["nk"]}}}


# --------------------------------------------------------------------------------------------------------
# Building a case
# --------------------------------------------------------------------------------------------------------
def _randn(shape, g, dtype, grad=False):
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype).requires_grad_(grad)


def _inputs(spec, mech, module, g, dtype, grad):
    """(args, kwargs) of one forward over the whole shape."""
    B, dim, shape = spec["batch"], spec["heads"] * spec["head_dim"], spec["cross_shape"]
    causal = spec["pattern"].startswith("causal")
    if spec["impl"] == "softmax_module":
        return (_randn((B, spec["nq"], dim), g, dtype, grad), _randn((B, spec["nk"], dim), g, dtype, grad)), {}
    if mech.kind == "pooling":
        x = _randn((B, spec["nk"], dim), g, dtype, grad)
        kw = {}
        if causal:
            T, nf = shape["frames"], shape["tokens_per_frame"]
            kw = {"context_pos": torch.arange(T).repeat_interleave(nf), "num_frames": T}
        return (x,), kw
    x = _randn((B, spec["nq"], dim), g, dtype, grad)
    sources = shape["sources"]
    if mech.cross_spec().sources:
        ctx: Any = {n: _randn((B, m, dim), g, dtype, grad) for n, m in sources.items()}
    else:
        ctx = _randn((B, spec["nk"], dim), g, dtype, grad)
    kw = {}
    if causal:  # causal by position: queries and tokens spread over the shape's frames
        T = shape["frames"]
        kw = {"q_pos": torch.arange(spec["nq"]) * T // spec["nq"],
              "context_pos": {n: torch.arange(m) * T // m for n, m in sources.items()}}
    return (x, ctx), kw


def _module(spec, dtype):
    from ..layers import build
    from ..registry import get

    heads, dim = spec["heads"], spec["heads"] * spec["head_dim"]
    torch.manual_seed(int(spec.get("seed", 0)))
    if spec["impl"] == "softmax_module":
        return get("softmax"), build("softmax", dim, heads).to(dtype)
    mech = get(spec["mechanism"])
    causal = spec["pattern"].startswith("causal")
    if mech.kind in ("sequence",) or (mech.kind == "pooling" and any(p.startswith("causal") for p in mech.patterns)):
        m = build(mech.name, dim, heads, causal=causal, **spec["options"])
    else:
        m = build(mech.name, dim, heads, **spec["options"])
    return mech, m.to(dtype)


def build(spec: dict[str, Any]):
    """The measurable closure of a cross case (see :func:`attnzoo.bench.cases.build`)."""
    from .cases import Built, _dtype, _first

    dtype = _dtype(spec)
    g = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    mech, module = _module(spec, dtype)
    info = {"form": "module" if spec["impl"] == "mechanism" else (
        "Attention(softmax) module" if spec["impl"] == "softmax_module" else "module, context recomputed per step"),
        "parameters": sum(p.numel() for p in module.parameters()), "shape": spec["cross_shape"]}
    if spec["mode"] == "decode":
        return _decode(spec, mech, module, dtype, g, info)
    grad = spec["mode"] == "forward_backward"
    args, kw = _inputs(spec, mech, module, g, dtype, grad)
    if not grad:
        module.eval()

        def run():
            with torch.no_grad():
                return module(*args, **kw)

        return Built(run=run, info=info)
    module.train()
    leaves = [t for a in args for t in (a.values() if isinstance(a, dict) else [a])]
    gout = None

    def run():
        nonlocal gout
        module.zero_grad(set_to_none=True)
        for t in leaves:
            t.grad = None
        out = _first(module(*args, **kw))
        if gout is None:
            gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        out.backward(gout)

    return Built(run=run, info=info)


def _decode(spec, mech, module, dtype, g, info):
    """``decode_tokens`` steps against the context: from a ContextCache (impl "mechanism"), or recomputing the
    context's projections at each step (impl "context_recompute")."""
    from ..state.context import ContextCache
    from .cases import Built, state_nbytes

    T, B, dim = int(spec.get("decode_tokens", 4)), spec["batch"], spec["heads"] * spec["head_dim"]
    module.eval()
    args, kw = _inputs({**spec, "impl": "mechanism"}, mech, module, g, dtype, False)
    recompute = spec["impl"] == "context_recompute"
    if mech.kind == "pooling":  # frames arrive one per step: the cache appends, the baseline re-runs the frames
        x, pos, frames = args[0], kw["context_pos"], kw["num_frames"]
        steps = min(T, frames)
        with torch.no_grad():
            state = ContextCache()
            for t in range(frames - steps):  # the earlier frames, already in the cache
                module(x[:, pos == t], context_pos=pos[pos == t], num_frames=frames, state=state)

        def prepare():
            return None if recompute else copy.deepcopy(state)

        def run(st):
            with torch.no_grad():
                for t in range(frames - steps, frames):
                    if recompute:
                        module(x[:, pos <= t], context_pos=pos[pos <= t], num_frames=frames)
                    else:
                        module(x[:, pos == t], context_pos=pos[pos == t], num_frames=frames, state=st)

        tokens = steps
    else:
        x_all, ctx = args
        xt = _randn((B, T, dim), g, dtype)  # (B, T, dim): the decoded queries
        q_pos = kw.get("q_pos")
        ctx_kw = {"context_pos": kw["context_pos"]} if "context_pos" in kw else {}
        with torch.no_grad():
            state = ContextCache()
            module(x_all[:, :1], ctx, state=state, **({"q_pos": q_pos[:1]} if q_pos is not None else {}), **ctx_kw)
        last = None if q_pos is None else q_pos[-1:].expand(1).clone()

        def prepare():
            return None if recompute else copy.deepcopy(state)

        def run(st):
            with torch.no_grad():
                for t in range(T):
                    extra = {} if last is None else {"q_pos": last}
                    if recompute:
                        module(xt[:, t : t + 1], ctx, **extra, **ctx_kw)
                    else:
                        module(xt[:, t : t + 1], state=st, **extra)

        tokens = T
    info = {**info, "state_bytes": None if recompute else state_nbytes(state)}
    return Built(prepare=prepare, step=run, tokens=tokens, info=info)
