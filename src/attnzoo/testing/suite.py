"""Which conformance checks apply to a record (:func:`cases`), the declared-mask check, and :func:`run_all`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..masks import materialize
from ..reference import softmax_attention
from ..registry import Mechanism
from .checks import (
    check_batch_independence,
    check_bfloat16,
    check_causality,
    check_decode,
    check_fast_matches_reference,
    check_gradcheck,
    check_gradients,
    check_key_padding,
    check_module_fast_matches_reference,
    check_noncontiguous,
    check_permutation,
    check_prefix_invariance,
    check_shape_dtype,
    check_unsupported_patterns,
)
from .cross_checks import (
    check_context_decode,
    check_context_permutation,
    check_cross_visibility,
    check_source_masks,
    check_source_mass,
)
from .inputs import assert_close, qkv, run_functional

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
