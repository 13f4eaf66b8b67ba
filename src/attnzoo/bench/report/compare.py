"""What changed between two runs (`attnzoo bench compare`)."""

from __future__ import annotations

from typing import Any

from ..efficiency import BASELINES
from .format import fmt_metric, fmt_time, fmt_x, has_bench, md_table, ok_cases
from .real import fmt_mib, real_measured, real_section, row_status


# --------------------------------------------------------------------------------------------------------
# Comparing two runs
# --------------------------------------------------------------------------------------------------------
def compare(a: dict[str, Any], b: dict[str, Any], *, threshold: float = 1.2) -> str:
    """Markdown: what changed from run ``a`` to run ``b`` (times, speedups, memory, gate, quality)."""
    out = ["# attnzoo bench compare", "", f"A: `{a['command']}` ({a['environment']['date']})",
           f"B: `{b['command']}` ({b['environment']['date']})", ""]
    diffs = []
    for key in ("torch", "attnzoo", "attnzoo_commit", "threads", "hostname"):
        va, vb = a["environment"].get(key), b["environment"].get(key)
        if va != vb:
            diffs.append(f"- {key}: {va} → {vb}")
    if a["environment"]["cpu"]["model"] != b["environment"]["cpu"]["model"]:
        diffs.append(f"- cpu: {a['environment']['cpu']['model']} → {b['environment']['cpu']['model']}")
    out += (["Environment differences:", *diffs, ""] if diffs else ["Same environment (torch, threads, CPU).", ""])
    if not (has_bench(a) or has_bench(b)):  # two `bench real` runs
        return "\n".join(out + compare_real(a, b, threshold=threshold))
    ga = {m["name"]: m["gate"]["status"] for m in a["mechanisms"]}
    gb = {m["name"]: m["gate"]["status"] for m in b["mechanisms"]}
    gate_rows = [[n, ga.get(n, "absent"), gb.get(n, "absent")] for n in sorted(set(ga) | set(gb))
                 if ga.get(n) != gb.get(n)]
    if gate_rows:
        out += ["## Gate / registry changes", "", md_table(["mechanism", "A", "B"], gate_rows), ""]
    ea = {r["id"]: r for r in ok_cases(a)}
    eb = {r["id"]: r for r in ok_cases(b)}
    rows, changed = [], 0
    for rid in sorted(set(ea) & set(eb)):
        ra, rb = ea[rid], eb[rid]
        t = rb["time_s"] / ra["time_s"] if ra["time_s"] else None
        s_a, s_b = ra.get("speedup"), rb.get("speedup")
        srel = s_b / s_a if s_a and s_b else None
        flag = ""
        if srel is not None and (srel >= threshold or srel <= 1 / threshold):
            flag = "faster vs baseline" if srel > 1 else "slower vs baseline"
            changed += 1
        if flag or (t is not None and (t >= threshold or t <= 1 / threshold)):
            rows.append([ra["series"], ra["pattern"], ra["mode"], str(ra["n"]), fmt_time(ra["time_s"]),
                         fmt_time(rb["time_s"]), fmt_x(t), fmt_x(s_a), fmt_x(s_b),
                         fmt_x(rb["memory_ratio"]) if rb["memory_ratio"] else "—", flag])
    out += [f"## Efficiency ({len(set(ea) & set(eb))} cases in both runs; {changed} speedup change(s) beyond "
            f"{threshold:g}×)", ""]
    if rows:
        out += [md_table(["series", "pattern", "mode", "N", "time A", "time B", "B/A time", "speedup A",
                           "speedup B", "memory B", "change"], rows), ""]
    else:
        out += [f"No time or speedup changed by more than {threshold:g}×.", ""]
    only_a, only_b = sorted(set(ea) - set(eb)), sorted(set(eb) - set(ea))
    if only_a or only_b:
        out += [f"Cases only in A: {len(only_a)}; only in B: {len(only_b)}.", ""]
        for label, ids in (("only in A", only_a), ("only in B", only_b)):
            series = sorted({(ea if label == 'only in A' else eb)[i]["series"] for i in ids})
            if series:
                out.append(f"- {label}: {', '.join(series[:30])}")
        out.append("")
    qa = {(q["mechanism"], q["task"], q["config_id"]): q for q in a["summary"]["quality"]}
    qb = {(q["mechanism"], q["task"], q["config_id"]): q for q in b["summary"]["quality"]}
    qrows = []
    for k in sorted(set(qa) | set(qb)):
        x, y = qa.get(k), qb.get(k)
        delta = f"{y['mean'] - x['mean']:+.3g}" if x and y else "—"
        qrows.append([k[0], k[1], k[2], fmt_metric(x), fmt_metric(y), delta])
    if qrows:
        out += ["## Quality", "", md_table(["mechanism", "task", "config", "A", "B", "B − A"], qrows), ""]
    out += compare_real(a, b, threshold=threshold)
    return "\n".join(out)


