"""The quality protocol: studies and variants, the learning-rate sweep, ranks with ties, the Pareto frontier,
the parallel scheduler, and the long lengths of the efficiency plan."""

from dataclasses import replace

import pytest

from attnzoo import registry
from attnzoo.bench import quick
from attnzoo.bench.config import full, quality
from attnzoo.bench.efficiency import efficiency_lengths, lengths_of, plan
from attnzoo.bench.plots import pareto_front
from attnzoo.bench.quality.protocol import (
    STUDIES,
    Study,
    best_lr,
    causal_sequence_mechanisms,
    rank,
    studies,
    summarize,
)
from attnzoo.bench.results import quality_summary
from attnzoo.bench.runner import Progress, finished_quality, quality_plan, run_quality


def _e(key, vals):
    return {"key": key, **summarize(vals)}


def test_rank_ties_inside_the_seed_spread_and_orders_beyond_it():
    entries = [_e("a", [0.99, 1.0, 0.97]), _e("b", [0.96, 0.98, 0.95]), _e("c", [0.10, 0.20, 0.15]),
               _e("d", [0.18, 0.30, 0.25])]
    out = {e["key"]: e for e in rank(entries, higher_is_better=True)}
    assert out["a"]["rank"] == 1 and out["b"]["rank"] == 1  # ranges 0.97-1.0 and 0.95-0.98 overlap: a tie
    assert out["a"]["ties"] == ["b"] and out["b"]["ties"] == ["a"]
    assert out["c"]["rank"] == 3 and out["d"]["rank"] == 3 and out["c"]["ties"] == ["d"]  # a and b beat both
    low = {e["key"]: e for e in rank(entries, higher_is_better=False)}  # lower is better: the order turns
    assert low["c"]["rank"] == 1 and low["a"]["rank"] == 3


def test_best_lr_prefers_the_best_value_then_the_smaller_rate():
    assert best_lr({1e-3: 0.5, 3e-3: 0.9}, True) == 3e-3
    assert best_lr({1e-3: 1.2, 3e-3: 0.9}, False) == 3e-3
    assert best_lr({1e-3: 0.9, 3e-3: 0.9}, True) == 1e-3
    assert best_lr({1e-3: None, 3e-3: 0.1}, True) == 3e-3 and best_lr({1e-3: None}, True) is None


def test_pareto_front_keeps_points_no_other_beats_in_size_and_accuracy():
    pts = [(100, 0.2), (50, 0.1), (400, 1.0), (200, 0.15), (400, 0.5), (800, 1.0)]
    assert pareto_front(pts) == [(50, 0.1), (100, 0.2), (400, 1.0)]


def test_variants_apply_study_options_user_options_and_the_sweep():
    s = Study("x", "mqar", {}, options={"sliding_window": {"window": 16}},
              sweep={"sliding_window": ({"window": 4}, {"window": 16})})
    assert s.variants("sliding_window") == [("window=16", {"window": 16}), ("window=4", {"window": 4})]
    assert s.variants("sliding_window", {"window": 8})[0] == ("window=8", {"window": 8})
    assert s.variants("softmax") == [("default", {})]


def test_every_study_option_is_valid_for_its_mechanism():
    for profile in STUDIES.values():
        for study in profile:
            for name, opts in {**study.options, **{k: {} for k in study.sweep}}.items():
                mech = registry.get(name)
                for _, o in study.variants(name):
                    mech.resolve_options(o)  # raises OptionError on a wrong name or range
                mech.resolve_options(opts)


def test_headline_study_trains_every_causal_sequence_mechanism():
    (s,) = studies("full", names=["mqar-L64-P8"])
    assert s.mechanisms is None and (s.config["seq_len"], s.config["pairs"], s.dim, s.layers) == (64, 8, 64, 2)
    assert len(s.lrs) > 1
    cfg = quality(studies=("mqar-L64-P8",), seeds=(0, 1, 2), mechanisms=None)
    names = {c["mechanism"] for c in quality_plan(cfg, registry.mechanisms())}
    assert set(causal_sequence_mechanisms()) <= names  # (non-causal sequence mechanisms get rows too)


def test_plan_sweeps_learning_rates_on_the_first_seed_then_trains_the_others_at_the_chosen_one():
    cfg = quality(studies=("mqar-L64-P8",), seeds=(0, 1, 2), quality_lrs=(1e-3, 3e-3))
    mechs = [registry.get("softmax"), registry.get("sliding_window")]
    cases = quality_plan(cfg, mechs)
    soft = [(c["lr"], c["seed"]) for c in cases if c["mechanism"] == "softmax"]
    assert soft == [(1e-3, 0), (3e-3, 0), (None, 1), (None, 2)]
    sw = {c["variant"] for c in cases if c["mechanism"] == "sliding_window"}
    assert {"window=16", "window=4", "window=64"} <= sw  # the study's setting and its sweep

    alone = quality_plan(replace(cfg, quality_sweep=False), mechs)
    assert {c["variant"] for c in alone if c["mechanism"] == "sliding_window"} == {"window=16"}
    assert len(alone) == 8  # 2 learning rates on seed 0, 2 more seeds, for each of the two mechanisms


class _FakeExecutor:
    """Returns a value from (mechanism, lr, seed) without training: the scheduler's logic only."""

    def __init__(self):
        self.calls = []

    def ready(self):
        pass

    def run(self, op, args, timeout):
        self.calls.append((args["mechanism"], args["lr"], args["seed"]))
        good = {"softmax": 1e-3, "linear": 3e-3}[args["mechanism"]]
        value = (0.9 if args["lr"] == good else 0.3) - 0.01 * args["seed"]
        return {"type": "quality", "id": f"{args['mechanism']}|{args['lr']}|{args['seed']}", "status": "ok",
                "mechanism": args["mechanism"], "study": args["study"], "variant": args["variant"], "lr": args["lr"],
                "seed": args["seed"], "value": value, "higher_is_better": True, "task": "mqar", "config_id": "c",
                "metric": "accuracy", "steps": 1, "budget_hit": False, "baselines": {}, "state_bytes": 10}


