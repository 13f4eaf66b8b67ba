"""Write every output of a run (plots, summary.md, report.html) into a directory."""

from __future__ import annotations

import os
from typing import Any

from .html import html_report
from .markdown import markdown_summary


def render(results: dict[str, Any], out_dir: str, *, plots: bool = True) -> dict[str, str]:
    """Write the PNG plots, summary.md and report.html for ``results`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    images: list[dict[str, str]] = []
    paths: dict[str, str] = {}
    if plots:
        try:
            from ..plots import all_plots

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
