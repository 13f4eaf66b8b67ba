"""The efficiency sweep: every mechanism x pattern x length x mode beside dense attention, in one run.

For each registered mechanism (that passed the correctness gate) the planner lists its cases; each case is
timed in this process (:mod:`attnzoo.bench.measure`) and its peak memory measured in a fresh process
(:mod:`attnzoo.bench.forkserver`). Its baseline, measured in the same run with the same sizes, is:

- ``sdpa``: torch's fused ``scaled_dot_product_attention`` on the same q/k/v (functional mechanisms);
  decoding: a KV cache + SDPA per token;
- ``softmax_module``: attnzoo's generic ``Attention`` layer with softmax attention, projections included
  (module mechanisms; grid and channel modules compare with it on the same tokens flattened);
- cross mechanisms (:mod:`attnzoo.bench.cross`) run at their papers' shapes beside the softmax layer on the same
  queries and context tokens; their decoding from a ContextCache beside recomputing the context
  (``context_recompute``).

Speedup = baseline time / mechanism time (> 1 is faster); memory ratio = mechanism / baseline peak memory.
The *efficiency length* (CAB, arXiv 2210.07661) is the length from which on the mechanism stays cheaper than
the baseline, interpolated on log-log axes between the two measured lengths around the crossing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import registry
from ..registry import Mechanism
from .config import BenchConfig

MEMORY_RESOLUTION = 512 * 1024
"""Peak-RSS deltas below about this many bytes are within the kernel's RSS accounting granularity (per-CPU
counter batching): ratios use max(bytes, MEMORY_RESOLUTION) so tiny cases compare as equal, not as 0 / x."""

PRIMARY_ORDER = ("causal_self", "noncausal_self", "causal_cross", "noncausal_cross")
BASELINES = ("sdpa", "softmax_module", "context_recompute")


def primary_pattern(mech: Mechanism) -> str:
    """The pattern a quick run measures: causal self attention where supported (decoding needs it)."""
    if mech.kind != "sequence":
        return "noncausal_self"
    return next(p for p in PRIMARY_ORDER if p in mech.patterns)


def patterns_of(mech: Mechanism, cfg: BenchConfig) -> list[str]:
    if mech.kind in ("grid", "channel"):
        pats = ["noncausal_self"]
    elif mech.kind != "sequence":
        pats = [p for p in PRIMARY_ORDER if p in mech.patterns and p.endswith("self")] or ["noncausal_self"]
    else:
        pats = [p for p in PRIMARY_ORDER if p in mech.patterns]
    if cfg.patterns is not None:
        pats = [p for p in pats if p in cfg.patterns]
    if cfg.primary_pattern_only and pats:
        prim = primary_pattern(mech)
        pats = [prim] if prim in pats else pats[:1]
    return pats


def _lengths(pattern: str, n: int, cfg: BenchConfig) -> tuple[int, int]:
    if pattern.endswith("self"):
        return n, n
    return max(1, round(n * cfg.cross_ratio)), n


def _base(cfg: BenchConfig, mech: Mechanism, pattern: str, mode: str, n: int) -> dict[str, Any]:
    nq, nk = _lengths(pattern, n, cfg)
    spec: dict[str, Any] = {
        "impl": "mechanism", "mechanism": mech.name, "kind": mech.kind,
        # a mechanism with a functional form is timed through it (the attention op, like the SDPA baseline, in
        # every pattern it supports); its module (learned parts, often self-only) is what quality trains
        "module": mech.module is not None and not mech.functional,
        "pattern": pattern, "mode": mode, "nq": nq, "nk": nk, "n": n, "batch": cfg.batch, "heads": cfg.heads,
        "kv_heads": cfg.kv_heads or cfg.heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
        "options": mech.resolve_options(cfg.options.get(mech.name, {})), "seed": 0,
        "decode_tokens": cfg.decode_tokens,
    }
    side = None
    if mech.kind in ("grid", "channel"):
        side = max(2, math.isqrt(n))
        spec.update(side=side, nq=side * side, nk=side * side, n=side * side)
    opts, heads = mech.fit_case(cfg.options.get(mech.name, {}), n=spec["n"], side=side, heads=cfg.heads,
                                causal=pattern.startswith("causal"))
    spec["options"] = mech.resolve_options(opts)
    if heads != cfg.heads:  # a single-head design: same width, one head
        spec.update(heads=heads, kv_heads=heads, head_dim=cfg.heads * cfg.head_dim // heads)
    return spec


def peer_applies(peer: str, mech: Mechanism, pattern: str, mode: str, cfg: BenchConfig,
                 available: dict[str, dict[str, Any]], mask_ok: bool) -> bool:
    if not available.get(peer, {}).get("available") or not mech.functional or mode == "decode":
        return False
    if mode not in cfg.peer_modes:
        return False
    if peer == "reference":
        return mech.fast is not None
    if peer in ("sdpa_masked", "flex"):
        return mech.mask is not None and mask_ok and (peer != "flex" or mode == "forward")
    if peer == "local_attention":
        return mech.name == "sliding_window" and pattern.endswith("self")
    return False


def lengths_of(mech: Mechanism, cfg: BenchConfig, mode: str) -> list[int]:
    """The lengths ``mech`` is measured at in ``mode``: the run's lengths, and its long lengths for sequence
    mechanisms of the sub-quadratic families (forward+backward up to ``long_fwd_bwd_max``)."""
    out = list(cfg.lengths)
    if mech.kind == "sequence" and mech.family in cfg.long_families:
        cap = cfg.long_fwd_bwd_max if mode == "forward_backward" and cfg.long_fwd_bwd_max else None
        out += [n for n in cfg.long_lengths if cap is None or n <= cap]
    return out


def plan(mech: Mechanism, cfg: BenchConfig, available: dict[str, dict[str, Any]] | None = None,
         mask_ok: bool = True) -> list[dict[str, Any]]:
    """The cases of ``mech``, in priority order: primary pattern first; within a pattern forward at every
    length, then decode, then forward+backward (a budget cut keeps whole curves); peers beside each case."""
    available = available or {}
    from . import cross as cross_bench

    if cross_bench.applies(mech.name):  # cross mechanisms: their papers' shapes, not cfg.lengths
        return cross_bench.plan(mech, cfg)
    specs = []
    order = [m for m in ("forward", "decode", "forward_backward") if m in cfg.modes]
    for pattern in patterns_of(mech, cfg):
        for mode in order:
            for n in lengths_of(mech, cfg, mode):
                if mode == "decode" and (pattern != "causal_self" or not mech.decodable):
                    continue
                if mode == "forward_backward" and mech.kind == "sequence" and mech.module is None \
                        and mech.reference is None:  # pragma: no cover - registry forbids it
                    continue
                specs.append(_base(cfg, mech, pattern, mode, n))
                for peer in cfg.peers if n in cfg.lengths else ():  # long lengths: no dense peers (N x N masks)
                    if peer_applies(peer, mech, pattern, mode, cfg, available, mask_ok):
                        specs.append({**_base(cfg, mech, pattern, mode, n), "impl": peer})
    return specs


def baseline_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The dense-attention case ``spec`` is compared with (same sizes, same run)."""
    if "cross_shape" in spec:
        from . import cross as cross_bench

        return cross_bench.baseline_spec(spec)
    out = {k: spec[k] for k in ("pattern", "mode", "nq", "nk", "n", "batch", "heads", "kv_heads", "head_dim",
                                "dtype", "decode_tokens")}
    out.update(mechanism="softmax", options={}, seed=0)
    if spec.get("module") or spec.get("kind", "sequence") != "sequence":
        out.update(impl="softmax_module", module=True, kind="sequence", kv_heads=spec["heads"])
        if spec.get("kind") in ("grid", "channel", "pooling", "fusion"):
            out.update(pattern="noncausal_self", nq=spec["n"], nk=spec["n"])
    else:
        out.update(impl="sdpa", module=False, kind="sequence")
    return out


