"""The terminal table printed at the end of a run."""

from __future__ import annotations

from typing import Any

from .format import fmt_len, fmt_x, has_bench, headline_rows, quality_label
from .real import real_terminal


def terminal_table(results: dict[str, Any]) -> str:
    """One screen: a line per mechanism with its headline ratios at the largest length measured (and the
    real-model table when the run has one)."""
    real = real_terminal(results)
    if not has_bench(results):
        return real or "no measurements in this run"
    return _bench_terminal(results) + ("\n\n" + real if real else "")


def _bench_terminal(results: dict[str, Any]) -> str:
    rows = headline_rows(results)
    head = ["mechanism", "gate", "pattern", "N", "fwd", "fwd+bwd", "decode", "mem", "eff.len", "quality"]
    lines = []
    for r in rows:
        lines.append([
            r["mechanism"][:24], r["gate"], (r["pattern"] or "—").replace("causal", "c").replace("non", "n"),
            str(r["n"] or "—"), fmt_x(r["forward_speedup"]), fmt_x(r["forward_backward_speedup"]),
            fmt_x(r["decode_speedup"]), fmt_x(r["memory_ratio"]), fmt_len(r["efficiency_length_time"]),
            quality_label(r["quality"])[:26],
        ])
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in lines]
    env, cnt = results["environment"], results["summary"]["counts"]
    out.append("")
    out.append(f"speedups = dense baseline time / mechanism time (>1 faster), mem = peak memory ratio (<1 smaller), "
               f"same run; {env['threads']} thread(s) on {env['cpu']['model']}")
    out.append(f"cases: {cnt.get('efficiency_ok', 0)} measured, {cnt.get('efficiency_skipped', 0)} skipped (budget), "
               f"{cnt.get('efficiency_error', 0)} errors, {cnt.get('efficiency_gate_failed', 0)} gate-failed, "
               f"{cnt.get('efficiency_contaminated', 0)} contaminated by other processes; "
               f"quality: {cnt.get('quality_ok', 0)} trained, {cnt.get('quality_skipped', 0)} skipped; "
               f"{results['duration_s']:.0f} s")
    return "\n".join(out)
