"""Measurement primitives: median wall time, CPU contamination, peak memory in a fresh process, environment.

Numbers from these are only ever reported as ratios against a baseline measured in the same run.

Timing (:func:`time_call`): warm-up calls, then ``torch.utils.benchmark.Timer.blocked_autorange`` and its
median. The machine may be shared: around each measurement the CPU time that *other* processes used is
read from ``/proc/stat`` (all busy jiffies) minus ``/proc/self/stat`` (this process's utime + stime), and
a measurement during which others used more than the idle cores is re-run (bounded retries) and flagged
``contaminated`` if it stays so. Decoding needs a fresh copy of the state before every measured call, which
``Timer`` cannot express, so :func:`time_prepared` runs its own loop (``perf_counter`` around each call,
untimed ``prepare()`` between calls) with the same warm-up, median and contamination check.

Peak memory (:func:`peak_memory`): one case is rebuilt in a new interpreter (``"package.module:function"``
plus JSON keyword arguments) and the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after set-up and one warm-up call) is read around one call. The child runs with
glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``), so every large tensor is mapped and unmapped
and the high-water mark follows live tensors instead of the allocator's free lists.
:mod:`attnzoo.bench.forkserver` does the same from a pre-imported process that forks one child per case
(milliseconds instead of seconds per case).

A *case* for :func:`peak_memory` is a zero-argument function returning the closure to measure::

    def sliding_window_fwd_bwd(n, window):
        q, k, v = ...                       # setup, not measured
        def run():
            attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True, window=window).sum().backward()
        return run
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.utils.benchmark as tbench

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""Environment of memory-measuring children: large blocks always mmapped, freed memory returned at once."""

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --------------------------------------------------------------------------------------------------------
# CPU accounting: how much CPU did other processes use while we measured?
# --------------------------------------------------------------------------------------------------------
def _busy_jiffies() -> int | None:
    """Busy jiffies of the whole machine since boot (user+nice+system+irq+softirq+steal), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    vals = [int(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    return vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + (vals[7] if len(vals) > 7 else 0)


def _own_jiffies() -> int | None:
    """utime + stime of this process (all its threads), in jiffies."""
    try:
        with open("/proc/self/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()  # fields after the command name, starting at field 3
    return int(rest[11]) + int(rest[12])  # fields 14 (utime) and 15 (stime)


def _own_children_jiffies() -> int:
    """CPU used by finished children we waited for (cutime + cstime), so our own helpers are not 'others'."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((ru.ru_utime + ru.ru_stime) * _HZ)


@dataclass
class CpuSample:
    wall: float
    busy: int | None
    own: int | None
    children: int

    @classmethod
    def now(cls) -> CpuSample:
        return cls(time.perf_counter(), _busy_jiffies(), _own_jiffies(), _own_children_jiffies())


def other_cpu(before: CpuSample, after: CpuSample) -> float | None:
    """Average number of cores busy with *other* processes between two samples, or None if unknown."""
    if before.busy is None or after.busy is None or before.own is None or after.own is None:
        return None
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own) - (after.children - before.children)
    return max(0.0, others / _HZ / wall)