def case_key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


def series_name(spec: dict[str, Any]) -> str:
    if spec["impl"] == "sdpa":
        return "sdpa"
    if spec["impl"] == "softmax_module":
        return "softmax_module"
    return spec["mechanism"] if spec["impl"] == "mechanism" else f"{spec['mechanism']} [{spec['impl']}]"


# --------------------------------------------------------------------------------------------------------
# Efficiency length
# --------------------------------------------------------------------------------------------------------
def efficiency_length(ns: Iterable[float], ratios: Iterable[float]) -> dict[str, Any]:
    """Where ``ratio = mechanism / baseline`` (time or memory) crosses 1 for good, on log-log axes.

    Returns ``{"n": N*, "where": "crossing"}`` with N* interpolated linearly in (log N, log ratio) between
    the last length where the mechanism is costlier and the next one (from which on it never is again);
    ``"below_range"`` (cheaper at every measured length; ``n`` = smallest length as an upper bound),
    ``"above_range"`` (still costlier at the largest length; ``n`` = that length as a lower bound), or
    ``"insufficient"`` (no valid points).
    """
    pts = sorted((float(n), float(r)) for n, r in zip(ns, ratios)
                 if n and r and math.isfinite(r) and r > 0 and n > 0)
    if not pts:
        return {"n": None, "where": "insufficient"}
    lr = [math.log(r) for _, r in pts]
    if lr[-1] > 0:
        return {"n": pts[-1][0], "where": "above_range"}
    i = len(pts) - 1
    while i > 0 and lr[i - 1] <= 0:
        i -= 1
    if i == 0:
        return {"n": pts[0][0], "where": "below_range"}
    (n0, _), (n1, _) = pts[i - 1], pts[i]
    a, b = lr[i - 1], lr[i]
    frac = a / (a - b) if a != b else 1.0
    return {"n": math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0))), "where": "crossing"}


