"""PNG plots of a results dict (matplotlib, imported lazily; Agg backend, no display needed).

Every figure labels its axes with units, carries a legend, and shows the dense baseline measured in the same
run (SDPA, or the softmax Attention module for module mechanisms) as a thick black dashed line.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

MODE_LABEL = {"forward": "forward", "forward_backward": "forward + backward", "decode": "decode (per token)"}
BASELINE_STYLE = {
    "sdpa": {"color": "black", "linestyle": "--", "linewidth": 2.6, "label": "SDPA (dense baseline)", "zorder": 5},
    "softmax_module": {"color": "0.35", "linestyle": "-.", "linewidth": 2.2,
                       "label": "softmax Attention module (dense baseline)", "zorder": 5},
}
MAX_SERIES_PER_FIGURE = 16


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib (pip install matplotlib); results.json and summary.md were "
                          "written without them") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _eff(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["records"] if r["type"] == "efficiency" and r["status"] == "ok"]


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i: i + size] for i in range(0, len(items), size)] or [[]]


def _fmt_bytes_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _):
        if v <= 0:
            return "0"
        for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
            if v >= div:
                return f"{v / div:.3g} {unit}"
        return f"{v:.3g} B"

    ax.yaxis.set_major_formatter(FuncFormatter(fmt))


def _series_styles(names: list[str]) -> dict[str, dict[str, Any]]:
    plt = _plt()
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    markers = "osD^v<>phX*"
    out = {}
    for i, name in enumerate(names):
        peer = "[" in name
        out[name] = {"color": cmap(i % cmap.N), "marker": markers[i % len(markers)], "linewidth": 1.6,
                     "linestyle": ":" if peer else "-", "markersize": 5, "label": name}
    return out


def curves(results: dict[str, Any], out_dir: str, metric: str) -> list[dict[str, str]]:
    """time_vs_length_<pattern>[_k].png or memory_vs_length_<pattern>[_k].png; one panel per mode."""
    plt = _plt()
    recs = _eff(results)
    key = "time_s" if metric == "time" else "memory_bytes"
    made = []
    for pattern in ("causal_self", "noncausal_self", "causal_cross", "noncausal_cross"):
        prs = [r for r in recs if r["pattern"] == pattern and r.get(key) is not None]
        series = sorted({r["series"] for r in prs if r["impl"] not in BASELINE_STYLE})
        if not series:
            continue
        modes = [m for m in ("forward", "forward_backward", "decode") if any(r["mode"] == m for r in prs)]
        for k, chunk in enumerate(_chunks(series, MAX_SERIES_PER_FIGURE)):
            styles = _series_styles(chunk)
            fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes) + 2.6, 4.4), squeeze=False)
            handles: dict[str, Any] = {}
            used_bases = {r["baseline_id"] for r in prs if r["series"] in chunk}
            n_cont = sum(1 for r in prs if r["series"] in chunk and r["contaminated"])
            n_all = sum(1 for r in prs if r["series"] in chunk)
            mark_bad = 0 < n_cont <= n_all / 2  # circling most points says nothing: say it in the title instead
            scale = 1e3 if metric == "time" else 1.0
            lengths = sorted({r["n"] for r in prs})
            for ax, mode in zip(axes[0], modes):
                for base, style in BASELINE_STYLE.items():
                    pts = sorted((r["n"], r[key] * scale) for r in prs if r["impl"] == base and r["mode"] == mode
                                 and r["id"] in used_bases)
                    if pts:
                        (h,) = ax.plot(*zip(*pts), **{**style, "marker": "s", "markersize": 4})
                        handles[style["label"]] = h
                for name in chunk:
                    rs = sorted((r for r in prs if r["series"] == name and r["mode"] == mode), key=lambda r: r["n"])
                    if not rs:
                        continue
                    st = styles[name]
                    (h,) = ax.plot([r["n"] for r in rs], [max(r[key], 1e-12) * scale for r in rs], **st)
                    handles[name] = h
                    bad = [r for r in rs if r["contaminated"]]
                    if bad and mark_bad:
                        ax.scatter([r["n"] for r in bad], [r[key] * scale for r in bad], s=55, facecolors="none",
                                   edgecolors="red", linewidths=0.9, zorder=6)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(lengths, [str(n) for n in lengths])
                ax.minorticks_off() if len(lengths) > 1 else None
                ax.set_xlabel("sequence length N (tokens)")
                if metric == "time":
                    ax.set_ylabel("time per token (ms)" if mode == "decode" else "time per call (ms)")
                else:
                    ax.set_ylabel("peak memory added by one call")
                    _fmt_bytes_axis(ax)
                ax.set_title(f"{pattern} · {MODE_LABEL[mode]}")
                ax.grid(True, which="both", alpha=0.3)
            if mark_bad:
                from matplotlib.lines import Line2D

                handles["contaminated (other processes busy)"] = Line2D(
                    [], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="red", markersize=8)
            fig.legend(list(handles.values()), list(handles.keys()), loc="center right", fontsize=8, frameon=True)
            what = "Time" if metric == "time" else "Peak memory"
            env = results["environment"]
            busy = f"; {n_cont} of {n_all} points measured while other processes used the CPU" if n_cont else ""
            fig.suptitle(f"{what} vs sequence length, {pattern} (B={prs[0]['batch']}, H={prs[0]['heads']}, "
                         f"d={prs[0]['head_dim']}, {prs[0]['dtype']}, {env['threads']} thread(s){busy})", fontsize=11)
            fig.tight_layout(rect=(0, 0, 1 - 2.4 / (5.2 * len(modes) + 2.6), 0.95))
            suffix = f"_{k + 1}" if len(series) > MAX_SERIES_PER_FIGURE else ""
            name = f"{metric}_vs_length_{pattern}{suffix}.png"
            fig.savefig(os.path.join(out_dir, name), dpi=110)
            plt.close(fig)
            made.append({"file": name, "title": f"{what} vs length — {pattern}"
                         + (f" (part {k + 1})" if suffix else ""),
                         "caption": f"{what} of each mechanism against the dense baseline measured in the same run, "
                                    "log-log axes; hollow red circles mark measurements taken while other "
                                    "processes used the CPU (see Hygiene)."})
    return made


def speedup_heatmaps(results: dict[str, Any], out_dir: str) -> list[dict[str, str]]:
    plt = _plt()
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    all_eff = [r for r in results["records"] if r["type"] == "efficiency" and r["impl"] not in BASELINE_STYLE]
    made = []
    for mode in ("forward", "forward_backward", "decode"):
        rs = [r for r in all_eff if r["mode"] == mode]
        if not any(r["status"] == "ok" for r in rs):
            continue
        rows = sorted({(r["series"], r["pattern"]) for r in rs})
        cols = sorted({r["n"] for r in rs})
        grid = np.full((len(rows), len(cols)), np.nan)
        text = [["" for _ in cols] for _ in rows]
        for r in rs:
            i, j = rows.index((r["series"], r["pattern"])), cols.index(r["n"])
            if r["status"] == "ok" and r["speedup"]:
                grid[i, j] = math.log2(r["speedup"])
                text[i][j] = f"{r['speedup']:.2g}×" + ("*" if r["contaminated"] else "")
            elif not text[i][j]:
                text[i][j] = {"gate_failed": "FAIL", "error": "err", "skipped": "skip"}.get(r["status"], "")
        lim = max(1.0, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0)
        fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 7.0, 0.38 * len(rows) + 2.2))
        cmap = plt.get_cmap("RdBu").with_extremes(bad="0.88")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8,
                        color="white" if np.isfinite(grid[i, j]) and abs(grid[i, j]) > 0.6 * lim else "black")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [f"{s} · {p}" for s, p in rows], fontsize=8)
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel("mechanism · pattern")
        cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        step = max(1, math.ceil(2 * lim / 8))
        ticks = [t for t in range(-int(lim), int(lim) + 1) if t % step == 0]
        cb.set_ticks(ticks, labels=[f"{2 ** t:g}×" if t >= 0 else f"1/{2 ** -t:g}×" for t in ticks])
        cb.set_label("speedup (log scale)")
        ax.set_title(f"Speedup over dense attention, {MODE_LABEL[mode]}\n(blue = faster than the baseline; "
                     "* = measured while other processes used the CPU)", fontsize=10)
        fig.tight_layout()
        name = f"speedup_heatmap_{mode}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        made.append({"file": name, "title": f"Speedup heatmap — {MODE_LABEL[mode]}",
                     "caption": "Baseline time / mechanism time at each length (same run). FAIL = correctness "
                                "gate failed (not timed); skip = time budget; err = the case raised."})
    return made


def _studies(summ: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(q.get("study") or f"{q['task']}|{q['config_id']}" for q in summ))


def _study_of(q: dict[str, Any]) -> str:
    return q.get("study") or f"{q['task']}|{q['config_id']}"


def _name(q: dict[str, Any]) -> str:
    v = q.get("variant", "default")
    return q["mechanism"] if v == "default" else f"{q['mechanism']} ({v})"


def quality_bars(results: dict[str, Any], out_dir: str) -> list[dict[str, str]]:
    plt = _plt()
    summ = results["summary"]["quality"]
    made = []
    for study in _studies(summ):
        qs = [q for q in summ if _study_of(q) == study]
        qs.sort(key=lambda q: q["mean"], reverse=qs[0]["higher_is_better"])
        fig, ax = plt.subplots(figsize=(8.5, 0.3 * len(qs) + 1.9))
        colors = ["black" if q["mechanism"] in ("softmax", "none") else "tab:blue" for q in qs]
        lo = [q["mean"] - q.get("min", q["mean"]) for q in qs]
        hi = [q.get("max", q["mean"]) - q["mean"] for q in qs]
        ax.barh(range(len(qs)), [q["mean"] for q in qs], xerr=[lo, hi], color=colors, alpha=0.85, capsize=3)
        ax.set_yticks(range(len(qs)), [_name(q) + (f" (n={q['seeds']})" if q["seeds"] > 1 else "") for q in qs],
                      fontsize=7)
        ax.invert_yaxis()
        metric = qs[0]["metric"]
        unit = {"accuracy": "accuracy (fraction correct, higher is better)",
                "nmse": "MSE / mean y² (lower is better)",
                "bits_per_char": "bits per character on held-out text (lower is better)"}[metric]
        ax.set_xlabel(unit)
        from matplotlib.patches import Patch

        handles = [Patch(color="black", label="dense softmax baseline (or no attention)"),
                   Patch(color="tab:blue", label="mechanism")]
        styles = ["--", ":", "-."]
        for k, (bname, bval) in enumerate(sorted(qs[0]["baselines"].items())):
            handles.append(ax.axvline(bval, color="tab:red", linestyle=styles[k % 3], linewidth=1.2,
                                      label=f"{bname.replace('_', ' ')} = {bval:.3g}"))
        ax.legend(handles=handles, fontsize=7, loc="lower right")
        steps = max(q["steps"] for q in qs)
        ax.set_title(f"{study}: {qs[0]['task']} ({qs[0]['config_id']}); ≤{steps:.0f} training steps", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        name = f"quality_{_slug(study)}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        made.append({"file": name, "title": f"Quality — {study}",
                     "caption": "Mean over seeds at each variant's chosen learning rate (error bar: the range over "
                                "seeds) of tiny models that differ only in their attention; red lines are reference "
                                "points (chance, closed-form predictors)."})
    return made


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (smaller x = state bytes, larger y = quality),
    sorted by x: the recall-vs-state frontier."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _study_setting(q: dict[str, Any]) -> bool:
    """Whether a quality summary row is its mechanism at the study's own options (not a point of its sweep)."""
    from .quality.protocol import STUDIES, variant_label

    study = next((s for p in STUDIES.values() for s in p if s.name == q.get("study")), None)
    return q.get("variant", "default") == variant_label(study.options.get(q["mechanism"], {}) if study else {})


