"""summary.md: the Markdown report of a run."""

from __future__ import annotations

from typing import Any

from .format import (
    fmt_bytes,
    fmt_len,
    fmt_range,
    fmt_rank,
    fmt_x,
    has_bench,
    headline_rows,
    md_table,
    quality_label,
    quality_name,
)
from .real import real_markdown

# --------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------


def headline_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["mechanism", "gate", "pattern", "N", "forward", "fwd+bwd", "decode", "memory", "efficiency length (time)",
            "decode state", "quality"]
    rows = []
    for r in headline_rows(results):
        def star(mode, r=r):
            return "*" if r[f"{mode}_contaminated"] else ""
        rows.append([r["mechanism"], r["gate"], r["pattern"] or "—", str(r["n"] or "—"),
                     fmt_x(r["forward_speedup"]) + star("forward"),
                     fmt_x(r["forward_backward_speedup"]) + star("forward_backward"),
                     fmt_x(r["decode_speedup"]) + star("decode"), fmt_x(r["memory_ratio"]),
                     fmt_len(r["efficiency_length_time"]), fmt_bytes(r["state_bytes"]), quality_label(r["quality"])])
    return head, rows


def env_line(results: dict[str, Any]) -> str:
    env = results["environment"]
    return (f"{env['cpu']['model']} ({env['cpu']['logical_cores']} logical cores; "
            f"{', '.join(env['cpu']['flags']) or 'no SIMD flags read'}), {env['threads']} thread(s), "
            f"torch {env['torch']}, attnzoo {env['attnzoo']}"
            + (f" ({env['attnzoo_commit']})" if env.get("attnzoo_commit") else "")
            + f", host {env['hostname']}, {env['date']}")


def gate_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in results["mechanisms"]:
        g = m["gate"]
        checks = ", ".join(f"{c['check']}{'[' + c['pattern'] + ']' if c.get('pattern') else ''}: {c['status']}"
                           for c in g["checks"]) or g.get("note", "")
        problems = "; ".join(f"{k}: {v[:200]}" for k, v in g["blocks"].items())
        rows.append([m["name"], g["status"], checks, problems or "—"])
    return rows


EFF_LENGTH_HEAD = ["series", "pattern", "mode", "lengths", "time", "memory", "why no number"]


def eff_length_rows(results: dict[str, Any]) -> list[list[str]]:
    return [[e["series"], e["pattern"], e["mode"], ", ".join(str(n) for n in e["lengths"]), fmt_len(e["time"]),
             fmt_len(e["memory"]), e.get("reason") or ""] for e in results["summary"]["efficiency_length"]]


QUALITY_HEAD = ["study", "config", "rank", "mechanism (options)", "metric", "mean ± std [min–max]", "seeds", "lr",
                "steps", "decode state", "reference"]