# --------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------
def _record(spec: dict[str, Any], cfg: BenchConfig, **fields: Any) -> dict[str, Any]:
    mech = registry.get(spec["mechanism"]) if spec["impl"] not in BASELINES else None
    rec = {
        "type": "efficiency", "id": "", "series": series_name(spec), "mechanism": spec["mechanism"],
        "impl": spec["impl"], "family": mech.family if mech else "core", "kind": spec.get("kind", "sequence"),
        "pattern": spec["pattern"], "mode": spec["mode"], "n": spec["n"], "nq": spec["nq"], "nk": spec["nk"],
        "side": spec.get("side"), "batch": spec["batch"], "heads": spec["heads"], "kv_heads": spec["kv_heads"],
        "head_dim": spec["head_dim"], "dtype": spec["dtype"], "threads": cfg.threads,
        "options": spec.get("options", {}), "decode_tokens": spec["decode_tokens"] if spec["mode"] == "decode"
        else None, "status": "ok", "message": "", "form": None, "time_s": None, "time_iqr_s": None,
        "repeats": None, "first_call_s": None, "compiled": False, "compile_time_s": None, "memory_bytes": None,
        "memory_method": None, "memory_error": None, "state_bytes": None, "other_cpu_cores": None,
        "attempts": 0, "contaminated": False, "other_cpu_attempts": [], "baseline_id": None, "speedup": None,
        "memory_ratio": None, "wall_s": 0.0, "parameters": None,
    }
    rec.update(fields)
    rec["id"] = "|".join(str(x) for x in (rec["series"], rec["pattern"], rec["mode"], rec["nq"], rec["nk"],
                                          rec["dtype"]))
    return rec


