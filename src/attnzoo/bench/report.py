"""Reports of a results dict: summary.md, report.html (self-contained), the terminal table, the README
headline block, and the comparison of two runs."""

from __future__ import annotations

import base64
import html
import os
from typing import Any

from .efficiency import BASELINES

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
def _ok(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["records"] if r["type"] == "efficiency" and r["status"] == "ok"]


def _at_max(recs: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    rs = [r for r in recs if all(r.get(k) == v for k, v in match.items())]
    return max(rs, key=lambda r: r["n"]) if rs else None


def headline_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    ok = _ok(results)
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


def _quality_label(q: dict[str, Any] | None) -> str:
    if q is None:
        return "—"
    return f"{q['task']} {fmt_metric(q)}"


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
            _quality_label(r["quality"])[:26],
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


# --------------------------------------------------------------------------------------------------------
# Real pretrained models (the real_model section, schema version 2)
# --------------------------------------------------------------------------------------------------------
def has_bench(results: dict[str, Any]) -> bool:
    """True when the run has the registry benchmark stages (a `bench real` run has only real_model)."""
    return bool(results["mechanisms"] or results["records"])


def real_section(results: dict[str, Any]) -> dict[str, Any] | None:
    return results.get("real_model")


def _real_measured(sec: dict[str, Any] | None) -> bool:
    return bool(sec) and "rows" in sec


def _x(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}×"


def _mib(v: float | None) -> str:
    return "—" if v is None else f"{v / 2 ** 20:.3g}"


def _row_status(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"skipped: {r['skipped']}"
    errs = r.get("errors") or {}
    parts = [f"error in {stage}" for stage in errs]
    if r.get("decode_skipped"):
        parts.append("no decode form")
    return "; ".join(parts) or "ok"


def real_decoder_table(sec: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows = mechanisms (with options); columns = perplexity and passkey accuracy at each length, decode
    tokens/s, cache MiB -- each with its ratio to the SDPA row of the same run -- the exact row's max
    |logit difference| to SDPA, and the row's status."""
    from .real import ratio_rows

    lengths = [str(n) for n in sec["lengths"]]
    head = (["mechanism (options)"] + [f"perplexity @{n} (×SDPA)" for n in lengths]
            + [f"passkey @{n} (×SDPA)" for n in lengths]
            + ["decode tok/s (×SDPA)", "cache MiB (×SDPA)", "max abs logit diff vs SDPA", "status"])
    rows = []
    for x in ratio_rows(sec):
        r = x["row"]
        base = r["mechanism"] == "sdpa"
        cells = [r["label"]]
        for n in lengths:
            v = (r.get("perplexity") or {}).get(n)
            cells.append("—" if v is None else f"{v:.4g}" + ("" if base else f" ({_x(x['perplexity_ratio'][n])})"))
        for n in lengths:
            v = (r.get("passkey_accuracy") or {}).get(n)
            cells.append("—" if v is None else f"{v:.2f}" + ("" if base else f" ({_x(x['passkey_ratio'][n], 2)})"))
        tps = r.get("decode_tokens_per_s")
        cells.append("—" if tps is None else f"{tps:.3g}" + ("" if base else f" ({_x(x['decode_speedup'], 2)})"))
        cb = r.get("cache_bytes")
        cells.append("—" if cb is None else _mib(cb) + ("" if base else f" ({_x(x['cache_ratio'])})"))
        d = r.get("max_abs_logit_diff_vs_sdpa")
        cells.append("—" if d is None else f"{d:.3g} (over {r.get('logit_diff_tokens', '?')} tokens)")
        cells.append(_row_status(r))
        rows.append(cells)
    return head, rows


def real_minilm_table(sec: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["mechanism (options)", "sentences", "tokens (mean / max)", "cosine to exact (mean)", "cosine (min)",
            "status"]
    rows = []
    for r in sec.get("minilm") or []:
        toks = f"{r['tokens_mean']:.3g} / {r['tokens_max']}" if r.get("tokens_max") is not None else "—"
        cm, cn = r.get("cosine_mean"), r.get("cosine_min")
        status = f"skipped: {r['skipped']}" if r.get("skipped") else (f"error: {r['error'][:160]}" if r.get("error")
                                                                     else "ok")
        rows.append([r["label"], str(r.get("sentences", "—")), toks, "—" if cm is None else f"{cm:.4f}",
                     "—" if cn is None else f"{cn:.4f}", status])
    return head, rows


def real_fidelity_line(sec: dict[str, Any]) -> str:
    soft = next((r for r in sec["rows"] if r["mechanism"] == "softmax" and "max_abs_logit_diff_vs_sdpa" in r), None)
    if soft is None:
        stages = (sec.get("config") or {}).get("stages")
        why = ("the perplexity stage was not run" if stages is not None and "perplexity" not in stages
               else "the exact softmax row did not run")
        return f"The adapter's fidelity (exact softmax vs SDPA logits) was not measured in this run: {why}."
    d = soft["max_abs_logit_diff_vs_sdpa"]
    if d == 0:
        return (f"Fidelity of the adapter: attnzoo's exact `softmax` inside the model gives logits bit-identical to "
                f"the model's own SDPA over {soft['logit_diff_tokens']} tokens (max absolute difference 0).")
    return (f"Fidelity of the adapter: attnzoo's exact `softmax` inside the model gives logits within {d:.3g} (max "
            f"absolute difference) of the model's own SDPA over {soft['logit_diff_tokens']} tokens.")


def real_intro(sec: dict[str, Any]) -> str:
    lengths = ", ".join(str(n) for n in sec["lengths"])
    threads = next((r["decode_threads"] for r in sec["rows"] if r.get("decode_threads")), None)
    return (f"{sec['model']}, every attention layer replaced by the mechanism without any training, on "
            f"{sec['corpus']} ({sec.get('corpus_tokens', '?')} tokens; perplexity windows of {lengths} tokens from "
            f"its first token). Passkey: the key hidden at depths {', '.join(f'{d:g}' for d in sec['passkey_depths'])}"
            f" of a filler prompt, teacher-forced, correct when every key token is the greedy choice. Decoding: "
            f"greedy, {sec['new_tokens']} timed tokens after a {sec['prefill']}-token prefill and "
            + (f"{sec['decode_warmup']} untimed tokens" if "decode_warmup" in sec else
               "untimed warm-up tokens (their number is not recorded in this results file)")
            + (f", each step timed alone with {threads} thread(s), tokens/s = 1 / median step time"
               if threads else ", tokens/s = timed tokens / their total time")
            + "; cache = bytes allocated by the decode cache of all layers "
            "at the end (the model's DynamicCache, or the mechanism's own decode state). "
            "Ratios are against the SDPA row measured in the same run: perplexity ×SDPA > 1 is worse, passkey "
            "×SDPA < 1 is worse, decode ×SDPA > 1 is faster, cache ×SDPA < 1 is smaller. Decoding speed on a "
            f"shared machine is noisy. The run took {sec['duration_s']:.0f} s"
            + (f"; **{sec['stopped']}**" if sec.get("stopped") else "") + ".")


def _real_notes(sec: dict[str, Any]) -> list[str]:
    out = [f"{r['label']}: {r['note']}" + (f" (perplexity: {r['perplexity_forwards']})"
                                            if r.get("perplexity_forwards") else "")
           for r in sec["rows"] if r.get("note")]
    match = [(r["label"], r["decode_matches_sdpa"]) for r in sec["rows"] if "decode_matches_sdpa" in r]
    if match:
        out.append("greedy decoded tokens identical to SDPA's: "
                   + ", ".join(f"{label} {'yes' if ok else 'no'}" for label, ok in match))
    return out


def _real_problems(sec: dict[str, Any]) -> list[str]:
    out = []
    for r in sec["rows"]:
        for stage, msg in (r.get("errors") or {}).items():
            out.append(f"{r['label']} — {stage}: {msg}")
        if r.get("decode_skipped"):
            out.append(f"{r['label']} — decoding not measured: {r['decode_skipped']}")
    for r in sec.get("minilm") or []:
        if r.get("error"):
            out.append(f"MiniLM {r['label']}: {r['error']}")
    out += [f"not evaluated: {x['mechanism']} — {x['reason']}" for x in sec.get("not_evaluated") or []]
    return out


def real_markdown(results: dict[str, Any], images: list[dict[str, str]]) -> list[str]:
    sec = real_section(results)
    if sec is None:
        return []
    parts = ["## Real pretrained models", ""]
    if not _real_measured(sec):
        return parts + [f"Not run: {sec.get('skipped') or sec.get('error')}", ""]
    head, rows = real_decoder_table(sec)
    parts += [real_intro(sec), "", real_fidelity_line(sec), "", f"### {sec['model']}", "", _md_table(head, rows), ""]
    notes = _real_notes(sec)
    if notes:
        parts += ["Options:", "", *[f"- {n}" for n in notes], ""]
    probs = _real_problems(sec)
    if probs:
        parts += ["Errors, skipped stages and unevaluated mechanisms:", "", *[f"- {p}" for p in probs], ""]
    if sec.get("minilm"):
        head, rows = real_minilm_table(sec)
        parts += [f"### {sec.get('encoder') or 'MiniLM'}: sentence embeddings", "",
                  "Cosine similarity of each sentence's mean-pooled embedding with the mechanism against exact "
                  "attention (SDPA) on the same padded batch (1 = identical).", "", _md_table(head, rows), ""]
    for im in images:
        if im["file"].startswith("real_"):
            parts += [f"![{im['title']}]({im['file']})", "", im["caption"], ""]
    return parts


def _inline(text: str) -> str:
    """Escaped HTML of a line with Markdown `code` and **bold** spans."""
    import re

    out = _h(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def real_html(results: dict[str, Any], images: list[dict[str, str]], out_dir: str) -> list[str]:
    sec = real_section(results)
    if sec is None:
        return []
    body = ["<h2>Real pretrained models</h2>"]
    if not _real_measured(sec):
        return body + [f'<p class="note">Not run: {_h(sec.get("skipped") or sec.get("error"))}</p>']
    head, rows = real_decoder_table(sec)
    n = len(sec["lengths"])
    body += [f"<p>{_inline(real_intro(sec))}</p>", f'<p class="note">{_inline(real_fidelity_line(sec))}</p>',
             f"<h3>{_h(sec['model'])}</h3>", _html_table(head, rows, numeric=set(range(1, 2 * n + 4)))]
    notes = _real_notes(sec)
    if notes:
        body.append("<p>Options:</p><ul>" + "".join(f"<li>{_h(x)}</li>" for x in notes) + "</ul>")
    probs = _real_problems(sec)
    if probs:
        body.append("<p>Errors, skipped stages and unevaluated mechanisms:</p><ul>"
                    + "".join(f"<li>{_h(x)}</li>" for x in probs) + "</ul>")
    body += [_img(out_dir, im) for im in images if im["file"].startswith("real_")]
    if sec.get("minilm"):
        head, rows = real_minilm_table(sec)
        body += [f"<h3>{_h(sec.get('encoder') or 'MiniLM')}: sentence embeddings</h3>",
                 "<p>Cosine similarity of each sentence's mean-pooled embedding with the mechanism against exact "
                 "attention (SDPA) on the same padded batch (1 = identical).</p>",
                 _html_table(head, rows, numeric={1, 2, 3, 4})]
    return body


def real_terminal(results: dict[str, Any]) -> str:
    sec = real_section(results)
    if sec is None:
        return ""
    if not _real_measured(sec):
        return f"real pretrained models: not run ({sec.get('skipped') or sec.get('error')})"
    head, rows = real_decoder_table(sec)
    keep = [i for i, h in enumerate(head) if h != "max abs logit diff vs SDPA"]
    head = [head[i].replace(" (×SDPA)", "") for i in keep]
    rows = [[r[i][:40] for i in keep] for r in rows]
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    out = [f"real pretrained models: {sec['model']} ({sec['duration_s']:.0f} s)"]
    out += ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in rows]
    out.append(real_fidelity_line(sec).replace("`", ""))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------
def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def _headline_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
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
                     fmt_len(r["efficiency_length_time"]), fmt_bytes(r["state_bytes"]), _quality_label(r["quality"])])
    return head, rows


def _env_line(results: dict[str, Any]) -> str:
    env = results["environment"]
    return (f"{env['cpu']['model']} ({env['cpu']['logical_cores']} logical cores; "
            f"{', '.join(env['cpu']['flags']) or 'no SIMD flags read'}), {env['threads']} thread(s), "
            f"torch {env['torch']}, attnzoo {env['attnzoo']}"
            + (f" ({env['attnzoo_commit']})" if env.get("attnzoo_commit") else "")
            + f", host {env['hostname']}, {env['date']}")


def _gate_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in results["mechanisms"]:
        g = m["gate"]
        checks = ", ".join(f"{c['check']}{'[' + c['pattern'] + ']' if c.get('pattern') else ''}: {c['status']}"
                           for c in g["checks"]) or g.get("note", "")
        problems = "; ".join(f"{k}: {v[:200]}" for k, v in g["blocks"].items())
        rows.append([m["name"], g["status"], checks, problems or "—"])
    return rows


def _eff_length_rows(results: dict[str, Any]) -> list[list[str]]:
    return [[e["series"], e["pattern"], e["mode"], ", ".join(str(n) for n in e["lengths"]), fmt_len(e["time"]),
             fmt_len(e["memory"])] for e in results["summary"]["efficiency_length"]]


def _quality_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for q in results["summary"]["quality"]:
        base = ", ".join(f"{k} {v:.3g}" for k, v in sorted(q["baselines"].items()))
        rows.append([q["task"], q["config_id"], q["mechanism"], q["metric"], fmt_metric(q), str(q["seeds"]),
                     f"{q['steps']:.0f}" + (" (budget)" if q["budget_hit"] else ""), fmt_bytes(q.get("state_bytes")),
                     base])
    return rows


def _problem_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in results["records"]:
        if r["status"] in ("error", "gate_failed") or (r["type"] == "efficiency" and r.get("memory_error")):
            what = r.get("series", r["mechanism"])
            where = (f"{r['pattern']} {r['mode']} n={r['n']}" if r["type"] == "efficiency"
                     else f"{r['task']} {r['config_id']} seed {r['seed']}")
            msg = r["message"] or f"memory: {r.get('memory_error')}"
            rows.append([r["type"], what, where, r["status"], msg[:300]])
    return rows


def _hygiene(results: dict[str, Any]) -> str:
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


def markdown_summary(results: dict[str, Any], images: list[dict[str, str]]) -> str:
    if not has_bench(results):
        return "\n".join([
            "# attnzoo bench results", "",
            f"`{results['command']}` — profile **{results['profile']}**, {results['duration_s']:.0f} s"
            + (" (**interrupted**)" if results["interrupted"] else ""), "",
            f"Environment: {_env_line(results)}"
            + (f", transformers {results['environment']['transformers']}"
               if results["environment"].get("transformers") else "") + ".", "",
            *real_markdown(results, images)])
    head, rows = _headline_table(results)
    parts = [
        "# attnzoo bench results",
        "",
        f"`{results['command']}` — profile **{results['profile']}**, {results['duration_s']:.0f} s"
        + (" (**interrupted**)" if results["interrupted"] else ""),
        "",
        f"Environment: {_env_line(results)}.",
        "",
        "Ratios are against dense attention measured in the same run (SDPA for functional mechanisms, the softmax "
        "Attention module for module mechanisms), at the largest length measured: speedup = baseline time / "
        "mechanism time (> 1 is faster), memory = mechanism / baseline peak memory (< 1 is smaller). "
        "`*` = measured while other processes used the CPU.",
        "",
        _md_table(head, rows),
        "",
        "## Correctness gate",
        "",
        _md_table(["mechanism", "status", "checks", "problems"], _gate_rows(results)),
        "",
        "## Efficiency length",
        "",
        "Length from which the mechanism stays cheaper than the baseline (interpolated on log-log axes; "
        "`<N` cheaper at every length, `>N` never within the measured range).",
        "",
        _md_table(["series", "pattern", "mode", "lengths", "time", "memory"], _eff_length_rows(results)),
        "",
        "## Quality",
        "",
        _md_table(["task", "config", "mechanism", "metric", "value", "seeds", "steps", "decode state", "reference"],
                  _quality_rows(results)),
        "",
        "## Measurement hygiene",
        "",
        _hygiene(results),
        "",
    ]
    probs = _problem_rows(results)
    if probs:
        parts += ["## Errors and failures", "", _md_table(["stage", "what", "where", "status", "message"], probs), ""]
    parts += real_markdown(results, images)
    peers = [[p["name"], "yes" if p["available"] else "no", p.get("version") or "—", p["reason"]]
             for p in results["peers"]]
    parts += ["## Peers", "", _md_table(["peer", "available", "version", "note"], peers), ""]
    images = [im for im in images if not im["file"].startswith("real_")]  # shown in their own section
    if images:
        parts += ["## Plots", ""]
        for im in images:
            parts += [f"### {im['title']}", "", f"![{im['title']}]({im['file']})", "", im["caption"], ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1250px;margin:24px auto;padding:0 16px;
color:#1d1d1f;line-height:1.45}
h1{margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;font-size:13px;margin:10px 0;width:100%}
th,td{border:1px solid #d6d6d6;padding:4px 7px;text-align:left;vertical-align:top}
th{background:#f3f4f6}tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.pass{color:#0a7c2f;font-weight:600}.fail,.error{color:#b42318;font-weight:600}
.meta{color:#555;font-size:14px}.note{background:#fff8e6;border:1px solid #f1d48a;padding:8px 12px;border-radius:6px}
figure{margin:18px 0}figure img{max-width:100%;border:1px solid #e5e5e5}figcaption{color:#555;font-size:13px}
code{background:#f3f4f6;padding:1px 4px;border-radius:3px}
"""


def _h(x: Any) -> str:
    return html.escape(str(x))


def _html_table(head: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table><thead><tr>" + "".join(f"<th>{_h(c)}</th>" for c in head) + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = ' class="num"' if i in numeric else ""
            if c in ("pass", "fail", "error"):
                cls = f' class="{c}"'
            cells.append(f"<td{cls}>{_h(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(out_dir: str, im: dict[str, str]) -> str:
    with open(os.path.join(out_dir, im["file"]), "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_h(im["title"])}">'
            f"<figcaption><b>{_h(im['title'])}.</b> {_h(im['caption'])}</figcaption></figure>")


def html_report(results: dict[str, Any], images: list[dict[str, str]], out_dir: str) -> str:
    env = results["environment"]
    if not has_bench(results):
        body = [
            "<h1>attnzoo bench — real pretrained models</h1>",
            f'<p class="meta"><code>{_h(results["command"])}</code> · profile <b>{_h(results["profile"])}</b> · '
            f'{results["duration_s"]:.0f} s · {_h(env["date"])}'
            + (" · <b>interrupted</b>" if results["interrupted"] else "") + "</p>",
            f'<p class="meta">{_h(_env_line(results))}'
            + (f", transformers {_h(env['transformers'])}" if env.get("transformers") else "") + "</p>",
            *real_html(results, images, out_dir),
            "<h2>Configuration</h2>",
            _html_table(["setting", "value"], [[k, str(v)] for k, v in results["config"].items()]),
        ]
        return _html_page(results, body)
    head, rows = _headline_table(results)
    cnt = results["summary"]["counts"]
    groups = {"efficiency": [i for i in images if i["file"].startswith(("time_", "memory_", "speedup_"))],
              "quality": [i for i in images if i["file"].startswith("quality_")]}
    body = [
        "<h1>attnzoo bench</h1>",
        f'<p class="meta"><code>{_h(results["command"])}</code> · profile <b>{_h(results["profile"])}</b> · '
        f'{results["duration_s"]:.0f} s · {_h(env["date"])}'
        + (" · <b>interrupted</b>" if results["interrupted"] else "") + "</p>",
        f'<p class="meta">{_h(_env_line(results))}</p>',
        '<p class="note">Every ratio compares with dense attention measured in the same run, with the same sizes: '
        "SDPA for functional mechanisms, the softmax <code>Attention</code> module (projections included) for module "
        "mechanisms. Speedup = baseline time / mechanism time (&gt; 1 is faster); memory = mechanism / baseline peak "
        f"memory (&lt; 1 is smaller). {cnt.get('efficiency_contaminated', 0)} measured case(s) were taken while "
        "other processes used the CPU (marked *); treat those ratios as noisy.</p>",
        "<h2>Headline</h2>",
        "<p>At the largest length measured for each mechanism (its first supported pattern of causal_self, "
        "noncausal_self, causal_cross, noncausal_cross; decode is causal self attention, time per token).</p>",
        _html_table(head, rows, numeric={3, 4, 5, 6, 7, 8, 9}),
        "<h2>Correctness gate</h2>",
        "<p>Run before any timing: fast form vs reference (outputs and gradients, float64 and float32), decode steps "
        "vs the causal forward, declared masks vs the reference. A failing mechanism is reported, not timed.</p>",
        _html_table(["mechanism", "status", "checks", "problems"], _gate_rows(results)),
        "<h2>Efficiency</h2>",
        *[_img(out_dir, im) for im in groups["efficiency"]],
        "<h3>Efficiency length</h3>",
        "<p>The length from which a mechanism stays cheaper than the baseline, interpolated on log-log axes "
        "(CAB, arXiv 2210.07661); &lt;N: cheaper at every measured length; &gt;N: not within the measured range.</p>",
        _html_table(["series", "pattern", "mode", "lengths", "time", "memory"], _eff_length_rows(results),
                    numeric={4, 5}),
        "<h2>Quality</h2>",
        "<p>Tiny models (same architecture, only the attention differs) trained on CPU for a fixed number of steps "
        "or until the per-case time budget; evaluation on a fixed held-out set.</p>",
        *[_img(out_dir, im) for im in groups["quality"]],
        _html_table(["task", "config", "mechanism", "metric", "value", "seeds", "steps", "decode state",
                     "reference"], _quality_rows(results), numeric={4, 5, 6, 7}),
        "<h2>Measurement hygiene</h2>",
        f"<p>{_h(_hygiene(results))}</p>",
        _html_table(["count", "cases"], [[k, str(v)] for k, v in cnt.items()], numeric={1}),
    ]
    probs = _problem_rows(results)
    if probs:
        body += ["<h2>Errors and failures</h2>",
                 _html_table(["stage", "what", "where", "status", "message"], probs)]
    body += real_html(results, images, out_dir)
    body += ["<h2>Peers</h2>",
             _html_table(["peer", "available", "version", "note"],
                         [[p["name"], "yes" if p["available"] else "no", p.get("version") or "—", p["reason"]]
                          for p in results["peers"]]),
             "<h2>Configuration</h2>",
             _html_table(["setting", "value"], [[k, str(v)] for k, v in results["config"].items()])]
    return _html_page(results, body)


def _html_page(results: dict[str, Any], body: list[str]) -> str:
    env = results["environment"]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>attnzoo bench — {_h(results['profile'])} — {_h(env['date'])}</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def render(results: dict[str, Any], out_dir: str, *, plots: bool = True) -> dict[str, str]:
    """Write the PNG plots, summary.md and report.html for ``results`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    images: list[dict[str, str]] = []
    paths: dict[str, str] = {}
    if plots:
        try:
            from .plots import all_plots

            images = all_plots(results, out_dir)
        except ImportError as e:
            paths["plots_skipped"] = str(e)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(markdown_summary(results, images))
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(html_report(results, images, out_dir))
    paths.update(summary=os.path.join(out_dir, "summary.md"), report=os.path.join(out_dir, "report.html"))
    paths["plots"] = ",".join(os.path.join(out_dir, im["file"]) for im in images)
    return paths


# --------------------------------------------------------------------------------------------------------
# README blocks
# --------------------------------------------------------------------------------------------------------
def update_block(path: str, start: str, end: str, content: str) -> bool:
    """Replace the text between the ``start`` and ``end`` marker lines of ``path``; True if it changed."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--update: no such file {path!r}")
    with open(path) as f:
        text = f.read()
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"--update: {path} must contain the markers {start} and {end} (in that order)")
    new = text[: i + len(start)] + "\n" + content.strip("\n") + "\n" + text[j:]
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


def readme_block(results: dict[str, Any] | list[dict[str, Any]]) -> str:
    """The README's headline block: generated from one or more results.json, never typed by hand (e.g. the
    registry benchmark and a `bench real` run)."""
    if isinstance(results, list):
        return "\n\n".join(readme_block(r) for r in results)
    parts = [_bench_readme(results)] if has_bench(results) else []
    real = real_readme(results)
    if real:
        parts.append(real)
    if not parts:
        raise ValueError(f"results of `{results['command']}`: nothing measured to put in the README")
    return "\n\n".join(parts)


def real_readme(results: dict[str, Any]) -> str:
    """Headline real-model numbers: the exact softmax fidelity, and at the longest length each measured row's
    perplexity, passkey accuracy, cache and decoding speed against SDPA in the same run."""
    from .real import ratio_rows

    sec = real_section(results)
    if not _real_measured(sec):
        return ""
    env = results["environment"]
    n = str(max(sec["lengths"]))
    rows = []
    for x in ratio_rows(sec):
        r = x["row"]
        if r.get("skipped") or not (r.get("perplexity") or r.get("passkey_accuracy") or r.get("decode_tokens_per_s")
                                    or r.get("errors")):
            continue
        base = r["mechanism"] == "sdpa"
        ppl = (r.get("perplexity") or {}).get(n)
        acc = (r.get("passkey_accuracy") or {}).get(n)
        cb, tps = r.get("cache_bytes"), r.get("decode_tokens_per_s")
        rows.append([
            f"`{r['label']}`",
            "—" if ppl is None else f"{ppl:.4g}" + ("" if base else f" ({_x(x['perplexity_ratio'][n])})"),
            "—" if acc is None else f"{acc:.2f}",
            "—" if cb is None else f"{_mib(cb)} MiB" + ("" if base else f" ({_x(x['cache_ratio'])})"),
            "—" if tps is None else f"{tps:.3g}" + ("" if base else f" ({_x(x['decode_speedup'], 2)})"),
            _row_status(r) if _row_status(r) != "ok" else ""])
    lines = [
        f"Real pretrained models, generated by `attnzoo bench readme` from a `{results['command']}` run "
        f"({env['date'][:10]}, {sec['duration_s'] / 60:.0f} min on {env['cpu']['model']}, "
        f"{sec.get('threads', env['threads'])} thread(s), a shared machine). {sec['model']} with every attention "
        f"layer replaced, no training, on {sec['corpus']}. " + real_fidelity_line(sec),
        "",
        _md_table(["mechanism (options)", f"perplexity @{n} (×SDPA)", f"passkey @{n}",
                   "decode cache after "
                   + (f"{sec['prefill'] + sec['decode_warmup'] + sec['new_tokens']} tokens" if "decode_warmup" in sec
                      else f"{sec['prefill']} + warm-up + {sec['new_tokens']} tokens") + " (×SDPA)",
                   "decode tok/s (×SDPA)", "note"], rows),
    ]
    return "\n".join(lines)


def _bench_readme(results: dict[str, Any]) -> str:
    env = results["environment"]
    rows = []
    for r in headline_rows(results):
        if r["forward_speedup"] is None and r["decode_speedup"] is None:
            continue
        rows.append([f"`{r['mechanism']}`", r["pattern"] or "—", str(r["n"] or "—"), fmt_x(r["forward_speedup"]),
                     fmt_x(r["forward_backward_speedup"]), fmt_x(r["decode_speedup"]), fmt_x(r["memory_ratio"]),
                     fmt_len(r["efficiency_length_time"]), _quality_label(r["quality"])])
    cnt = results["summary"]["counts"]
    lines = [
        f"Generated by `attnzoo bench readme` from a `{results['command']}` run ({results['profile']} profile, "
        f"{env['date'][:10]}) on {env['cpu']['model']}, {env['threads']} thread(s), torch {env['torch']}. "
        "Ratios against dense SDPA (or the softmax Attention module) measured in the same run, at the largest "
        "length measured; speedup > 1 is faster, memory < 1 is smaller."
        + (f" {cnt.get('efficiency_contaminated', 0)} case(s) were measured while other processes used the CPU."
           if cnt.get("efficiency_contaminated") else ""),
        "",
        _md_table(["mechanism", "pattern", "N", "forward", "fwd+bwd", "decode/token", "memory", "efficiency length",
                   "quality"], rows),
    ]
    return "\n".join(lines)


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
        out += ["## Gate / registry changes", "", _md_table(["mechanism", "A", "B"], gate_rows), ""]
    ea = {r["id"]: r for r in _ok(a)}
    eb = {r["id"]: r for r in _ok(b)}
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
        out += [_md_table(["series", "pattern", "mode", "N", "time A", "time B", "B/A time", "speedup A",
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
        out += ["## Quality", "", _md_table(["mechanism", "task", "config", "A", "B", "B − A"], qrows), ""]
    out += compare_real(a, b, threshold=threshold)
    return "\n".join(out)


def compare_real(a: dict[str, Any], b: dict[str, Any], *, threshold: float = 1.2) -> list[str]:
    """Markdown lines: the real-model rows of two runs side by side (perplexity and passkey at every common
    length, decoding speed and cache), with changes beyond ``threshold`` flagged; the fidelity of both."""
    sa, sb = real_section(a), real_section(b)
    if sa is None and sb is None:
        return []
    out = ["## Real pretrained models", ""]
    if not (_real_measured(sa) and _real_measured(sb)):
        def state(sec):
            return "absent" if sec is None else ("measured" if _real_measured(sec) else
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
            show = (lambda v: _mib(v)) if fmt is None else (lambda v, f=fmt: f.format(v))
            flag = ""
            if va and vb and (vb / va >= threshold or vb / va <= 1 / threshold):
                flag = ("faster" if vb > va else "slower") if key == "decode_tokens_per_s" else (
                    "larger" if vb > va else "smaller")
                changed += 1
            rows.append([label, what, "—" if va is None else show(va), "—" if vb is None else show(vb), flag])
        if _row_status(x) != _row_status(y):
            rows.append([label, "status", _row_status(x), _row_status(y), "changed"])
            changed += 1
    out += [f"{changed} change(s) (perplexity, speed or cache beyond {threshold:g}×, passkey by 0.2 or more, "
            "status).", ""]
    if rows:
        out += [_md_table(["mechanism (options)", "measure", "A", "B", "change"], rows), ""]
    only = [f"only in A: {', '.join(x for x in ra if x not in rb)}" if any(x not in rb for x in ra) else "",
            f"only in B: {', '.join(x for x in rb if x not in ra)}" if any(x not in ra for x in rb) else ""]
    out += [f"- {o}" for o in only if o]
    ma = {r["label"]: r for r in sa.get("minilm") or []}
    mb = {r["label"]: r for r in sb.get("minilm") or []}
    mrows = [[k, "—" if ma[k].get("cosine_mean") is None else f"{ma[k]['cosine_mean']:.4f}",
              "—" if mb[k].get("cosine_mean") is None else f"{mb[k]['cosine_mean']:.4f}"] for k in ma if k in mb]
    if any(r[1] != "—" or r[2] != "—" for r in mrows):
        out += ["", "MiniLM cosine to exact (mean):", "", _md_table(["mechanism (options)", "A", "B"], mrows), ""]
    return out


def baseline_series() -> tuple[str, ...]:
    return BASELINES
