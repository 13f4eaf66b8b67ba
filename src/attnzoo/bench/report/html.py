"""report.html: the self-contained HTML report of a run (plots embedded)."""

from __future__ import annotations

from typing import Any

from .format import escape, has_bench, html_table, img_tag, inline_html
from .markdown import (
    EFF_LENGTH_HEAD,
    QUALITY_HEAD,
    eff_length_rows,
    env_line,
    gate_rows,
    headline_table,
    hygiene,
    merged_from,
    problem_rows,
    quality_intro,
    quality_rows,
)
from .real import real_html


def merged_html(results: dict[str, Any]) -> list[str]:
    """The commands of the runs a merged results document joins, as a meta paragraph (none otherwise)."""
    cmds = [line[3:-1] for line in merged_from(results) if line.startswith("- `")]
    return ['<p class="meta">Merged from the runs: ' + " · ".join(f"<code>{escape(c)}</code>" for c in cmds)
            + "</p>"] if cmds else []

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


def html_report(results: dict[str, Any], images: list[dict[str, str]], out_dir: str) -> str:
    env = results["environment"]
    if not has_bench(results):
        body = [
            "<h1>attnzoo bench — real pretrained models</h1>",
            f'<p class="meta"><code>{escape(results["command"])}</code> · '
            f'profile <b>{escape(results["profile"])}</b> · '
            f'{results["duration_s"]:.0f} s · {escape(env["date"])}'
            + (" · <b>interrupted</b>" if results["interrupted"] else "") + "</p>",
            f'<p class="meta">{escape(env_line(results))}'
            + (f", transformers {escape(env['transformers'])}" if env.get("transformers") else "") + "</p>",
            *real_html(results, images, out_dir),
            "<h2>Configuration</h2>",
            html_table(["setting", "value"], [[k, str(v)] for k, v in results["config"].items()]),
        ]
        return _html_page(results, body)
    head, rows = headline_table(results)
    cnt = results["summary"]["counts"]
    groups = {"efficiency": [i for i in images if i["file"].startswith(("time_", "memory_", "speedup_"))],
              "quality": [i for i in images if i["file"].startswith("quality_")],
              "recall": [i for i in images if i["file"].startswith("recall_vs_state")]}
    body = [
        "<h1>attnzoo bench</h1>",
        f'<p class="meta"><code>{escape(results["command"])}</code> · '
        f'profile <b>{escape(results["profile"])}</b> · '
        f'{results["duration_s"]:.0f} s · {escape(env["date"])}'
        + (" · <b>interrupted</b>" if results["interrupted"] else "") + "</p>",
        *merged_html(results),
        f'<p class="meta">{escape(env_line(results))}</p>',
        '<p class="note">Every ratio compares with dense attention measured in the same run, with the same sizes: '
        "SDPA for functional mechanisms, the softmax <code>Attention</code> module (projections included) for module "
        "mechanisms. Speedup = baseline time / mechanism time (&gt; 1 is faster); memory = mechanism / baseline peak "
        f"memory (&lt; 1 is smaller). {cnt.get('efficiency_contaminated', 0)} measured case(s) were taken while "
        "other processes used the CPU (marked *); treat those ratios as noisy.</p>",
        "<h2>Headline</h2>",
        "<p>At the largest length measured for each mechanism (its first supported pattern of causal_self, "
        "noncausal_self, causal_cross, noncausal_cross; decode is causal self attention, time per token).</p>",
        html_table(head, rows, numeric={3, 4, 5, 6, 7, 8, 9}),
        "<h2>Correctness gate</h2>",
        "<p>Run before any timing: fast form vs reference (outputs and gradients, float64 and float32), decode steps "
        "vs the causal forward, declared masks vs the reference. A failing mechanism is reported, not timed.</p>",
        html_table(["mechanism", "status", "checks", "problems"], gate_rows(results)),
        "<h2>Efficiency</h2>",
        *[img_tag(out_dir, im) for im in groups["efficiency"]],
        "<h3>Efficiency length</h3>",
        "<p>The length from which a mechanism stays cheaper than the baseline, interpolated on log-log axes "
        "(CAB, arXiv 2210.07661); &lt;N: cheaper at every measured length; &gt;N: not within the measured range.</p>",
        html_table(EFF_LENGTH_HEAD, eff_length_rows(results),
                    numeric={4, 5}),
        "<h2>Quality</h2>",
        f"<p>{inline_html(quality_intro())}</p>",
        *[img_tag(out_dir, im) for im in groups["recall"]],
        *[img_tag(out_dir, im) for im in groups["quality"]],
        html_table(QUALITY_HEAD, quality_rows(results), numeric={2, 5, 6, 7, 8, 9}),
        "<h2>Measurement hygiene</h2>",
        f"<p>{escape(hygiene(results))}</p>",
        html_table(["count", "cases"], [[k, str(v)] for k, v in cnt.items()], numeric={1}),
    ]
    probs = problem_rows(results)
    if probs:
        body += ["<h2>Errors and failures</h2>",
                 html_table(["stage", "what", "where", "status", "message"], probs)]
    body += real_html(results, images, out_dir)
    body += ["<h2>Peers</h2>",
             html_table(["peer", "available", "version", "note"],
                         [[p["name"], "yes" if p["available"] else "no", p.get("version") or "—", p["reason"]]
                          for p in results["peers"]]),
             "<h2>Configuration</h2>",
             html_table(["setting", "value"], [[k, str(v)] for k, v in results["config"].items()])]
    return _html_page(results, body)


def _html_page(results: dict[str, Any], body: list[str]) -> str:
    env = results["environment"]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>attnzoo bench — {escape(results['profile'])} — {escape(env['date'])}</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
