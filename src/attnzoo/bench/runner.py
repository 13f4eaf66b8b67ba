"""``attnzoo bench``: gate, efficiency, quality, then results.json and the report, under one time budget."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from .. import registry
from ..errors import UnknownMechanismError, suggest
from .config import BenchConfig
from .efficiency import EfficiencyRunner, attach_ratios, efficiency_lengths, plan
from .gate import run_gate
from .measure import environment
from .results import SCHEMA, SCHEMA_VERSION, counts, quality_summary


# --------------------------------------------------------------------------------------------------------
# Peers and extra mechanisms
# --------------------------------------------------------------------------------------------------------
def detect_peers(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Which optional peers can run here; a missing one is reported, never an error."""
    out = []
    for name in ("reference", "sdpa_masked", "flex", "local_attention"):
        entry: dict[str, Any] = {"name": name, "available": True, "version": None, "reason": ""}
        if name not in cfg.peers:
            entry.update(available=False, reason=f"not requested in the {cfg.profile} profile (--peers)")
        elif name == "flex":
            try:
                import torch
                from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

                entry["version"] = torch.__version__
                entry["reason"] = "compiled with torch.compile (compile time reported separately)"
            except ImportError as e:
                entry.update(available=False, reason=f"torch without FlexAttention: {e}")
        elif name == "local_attention":
            try:
                import local_attention  # noqa: F401

                entry["version"] = importlib.metadata.version("local-attention")
                entry["reason"] = "lucidrains' local-attention, exact window"
            except ImportError:
                entry.update(available=False, reason="package `local-attention` not installed "
                                                     "(pip install local-attention)")
        elif name == "reference":
            entry["reason"] = "the mechanism's own reference form (dense, readable)"
        else:
            entry["reason"] = "torch SDPA with the mechanism's static mask materialized densely"
        out.append(entry)
    return out


def import_extra(names: list[str]) -> None:
    from .forkserver import import_extra

    for name in names:
        import_extra(name)


def select_mechanisms(names: list[str] | None) -> list[registry.Mechanism]:
    if not names:
        return registry.mechanisms()
    out, seen = [], set()
    for n in names:
        try:
            m = registry.get(n)
        except UnknownMechanismError as e:
            raise UnknownMechanismError(f"--mechanisms: {e}") from None
        if m.name not in seen:
            seen.add(m.name)
            out.append(m)
    return out


def check_options(cfg: BenchConfig, mechs: list[registry.Mechanism]) -> None:
    known = {m.name: m for m in registry.mechanisms()}
    for name, opts in cfg.options.items():
        mech = known.get(name) or registry.get(name)
        if mech.name != name:  # an alias: store under the canonical name
            cfg.options[mech.name] = {**cfg.options.get(mech.name, {}), **opts}
        mech.resolve_options(opts)  # raises OptionError naming the option and its valid range
    for name in list(cfg.options):
        if name not in known:
            cfg.options.pop(name)