def quality_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per (study, mechanism, option variant), ranked within the study; ``=`` marks a rank shared
    with another variant inside the seed spread."""
    rows = []
    for q in results["summary"]["quality"]:
        base = ", ".join(f"{k} {v:.3g}" for k, v in sorted(q["baselines"].items()))
        lr = "—" if q.get("lr") is None else f"{q['lr']:g}" + (
            f" (of {', '.join(q['lr_sweep'])})" if len(q.get("lr_sweep") or {}) > 1 else "")
        rows.append([q.get("study") or q["task"], q["config_id"], fmt_rank(q), quality_name(q), q["metric"],
                     fmt_range(q), str(q["seeds"]), lr,
                     f"{q['steps']:.0f}" + (" (budget)" if q["budget_hit"] else ""), fmt_bytes(q.get("state_bytes")),
                     base])
    return rows


def quality_intro() -> str:
    return ("Tiny models that differ only in their attention, trained on CPU (quality/protocol.py): per study a "
            "learning-rate sweep on the first seed, the other seeds at the best learning rate; mean, sample std "
            "and range over seeds. Rank = 1 + the number of variants better beyond the seed spread (their seed "
            "ranges do not overlap): `=` marks a rank shared with a variant whose difference is inside the spread "
            "(a tie). Decode state: bytes of all attention layers' decode states of one sequence after the "
            "task's length.")


def problem_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in results["records"]:
        if r["status"] in ("error", "gate_failed") or (r["type"] == "efficiency" and r.get("memory_error")):
            what = r.get("series", r["mechanism"])
            where = (f"{r['pattern']} {r['mode']} n={r['n']}" if r["type"] == "efficiency"
                     else f"{r['task']} {r['config_id']} seed {r['seed']}")
            msg = r["message"] or f"memory: {r.get('memory_error')}"
            rows.append([r["type"], what, where, r["status"], msg[:300]])
    return rows


def hygiene(results: dict[str, Any]) -> str:
    eff = [r for r in results["records"] if r["type"] == "efficiency" and r["status"] == "ok"]
    cont = [r for r in eff if r["contaminated"]]
    others = [r["other_cpu_cores"] for r in eff if r["other_cpu_cores"] is not None]
    avg = sum(others) / len(others) if others else None
    comp = [r for r in eff if r["compiled"]]
    text = (f"Each timing is the median of repeated calls after {results['config']['warmup']} warm-up call(s) "
            f"(torch.utils.benchmark, at least {results['config']['min_run_time']} s of calls). During each, the CPU "
            f"time of other processes was read from /proc/stat; a case during which they used more than the "
            f"cores this run left idle was re-run up to {results['config']['retries']} time(s). "
            f"{len(cont)} of {len(eff)} measured cases stayed contaminated and are marked * "
            f"(other processes used {avg:.2f} cores on average during measurements)." if avg is not None else
            f"{len(cont)} of {len(eff)} measured cases stayed contaminated.")
    noise = [r["speedup"] for r in eff if r["series"] == "softmax" and r.get("speedup")]
    if noise:
        lo, hi = min(noise), max(noise)
        text += (f" Noise floor: the registered `softmax` mechanism runs the same SDPA kernel as the baseline, so its "
                 f"ratio should be 1; this run measured {lo:.2g}× to {hi:.2g}× across {len(noise)} cases — ratios "
                 "inside that band are indistinguishable from 1.")
    text += (" Peak memory: one call in a fresh process forked from a clean server (VmHWM after a warm-up call, "
             "glibc mmap threshold pinned so freed tensors return to the OS); deltas below ~0.5 MiB are within "
             "the kernel's RSS accounting granularity.")
    if comp:
        text += f" {len(comp)} case(s) compiled with torch.compile; compile time is reported separately " \
                "(first call minus median)."
    return text


def merged_from(results: dict[str, Any]) -> list[str]:
    """The commands of the runs a merged results document joins (``attnzoo bench merge``), one line each."""
    parts = (results.get("config") or {}).get("merged") or []
    return ["", "Merged from the runs:", "", *(f"- `{p['command']}`" for p in parts)] if parts else []


def markdown_summary(results: dict[str, Any], images: list[dict[str, str]]) -> str:
    if not has_bench(results):
        return "\n".join([
            "# attnzoo bench results", "",
            f"`{results['command']}` — profile **{results['profile']}**, {results['duration_s']:.0f} s"
            + (" (**interrupted**)" if results["interrupted"] else ""), "",
            f"Environment: {env_line(results)}"
            + (f", transformers {results['environment']['transformers']}"
               if results["environment"].get("transformers") else "") + ".", "",
            *real_markdown(results, images)])
    head, rows = headline_table(results)
    parts = [
        "# attnzoo bench results",
        "",
        f"`{results['command']}` — profile **{results['profile']}**, {results['duration_s']:.0f} s"
        + (" (**interrupted**)" if results["interrupted"] else ""),
        *merged_from(results),
        "",
        f"Environment: {env_line(results)}.",
        "",
        "Ratios are against dense attention measured in the same run (SDPA for functional mechanisms, the softmax "
        "Attention module for module mechanisms), at the largest length measured: speedup = baseline time / "
        "mechanism time (> 1 is faster), memory = mechanism / baseline peak memory (< 1 is smaller). "
        "`*` = measured while other processes used the CPU.",
        "",
        md_table(head, rows),
        "",
        "## Correctness gate",
        "",
        md_table(["mechanism", "status", "checks", "problems"], gate_rows(results)),
        "",
        "## Efficiency length",
        "",
        "Length from which the mechanism stays cheaper than the baseline (interpolated on log-log axes; "
        "`<N` cheaper at every length, `>N` never within the measured range).",
        "",
        md_table(EFF_LENGTH_HEAD, eff_length_rows(results)),
        "",
        "## Quality",
        "",
        quality_intro(),
        "",
        md_table(QUALITY_HEAD, quality_rows(results)),
        "",
        "## Measurement hygiene",
        "",
        hygiene(results),
        "",
    ]
    probs = problem_rows(results)
    if probs:
        parts += ["## Errors and failures", "", md_table(["stage", "what", "where", "status", "message"], probs), ""]
    parts += real_markdown(results, images)
    peers = [[p["name"], "yes" if p["available"] else "no", p.get("version") or "—", p["reason"]]
             for p in results["peers"]]
    parts += ["## Peers", "", md_table(["peer", "available", "version", "note"], peers), ""]
    images = [im for im in images if not im["file"].startswith("real_")]  # shown in their own section
    if images:
        parts += ["## Plots", ""]
        for im in images:
            parts += [f"### {im['title']}", "", f"![{im['title']}]({im['file']})", "", im["caption"], ""]
    return "\n".join(parts)
