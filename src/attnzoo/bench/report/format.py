"""Formatting of numbers and the headline numbers of each mechanism, shared by every output."""

from __future__ import annotations

import base64
import html
import os
from typing import Any

MODES = ("forward", "forward_backward", "decode")
PREFERRED = ("causal_self", "noncausal_self", "causal_cross", "noncausal_cross")


# --------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------
def fmt_x(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}×"


def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "—"
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(v) >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.0f} B"


def fmt_time(v: float | None) -> str:
    if v is None:
        return "—"
    if v < 1e-3:
        return f"{v * 1e6:.3g} µs"
    if v < 1:
        return f"{v * 1e3:.3g} ms"
    return f"{v:.3g} s"


def fmt_len(c: dict[str, Any] | None) -> str:
    if not c or c.get("n") is None:
        return "—"
    n = c["n"]
    s = f"{n / 1000:.3g}k" if n >= 1000 else f"{n:.0f}"
    return {"crossing": f"≈{s}", "below_range": f"<{s}", "above_range": f">{s}"}.get(c["where"], "—")


def fmt_metric(q: dict[str, Any] | None) -> str:
    if q is None:
        return "—"
    val = f"{q['mean']:.3g}"
    if q.get("std") is not None:
        val += f" ± {q['std']:.2g}"
    return val


# --------------------------------------------------------------------------------------------------------
# Headline numbers per mechanism
# --------------------------------------------------------------------------------------------------------
def ok_cases(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["records"] if r["type"] == "efficiency" and r["status"] == "ok"]


def _at_max(recs: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    rs = [r for r in recs if all(r.get(k) == v for k, v in match.items())]
    return max(rs, key=lambda r: r["n"]) if rs else None


def headline_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    ok = ok_cases(results)
    el = {(e["series"], e["pattern"], e["mode"]): e for e in results["summary"]["efficiency_length"]}
    quality = results["summary"]["quality"]
    rows = []
    for m in results["mechanisms"]:
        name = m["name"]
        mine = [r for r in ok if r["series"] == name]
        pats = [p for p in PREFERRED if any(r["pattern"] == p for r in mine)]
        pattern = pats[0] if pats else None
        row: dict[str, Any] = {"mechanism": name, "family": m["family"], "kind": m["kind"],
                               "gate": m["gate"]["status"], "pattern": pattern, "n": None}
        for mode in MODES:
            pat = "causal_self" if mode == "decode" else pattern
            r = _at_max(mine, pattern=pat, mode=mode)
            if r is None and mode == "decode":  # cross mechanisms decode against a cached context
                r = _at_max(mine, pattern=pattern, mode=mode)
            row[f"{mode}_speedup"] = r["speedup"] if r else None
            row[f"{mode}_n"] = r["n"] if r else None
            row[f"{mode}_contaminated"] = bool(r and r["contaminated"])
            if mode == "forward" and r:
                row["n"] = r["n"]
                row["memory_ratio"] = r["memory_ratio"]
            if mode == "decode" and r:
                row["state_bytes"] = r["state_bytes"]
        row.setdefault("memory_ratio", None)
        row.setdefault("state_bytes", None)
        e = el.get((name, pattern, "forward"))
        row["efficiency_length_time"] = e["time"] if e else None
        row["efficiency_length_memory"] = e["memory"] if e else None
        qs = [q for q in quality if q["mechanism"] == name]
        pick = next((q for t in ("mqar", "digits", "char_lm") for q in qs if q["task"] == t), qs[0] if qs else None)
        row["quality"] = pick
        statuses = [r["status"] for r in results["records"] if r["type"] == "efficiency" and r["series"] == name]
        row["cases"] = {s: statuses.count(s) for s in sorted(set(statuses))}
        rows.append(row)
    return rows


def quality_label(q: dict[str, Any] | None) -> str:
    if q is None:
        return "—"
    return f"{q['task']} {fmt_metric(q)}"


def md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def escape(x: Any) -> str:
    return html.escape(str(x))


def html_table(head: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table><thead><tr>" + "".join(f"<th>{escape(c)}</th>" for c in head) + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = ' class="num"' if i in numeric else ""
            if c in ("pass", "fail", "error"):
                cls = f' class="{c}"'
            cells.append(f"<td{cls}>{escape(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def img_tag(out_dir: str, im: dict[str, str]) -> str:
    with open(os.path.join(out_dir, im["file"]), "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(im["title"])}">'
            f"<figcaption><b>{escape(im['title'])}.</b> {escape(im['caption'])}</figcaption></figure>")


def has_bench(results: dict[str, Any]) -> bool:
    """True when the run has the registry benchmark stages (a `bench real` run has only real_model)."""
    return bool(results["mechanisms"] or results["records"])