def test_run_quality_trains_the_other_seeds_at_the_learning_rate_the_sweep_chose():
    cfg = quality(studies=("mqar-separation",), seeds=(0, 1), quality_lrs=(1e-3, 3e-3), quality_steps=1)
    cases = quality_plan(cfg, [registry.get("softmax"), registry.get("linear")])
    exe = _FakeExecutor()
    recs = run_quality(cfg, cases, deadline=None, gates={}, progress=Progress(False), executor=exe)
    assert ("softmax", 1e-3, 1) in exe.calls and ("linear", 3e-3, 1) in exe.calls
    assert ("softmax", 3e-3, 1) not in exe.calls and len(recs) == 6
    summ = {q["mechanism"]: q for q in quality_summary(recs)}
    assert summ["softmax"]["lr"] == 1e-3 and summ["softmax"]["seeds"] == 2
    assert summ["softmax"]["mean"] == pytest.approx(0.895) and summ["softmax"]["lr_sweep"] == {"0.001": 0.9,
                                                                                                "0.003": 0.3}
    assert summ["softmax"]["rank"] == 1 and summ["linear"]["ties"] == ["softmax"]  # 0.88-0.9 vs 0.89-0.9


class _InterruptedExecutor(_FakeExecutor):
    """Ctrl-C arrives while the third case trains."""

    def run(self, op, args, timeout):
        if len(self.calls) == 2:
            raise KeyboardInterrupt
        return super().run(op, args, timeout)


def test_an_interrupted_quality_run_keeps_the_cases_it_finished():
    cfg = quality(studies=("mqar-separation",), seeds=(0, 1), quality_lrs=(1e-3, 3e-3), quality_steps=1)
    cases = quality_plan(cfg, [registry.get("softmax"), registry.get("linear")])
    done: dict = {}
    with pytest.raises(KeyboardInterrupt):
        run_quality(cfg, cases, deadline=None, gates={}, progress=Progress(False), executor=_InterruptedExecutor(),
                    results=done)
    kept = finished_quality(done)
    assert [(r["mechanism"], r["lr"], r["seed"]) for r in kept] == [("softmax", 1e-3, 0), ("softmax", 3e-3, 0)]


def test_long_lengths_only_for_sub_quadratic_sequence_families():
    cfg = full()
    assert 32768 in cfg.long_lengths
    sw, soft = registry.get("sliding_window"), registry.get("softmax")
    assert max(lengths_of(sw, cfg, "forward")) == 32768 and max(lengths_of(sw, cfg, "forward_backward")) == 16384
    assert max(lengths_of(soft, cfg, "forward")) == max(cfg.lengths)
    avail = {p: {"available": True} for p in ("reference", "sdpa_masked", "flex")}
    specs = plan(sw, cfg, avail)
    assert any(s["n"] == 32768 and s["impl"] == "mechanism" for s in specs)
    assert not any(s["n"] > max(cfg.lengths) and s["impl"] != "mechanism" for s in specs)  # no N x N peers there
    assert quick().long_lengths == ()  # the quick profile measures (and extrapolates) nothing beyond its lengths


def test_an_efficiency_length_that_is_not_a_number_says_why():
    recs = [{"type": "efficiency", "status": "ok", "impl": "mechanism", "series": "softmax", "mechanism": "softmax",
             "pattern": "causal_self", "mode": "forward", "n": n, "speedup": 0.9, "memory_ratio": 1.0}
            for n in (256, 1024)]
    (e,) = efficiency_lengths(recs)
    assert e["time"]["where"] == "above_range" and "1024" in e["reason"] and "O(" in e["reason"]


def test_merge_unites_shards_and_recomputes_the_ranking():
    from attnzoo.bench.results import merge

    cfg = quality(studies=("mqar-separation",), seeds=(0, 1), quality_steps=1)
    parts = []
    for name in ("softmax", "linear"):
        recs = run_quality(cfg, quality_plan(cfg, [registry.get(name)]), deadline=None, gates={},
                           progress=Progress(False), executor=_FakeExecutor())
        parts.append({"schema": "attnzoo-bench", "schema_version": 2, "created": "2026", "command": f"shard {name}",
                      "profile": "quality", "config": {}, "environment": {"date": "d", "hostname": "h", "torch": "t",
                      "attnzoo": "a", "threads": 1, "python": "p", "cpu": {"model": "m", "flags": [],
                                                                             "logical_cores": 2}},
                      "duration_s": 1.0, "interrupted": False, "mechanisms": [{"name": name}], "peers": [],
                      "records": recs, "summary": {"efficiency_length": [], "quality": [], "counts": {}}})
    out = merge(parts, "attnzoo bench merge a b --out x")
    assert [m["name"] for m in out["mechanisms"]] == ["softmax", "linear"] and len(out["records"]) == 4
    assert {q["mechanism"] for q in out["summary"]["quality"]} == {"softmax", "linear"}
    assert out["config"]["merged"][1]["command"] == "shard linear"
    from attnzoo.bench.report.html import merged_html
    from attnzoo.bench.report.markdown import merged_from

    assert merged_from(out)[-2:] == ["- `shard softmax`", "- `shard linear`"]  # summary.md names every run
    assert "<code>shard linear</code>" in merged_html(out)[0] and merged_from(parts[0]) == merged_html(parts[0]) == []
    with pytest.raises(ValueError, match="two or more"):
        merge(parts[:1], "x")
