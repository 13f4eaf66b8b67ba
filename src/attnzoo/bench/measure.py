"""Measurement primitives: median wall time (torch.utils.benchmark) and peak memory in a fresh process.

Numbers from these are only ever reported as ratios against a baseline measured in the same run.

A *case* is a zero-argument function returning the closure to measure, addressed as
``"package.module:function"`` with JSON keyword arguments, so that :func:`peak_memory` can rebuild it in a
new interpreter (peak RSS of a long-lived process says nothing about one case)::

    def sliding_window_fwd_bwd(n, window):
        q, k, v = ...                       # setup, not measured
        def run():
            attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True, window=window).sum().backward()
        return run
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark as tbench


def median_time(run: Callable[[], Any], *, min_run_time: float = 1.0, warmup: int = 1,
                threads: int | None = None) -> float:
    """Median seconds per call of ``run`` after ``warmup`` calls (torch.utils.benchmark.Timer)."""
    for _ in range(warmup):
        run()
    timer = tbench.Timer(stmt="run()", globals={"run": run},
                         num_threads=threads if threads is not None else torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def load_case(target: str, kwargs: dict[str, Any]) -> Callable[[], Any]:
    module, _, name = target.partition(":")
    if not name:
        raise ValueError(f"target: expected 'package.module:function', got {target!r}")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _maxrss_bytes() -> int:
    # Linux: the process's own high-water mark (VmHWM). getrusage's ru_maxrss is not usable there: exec
    # keeps the parent's peak RSS in it, so a child spawned by a large parent reports the parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _child(target: str, kwargs_json: str) -> None:  # runs in the fresh process
    run = load_case(target, json.loads(kwargs_json))
    before = _maxrss_bytes()
    run()
    after = _maxrss_bytes()
    print(json.dumps({"peak_bytes": max(0, after - before), "setup_bytes": before}))


def peak_memory(target: str, kwargs: dict[str, Any], *, threads: int | None = None, timeout: float = 900) -> int:
    """Peak resident memory (bytes) that one call of the case adds above its set-up, in a new process."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the dir holding attnzoo/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    code = "import sys; from attnzoo.bench.measure import _child; _child(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, target, json.dumps(kwargs)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"peak_memory: case {target} {kwargs} failed:\n{proc.stderr[-2000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])
