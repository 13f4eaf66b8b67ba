"""The real pretrained-model section (results schema version 2) in every output: Markdown, HTML, terminal."""

from __future__ import annotations

from typing import Any

from .format import escape, html_table, img_tag, inline_html, md_table

# --------------------------------------------------------------------------------------------------------
# Real pretrained models (the real_model section, schema version 2)
# --------------------------------------------------------------------------------------------------------


def real_section(results: dict[str, Any]) -> dict[str, Any] | None:
    return results.get("real_model")


def real_measured(sec: dict[str, Any] | None) -> bool:
    return bool(sec) and "rows" in sec


def fmt_ratio(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}×"


def fmt_mib(v: float | None) -> str:
    return "—" if v is None else f"{v / 2 ** 20:.3g}"


def row_status(r: dict[str, Any]) -> str:
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
    from ..real import ratio_rows

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
            ratio = "" if base or v is None else f" ({fmt_ratio(x['perplexity_ratio'][n])})"
            cells.append("—" if v is None else f"{v:.4g}" + ratio)
        for n in lengths:
            v = (r.get("passkey_accuracy") or {}).get(n)
            ratio = "" if base or v is None else f" ({fmt_ratio(x['passkey_ratio'][n], 2)})"
            cells.append("—" if v is None else f"{v:.2f}" + ratio)
        tps = r.get("decode_tokens_per_s")
        cells.append("—" if tps is None else f"{tps:.3g}" + ("" if base else f" ({fmt_ratio(x['decode_speedup'], 2)})"))
        cb = r.get("cache_bytes")
        cells.append("—" if cb is None else fmt_mib(cb) + ("" if base else f" ({fmt_ratio(x['cache_ratio'])})"))
        d = r.get("max_abs_logit_diff_vs_sdpa")
        cells.append("—" if d is None else f"{d:.3g} (over {r.get('logit_diff_tokens', '?')} tokens)")
        cells.append(row_status(r))
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
    if not real_measured(sec):
        return parts + [f"Not run: {sec.get('skipped') or sec.get('error')}", ""]
    head, rows = real_decoder_table(sec)
    parts += [real_intro(sec), "", real_fidelity_line(sec), "", f"### {sec['model']}", "", md_table(head, rows), ""]
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
                  "attention (SDPA) on the same padded batch (1 = identical).", "", md_table(head, rows), ""]
    for im in images:
        if im["file"].startswith("real_"):
            parts += [f"![{im['title']}]({im['file']})", "", im["caption"], ""]
    return parts


def real_html(results: dict[str, Any], images: list[dict[str, str]], out_dir: str) -> list[str]:
    sec = real_section(results)
    if sec is None:
        return []
    body = ["<h2>Real pretrained models</h2>"]
    if not real_measured(sec):
        return body + [f'<p class="note">Not run: {escape(sec.get("skipped") or sec.get("error"))}</p>']
    head, rows = real_decoder_table(sec)
    n = len(sec["lengths"])
    body += [f"<p>{inline_html(real_intro(sec))}</p>", f'<p class="note">{inline_html(real_fidelity_line(sec))}</p>',
             f"<h3>{escape(sec['model'])}</h3>", html_table(head, rows, numeric=set(range(1, 2 * n + 4)))]
    notes = _real_notes(sec)
    if notes:
        body.append("<p>Options:</p><ul>" + "".join(f"<li>{escape(x)}</li>" for x in notes) + "</ul>")
    probs = _real_problems(sec)
    if probs:
        body.append("<p>Errors, skipped stages and unevaluated mechanisms:</p><ul>"
                    + "".join(f"<li>{escape(x)}</li>" for x in probs) + "</ul>")
    body += [img_tag(out_dir, im) for im in images if im["file"].startswith("real_")]
    if sec.get("minilm"):
        head, rows = real_minilm_table(sec)
        body += [f"<h3>{escape(sec.get('encoder') or 'MiniLM')}: sentence embeddings</h3>",
                 "<p>Cosine similarity of each sentence's mean-pooled embedding with the mechanism against exact "
                 "attention (SDPA) on the same padded batch (1 = identical).</p>",
                 html_table(head, rows, numeric={1, 2, 3, 4})]
    return body


def real_terminal(results: dict[str, Any]) -> str:
    sec = real_section(results)
    if sec is None:
        return ""
    if not real_measured(sec):
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