def contamination_limit(threads: int, tolerance: float = 0.25) -> float:
    """Cores others may use without competing with our ``threads``: the idle cores plus a tolerance."""
    ncpu = os.cpu_count() or 1
    return max(0.0, ncpu - threads) + tolerance


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """One timed case: median seconds per call and how clean the measurement was."""

    median: float
    iqr: float
    repeats: int  # calls measured (all blocks)
    first_call: float  # seconds of the first warm-up call (includes any compilation)
    compiled: bool  # torch.compile/dynamo produced graphs during warm-up
    other_cpu: float | None  # cores used by other processes during the accepted attempt
    attempts: int
    contaminated: bool
    other_cpu_attempts: list[float | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dynamo_graphs() -> int:
    """Graphs compiled so far by torch.compile (0 while dynamo was never imported: importing it is slow)."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0
    counters = utils.counters
    return int(sum(counters["stats"].values())) + int(sum(counters["inductor"].values()))


def _warmup(run: Callable[[], Any], warmup: int) -> tuple[float, bool]:
    graphs = _dynamo_graphs()
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        run()
    return first, _dynamo_graphs() != graphs


def _retrying(measure: Callable[[], tuple[float, float, int]], *, threads: int, retries: int,
              first: float, compiled: bool, backoff: float = 0.25) -> Timing:
    """Run ``measure`` until other processes left our cores alone (at most ``retries`` re-runs); keep the
    clean attempt, else the least contaminated one and flag it."""
    limit = contamination_limit(threads)
    attempts: list[tuple[float, float, int, float | None]] = []
    for attempt in range(retries + 1):
        before = CpuSample.now()
        med, iqr, n = measure()
        other = other_cpu(before, CpuSample.now())
        attempts.append((med, iqr, n, other))
        if other is None or other <= limit:
            return Timing(med, iqr, n, first, compiled, other, attempt + 1, False, [a[3] for a in attempts])
        if attempt < retries:
            time.sleep(backoff * (attempt + 1))
    med, iqr, n, other = min(attempts, key=lambda a: a[3] if a[3] is not None else 0.0)
    return Timing(med, iqr, n, first, compiled, other, len(attempts), True, [a[3] for a in attempts])


def time_call(run: Callable[[], Any], *, min_run_time: float = 1.0, warmup: int = 1, threads: int | None = None,
              retries: int = 2) -> Timing:
    """Median seconds per call of ``run`` (``torch.utils.benchmark``), re-measured while contaminated."""
    threads = torch.get_num_threads() if threads is None else threads
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first, compiled = _warmup(run, warmup)
        timer = tbench.Timer(stmt="run()", globals={"run": run}, num_threads=threads)

        def measure() -> tuple[float, float, int]:
            m = timer.blocked_autorange(min_run_time=min_run_time)
            return float(m.median), float(m.iqr), int(m.number_per_run * len(m.raw_times))

        return _retrying(measure, threads=threads, retries=retries, first=first, compiled=compiled)
    finally:
        torch.set_num_threads(old)


def time_prepared(prepare: Callable[[], Any], run: Callable[[Any], Any], *, min_run_time: float = 1.0,
                  warmup: int = 1, threads: int | None = None, retries: int = 2, min_repeats: int = 3,
                  max_repeats: int = 1000) -> Timing:
    """Median seconds of ``run(prepare())``, with ``prepare()`` untimed before every call (decoding from a
    fresh copy of a prefilled state)."""
    threads = torch.get_num_threads() if threads is None else threads
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first, compiled = _warmup(lambda: run(prepare()), warmup)

        def measure() -> tuple[float, float, int]:
            times: list[float] = []
            spent = 0.0
            while len(times) < max_repeats and (len(times) < min_repeats or spent < min_run_time):
                arg = prepare()
                t0 = time.perf_counter()
                run(arg)
                dt = time.perf_counter() - t0
                times.append(dt)
                spent += dt
            q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
            return statistics.median(times), q[2] - q[0], len(times)

        return _retrying(measure, threads=threads, retries=retries, first=first, compiled=compiled)
    finally:
        torch.set_num_threads(old)


def median_time(run: Callable[[], Any], *, min_run_time: float = 1.0, warmup: int = 1,
                threads: int | None = None) -> float:
    """Median seconds per call of ``run`` after ``warmup`` calls (torch.utils.benchmark.Timer)."""
    return time_call(run, min_run_time=min_run_time, warmup=warmup, threads=threads, retries=0).median


# --------------------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------------------
def load_case(target: str, kwargs: dict[str, Any]) -> Callable[[], Any]:
    module, _, name = target.partition(":")
    if not name:
        raise ValueError(f"target: expected 'package.module:function', got {target!r}")
    return getattr(importlib.import_module(module), name)(**kwargs)


def status_bytes(key: str) -> int | None:
    """A byte count from /proc/self/status (``VmRSS``, ``VmHWM``, ...), or None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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


def reset_peak() -> bool:
    """Reset this process's resident high-water mark to its current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(run: Callable[..., Any], *, prepare: Callable[[], Any] | None = None,
                 warmup: bool = True) -> dict[str, int | str]:
    """Peak resident bytes one call of ``run`` adds above what is resident before it (call it in a process
    that does nothing else). With ``prepare``, the call is ``run(prepare())`` and ``prepare`` is not
    measured (a fresh copy of a decode state). Uses VmHWM after a reset where possible, else ru_maxrss."""
    call = run if prepare is None else (lambda arg: run(arg))
    if warmup:
        call() if prepare is None else call(prepare())
    arg = None if prepare is None else prepare()
    can_reset = reset_peak()
    before = status_bytes("VmRSS") if can_reset else _maxrss_bytes()
    call() if prepare is None else call(arg)
    after = status_bytes("VmHWM") if can_reset else _maxrss_bytes()
    if before is None or after is None:
        raise RuntimeError("measure_peak: cannot read /proc/self/status")
    return {"peak_bytes": max(0, after - before), "setup_bytes": before,
            "method": "VmHWM" if can_reset else "ru_maxrss"}


def _child(target: str, kwargs_json: str) -> None:  # runs in the fresh process
    run = load_case(target, json.loads(kwargs_json))
    print(json.dumps(measure_peak(run)))


def child_env(threads: int | None = None) -> dict[str, str]:
    """Environment of a measuring child: attnzoo importable, the allocator pinned, ``threads`` threads."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the dir holding attnzoo/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    env.update(MALLOC_ENV)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


def peak_memory(target: str, kwargs: dict[str, Any], *, threads: int | None = None, timeout: float = 900) -> int:
    """Peak resident memory (bytes) that one call of the case adds above its set-up, in a new process."""
    code = "import sys; from attnzoo.bench.measure import _child; _child(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, target, json.dumps(kwargs)], capture_output=True,
                          text=True, env=child_env(threads), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"peak_memory: case {target} {kwargs} failed:\n{proc.stderr[-2000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


# --------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------
_FLAGS_OF_INTEREST = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                      "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return {"model": model, "flags": [f for f in _FLAGS_OF_INTEREST if f in flags], "all_flags": " ".join(flags),
            "logical_cores": os.cpu_count()}


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(threads: int) -> dict[str, Any]:
    """What a reader needs to judge the numbers: versions, threads, CPU, host, date, load."""
    from .. import __version__

    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover
        load = None
    mem = _meminfo_total()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "attnzoo": __version__,
        "attnzoo_commit": _git_commit(),
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "cpu": cpu_info(),
        "memory_total_bytes": mem,
        "load_average_at_start": load,
        "clock_ticks_per_s": _HZ,
    }


def _meminfo_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _demo_case(numel: int) -> Callable[[], Any]:
    """A case for checking :func:`peak_memory`: one call allocates ``numel`` float32 and frees them."""

    def run():
        return float(torch.ones(numel).sum())

    return run
