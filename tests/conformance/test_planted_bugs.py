"""The conformance suite must catch real bugs: three broken mechanisms, registered only here, each fail
the check written for their bug (and a correct twin passes it)."""

import pytest
import torch

from attnzoo import registry, testing
from attnzoo.mechanisms.core.softmax import init_kv_cache, softmax_reference, softmax_step
from attnzoo.reference import softmax_attention


def leaky_reference(q, k, v, *, causal, key_padding_mask, scale):
    """Causal mask off by one: every query also sees the next key (a future leak)."""
    nq, nk = q.shape[2], k.shape[2]
    i = torch.arange(nq).view(nq, 1) + (nk - nq)
    j = torch.arange(nk).view(1, nk)
    mask = (j <= i + 1) if causal else None
    return softmax_attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=mask, scale=scale)


def padding_blind_reference(q, k, v, *, causal, key_padding_mask, scale):
    """Drops the key-padding mask, as HF's AttentionInterface does without a mask function."""
    return softmax_attention(q, k, v, causal=causal, scale=scale)


def drifting_step(q, k, v, state, *, scale, key_padding_mask=None):
    """A decode step whose scale drifts by 1% per decoded token."""
    out = softmax_step(q, k, v, state, scale=scale * (1 + 0.01 * state.seq_len), key_padding_mask=key_padding_mask)
    return out


def _record(name, reference=softmax_reference, step=softmax_step):
    return registry.Mechanism(
        name=name, family="core", title="planted bug", arxiv="0000.00000", code="-", summary="test only",
        patterns=registry.PATTERNS, exact=True, complexity="-", reference=reference, step=step,
        init_state=init_kv_cache, state="kv", permutation_equivariant=True,
    )


@pytest.fixture
def planted():
    made = []

    def make(name, **kw):
        rec = registry.register(_record(name, **kw))
        made.append(name)
        return rec

    yield make
    for name in made:
        registry.unregister(name)


def test_correct_twin_passes(planted):
    rec = planted("planted_correct")
    testing.check_causality(rec, "causal_self")
    testing.check_causality(rec, "causal_cross")
    testing.check_key_padding(rec, "noncausal_self")
    testing.check_decode(rec)


@pytest.mark.parametrize("pattern", ["causal_self", "causal_cross"])
def test_future_leak_is_caught(planted, pattern):
    rec = planted("planted_leak", reference=leaky_reference)
    with pytest.raises(AssertionError, match="future leak"):
        testing.check_causality(rec, pattern)


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self", "noncausal_cross"])
def test_ignored_padding_is_caught(planted, pattern):
    rec = planted("planted_padding", reference=padding_blind_reference)
    with pytest.raises(AssertionError, match="mask ignored"):
        testing.check_key_padding(rec, pattern)


def test_drifting_decode_is_caught(planted):
    rec = planted("planted_drift", step=drifting_step)
    with pytest.raises(AssertionError, match="step decoding"):
        testing.check_decode(rec)


def test_run_all_reports_failures(planted):
    rec = planted("planted_leak_all", reference=leaky_reference)
    failures = testing.run_all(rec)
    assert any(k.startswith("causality[causal_self]") for k in failures), failures
