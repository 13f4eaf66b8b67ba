"""The generic multi-source cross-attention layer (the contract of ARCHITECTURE.md "Cross-attention"; not a paper).

A query stream attends to named context streams, each with its own key/value projections, key-padding mask,
region mask and scale; ``mode="separate"`` (a softmax per source, IP-Adapter) or ``"joint"`` (one softmax over
the concatenated keys, FcaFormer/PWCA); ``causal=True`` is causal cross by position (``q_pos`` / ``context_pos``);
decoding reads a :class:`~attnzoo.state.context.ContextCache` filled once. Implementation:
:class:`attnzoo.cross.CrossAttention` over :func:`attnzoo.cross_attention`.
"""

from __future__ import annotations

from typing import Any

from ...cross import MODES, CrossAttention
from ...registry import CrossSpec, Mechanism, Option, register


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    opts = CROSS_ATTENTION.resolve_options(options)
    return CrossAttention(dim, heads, kv_heads=kv_heads, causal=causal, **opts)


CROSS_ATTENTION = register(Mechanism(
    name="cross_attention",
    aliases=("multi_source_cross_attention",),
    family="cross",
    catalog="",
    title="Multi-source cross-attention (attnzoo's contract, not a paper)",
    arxiv="",
    code="",
    summary="Queries attend to named context sources (own k/v projections, masks, regions, scales): a softmax per "
            "source summed (separate) or one softmax over all (joint); causal by position; cached context.",
    patterns=("noncausal_cross", "causal_cross"),
    exact=True,
    state="context",
    complexity="time O(Nq sum_s M_s d), memory O(Nq + sum_s M_s) fused; decode O(sum_s M_s) per token",
    module=_module,
    options=(
        Option("context_dims", None, dict, allow_none=True,
               doc="{source: width} of named contexts (None: one context of width context_dim)"),
        Option("context_dim", None, int, low=1, allow_none=True, doc="width of a single context (None: dim)"),
        Option("mode", "separate", str, choices=MODES, doc="a softmax per source (separate) or one over all (joint)"),
        Option("scales", None, dict, allow_none=True, doc="{source: initial output scale} (default 1)"),
        Option("learnable_scales", False, bool, doc="make the per-source scales parameters"),
        Option("head_dim", None, int, low=1, allow_none=True, doc="per-head width (None: dim / heads)"),
        Option("bias", False, bool, doc="biases in the projections"),
    ),
    permutation_equivariant=True,
    test_options={"context_dims": {"text": 12, "image": 10}, "scales": {"image": 0.7}},
    cross=CrossSpec(sources=("text", "image"), positions=True, context_permutation_invariant=True, cache=True,
                    source_mass=True),
    notes="exact softmax attention per source (separate) or over the union (joint); causal_cross is causal by "
          "position (q_pos, context_pos), not by index. Separate mode is IP-Adapter's decoupled cross-attention "
          "(ip_adapter), joint mode FcaFormer's (fcaformer).",
))
