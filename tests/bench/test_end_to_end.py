"""The harness end to end on tiny sizes: every stage runs and writes what it promises."""

import json
import os

import jsonschema
import pytest

from attnzoo.bench import results as res_mod
from attnzoo.bench.results import load, load_schema, validate


def test_writes_every_output(tiny_run):
    results, out, paths = tiny_run
    for name in ("results.json", "summary.md", "report.html"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    pngs = [p for p in paths["plots"].split(",") if p]
    assert any("time_vs_length_causal_self" in p for p in pngs)
    assert any("memory_vs_length" in p for p in pngs)
    assert any("speedup_heatmap_forward" in p for p in pngs)
    assert any("quality_mqar" in p for p in pngs) and any("quality_digits" in p for p in pngs)
    assert any("recall_vs_state" in p for p in pngs)
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_mechanism_is_gated_measured_beside_its_baseline_and_trained(tiny_run):
    results, _, _ = tiny_run
    recs = results["records"]
    eff = [r for r in recs if r["type"] == "efficiency"]
    by_id = {r["id"]: r for r in eff}
    for m in results["mechanisms"]:
        assert m["gate"]["status"] == "pass", m["gate"]
        mine = [r for r in eff if r["series"] == m["name"] and r["status"] == "ok"]
        assert mine, f"{m['name']} was not measured: {[r['message'] for r in eff if r['series'] == m['name']]}"
        for r in mine:
            base = by_id[r["baseline_id"]]
            assert base["impl"] in ("sdpa", "softmax_module") and base["status"] == "ok"
            assert (base["nq"], base["nk"], base["mode"]) == (r["nq"], r["nk"], r["mode"]) or r["kind"] != "sequence"
            assert r["speedup"] == pytest.approx(base["time_s"] / r["time_s"])
            assert r["memory_bytes"] is not None, r["memory_error"]
    modes = {(r["series"], r["mode"]) for r in eff if r["status"] == "ok"}
    # functional and module decoding, forward+backward of every layout
    for want in [("sliding_window", "decode"), ("bench_fake_module", "decode"), ("sdpa", "decode"),
                 ("bench_fake_grid", "forward_backward"), ("bench_fake_channel", "forward_backward"),
                 ("sliding_window [sdpa_masked]", "forward")]:
        assert want in modes, want
    dec = [r for r in eff if r["mode"] == "decode" and r["status"] == "ok"]
    assert all(r["state_bytes"] and r["state_bytes"] > 0 for r in dec)
    grid = [r for r in eff if r["series"] == "bench_fake_grid" and r["status"] == "ok"]
    assert {r["n"] for r in grid} == {16, 25}  # 4x4 and 5x5 grids (side = isqrt(N))
    q = [r for r in recs if r["type"] == "quality" and r["status"] == "ok"]
    not_ok = [(r["mechanism"], r["task"], r["status"], r["message"]) for r in recs
              if r["type"] == "quality" and r["status"] not in ("ok", "not_applicable")]
    assert not not_ok, f"quality cases planned but not trained: {not_ok}"
    assert {(r["mechanism"], r["task"]) for r in q} >= {
        ("softmax", "mqar"), ("sliding_window", "mqar"), ("bench_fake_module", "mqar"), ("softmax", "digits"),
        ("none", "digits"), ("bench_fake_grid", "digits"), ("bench_fake_channel", "digits")}
    assert all(r["steps"] == 3 for r in q)
    assert results["summary"]["efficiency_length"] and results["summary"]["quality"]
    env = results["environment"]
    assert env["torch"] and env["cpu"]["model"] and env["hostname"] and env["threads"] == 1


def test_results_validate_against_the_schema_file(tiny_run):
    results, out, _ = tiny_run
    jsonschema.Draft202012Validator.check_schema(load_schema())
    validate(results)
    loaded = load(os.path.join(out, "results.json"))
    assert loaded["schema_version"] == res_mod.SCHEMA_VERSION
    assert len(loaded["records"]) == len(results["records"])


def test_schema_rejects_broken_results(tiny_run):
    results, _, _ = tiny_run
    bad = json.loads(json.dumps(results))
    bad["records"][0]["status"] = "fast-ish"
    with pytest.raises(ValueError, match="schema violation"):
        validate(bad)
    bad = json.loads(json.dumps(results))
    ok = next(r for r in bad["records"] if r["type"] == "efficiency" and r["status"] == "ok")
    ok["time_s"] = None  # a measured case must carry its time
    with pytest.raises(ValueError, match="schema violation"):
        validate(bad)
    bad = json.loads(json.dumps(results))
    bad["schema_version"] = 999
    with pytest.raises(ValueError, match="schema_version"):
        validate(bad)
    with pytest.raises(ValueError, match="not attnzoo bench"):
        validate({"schema": "other"})


def test_markdown_summary_has_the_tables(tiny_run):
    _, out, _ = tiny_run
    text = open(os.path.join(out, "summary.md")).read()
    for heading in ("# attnzoo bench results", "## Correctness gate", "## Efficiency length", "## Quality",
                    "## Measurement hygiene", "## Peers", "![Time vs length"):
        assert heading in text, heading
