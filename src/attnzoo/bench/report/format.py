"""Formatting of numbers and the headline numbers of each mechanism, shared by every output."""

from __future__ import annotations

import base64
import html
import os
from typing import Any

MODES = ("forward", "forward_backward", "decode")
HEADLINE_STUDIES = ("mqar-L64-P8", "mqar-separation", "mqar")
"""The quality study shown beside a mechanism's speed, first found (quality/protocol.py)."""
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


def fmt_range(q: dict[str, Any]) -> str:
    """``mean ± std [min–max]`` over seeds (the range decides ties)."""
    if q.get("min") is None or q.get("seeds", 1) < 2:
        return fmt_metric(q)
    return f"{fmt_metric(q)} [{q['min']:.3g}–{q['max']:.3g}]"


def fmt_rank(q: dict[str, Any]) -> str:
    """Rank within the study; ``=`` marks a rank shared with a variant inside the seed spread."""
    if q.get("rank") is None:
        return "—"
    return f"{'=' if q.get('ties') else ''}{q['rank']}"


def quality_name(q: dict[str, Any]) -> str:
    v = q.get("variant", "default")
    return q["mechanism"] if v == "default" else f"{q['mechanism']} ({v})"


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
        qs = [q for q in quality if q["mechanism"] == name and q.get("variant", "default") == "default"]
        pick = next((q for s in HEADLINE_STUDIES for q in qs if q.get("study") == s), None) or next(
            (q for t in ("mqar", "digits", "char_lm") for q in qs if q["task"] == t), qs[0] if qs else None)
        row["quality"] = pick
        statuses = [r["status"] for r in results["records"] if r["type"] == "efficiency" and r["series"] == name]
        row["cases"] = {s: statuses.count(s) for s in sorted(set(statuses))}
        rows.append(row)
    return rows


def quality_label(q: dict[str, Any] | None) -> str:
    if q is None:
        return "—"
    rank = f" (rank {fmt_rank(q)})" if q.get("rank") is not None else ""
    return f"{q.get('study') or q['task']} {fmt_metric(q)}{rank}"


def md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def escape(x: Any) -> str:
    return html.escape(str(x))


def inline_html(text: str) -> str:
    """Escaped HTML of a line with Markdown `code` and **bold** spans."""
    import re

    out = escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


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
