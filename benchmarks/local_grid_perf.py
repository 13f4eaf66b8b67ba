"""Time and peak memory of attnzoo's 2-D / grid local attention against dense attention (CPU, float32).

Part 1 (acceptance of neighborhood_2d): 7 x 7 neighborhood attention on a 64 x 64 grid (4096 tokens), B = 1,
head dim 32, heads 4 and 8, forward and forward+backward, against

- dense SDPA over the same 4096 tokens (``F.scaled_dot_product_attention``, no mask), and
- dense SDPA given the equivalent boolean neighborhood mask (4096 x 4096).

Part 2: every grid mechanism of this family as a module (dim 128, 4 heads) on a 56 x 56 grid: the fast backend
against the dense reference backend of the same module (same weights).

Every number is a median of repeats (``attnzoo.bench.measure.median_time``); peak memory is the resident memory
one call adds, measured in a fresh process (``attnzoo.bench.measure.peak_memory``). Speed-ups are ratios against
the baseline measured in the same run. A correctness gate (fast vs reference on a small grid) runs first.

    python benchmarks/local_grid_perf.py [--threads 2,1] [--quick] [--no-memory] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH", "")) if p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo.bench.measure import median_time, peak_memory  # noqa: E402
from attnzoo.masks import materialize, neighborhood_2d  # noqa: E402
from attnzoo.mechanisms.local.neighborhood_2d import na2d  # noqa: E402

MODULES = {  # name -> options at 56 x 56 (grid sides must divide into blocks / windows / groups)
    "neighborhood_2d": {"kernel_size": 7},
    "halonet": {"block_size": 8, "halo_size": 3},
    "crossformer_lsda[sda]": {"mode": "sda", "group_size": 7},
    "crossformer_lsda[lda]": {"mode": "lda", "group_size": 7},
    "criss_cross": {},
    "hat": {"window_size": 8, "shift_size": 4, "overlap_ratio": 0.5},
    "transnext_aggregated": {"window_size": 3, "pool_size": 7},
}


# --------------------------------------------------------------------------------------------------------
# Cases: zero-argument closures, rebuilt by name in the memory subprocess
# --------------------------------------------------------------------------------------------------------
def na_case(impl: str, mode: str, heads: int, size: int = 64, kernel: int = 7, dim: int = 32):
    """impl: 'na2d' (tiled fast), 'sdpa' (dense, no mask), 'sdpa_mask' (dense with the neighborhood mask)."""
    torch.manual_seed(0)
    shape = (1, heads, size, size, dim)
    q, k, v = (torch.randn(shape, requires_grad=mode == "fwd_bwd") for _ in range(3))
    if impl == "na2d":
        fn = lambda: na2d(q, k, v, kernel_size=kernel, layout="heads_first")
        inputs = (q, k, v)
    else:
        n = size * size
        qf, kf, vf = (t.detach().reshape(1, heads, n, dim).requires_grad_(mode == "fwd_bwd") for t in (q, k, v))
        mask = None
        if impl == "sdpa_mask":
            mask = materialize(neighborhood_2d(size, size, kernel), 1, 1, n, n)  # (1, 1, N, N) bool
        fn = lambda: F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
        inputs = (qf, kf, vf)
    return _runner(fn, inputs, mode)


def module_case(name: str, backend: str, mode: str, size: int = 56, dim: int = 128, heads: int = 4):
    torch.manual_seed(0)
    mech = name.split("[")[0]
    m = attnzoo.build(mech, dim, heads, **MODULES[name])
    m.backend = backend
    x = torch.randn(1, size, size, dim, requires_grad=mode == "fwd_bwd")
    return _runner(lambda: m(x), (x, *m.parameters()), mode)


def _runner(fn, inputs, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn()
        return run

    def run():
        out = fn()
        # autograd.grad: no accumulation into .grad, as a training step after zero_grad(set_to_none=True)
        return torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


# --------------------------------------------------------------------------------------------------------
def gate() -> None:
    """fast == reference on small grids before any number is reported."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 11, 8, dtype=torch.float64) for _ in range(3))
    a = na2d(q, k, v, kernel_size=7, backend="fast", layout="heads_first")
    b = na2d(q, k, v, kernel_size=7, backend="reference", layout="heads_first")
    assert (a - b).norm() / b.norm() < 1e-10, "na2d fast != reference"
    for name, opts in MODULES.items():
        mech = name.split("[")[0]
        torch.manual_seed(0)
        m = attnzoo.build(mech, 32, 2, **opts).double()
        x = torch.randn(1, 56, 56, 32, dtype=torch.float64)
        m.backend = "reference"
        ref = m(x)
        m.backend = "fast"
        err = ((m(x) - ref).norm() / ref.norm()).item()
        assert err < 1e-10, f"{name}: fast vs reference relative error {err:.2e}"