# --------------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar when tqdm is installed and enabled, else one line per message on stderr (or nothing)."""

    def __init__(self, enabled: bool, total: int = 0):
        self.enabled, self.bar = enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr,
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
            except ImportError:
                print("attnzoo bench: install tqdm for a progress bar (pip install tqdm)", file=sys.stderr)

    def total(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total = n
            self.bar.refresh()

    def message(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(msg[:60], refresh=True)
        else:
            print(f"  {msg}", file=sys.stderr, flush=True)

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------------
def mechanism_entry(mech: registry.Mechanism, gate: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    d = mech.as_dict()
    d["options_used"] = mech.resolve_options(cfg.options.get(mech.name, {}))
    d["has_mask"] = mech.mask is not None
    d["decodable"] = mech.decodable
    d["gate"] = gate
    return d


def quality_plan(cfg: BenchConfig, mechs: list[registry.Mechanism]) -> list[dict[str, Any]]:
    """Every quality case of the run, in order: per study (baselines first), per mechanism and option
    variant, the learning-rate sweep on the first seed, then the other seeds (``lr`` None: trained at the
    learning rate the sweep chose, see :func:`attnzoo.bench.quality.protocol.best_lr`)."""
    from .quality import NO_ATTENTION, applicability, make_task
    from .quality.protocol import mechanisms_of, studies

    cases: list[dict[str, Any]] = []
    names = [m.name for m in mechs]
    for study in studies(cfg.study_profile(), cfg.tasks, cfg.studies):
        base = {"study": study.name, "task": study.task, "config": study.config, "hyper": study.hyper(),
                "steps": cfg.quality_steps or study.steps, "budget": cfg.quality_budget or study.budget,
                "reserve": study.reserve}
        try:
            task = make_task(study.task, study.config)
        except Exception:  # noqa: BLE001 - e.g. scikit-learn missing; reported by run_quality
            cases.append({**base, "mechanism": "*", "variant": "default", "options": {}, "lr": None, "seed": 0})
            continue
        pool = names + ([NO_ATTENTION] if task.input == "image" else [])
        order = mechanisms_of(study, pool)
        if task.input == "image" and NO_ATTENTION in order:  # the CNN without attention, right after softmax
            order.remove(NO_ATTENTION)
            order.insert(1 if order and order[0] == "softmax" else 0, NO_ATTENTION)
        lrs = list(cfg.quality_lrs or study.lrs)
        for name in order:
            if isinstance(applicability(task, name), str):
                continue
            variants = study.variants(name, cfg.options.get(name))
            for label, opts in variants if cfg.quality_sweep else variants[:1]:
                one = {**base, "mechanism": name, "variant": label, "options": opts}
                seeds = list(cfg.seeds)
                if len(lrs) == 1:
                    cases += [{**one, "lr": lrs[0], "seed": s} for s in seeds]
                else:
                    cases += [{**one, "lr": lr, "seed": seeds[0]} for lr in lrs]
                    cases += [{**one, "lr": None, "seed": s, "sweep": lrs} for s in seeds[1:]]
    return cases


def _chosen_lr(records: list[dict[str, Any]], case: dict[str, Any]) -> float | None:
    """The learning rate of the sweep (on the first seed) of ``case``'s variant with the best value."""
    from .quality.protocol import best_lr

    values: dict[float, float | None] = {}
    better = True
    for r in records:
        if (r.get("study"), r["mechanism"], r.get("variant")) == (case["study"], case["mechanism"], case["variant"]) \
                and r.get("lr") in case["sweep"] and r["status"] == "ok":
            values.setdefault(r["lr"], r["value"])
            better = r["higher_is_better"]
    return best_lr(values, better)


def _variant(case: dict[str, Any]) -> tuple[str, str, str]:
    return case["study"], case["mechanism"], case["variant"]


def run_quality(cfg: BenchConfig, cases: list[dict[str, Any]], *, deadline: float | None,
                gates: dict[str, dict[str, Any]], progress: Progress, executor,
                results: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Train every case (``cfg.quality_workers`` at a time, each in its own fork server); a case trained at
    the sweep's chosen learning rate waits for its variant's sweep. Records come back in plan order.

    ``results`` (plan index -> record) is filled as cases finish, so a caller interrupted in the middle of a
    long run keeps the cases already trained (:func:`finished_quality`)."""
    from .quality import make_task

    tasks: dict[str, Any] = {}
    results = {} if results is None else results

    def task_of(case):
        key = f"{case['task']}|{sorted(case['config'].items())}"
        if key not in tasks:
            try:
                tasks[key] = make_task(case["task"], case["config"])
            except Exception as e:  # noqa: BLE001
                tasks[key] = e
        return tasks[key]

    def budget_of(i: int, pending: list[int]) -> float:
        case, budget = cases[i], cases[i]["budget"]
        if deadline is not None:  # reserved studies keep their budget; the others share what remains after them
            rest = [cases[j] for j in pending if j != i]
            reserved = sum(c["budget"] for c in rest if c.get("reserve"))
            left = deadline - time.monotonic() - (0.0 if case.get("reserve") else reserved)
            share = left if case.get("reserve") else left / (1 + sum(not c.get("reserve") for c in rest))
            budget = min(budget, share * max(1, cfg.quality_workers))
        return budget

    def prepare(i: int, pending: list[int]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(record decided without training, or None; the probe's arguments, or None)."""
        case = cases[i]
        mech, task = case["mechanism"], task_of(case)
        if isinstance(task, Exception):
            msg = f"task unavailable: {type(task).__name__}: {task}"
            return (_quality_stub(case, "softmax", "error", msg) if mech == "*" else {"drop": True}), None
        done = [results[j] for j in results]
        lr = case["lr"] if case["lr"] is not None else _chosen_lr(done, case)
        budget = budget_of(i, pending)
        blocked = gates.get(mech, {}).get("blocks", {}).get("fast")
        if blocked:
            return _quality_stub(case, mech, "skipped", f"correctness gate failed: {blocked[:300]}", task, lr), None
        if lr is None:
            return _quality_stub(case, mech, "skipped", "no learning rate of the sweep trained successfully on the "
                                 "first seed", task), None
        if budget < 0.3:
            return _quality_stub(case, mech, "skipped", "time budget of the run exhausted", task, lr), None
        args = {"task": case["task"], "config": case["config"], "mechanism": mech, "seed": case["seed"],
                "steps": case["steps"], "budget": budget, "options": case["options"], "threads": cfg.threads,
                "lr": lr, "study": case["study"], "variant": case["variant"], **case["hyper"]}
        return None, args

    def train(exe, i: int, args: dict[str, Any]) -> dict[str, Any]:
        case, budget = cases[i], args["budget"]
        progress.message(f"quality {case['study']} {case['mechanism']} {case['variant']} lr={args['lr']:g} "
                         f"seed {case['seed']}")
        timeout = 1.5 * budget + 6.0
        res = exe.run("quality", args, timeout=timeout)
        if "error" in res and "type" not in res:
            status = "timeout" if res.get("timeout") else "error"
            msg = (f"exceeded the case budget of {budget:.1f} s (one training step or the evaluation took too "
                   f"long; killed after {timeout:.0f} s)" if status == "timeout" else str(res["error"])[:500])
            res = _quality_stub(case, case["mechanism"], status, msg, task_of(case), args["lr"])
            res["budget_s"] = budget
        return res

    def ready(i: int) -> bool:
        """A chosen-lr case waits until every sweep case of its variant has a record."""
        if cases[i]["lr"] is not None:
            return True
        return not any(_variant(cases[j]) == _variant(cases[i]) and cases[j]["lr"] is not None
                       and j not in results for j in range(len(cases)))

    workers = max(1, cfg.quality_workers)
    pending = list(range(len(cases)))
    if workers == 1:
        for i in list(pending):
            rec, args = prepare(i, pending)
            results[i] = rec if rec is not None else train(executor, i, args)
            pending.remove(i)
            progress.tick()
    else:
        import concurrent.futures as cf

        from .forkserver import executor as make_executor

        exes = [executor] + [make_executor(threads=cfg.threads, imports=cfg.imports, isolate=cfg.isolate)
                             for _ in range(workers - 1)]
        for e in exes[1:]:
            e.start()
        free = list(exes)
        running: dict[cf.Future, tuple[int, Any]] = {}
        pool = cf.ThreadPoolExecutor(workers)
        try:
            while pending or running:
                launched = False
                for i in list(pending):
                    if not free:
                        break
                    if not ready(i):
                        continue
                    pending.remove(i)
                    rec, args = prepare(i, pending)
                    if rec is not None:
                        results[i] = rec
                        progress.tick()
                        continue
                    exe = free.pop()
                    exe.ready()
                    running[pool.submit(train, exe, i, args)] = (i, exe)
                    launched = True
                if running and not launched:
                    done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        i, exe = running.pop(fut)
                        results[i] = fut.result()
                        free.append(exe)
                        progress.tick()
        finally:  # on an interrupt: kill the workers' running cases now (the caller closes its own executor)
            for e in exes[1:]:
                e.close(now=bool(running))
            pool.shutdown(wait=not running, cancel_futures=True)
    return finished_quality(results)


def finished_quality(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the finished quality cases, in plan order."""
    return [results[i] for i in sorted(results) if not results[i].get("drop")]


def _quality_stub(case: dict[str, Any], mech: str, status: str, message: str, task=None,
                  lr: float | None = None) -> dict[str, Any]:
    from .quality import NO_ATTENTION

    task_name, conf, seed = case["task"], case["config"], case["seed"]
    metric = task.metric if task is not None else {"icl_regression": "nmse", "char_lm": "bits_per_char"}.get(
        task_name, "accuracy")
    cid = task.config_id() if task is not None else ",".join(f"{k}={v}" for k, v in sorted(conf.items()))
    lr_txt = "chosen" if lr is None else f"{lr:g}"
    return {
        "type": "quality", "id": f"{mech}|{case['study']}|{case['variant']}|{cid}|lr={lr_txt}|seed={seed}",
        "mechanism": mech, "study": case["study"], "variant": case["variant"], "lr": lr,
        "family": registry.get(mech).family if mech not in (NO_ATTENTION, "*") else "baseline",
        "kind": registry.get(mech).kind if mech not in (NO_ATTENTION, "*") else "channel",
        "task": task_name, "config": dict(task.config if task is not None else conf), "config_id": cid, "seed": seed,
        "metric": metric, "higher_is_better": metric == "accuracy", "value": None, "baselines": {},
        "status": status, "message": message, "steps": 0, "steps_planned": case["steps"], "budget_s": 0.0,
        "budget_hit": False, "train_time_s": 0.0, "parameters": None, "state_bytes": None,
        "options": case["options"], "hyper": case["hyper"],
    }


# --------------------------------------------------------------------------------------------------------
def run(cfg: BenchConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns the results dict (not yet written)."""
    t_start = time.monotonic()
    deadline = None if cfg.deadline is None else t_start + cfg.deadline
    log = log or (lambda m: None)
    import_extra(cfg.imports)
    mechs = select_mechanisms(cfg.mechanisms)
    check_options(cfg, mechs)
    env = environment(cfg.threads)
    peers = detect_peers(cfg)
    available = {p["name"]: p for p in peers}
    progress = Progress(cfg.progress, total=len(mechs))
    from .forkserver import executor as make_executor

    exe = make_executor(threads=cfg.threads, imports=cfg.imports, isolate=cfg.isolate)
    exe.start()  # the fork server imports in the background while the gate runs
    stages: dict[str, float] = {}
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    gates: dict[str, dict[str, Any]] = {}
    trained: dict[int, dict[str, Any]] | None = None  # quality cases finished so far (kept on an interrupt)
    interrupted = False
    try:
        # 1. correctness gate
        t0 = time.monotonic()
        for m in mechs:
            progress.message(f"gate {m.name}")
            gates[m.name] = run_gate(m)
            progress.tick()
        stages["gate"] = time.monotonic() - t0
        # 2. efficiency
        if cfg.efficiency:
            plans = {m.name: plan(m, cfg, available, mask_ok="mask" not in gates[m.name]["blocks"]) for m in mechs}
            qcases = quality_plan(cfg, mechs) if cfg.quality else []
            progress.total(len(mechs) + sum(len(p) for p in plans.values()) + len(qcases))
            stage_end = None if deadline is None else t_start + cfg.deadline * cfg.efficiency_share
            progress.message("starting the measurement worker")
            exe.ready()
            t0 = time.monotonic()
            runner = EfficiencyRunner(cfg, executor=exe, progress=progress.message, stage_deadline=stage_end)
            for i, m in enumerate(mechs):
                budget = cfg.mechanism_budget
                if stage_end is not None:
                    budget = max(0.0, min(budget, (stage_end - time.monotonic()) / (len(mechs) - i)))
                blocks = dict(gates[m.name]["blocks"])
                blocks.pop("mask", None)
                runner.run_mechanism(m, plans[m.name], budget=budget, gate_status=blocks, tick=progress.tick)
            records.extend(runner.records)
            notes.extend(runner.notes)
            stages["efficiency"] = time.monotonic() - t0
        else:
            qcases = quality_plan(cfg, mechs) if cfg.quality else []
            progress.total(len(mechs) + len(qcases))
        # 3. quality
        if cfg.quality:
            exe.ready()
            t0 = time.monotonic()
            trained = {}
            run_quality(cfg, qcases, deadline=deadline, gates=gates, progress=progress, executor=exe,
                        results=trained)
            stages["quality"] = time.monotonic() - t0
    except KeyboardInterrupt:
        interrupted = True
        print("\nattnzoo bench: interrupted; writing what was measured so far", file=sys.stderr)
    finally:
        progress.close()
        exe.close(now=interrupted)
    if trained:
        records.extend(finished_quality(trained))
    real_model = None
    if cfg.real and not interrupted:
        real_model, interrupted = run_real_stage(cfg, log)
        stages["real_model"] = real_model.get("duration_s", 0.0)
    attach_ratios(records)
    entries = [mechanism_entry(m, gates.get(m.name, {"status": "error", "checks": [], "blocks":
                                                      {"fast": "not gated (interrupted)"}}), cfg) for m in mechs]
    out = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": env["date"],
        "command": cfg.command or " ".join(["attnzoo", *sys.argv[1:]]), "profile": cfg.profile,
        "config": cfg.as_dict(), "environment": {**env, "stages_s": stages},
        "duration_s": time.monotonic() - t_start,
        "interrupted": interrupted, "mechanisms": entries, "peers": peers, "records": records,
        "summary": {"efficiency_length": efficiency_lengths(records), "quality": quality_summary(records),
                    "counts": counts(records), "notes": notes},
    }
    if real_model is not None:
        out["real_model"] = real_model
    return out


def run_real_stage(cfg: BenchConfig, log: Callable[[str], None]) -> tuple[dict[str, Any], bool]:
    """The real pretrained-model stage of a bench run: (its real_model section, interrupted). Missing model
    packages are recorded (and printed), never an error; a crash of the stage is recorded as its error."""
    from . import real

    missing = real.packages_missing()
    if missing:
        msg = f"{missing}; then `attnzoo bench real` (or bench --full) runs it"
        print(f"attnzoo bench: real pretrained-model stage skipped: {msg}", file=sys.stderr)
        return {"skipped": msg}, False
    progress = Progress(cfg.progress)
    rcfg = real.quick_config() if cfg.profile == "quick" else real.RealConfig()
    rcfg.progress = progress
    t0 = time.monotonic()
    try:
        section = real.run_real(rcfg)
    except Exception as e:  # noqa: BLE001 - e.g. a model file that fails to load: recorded, the run is kept
        section = {"error": f"{type(e).__name__}: {e}"[:1000], "duration_s": time.monotonic() - t0}
    finally:
        progress.close()
    log(f"real-model stage: {time.monotonic() - t0:.0f} s")
    return section, bool(section.get("interrupted"))


def write_outputs(results: dict[str, Any], out: str, *, plots: bool = True) -> dict[str, str]:
    """results.json, summary.md, PNG plots and report.html into ``out``; returns {what: path}."""
    from .report import render

    os.makedirs(out, exist_ok=True)
    from .results import save

    paths = {"results": os.path.join(out, "results.json")}
    save(results, paths["results"])
    paths.update(render(results, out, plots=plots))
    return paths


def unknown_task_hint(name: str) -> str:
    from .quality import TASKS

    return suggest(name, TASKS)