class EfficiencyRunner:
    """Measures planned cases under time budgets; baselines are measured on demand and shared."""

    def __init__(self, cfg: BenchConfig, *, executor, progress: Callable[[str], None] | None = None,
                 stage_deadline: float | None = None):
        self.cfg, self.executor = cfg, executor
        self.progress = progress or (lambda msg: None)
        self.stage_deadline = stage_deadline  # time.monotonic() by which the stage should end
        self.baselines: dict[str, dict[str, Any]] = {}
        self.records: list[dict[str, Any]] = []
        self.min_case_timeout = 5.0  # even a mechanism out of budget gets this long for its first case
        self.retries = cfg.retries
        self.baseline_seconds = 0.0
        self.recent: list[bool] = []
        self.measured = 0
        self.notes: list[str] = []

    def _note_contamination(self, contaminated: bool) -> None:
        """Stop re-running cases once the machine is persistently busy: retries would only double the run."""
        self.measured += 1
        self.recent = (self.recent + [contaminated])[-8:]
        if self.retries and len(self.recent) == 8 and sum(self.recent) >= 7:
            self.notes.append(f"retries disabled after {self.measured} timed cases: 7 of the last 8 stayed "
                              "contaminated after re-runs (the machine is persistently busy)")
            self.retries = 0

    # -- one case ------------------------------------------------------------------------------------------
    def measure(self, spec: dict[str, Any], *, timeout: float = 120.0) -> dict[str, Any]:
        """Time ``spec`` (and measure its peak memory) in fresh processes; a case over ``timeout`` is killed."""
        cfg, t0 = self.cfg, time.monotonic()
        args = {"spec": spec, "min_run_time": cfg.min_run_time, "warmup": cfg.warmup, "retries": self.retries,
                "threads": cfg.threads}
        res = self.executor.run("timing", args, timeout=timeout)
        if "error" in res:
            status = "timeout" if res.get("timeout") else "error"
            return _record(spec, cfg, status=status, message=str(res["error"])[:500], wall_s=time.monotonic() - t0)
        timing, info, per = res["timing"], res["info"], res["tokens"]
        self._note_contamination(timing["contaminated"])
        rec = _record(
            spec, cfg, form=info.get("form"), time_s=timing["median"] / per, time_iqr_s=timing["iqr"] / per,
            repeats=timing["repeats"], first_call_s=timing["first_call"], compiled=timing["compiled"],
            compile_time_s=max(0.0, timing["first_call"] - timing["median"]) if timing["compiled"] else None,
            other_cpu_cores=timing["other_cpu"], attempts=timing["attempts"], contaminated=timing["contaminated"],
            other_cpu_attempts=timing["other_cpu_attempts"], state_bytes=info.get("state_bytes"),
            parameters=info.get("parameters"),
        )
        if cfg.memory:
            mem_timeout = max(10.0, 6 * (timing["first_call"] + timing["median"] * 3) + 5)
            mem = self.executor.run("memory", {"spec": spec}, timeout=mem_timeout)
            if "peak_bytes" in mem:
                rec["memory_bytes"], rec["memory_method"] = int(mem["peak_bytes"]), mem.get("method")
            else:
                rec["memory_error"] = str(mem.get("error"))[:500]
        rec["wall_s"] = time.monotonic() - t0
        return rec

    def baseline(self, spec: dict[str, Any]) -> dict[str, Any]:
        bspec = baseline_spec(spec)
        key = case_key(bspec)
        if key not in self.baselines:
            self.progress(f"baseline {series_name(bspec)} {bspec['pattern']} {bspec['mode']} n={bspec['n']}")
            t0 = time.monotonic()
            rec = self.measure(bspec, timeout=max(60.0, self.cfg.mechanism_budget))
            self.baseline_seconds += time.monotonic() - t0
            self.baselines[key] = rec
            self.records.append(rec)
        return self.baselines[key]

    def predict(self, prev: dict[str, Any], n: int) -> float:
        """Seconds a case at length ``n`` will take, from the same series at a shorter length (quadratic
        growth assumed: the worst case of dense attention)."""
        scale = (n / prev["n"]) ** 2
        if prev["status"] != "ok":
            return prev["wall_s"] * scale
        call = prev["time_s"] * (prev["decode_tokens"] or 1) * scale
        cfg = self.cfg
        return 0.25 + cfg.warmup * call + max(cfg.min_run_time, 3 * call) * (1 + self.retries) \
            + (3 * call if cfg.memory else 0.0)

    # -- one mechanism -------------------------------------------------------------------------------------
    def run_mechanism(self, mech: Mechanism, specs: list[dict[str, Any]], *, budget: float,
                      gate_status: dict[str, str], tick: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
        """Measure ``specs`` of ``mech`` until ``budget`` seconds are spent (the first case always runs)."""
        out: list[dict[str, Any]] = []
        start = time.monotonic()
        last: dict[tuple, dict[str, Any]] = {}  # series key -> its record at the previous length
        base0 = self.baseline_seconds  # time spent on shared baselines is not the mechanism's
        for i, spec in enumerate(specs):
            key = (spec["impl"], spec["pattern"], spec["mode"])
            blocked = gate_status.get("decode" if spec["mode"] == "decode" else "fast")
            if blocked:
                out.append(_record(spec, self.cfg, status="gate_failed", message=blocked))
                tick()
                continue
            spent = time.monotonic() - start - (self.baseline_seconds - base0)
            predicted = self.predict(last[key], spec["n"]) if key in last else 0.0
            over = spent >= budget or spent + predicted > budget * 1.5
            if self.stage_deadline is not None and time.monotonic() + predicted > self.stage_deadline:
                over = True
            if i > 0 and over and any(r["status"] in ("ok", "error", "timeout") for r in out):
                why = (f"time budget: {spent:.1f} s of {budget:.1f} s spent on {mech.name}"
                       + (f", this case predicted {predicted:.1f} s" if predicted else ""))
                out.append(_record(spec, self.cfg, status="skipped", message=why))
                tick()
                continue
            self.progress(f"{mech.name} [{spec['impl']}] {spec['pattern']} {spec['mode']} n={spec['n']}")
            timeout = max(self.min_case_timeout, budget - spent + 1.0)
            if self.stage_deadline is not None and any(r["status"] == "ok" for r in out):
                timeout = min(timeout, max(self.min_case_timeout, self.stage_deadline - time.monotonic()))
            rec = self.measure(spec, timeout=timeout)
            if rec["status"] == "ok":
                base = self.baseline(spec)
                rec["baseline_id"] = base["id"]
            last[key] = rec
            out.append(rec)
            tick()
        self.records.extend(out)
        return out


def attach_ratios(records: list[dict[str, Any]]) -> None:
    """Fill ``speedup`` and ``memory_ratio`` of every measured record from its baseline record."""
    by_id = {r["id"]: r for r in records if r["type"] == "efficiency" and r["impl"] in BASELINES}
    for r in records:
        if r["type"] != "efficiency" or r["status"] != "ok":
            continue
        base = by_id.get(r.get("baseline_id") or "")
        if r["impl"] in BASELINES:
            base = r
            r["baseline_id"] = r["id"]
        if base is None or base["status"] != "ok":
            continue
        if r["time_s"] and base["time_s"]:
            r["speedup"] = base["time_s"] / r["time_s"]
        if r["memory_bytes"] is not None and base["memory_bytes"] is not None:
            r["memory_ratio"] = max(r["memory_bytes"], MEMORY_RESOLUTION) / max(base["memory_bytes"], MEMORY_RESOLUTION)


def efficiency_lengths(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (series, pattern, mode): where its time and its memory cross the baseline's."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["type"] == "efficiency" and r["status"] == "ok" and r["impl"] not in BASELINES:
            groups.setdefault((r["series"], r["mechanism"], r["impl"], r["pattern"], r["mode"]), []).append(r)
    out = []
    for (series, mech, impl, pattern, mode), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        t = efficiency_length(ns, [1 / r["speedup"] if r["speedup"] else float("nan") for r in rs])
        m = efficiency_length(ns, [r["memory_ratio"] if r["memory_ratio"] else float("nan") for r in rs])
        out.append({"series": series, "mechanism": mech, "impl": impl, "pattern": pattern, "mode": mode,
                    "lengths": ns, "time": t, "memory": m, "reason": length_reason(mech, t, ns)})
    return out


def length_reason(name: str, crossing: dict[str, Any], ns: list[int]) -> str:
    """Why a time efficiency length is not a number within the measured range (empty when it is)."""
    if crossing["where"] in ("crossing", "below_range"):
        return ""
    try:
        mech = registry.get(name)
    except Exception:  # noqa: BLE001 - a user's mechanism no longer registered
        mech = None
    top = max(ns) if ns else 0
    comp = f" (its cost: {mech.complexity})" if mech is not None and mech.complexity else ""
    if crossing["where"] == "above_range":
        return (f"never cheaper than the baseline up to {top} tokens, the longest measured{comp}; "
                + ("dense SDPA on CPU is a fused kernel, so a mechanism that still does O(N^2) work or pays "
                   "per-block overheads does not catch up within this range" if mech is None or mech.family
                   not in ("local", "linear", "sparse", "memory") else
                   "its extra per-token work exceeds what it saves at these lengths"))
    return "not measured"