def recall_vs_state(results: dict[str, Any], out_dir: str) -> list[dict[str, str]]:
    """recall_vs_state[_<study>].png: BASED's Figure 1 on CPU -- per MQAR study (or another accuracy task),
    x = decode-state bytes of one sequence at the task's length (all attention layers), y = accuracy; one
    point per mechanism and option variant, the Pareto frontier drawn."""
    plt = _plt()
    summ = [q for q in results["summary"]["quality"] if q.get("state_bytes") and q["higher_is_better"]]
    if not summ:
        return []
    studies = [s for s in _studies(summ) if any(q["task"] == "mqar" and _study_of(q) == s for q in summ)] \
        or _studies(summ)[:1]
    made = []
    for k, study in enumerate(studies):
        qs = [q for q in summ if _study_of(q) == study]
        families = sorted({q.get("family") or "?" for q in qs})
        cmap = plt.get_cmap("tab10")
        fig, ax = plt.subplots(figsize=(12.5, 6.2))
        for q in qs:
            fam = q.get("family") or "?"
            color = "black" if q["mechanism"] == "softmax" else cmap(families.index(fam) % 10)
            lo, hi = q["mean"] - q.get("min", q["mean"]), q.get("max", q["mean"]) - q["mean"]
            ax.errorbar([q["state_bytes"]], [q["mean"]], yerr=[[lo], [hi]], fmt="o" if _study_setting(q) else "s",
                        color=color, capsize=2, markersize=5, alpha=0.9)
            ax.annotate(_name(q), (q["state_bytes"], q["mean"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=6.5, color=color)
        front = pareto_front([(q["state_bytes"], q["mean"]) for q in qs])
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="tab:red", linewidth=1.6, alpha=0.7, label="Pareto frontier")
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color="tab:red", linewidth=1.6, label="Pareto frontier (no point has a smaller "
                          "state and a higher accuracy)"),
                   Line2D([], [], marker="o", linestyle="", color="0.3", label="mechanism, study options"),
                   Line2D([], [], marker="s", linestyle="", color="0.3", label="option sweep (window, feature "
                          "dim, chunks)")]
        handles += [Line2D([], [], marker="o", linestyle="", color="black" if f == "core" else cmap(i % 10),
                           label=f"family: {f}") for i, f in enumerate(families)]
        for bname, bval in sorted(qs[0]["baselines"].items()):
            ax.axhline(bval, color="0.5", linestyle=":", linewidth=1)
            handles.append(Line2D([], [], color="0.5", linestyle=":", label=f"{bname} = {bval:.3g}"))
        ax.set_xscale("log")
        _fmt_x_bytes(ax)
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("decode state of one sequence after the task's length (bytes, all attention layers, "
                      "state.nbytes())")
        ax.set_ylabel(f"{qs[0]['task']} {qs[0]['metric']} (mean over seeds; bar: range)")
        ax.set_title(f"Recall vs decode-state size — {study} ({qs[0]['config_id']})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.12)  # room for the labels of the outermost points
        # beside the axes: most mechanisms sit low on MQAR, where a legend inside would hide them
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        name = "recall_vs_state.png" if k == 0 else f"recall_vs_state_{_slug(study)}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        made.append({"file": name, "title": f"Recall vs decode-state size — {study}",
                     "caption": "BASED's Figure 1 on CPU: each point a mechanism (or one of its option settings), "
                                "x its decode state for one sequence at the task's length, y its accuracy; the red "
                                "line is the Pareto frontier. Up and to the left is better: a mechanism on the "
                                "frontier buys the most recall for its memory."})
    return made


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60]


