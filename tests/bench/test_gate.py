"""The correctness gate catches a fast form that disagrees with its reference: reported failing, not timed."""

import pytest

from attnzoo import registry
from attnzoo.bench.gate import run_gate


# The softmax forms are looked up in the registry when a test runs, never at import: loading the registry
# during collection rebinds `attnzoo.mechanisms` (the function) to the subpackage of the same name, and
# tests/conformance calls `attnzoo.list_mechanisms()` while it is collected.
def softmax_fast(q, k, v, **kw):
    return registry.get("softmax").fast(q, k, v, **kw)


def softmax_step(q, k, v, state, **kw):
    return registry.get("softmax").step(q, k, v, state, **kw)


def softmax_reference(q, k, v, **kw):
    return registry.get("softmax").reference(q, k, v, **kw)


def init_kv_cache(**kw):
    return registry.get("softmax").init_state(**kw)


def sliding_window_predicate(nq, nk, **kw):
    return registry.get("sliding_window").mask(nq, nk, **kw)


def wrong_fast(q, k, v, *, causal, key_padding_mask, scale):
    """Off by a 1% scale: plausible-looking output, wrong numbers."""
    return softmax_fast(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale * 1.01)


def drifting_step(q, k, v, state, *, scale, key_padding_mask=None):
    return softmax_step(q, k, v, state, scale=scale * (1 + 0.01 * state.seq_len), key_padding_mask=key_padding_mask)


def _record(name, fast=softmax_fast, step=softmax_step, mask=None):
    return registry.Mechanism(
        name=name, family="core", title="planted", arxiv="", code="-", summary="test only",
        patterns=registry.PATTERNS, exact=True, complexity="-", reference=softmax_reference, fast=fast,
        step=step, init_state=init_kv_cache, state="kv", mask=mask)


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
    g = run_gate(planted("bench_planted_correct"))
    assert g["status"] == "pass" and not g["blocks"]
    assert {c["check"] for c in g["checks"]} == {"fast_vs_reference", "decode_vs_forward"}


def test_wrong_fast_form_fails_the_gate(planted):
    g = run_gate(planted("bench_planted_wrong_fast", fast=wrong_fast))
    assert g["status"] == "fail"
    assert "fast" in g["blocks"] and "relative error" in g["blocks"]["fast"]
    failed = {(c["check"], c["pattern"]) for c in g["checks"] if c["status"] == "fail"}
    assert ("fast_vs_reference", "causal_self") in failed and ("fast_vs_reference", "noncausal_cross") in failed


def test_drifting_decode_blocks_only_decode(planted):
    g = run_gate(planted("bench_planted_drift", step=drifting_step))
    assert g["status"] == "fail" and set(g["blocks"]) == {"decode"}


def test_wrong_declared_mask_disables_mask_peers(planted):
    wrong = lambda nq, nk, *, causal: sliding_window_predicate(nq, nk, causal=causal, window=2)  # noqa: E731
    g = run_gate(planted("bench_planted_mask", mask=wrong))
    assert set(g["blocks"]) == {"mask"}


def test_failing_mechanism_is_reported_not_timed(planted, tmp_path):
    from attnzoo.bench import quick
    from attnzoo.bench.report import terminal_table
    from attnzoo.bench.runner import run

    planted("bench_planted_wrong_fast2", fast=wrong_fast)
    cfg = quick(mechanisms=["bench_planted_wrong_fast2"], lengths=(16,), memory=False, quality=True,
                tasks=("mqar",), quality_steps=2, isolate=False, progress=False, deadline=None, min_run_time=0.001,
                retries=0, out=str(tmp_path))
    results = run(cfg)
    (entry,) = results["mechanisms"]
    assert entry["gate"]["status"] == "fail"
    mine = [r for r in results["records"] if r["mechanism"] == "bench_planted_wrong_fast2"]
    eff = [r for r in mine if r["type"] == "efficiency"]
    assert eff and all(r["status"] == "gate_failed" and r["time_s"] is None for r in eff)
    assert not any(r["impl"] == "sdpa" for r in results["records"] if r["type"] == "efficiency")  # nothing timed
    q = [r for r in mine if r["type"] == "quality"]
    assert q and all(r["status"] == "skipped" and "gate" in r["message"] for r in q)
    assert "fail" in terminal_table(results)
