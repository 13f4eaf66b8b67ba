"""The analysis report: results.json, summary.md and one self-contained report.html (figures embedded) from the
document ``attnzoo analyze`` builds: {"schema", "command", "environment", "duration_s", "runs": [analyze() outputs],
and optionally "icl", "operators", "memory"}."""

from __future__ import annotations

import json
import os
from typing import Any

from ..bench.report.format import escape, html_table, img_tag, md_table
from ..bench.report.html import CSS
from .run import MODELS

SCHEMA = "attnzoo.analysis/1"


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def _tables(run: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) tables of one analyze() run."""
    out = []
    tag = run["target"] + ("" if run["mechanism"] == "softmax" else f" + {run['mechanism']} {run['options'] or ''}")
    sec = run["sections"]
    if "retrieval-heads" in sec:
        r = sec["retrieval-heads"]
        out.append((f"{tag}: top retrieval heads (P045)", ["layer", "head", "score"],
                    [[str(l), str(h), _f(s)] for l, h, s in r["top_heads"][:10]]))
        rows = [["none", "—", _f(r["ablation"]["baseline"]), "—", "—"]]
        for a in r["ablation"]["rows"]:
            rows.append([f"top-{a['k']} retrieval heads", str(a["k"]), _f(a["top"]),
                         _f(a["random_mean"]), ", ".join(_f(x["accuracy"]) for x in a["random"])])
        none = " -- no head is above the threshold: the 'top-k' are ties, so this is not a retrieval-head test" \
            if r["retrieval_heads"] == 0 else ""
        out.append((f"{tag}: passkey accuracy with heads masked ({len(r['passkey_depths']) * len(r['passkey_lengths'])}"
                    f" prompts; {r['retrieval_heads']} heads score > {r['threshold']}, max {_f(r['max_score'])}){none}",
                    ["masked", "k", "accuracy (top-k masked)", "accuracy (k random, mean)", "random per seed"], rows))
    if "sinks" in sec and "act" in sec["sinks"]:
        a = sec["sinks"]["act"]
        rows = []
        for name, v in a["results"].items():
            if v is None:
                rows.append([name, "0", "—", "—", "—"])
                continue
            heads = {"before": 0, "all improving": len(a["improving"]),
                     "top-8 improving": min(8, len(a["improving"]))}[name]
            rows.append([name, str(heads), ", ".join(_f(p, 6) for p in v["perplexity"]), _f(v["perplexity_mean"], 6),
                         _f(v["passkey"])])
        out.append((f"{tag}: ACT (P046) before / after: {a['candidates']} candidate heads calibrated one at a time on "
                    f"{a['calibration_windows']} x {a['calibration_tokens']} calibration tokens, "
                    f"{len(a['improving'])} improve it; evaluation on {a['eval_windows']} held-out windows of "
                    f"{a['eval_tokens']} tokens and {len(a['passkey_lengths']) * len(a['passkey_depths'])} passkey "
                    "prompts", ["ACT heads", "count", "perplexity per window", "perplexity", "passkey"], rows))
    if "sinks" in sec and "var" in sec["sinks"]:
        v = sec["sinks"]["var"]
        rows = [["0 (before)", _f(v["answer_nll_before"], 4), "—"]]
        rows += [[_f(r["p"]), _f(r["answer_nll"], 4), str(r["image_centric_heads"])] for r in v["rows"]]
        out.append((f"{tag}: VAR (P098), text-only: {v['span_sinks']} sink tokens of the {v['span_tokens']}-token "
                    f"marked span (sink dims {v['sink_dims']}, e.g. {v['sink_tokens'][:5]}); span mass of the answer "
                    f"rows: non-sink {_f(v['span_non_sink_mass'])}, sink {_f(v['span_sink_mass'])}",
                    ["p", "answer NLL", "image-centric heads (all layers)"], rows))
    if "importance" in sec:
        i = sec["importance"]
        import torch

        d = torch.tensor(i["ablation"])
        top = torch.sort(d.flatten(), descending=True).indices[:5]
        H = d.shape[1]
        out.append((f"{tag}: head importance (P019), loss = {i['loss']}; base {_f(i['base_loss'], 4)}; Spearman "
                    f"(|ablation| vs |gradient|) {_f(i['spearman_abs_ablation_vs_gradient'])}",
                    ["layer", "head", "loss increase when pruned", "|dL/dg|"],
                    [[str(int(t) // H), str(int(t) % H), _f(float(d.flatten()[t])),
                      _f(abs(i["gradient"][int(t) // H][int(t) % H]))] for t in top]))
    if "alignment" in sec:
        a = sec["alignment"]
        out.append((f"{tag}: word starts from cross-attention (DTW), {len(a['true_start'])} words, "
                    f"{_f(a['audio_seconds'], 2)} s of speech",
                    ["heads", "median |error| (s)", "max |error| (s)", "start inside the word or the gap before it",
                     "predicted starts (s)"],
                    [[f"{name} {r['heads']}", _f(r["median_abs_error"]), _f(r["max_abs_error"]),
                      _f(r["within_word_or_gap"]), ", ".join(_f(x, 2) for x in r["predicted_start"])]
                     for name, r in a["rows"].items()]))
        out.append((f"{tag}: true word starts (s)", ["words", "starts"],
                    [[a["text"], ", ".join(_f(x, 2) for x in a["true_start"])]]))
    if run["target"] not in MODELS:
        for what in ("maps", "sinks"):
            if what in sec:
                s = sec[what]
                key = "entropy" if what == "maps" else "sink_mass"
                ref = "softmax_entropy" if what == "maps" else "softmax_sink_mass"
                out.append((f"{run['target']} ({what}): options {s['options']}, causal={s['causal']}",
                            ["head", key, f"softmax {key}"],
                            [[str(h), _f(a), _f(b)] for h, (a, b) in enumerate(zip(s[key], s[ref]))]))
    return out


def _icl_tables(icl: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    t = icl["task"]
    rows, base_rows = [], []
    for r in icl["runs"]:
        st = r["structure"]
        for h in range(len(st["c"])):
            rows.append([f"{r['heads']} heads, seed {r['seed']}", str(h), _f(st["c"][h]), _f(st["mu"][h]),
                         _f(st["kq_residual"][h]), _f(st["kq_y_row"][h]), _f(st["ov_last_share"][h]),
                         _f(st["zero_sum"]) if h == 0 else "", ", ".join(_f(x) for x in st["group_kq_residual"])
                         if h == 0 else ""])
        b = r["baselines"]
        base_rows.append([f"{r['heads']} heads, seed {r['seed']}", _f(b["model"], 4), _f(b["one_step_gd"], 4),
                          _f(b["ridge"], 3), _f(b["zero"], 4), str(st["c_mu_same_sign"])])
    return [
        (f"ICL linear regression (P037): d={t['d']}, N={t['n']}, noise {t['noise']}, {icl['steps']} Adam steps; "
         "structure of the trained KQ and OV matrices",
         ["run", "head", "c_h (KQ x-block ~ c I)", "mu_h (OV last entry)", "||K - cI|| / ||K||", "KQ y-row / ||K||",
          "|mu| / ||OV read row||", "|sum mu| / sum |mu|", "sign groups: ||sum mu K - cI|| / ||sum mu K||"], rows),
        ("ICL linear regression: test MSE on fresh prompts", ["run", "trained attention", "one-step GD (best step)",
                                                             "ridge (Bayes)", "zero", "c_h mu_h of one sign"],
         base_rows),
    ]


def _operator_table(ops: list[dict[str, Any]]) -> tuple[str, list[str], list[list[str]]]:
    rows = []
    for o in ops:
        if o["source"] is None:
            rows.append([o["name"], o["family"], o["kind"], "—", "—", "—", o["reason"]])
            continue
        err = max(p["rel_err"] for p in o["patterns"].values())
        rows.append([o["name"], o["family"], o["kind"], o["source"], ", ".join(o["patterns"]), f"{err:.1e}",
                     "yes" if o["linear_in_v"] else "no: its selection reads v (W(v) v)"])
    n_ok = sum(o["source"] is not None for o in ops)
    return (f"Effective operator of every registered mechanism ({n_ok} of {len(ops)} have one; operator @ v vs the "
            "reference and fast forms, float64, worst relative error over patterns and key padding)",
            ["mechanism", "family", "kind", "operator", "patterns checked", "max rel. err", "linear in v / reason"],
            rows)


def _memory_table(mem: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    mib = 1 << 20
    rows = [[str(r["n"]), r["case"], f"{r['peak_bytes'] / mib:.1f}", f"{r['matrix_bytes'] / mib:.0f}",
             f"{r['ratio']:.4f}"] for r in mem["rows"]]
    eq = mem["equality"]
    return (f"Streaming head statistics: peak memory vs the dense matrix (SmolLM2 heads, float32, causal); equality "
            f"at n={eq['n']} float64: max rel. err {eq['max_rel_err']:.1e}, argmax/top-k identical "
            f"{eq['argmax_equal'] and eq['topk_indices_equal']}",
            ["n", "case", "peak (MiB)", "dense matrix (MiB)", "peak / matrix"], rows)


def _all_tables(doc: dict[str, Any]):
    tables = []
    if doc.get("operators"):
        tables.append(_operator_table(doc["operators"]))
    if doc.get("memory"):
        tables.append(_memory_table(doc["memory"]))
    for run in doc["runs"]:
        tables += _tables(run)
    if doc.get("icl"):
        tables += _icl_tables(doc["icl"])
    return tables


def _figures(doc: dict[str, Any]) -> list[dict[str, str]]:
    figs = []
    for run in doc["runs"]:
        for sec in run["sections"].values():
            figs += sec.get("figures", [])
    if doc.get("icl"):
        figs += doc["icl"].get("figures", [])
    return figs


def markdown(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    lines = ["# attnzoo analyze", "", f"`{doc['command']}` · {doc['duration_s']:.0f} s · {env['date']} · "
             f"torch {env['torch']}, {env['threads']} thread(s), load at start {env.get('load_average_at_start')}", ""]
    for title, head, rows in _all_tables(doc):
        lines += [f"## {title}", "", md_table(head, rows), ""]
    lines += ["## Figures", ""] + [f"- `{f['file']}`: {f['title']}. {f['caption']}" for f in _figures(doc)]
    return "\n".join(lines) + "\n"


def html(doc: dict[str, Any], out_dir: str) -> str:
    env = doc["environment"]
    body = ["<h1>attnzoo analyze</h1>",
            f'<p class="meta"><code>{escape(doc["command"])}</code> · {doc["duration_s"]:.0f} s · '
            f'{escape(env["date"])} · torch {escape(env["torch"])}, {env["threads"]} thread(s), load at start '
            f'{escape(env.get("load_average_at_start"))}</p>',
            '<p class="note">Every analysis reads the effective attention operator of the mechanism the model runs '
            "(exact softmax unless a run names another): statistics of softmax and masked-softmax heads stream from q, "
            "k and the log-sum-exp without an n x n matrix; other mechanisms' come from their operator. Text-only "
            "VAR: the redistributed span is a marked segment of a text prompt.</p>"]
    for title, head, rows in _all_tables(doc):
        body += [f"<h2>{escape(title)}</h2>", html_table(head, rows)]
    figs = _figures(doc)
    if figs:
        body.append("<h2>Figures</h2>")
        body += [img_tag(out_dir, f) for f in figs]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>attnzoo analyze — {escape(env['date'])}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def _jsonable(x: Any) -> Any:
    import torch

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and x != x:
        return None
    return x


def render(doc: dict[str, Any], out_dir: str) -> list[str]:
    """Write results.json, summary.md and report.html into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    doc = _jsonable(doc)
    paths = [os.path.join(out_dir, n) for n in ("results.json", "summary.md", "report.html")]
    with open(paths[0], "w") as f:
        json.dump(doc, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(doc))
    with open(paths[2], "w") as f:
        f.write(html(doc, out_dir))
    return paths