def compare_real(a: dict[str, Any], b: dict[str, Any], *, threshold: float = 1.2) -> list[str]:
    """Markdown lines: the real-model rows of two runs side by side (perplexity and passkey at every common
    length, decoding speed and cache), with changes beyond ``threshold`` flagged; the fidelity of both."""
    sa, sb = real_section(a), real_section(b)
    if sa is None and sb is None:
        return []
    out = ["## Real pretrained models", ""]
    if not (real_measured(sa) and real_measured(sb)):
        def state(sec):
            return "absent" if sec is None else ("measured" if real_measured(sec) else
                                                 f"not run ({sec.get('skipped') or sec.get('error')})")
        return out + [f"A: {state(sa)}; B: {state(sb)}.", ""]
    fa, fb = sa.get("exact_max_abs_logit_diff"), sb.get("exact_max_abs_logit_diff")
    out += [f"Exact softmax max abs logit difference vs SDPA: A {fa if fa is None else f'{fa:.3g}'}, "
            f"B {fb if fb is None else f'{fb:.3g}'}.", ""]
    if sa["model"] != sb["model"] or sa["corpus"] != sb["corpus"]:
        out += [f"Different setups: A {sa['model']} on {sa['corpus']}; B {sb['model']} on {sb['corpus']}.", ""]
    ra = {r["label"]: r for r in sa["rows"]}
    rb = {r["label"]: r for r in sb["rows"]}
    lengths = [str(n) for n in sa["lengths"] if n in sb["lengths"]]
    rows, changed = [], 0
    for label in [x for x in ra if x in rb]:
        x, y = ra[label], rb[label]
        for what, key, fmt, factor in (("perplexity", "perplexity", "{:.4g}", True),
                                       ("passkey", "passkey_accuracy", "{:.2f}", False)):
            for n in lengths:
                va, vb = (x.get(key) or {}).get(n), (y.get(key) or {}).get(n)
                if va is None and vb is None:
                    continue
                flag = ""
                if va is not None and vb is not None:
                    if factor and va > 0 and (vb / va >= threshold or vb / va <= 1 / threshold):
                        flag = "worse" if vb > va else "better"
                    if not factor and abs(vb - va) >= 0.2:
                        flag = "better" if vb > va else "worse"
                changed += bool(flag)
                rows.append([label, f"{what} @{n}", "—" if va is None else fmt.format(va),
                             "—" if vb is None else fmt.format(vb), flag])
        for what, key, fmt in (("decode tok/s", "decode_tokens_per_s", "{:.3g}"), ("cache MiB", "cache_bytes", None)):
            va, vb = x.get(key), y.get(key)
            if va is None and vb is None:
                continue
            show = (lambda v: fmt_mib(v)) if fmt is None else (lambda v, f=fmt: f.format(v))
            flag = ""
            if va and vb and (vb / va >= threshold or vb / va <= 1 / threshold):
                flag = ("faster" if vb > va else "slower") if key == "decode_tokens_per_s" else (
                    "larger" if vb > va else "smaller")
                changed += 1
            rows.append([label, what, "—" if va is None else show(va), "—" if vb is None else show(vb), flag])
        if row_status(x) != row_status(y):
            rows.append([label, "status", row_status(x), row_status(y), "changed"])
            changed += 1
    out += [f"{changed} change(s) (perplexity, speed or cache beyond {threshold:g}×, passkey by 0.2 or more, "
            "status).", ""]
    if rows:
        out += [md_table(["mechanism (options)", "measure", "A", "B", "change"], rows), ""]
    only = [f"only in A: {', '.join(x for x in ra if x not in rb)}" if any(x not in rb for x in ra) else "",
            f"only in B: {', '.join(x for x in rb if x not in ra)}" if any(x not in ra for x in rb) else ""]
    out += [f"- {o}" for o in only if o]
    ma = {r["label"]: r for r in sa.get("minilm") or []}
    mb = {r["label"]: r for r in sb.get("minilm") or []}
    mrows = [[k, "—" if ma[k].get("cosine_mean") is None else f"{ma[k]['cosine_mean']:.4f}",
              "—" if mb[k].get("cosine_mean") is None else f"{mb[k]['cosine_mean']:.4f}"] for k in ma if k in mb]
    if any(r[1] != "—" or r[2] != "—" for r in mrows):
        out += ["", "MiniLM cosine to exact (mean):", "", md_table(["mechanism (options)", "A", "B"], mrows), ""]
    return out


def baseline_series() -> tuple[str, ...]:
    return BASELINES
