"""``attnzoo bench``: efficiency and quality measurements against dense attention in the same run.

    from attnzoo.bench import quick, run, write_outputs
    results = run(quick(mechanisms=["sliding_window"], lengths=(256, 1024)))
    write_outputs(results, "bench-results")

Modules: ``config`` (profiles), ``gate`` (correctness before timing), ``cases`` (what one case runs),
``measure`` (timing, CPU contamination, peak memory, environment), ``forkserver`` (peak memory in fresh
processes), ``efficiency`` (the sweep, speedups, efficiency length), ``quality`` (tasks, tiny models,
training), ``results`` (schema, validation), ``plots``, ``report`` (Markdown, HTML, compare, README block),
``runner`` (the whole run).
"""

from .config import BenchConfig, full, quick
from .efficiency import efficiency_length
from .runner import run, write_outputs

__all__ = ["BenchConfig", "quick", "full", "run", "write_outputs", "efficiency_length"]
