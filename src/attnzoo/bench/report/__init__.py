"""Reports of a results dict, one module per output: the terminal table (terminal), summary.md (markdown),
report.html (html), the README headline block (readme) and the comparison of two runs (compare); render writes
them all. format holds the number formatting and headline rows they share; real the real-model section.
"""

from .compare import baseline_series, compare, compare_real
from .format import MODES, PREFERRED, fmt_bytes, fmt_len, fmt_metric, fmt_time, fmt_x, has_bench, headline_rows
from .html import html_report
from .markdown import markdown_summary
from .readme import readme_block, real_readme, update_block
from .real import real_fidelity_line, real_section
from .render import render
from .terminal import terminal_table

__all__ = [
    "MODES",
    "PREFERRED",
    "baseline_series",
    "compare",
    "compare_real",
    "fmt_bytes",
    "fmt_len",
    "fmt_metric",
    "fmt_time",
    "fmt_x",
    "has_bench",
    "headline_rows",
    "html_report",
    "markdown_summary",
    "readme_block",
    "real_fidelity_line",
    "real_readme",
    "real_section",
    "render",
    "terminal_table",
    "update_block",
]
