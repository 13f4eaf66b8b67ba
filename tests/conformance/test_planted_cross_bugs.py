"""The cross checks must catch real bugs: broken variants of the multi-source layer, registered only here, each fail
the check written for their bug, and the correct layer passes them."""

import pytest
import torch

from attnzoo import CrossAttention, registry, testing
from attnzoo.registry import CrossSpec


class LeakyPositions(CrossAttention):
    """Causal by position off by one: every query also sees the next frame."""

    def forward(self, x, context=None, *, q_pos=None, **kw):
        return super().forward(x, context, q_pos=None if q_pos is None else q_pos + 1, **kw)


class DropsImageMask(CrossAttention):
    """Forgets the image source's key-padding mask (as an adapter that only forwards the text mask)."""

    def forward(self, x, context=None, *, key_padding_mask=None, **kw):
        if isinstance(key_padding_mask, dict):
            key_padding_mask = {n: m for n, m in key_padding_mask.items() if n != "image"} or None
        return super().forward(x, context, key_padding_mask=key_padding_mask, **kw)


class StaleCache(CrossAttention):
    """Decoding from a ContextCache reads the image keys scaled by 1.01 (a cache that drifted from the context)."""

    def forward(self, x, context=None, *, state=None, **kw):
        if state is not None and context is None and "image" in state:
            k = state.keys("image")
            k.mul_(1.01)
            out = super().forward(x, None, state=state, **kw)
            k.div_(1.01)
            return out
        return super().forward(x, context, state=state, **kw)


class OrderedContext(CrossAttention):
    """Adds the context token's index to its features: not invariant to the context's order."""

    def forward(self, x, context=None, **kw):
        if isinstance(context, dict):
            context = {n: c + 0.1 * torch.arange(c.shape[1], dtype=c.dtype).view(1, -1, 1) for n, c in context.items()}
        return super().forward(x, context, **kw)


class SeparateMass(CrossAttention):
    """Reports each source's own softmax mass (1 each), not the joint share."""

    def forward(self, x, context=None, *, return_source_mass=False, **kw):
        out = super().forward(x, context, return_source_mass=return_source_mass, **kw)
        if not return_source_mass:
            return out
        y, mass = out[0], out[1]
        return (y, {n: torch.ones_like(m) for n, m in mass.items()}) + tuple(out[2:])


def _record(name, cls):
    def module(dim, heads, *, kv_heads=None, causal=False, **options):
        return cls(dim, heads, kv_heads=kv_heads, causal=causal, **options)

    return registry.Mechanism(
        name=name, family="cross", title="planted bug", arxiv="0000.00000", code="-", summary="test only",
        patterns=("noncausal_cross", "causal_cross"), exact=True, complexity="-", module=module,
        options=(registry.Option("context_dims", None, dict, allow_none=True),
                 registry.Option("mode", "separate", str, choices=("separate", "joint"))),
        test_options={"context_dims": {"text": 12, "image": 10}},
        cross=CrossSpec(sources=("text", "image"), positions=True, context_permutation_invariant=True, cache=True,
                        source_mass=True),
    )


@pytest.fixture
def planted():
    made = []

    def make(name, cls):
        made.append(name)
        return registry.register(_record(name, cls))

    yield make
    for name in made:
        registry.unregister(name)


def test_the_correct_layer_passes_every_cross_check(planted):
    rec = planted("planted_cross_ok", CrossAttention)
    for pattern in ("noncausal_cross", "causal_cross"):
        testing.check_source_masks(rec, pattern)
        testing.check_context_permutation(rec, pattern)
        testing.check_context_decode(rec, pattern)
        testing.check_source_mass(rec, pattern)
    testing.check_cross_visibility(rec, "causal_cross")


def test_a_query_seeing_a_later_frame_is_caught(planted):
    rec = planted("planted_cross_leak", LeakyPositions)
    with pytest.raises(AssertionError, match="a query sees a token placed after it"):
        testing.check_cross_visibility(rec, "causal_cross")


def test_a_dropped_source_mask_is_caught(planted):
    rec = planted("planted_cross_mask", DropsImageMask)
    with pytest.raises(AssertionError, match="masked tokens of source 'image'.*mask ignored"):
        testing.check_source_masks(rec, "noncausal_cross")


def test_a_stale_context_cache_is_caught(planted):
    rec = planted("planted_cross_cache", StaleCache)
    with pytest.raises(AssertionError, match="decoding with a ContextCache vs the full run"):
        testing.check_context_decode(rec, "noncausal_cross")


def test_order_dependence_is_caught_where_invariance_is_claimed(planted):
    rec = planted("planted_cross_order", OrderedContext)
    with pytest.raises(AssertionError, match="context tokens permuted"):
        testing.check_context_permutation(rec, "noncausal_cross")


def test_a_mass_that_is_not_the_joint_share_is_caught(planted):
    rec = planted("planted_cross_mass", SeparateMass)
    with pytest.raises(AssertionError, match="joint source masses sum to 1"):
        testing.check_source_mass(rec, "noncausal_cross")