def measure(target: str, kwargs: dict, args, threads: int | None = None) -> dict:
    run = globals()[target](**kwargs)
    t = median_time(run, min_run_time=args.min_run_time, warmup=1, threads=threads)
    mem = None
    if not args.no_memory:
        mem = peak_memory(f"local_grid_perf:{target}", kwargs, threads=threads)
    print(f"  {target} {kwargs} threads={threads}: {t * 1e3:.1f} ms" +
          ("" if mem is None else f", {mem / 2**20:.1f} MiB"), file=sys.stderr, flush=True)
    return {"time_s": t, "peak_bytes": mem}


def _fmt_mem(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="heads 4 only; part 2 forward+backward only")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory measurements")
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing (torch.utils.benchmark)")
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--part", choices=["1", "2", "all"], default="all")
    ap.add_argument("--threads", default=str(torch.get_num_threads()),
                    help="comma-separated thread counts for part 1 (part 2 uses the first), e.g. 2,1")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    gate()
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                           "load_avg": os.getloadavg()}, "part1": [], "part2": []}
    started = time.time()
    lines = []
    if args.part in ("1", "all"):
        lines += ["### Part 1: neighborhood attention 7x7, 64x64 grid (4096 tokens), B=1, head dim 32, float32", "",
                  "| threads | heads | pass | dense SDPA ms | SDPA + NA mask ms | na2d (fast) ms | speed-up vs SDPA | "
                  "vs SDPA+mask | peak MiB SDPA / SDPA+mask / na2d |", "|---|---|---|---|---|---|---|---|---|"]
        for threads in args.threads:
            for heads in ((4,) if args.quick else (4, 8)):
                for mode in ("fwd", "fwd_bwd"):
                    r = {impl: measure("na_case", {"impl": impl, "mode": mode, "heads": heads}, args, threads)
                         for impl in ("sdpa", "sdpa_mask", "na2d")}
                    results["part1"].append({"threads": threads, "heads": heads, "mode": mode, **r})
                    s, sm, na = (r[i]["time_s"] for i in ("sdpa", "sdpa_mask", "na2d"))
                    lines.append(f"| {threads} | {heads} | {mode} | {s * 1e3:.1f} | {sm * 1e3:.1f} | {na * 1e3:.1f} | "
                                 f"x{s / na:.1f} | x{sm / na:.1f} | {_fmt_mem(r['sdpa']['peak_bytes'])} / "
                                 f"{_fmt_mem(r['sdpa_mask']['peak_bytes'])} / {_fmt_mem(r['na2d']['peak_bytes'])} |")
        lines.append("")
    if args.part in ("2", "all"):
        lines += [f"### Part 2: grid modules, 56x56 grid, dim 128, 4 heads, B=1, float32, {args.threads[0]} threads: "
                  "fast vs dense reference", "",
                  "| mechanism | pass | reference ms | fast ms | speed-up | peak MiB reference / fast |",
                  "|---|---|---|---|---|---|"]
        modes = ("fwd_bwd",) if args.quick else ("fwd", "fwd_bwd")
        for name in MODULES:
            for mode in modes:
                r = {b: measure("module_case", {"name": name, "backend": b, "mode": mode}, args, args.threads[0])
                     for b in ("reference", "fast")}
                results["part2"].append({"mechanism": name, "mode": mode, **r})
                ref, fast = r["reference"]["time_s"], r["fast"]["time_s"]
                lines.append(f"| {name} | {mode} | {ref * 1e3:.1f} | {fast * 1e3:.1f} | x{ref / fast:.1f} | "
                             f"{_fmt_mem(r['reference']['peak_bytes'])} / {_fmt_mem(r['fast']['peak_bytes'])} |")
        lines.append("")
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["elapsed_s"] = time.time() - started
    print("\n".join(lines))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average at start "
          f"{results['machine']['load_avg'][0]:.1f}, at end {results['machine']['load_avg_end'][0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
