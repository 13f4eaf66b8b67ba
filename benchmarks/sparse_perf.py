"""Speed and memory of the sparse/routing family beside dense SDPA, measured in the same run (float32, CPU).

    cd <worktree> && PYTHONPATH=src python benchmarks/sparse_perf.py [--threads 1] [--quick] [--json out.json]

Cases (the acceptance list of the sparse issue):
- BiFormer on a 56x56 grid (3136 tokens), 7x7 regions, top-4, forward+backward: the attention core
  (routing + gathered attention) vs SDPA over the same q/k/v, and the whole layer (projections, routing,
  attention, LCE, output) vs the same layer with SDPA as its core.
- HyperAttention, non-causal, n = 32768, B=1, H=8, d=64, forward vs SDPA forward, with its relative error
  against exact attention on random inputs and on inputs with a planted match per query.
- HiP and DMA, causal, n = 16384, forward: time and peak memory beside causal SDPA.

Every number is a ratio against SDPA timed in the same process (median of repeats after a warm-up,
``attnzoo.bench.measure.median_time``); peak memory is measured per case in a fresh process
(``peak_memory``). Default ``--threads 1``: on a shared machine, multi-threaded timings of code made of many
medium-sized ops are dominated by OpenMP barrier waits whenever another process holds a core; one thread
makes both sides comparable. ``--threads 2`` is reported too when asked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.bench.measure import median_time, peak_memory
from attnzoo.mechanisms.sparse.biformer import bra_fast, route_regions
from attnzoo.testing import rel_err

GRID = {"B": 1, "H": 56, "W": 56, "dim": 128, "heads": 8, "n_win": 7, "topk": 4}


def _rand(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return t.requires_grad_(grad)


# ---- cases: each returns the closure to measure (importable for peak_memory) -----------------------------
def biformer_core(backend: str, dim: int, heads: int, H: int = 56, W: int = 56, n_win: int = 7, topk: int = 4):
    """Attention core forward+backward: routing + gathered attention, or SDPA over all H*W tokens."""
    N, hd = H * W, dim // heads
    q, k, v = (_rand(1, heads, N, hd, seed=i, grad=True) for i in range(3))
    g = _rand(1, heads, N, hd, seed=9)
    S = n_win

    def means(x):  # region means on the full width, as the module does
        return x.detach().transpose(1, 2).reshape(1, S, H // S, S, W // S, dim).mean(dim=(2, 4)).reshape(1, S * S, dim)

    def run_fast():
        r_idx = route_regions(means(q), means(k), topk, dim ** -0.5)
        bra_fast(q, k, v, r_idx, height=H, width=W, n_win=S, scale=hd ** -0.5).backward(g)

    def run_sdpa():
        F.scaled_dot_product_attention(q, k, v).backward(g)

    return run_fast if backend == "fast" else run_sdpa


def biformer_layer(backend: str, dim: int, heads: int, H: int = 56, W: int = 56, n_win: int = 7, topk: int = 4):
    """The whole BiFormer layer forward+backward; ``sdpa`` swaps its core for dense SDPA."""
    torch.manual_seed(0)
    layer = attnzoo.build("biformer", dim, heads, n_win=n_win, topk=topk, backend="fast")
    x = _rand(1, H, W, dim, seed=1, grad=True)
    g = _rand(1, H, W, dim, seed=2)
    if backend == "sdpa":
        from attnzoo.mechanisms.sparse import biformer as mod

        def dense_core(q, k, v, r_idx, *, height, width, n_win, scale):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

        def run():
            saved = mod.bra_fast
            mod.bra_fast = dense_core
            try:
                layer(x).backward(g)
            finally:
                mod.bra_fast = saved
        return run
    return lambda: layer(x).backward(g)


def seq_fwd(mechanism: str, n: int, causal: bool, heads: int = 8, d: int = 64, **options):
    """Forward of a functional mechanism (or ``sdpa``) on random q/k/v (B=1)."""
    q, k, v = (_rand(1, heads, n, d, seed=i) for i in range(3))
    if mechanism == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return lambda: attnzoo.attention(q, k, v, mechanism=mechanism, causal=causal, backend="fast", **options)


# ---- driver ----------------------------------------------------------------------------------------------
def _case(target, kwargs, threads, reps, warmup=1, memory=True):
    torch.set_num_threads(threads)
    run = globals()[target](**kwargs)
    t = median_time(run, min_run_time=reps, warmup=warmup, threads=threads)
    mem = peak_memory(f"benchmarks.sparse_perf:{target}", kwargs, threads=threads) if memory else None
    return t, mem


def _fmt_mem(b):
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run, not the acceptance sizes)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--only", nargs="+", choices=("biformer", "hyperattention", "causal"),
                    default=("biformer", "hyperattention", "causal"), help="case groups to run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    mem = not args.no_memory
    n_hyper, n_causal = (8192, 4096) if args.quick else (32768, 16384)
    rows, results = [], {"machine": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                         "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "cases": []}

    def add(group, name, t, m, base_t, base_m, threads, extra=""):
        rows.append((threads, group, name, t, m, base_t / t if base_t else None, extra))
        results["cases"].append({"threads": threads, "group": group, "name": name, "seconds": t, "peak_bytes": m,
                                 "speedup_vs_sdpa": (base_t / t) if base_t else None, "note": extra})
        print(f"  [{threads}t] {group:28s} {name:30s} {t * 1e3:10.1f} ms  {_fmt_mem(m):>10s}"
              + (f"  x{base_t / t:5.2f} vs SDPA" if base_t else "") + (f"  {extra}" if extra else ""), flush=True)

    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"threads={threads}", flush=True)
        if "biformer" in args.only:  # 56x56 grid, 7x7 regions, top-4, forward+backward
            for dim, heads in ((128, 8), (64, 4)):
                group = f"biformer core dim{dim} h{heads}"
                tb, mb = _case("biformer_core", {"backend": "sdpa", "dim": dim, "heads": heads}, threads, 3, memory=mem)
                add(group, "sdpa (3136 tokens) fwd+bwd", tb, mb, None, None, threads)
                tf, mf = _case("biformer_core", {"backend": "fast", "dim": dim, "heads": heads}, threads, 3, memory=mem)
                add(group, "biformer fast fwd+bwd", tf, mf, tb, mb, threads)
            group = "biformer layer dim128 h8"
            tb, mb = _case("biformer_layer", {"backend": "sdpa", "dim": 128, "heads": 8}, threads, 3, memory=mem)
            add(group, "layer w/ SDPA core fwd+bwd", tb, mb, None, None, threads)
            tf, mf = _case("biformer_layer", {"backend": "fast", "dim": 128, "heads": 8}, threads, 3, memory=mem)
            add(group, "biformer layer fwd+bwd", tf, mf, tb, mb, threads)

        if "hyperattention" in args.only:  # non-causal forward
            group = f"hyperattention n={n_hyper}"
            kw = {"n": n_hyper, "causal": False}
            tb, mb = _case("seq_fwd", {"mechanism": "sdpa", **kw}, threads, 1, warmup=0, memory=mem)
            add(group, "sdpa fwd", tb, mb, None, None, threads)
            th, mh = _case("seq_fwd", {"mechanism": "hyperattention", **kw}, threads, 3, memory=mem)
            # relative error against exact attention: random inputs, and a planted match for every query
            q, k, v = (_rand(1, 8, n_hyper, 64, seed=i) for i in range(3))
            exact = F.scaled_dot_product_attention(q, k, v)
            err_rand = rel_err(attnzoo.attention(q, k, v, mechanism="hyperattention"), exact)
            perm = torch.randperm(n_hyper, generator=torch.Generator().manual_seed(5))
            kp = q[:, :, perm] + 0.3 * _rand(1, 8, n_hyper, 64, seed=7)
            exact_p = F.scaled_dot_product_attention(q, kp, v)
            err_plant = rel_err(attnzoo.attention(q, kp, v, mechanism="hyperattention"), exact_p)
            add(group, "hyperattention fwd (b=256, m=256)", th, mh, tb, mb, threads,
                f"rel.err {err_rand:.3f} random / {err_plant:.3f} planted-match")
            results["hyperattention_rel_err"] = {"random": err_rand, "planted_match": err_plant}
            del q, k, v, exact, kp, exact_p

        if "causal" in args.only:  # HiP and DMA, causal forward
            group = f"causal n={n_causal}"
            kw = {"n": n_causal, "causal": True}
            tb, mb = _case("seq_fwd", {"mechanism": "sdpa", **kw}, threads, 1, warmup=0, memory=mem)
            add(group, "sdpa causal fwd", tb, mb, None, None, threads)
            for name, opts in (("hip", {}), ("dma", {}), ("dma", {"window": 512})):
                t, m = _case("seq_fwd", {"mechanism": name, **kw, **opts}, threads, 1, warmup=0, memory=mem)
                label = name + " fwd " + (", ".join(f"{a}={b}" for a, b in opts.items()) or "(defaults)")
                add(group, label, t, m, tb, mb, threads)

    print("\n| threads | case | variant | time | peak memory | speed-up vs SDPA | note |")
    print("|---|---|---|---|---|---|---|")
    for threads, group, name, t, m, sp, extra in rows:
        sps = "" if sp is None else f"{sp:.2f}x"
        print(f"| {threads} | {group} | {name} | {t * 1e3:.0f} ms | {_fmt_mem(m)} | {sps} | {extra} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n(total {time.time() - t0:.0f} s; machine shared with other jobs: compare ratios, not absolute times)")
