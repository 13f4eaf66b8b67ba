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

Modules: :mod:`.inputs` (tolerances, seeded inputs, calls), :mod:`.checks` (the per-pattern checks),
:mod:`.cross_checks` (the cross checks), :mod:`.suite` (which checks apply, :func:`run_all`).
"""

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
    query_positions,
)
from .inputs import (
    POSITIONS,
    TOL,
    Sizes,
    assert_close,
    context_dims,
    default_positions,
    first_output,
    lengths,
    make_module,
    map_tensors,
    module_inputs,
    padding_mask,
    position_kwargs,
    positional,
    qkv,
    randomize,
    rel_err,
    run_functional,
    run_module,
    seeded_generator,
    source_lengths,
)
from .suite import MechCheck, PatternCheck, cases, check_declared_mask, run_all

__all__ = [
    "MechCheck",
    "POSITIONS",
    "PatternCheck",
    "Sizes",
    "TOL",
    "assert_close",
    "cases",
    "check_batch_independence",
    "check_bfloat16",
    "check_causality",
    "check_context_decode",
    "check_context_permutation",
    "check_cross_visibility",
    "check_declared_mask",
    "check_decode",
    "check_fast_matches_reference",
    "check_gradcheck",
    "check_gradients",
    "check_key_padding",
    "check_module_fast_matches_reference",
    "check_noncontiguous",
    "check_permutation",
    "check_prefix_invariance",
    "check_shape_dtype",
    "check_source_masks",
    "check_source_mass",
    "check_unsupported_patterns",
    "context_dims",
    "default_positions",
    "first_output",
    "lengths",
    "make_module",
    "map_tensors",
    "module_inputs",
    "padding_mask",
    "position_kwargs",
    "positional",
    "qkv",
    "query_positions",
    "randomize",
    "rel_err",
    "run_all",
    "run_functional",
    "run_module",
    "seeded_generator",
    "source_lengths",
]
