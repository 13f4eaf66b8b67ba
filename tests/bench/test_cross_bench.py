"""attnzoo bench for cross mechanisms: planned at their papers' shapes, every case builds and runs (at shrunken
shapes here), baselines are the softmax layer on the same shapes / the module recomputing its context, the gate
checks context-cache decoding, and the summary shows cross decode speedups."""

import pytest
import torch

from attnzoo import registry
from attnzoo.bench import cases
from attnzoo.bench import cross as cross_bench
from attnzoo.bench.config import full, quick
from attnzoo.bench.efficiency import baseline_spec, plan
from attnzoo.bench.gate import run_gate

SMALL = {
    "ip_adapter": {"noncausal_cross": [{"queries": 16, "sources": {"text": 7, "image": 4}},
                                       {"queries": 16, "sources": {"text": 7, "image": 9}}]},
    "cross_attention": {"causal_cross": [{"queries": 12, "sources": {"text": 5, "image": 8}, "frames": 4}]},
    "crossvit": {"noncausal_cross": [{"queries": 1 + 9, "sources": {"context": 6}}]},
    "video_ccam": {"causal_cross": [{"queries": 8, "frames": 4, "tokens_per_frame": 3}]},
    "acmil": {"noncausal_cross": [{"queries": 3, "tokens": 20}]},
    "filip": {"noncausal_cross": [{"queries": 6, "sources": {"context": 5}}]},
    "multilayer_pooling": {"noncausal_cross": [{"queries": 5, "tokens": 6}]},
    "fcaformer": {"noncausal_cross": [{"queries": 9, "sources": {"context": 4}}]},
}


@pytest.fixture
def small_shapes(monkeypatch):
    monkeypatch.setattr(cross_bench, "SHAPES", {**cross_bench.SHAPES, **SMALL})


def test_every_cross_record_has_paper_shapes():
    for m in registry.mechanisms(family="cross"):
        # multi-source modules; the modality masks (croc, aki, ee_mllm) are self-attention functions measured by
        # the registry benchmark like any functional mechanism (their causal_cross pattern is KV-cache decoding)
        if m.cross is not None and any(p.endswith("cross") for p in m.patterns):
            assert cross_bench.applies(m.name), f"{m.name}: no paper shapes in attnzoo.bench.cross.SHAPES"
    ip = cross_bench.SHAPES["ip_adapter"]["noncausal_cross"]
    assert ip[0]["queries"] == 4096 and ip[0]["sources"]["text"] == 77 and ip[-1]["sources"]["image"] == 256
    assert cross_bench.SHAPES["video_ccam"]["causal_cross"][0] == {"queries": 64, "frames": 16,
                                                                  "tokens_per_frame": 256}


def test_plan_quick_takes_one_shape_full_takes_all(small_shapes):
    mech = registry.get("ip_adapter")
    q = plan(mech, quick(heads=2, head_dim=4))
    f = plan(mech, full(heads=2, head_dim=4))
    assert {s["nk"] for s in q} == {11} and {s["nk"] for s in f} == {11, 16}
    assert {s["mode"] for s in q} == {"forward", "decode", "forward_backward"}
    assert all(s["cross_shape"] and s["module"] for s in q)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_cases_and_baselines_build_and_run(small_shapes, name):
    torch.set_num_threads(1)
    cfg = full(heads=2, head_dim=4, decode_tokens=2, threads=1)
    specs = plan(registry.get(name), cfg)
    assert specs
    for spec in specs:
        base = baseline_spec(spec)
        if spec["mode"] == "decode":
            assert base["impl"] == "context_recompute"
        else:
            assert base["impl"] == "softmax_module" and (base["nq"], base["nk"]) == (spec["nq"], spec["nk"])
        for s in (spec, base):
            built = cases.build(s)
            if built.run is not None:
                built.run()
            else:
                built.step(built.prepare())
                assert built.tokens >= 1


def test_gate_checks_context_cache_decoding():
    gate = run_gate(registry.get("video_ccam"))
    assert any(c["check"] == "context_decode" and c["status"] == "pass" for c in gate["checks"])
    assert gate["status"] == "pass"