def _fmt_x_bytes(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _):
        for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
            if v >= div:
                return f"{v / div:.3g} {unit}"
        return f"{v:.3g} B"

    ax.xaxis.set_major_formatter(FuncFormatter(fmt))


def all_plots(results: dict[str, Any], out_dir: str) -> list[dict[str, str]]:
    made: list[dict[str, str]] = []
    made += curves(results, out_dir, "time")
    made += curves(results, out_dir, "memory")
    made += speedup_heatmaps(results, out_dir)
    made += quality_bars(results, out_dir)
    made += recall_vs_state(results, out_dir)
    made += real_model_plots(results, out_dir)
    return made


def real_model_plots(results: dict[str, Any], out_dir: str) -> list[dict[str, str]]:
    """real_model.png: perplexity and passkey accuracy vs length per mechanism, and decode speed vs cache
    size, SDPA (the model's own attention, same run) as the thick black dashed baseline."""
    sec = results.get("real_model") or {}
    rows = [r for r in sec.get("rows", []) if r.get("perplexity") or r.get("passkey_accuracy")]
    if not rows:
        return []
    plt = _plt()
    lengths = sec["lengths"]
    others = [r["label"] for r in rows if r["mechanism"] != "sdpa"]
    styles = _series_styles(others)
    fig, axes = plt.subplots(1, 3, figsize=(17.5, 4.9))
    handles: dict[str, Any] = {}
    for r in rows:
        base = r["mechanism"] == "sdpa"
        st = ({**BASELINE_STYLE["sdpa"], "label": "SDPA (the model's own attention)", "marker": "s", "markersize": 4}
              if base else styles[r["label"]])
        if r["mechanism"] == "softmax":  # exact: drawn under SDPA's line, hollow markers so both stay visible
            st = {**st, "markerfacecolor": "none", "markersize": 8, "linewidth": 1.0}
        for ax, key in ((axes[0], "perplexity"), (axes[1], "passkey_accuracy")):
            vals = r.get(key) or {}
            pts = [(n, vals[str(n)]) for n in lengths if vals.get(str(n)) is not None]
            if pts:
                (h,) = ax.plot(*zip(*pts), **st)
                handles[st["label"]] = h
        if r.get("decode_tokens_per_s") and r.get("cache_bytes") is not None:
            h = axes[2].scatter([r["cache_bytes"] / 2 ** 20], [r["decode_tokens_per_s"]], s=70 if base else 45,
                                color=st["color"], marker="s" if base else st["marker"], zorder=5,
                                edgecolors="black" if base else None)
            handles.setdefault(st["label"], h)
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("perplexity (exp of mean next-token NLL; lower is better)")
    axes[0].set_title("Perplexity vs length")
    axes[1].set_ylabel("passkey accuracy (fraction of cases; higher is better)")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_title(f"Passkey retrieval vs length (depths {', '.join(f'{d:g}' for d in sec['passkey_depths'])})")
    tokens = (f"{sec['prefill'] + sec['decode_warmup'] + sec['new_tokens']} tokens" if "decode_warmup" in sec
              else f"{sec['prefill']} + warm-up + {sec['new_tokens']} tokens")
    axes[2].set_xlabel(f"decode cache after {tokens} (MiB allocated, all layers)")
    axes[2].set_ylabel("greedy decoding speed (tokens/s)")
    axes[2].set_title("Decoding: speed vs cache size")
    axes[2].grid(True, alpha=0.3)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(4, len(handles)),
               fontsize=8, frameon=True)
    env = results["environment"]
    fig.suptitle(f"{sec['model']} on {sec['corpus']}, training-free mechanisms vs SDPA (same run, "
                 f"{sec.get('threads', env['threads'])} thread(s), shared machine)", fontsize=11)
    n_rows = -(-len(handles) // 4)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * n_rows, 1, 0.95))
    name = "real_model.png"
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return [{"file": name, "title": "Real pretrained model — perplexity, passkey, decoding",
             "caption": "Each mechanism replaces attention in every layer of the pretrained model without "
                        "training; the thick black dashed line is the model's own SDPA measured in the same run. "
                        "Perplexity windows start at the corpus' first token; passkey accuracy is teacher-forced "
                        "greedy recall of a 5-digit key; decoding speed is noisy on a shared machine."}]
