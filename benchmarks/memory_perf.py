"""Decode and prefill cost of the long-context / memory family beside dense attention (attnzoo issue 5).

    PYTHONPATH=src python benchmarks/memory_perf.py            # the full run (prefixes 1k/8k/32k, n = 16384)
    PYTHONPATH=src python benchmarks/memory_perf.py --quick    # a small smoke run

fp32, causal, B = 1, H = 8, head dim 64 (modules: dim 512, 8 heads), one thread (the machine is shared;
only ratios against the dense baseline measured in the same run mean anything).

1. Decode: time per token and decode-state bytes (``state.nbytes()``) after a prefix of P tokens, beside a
   full ``KVCache`` with dense attention (the ``softmax`` mechanism's step; for modules, the dense
   ``Attention`` layer). Per-token time is the median over runs of ``K`` consecutive decode steps divided
   by K, so periodic work (a full step every ``stride`` tokens, a core token every ``group_size``, a
   landmark every block, a FIT group) is amortised as in real decoding. Functional states are filled with
   random keys/values/summaries of exactly the shapes a real prefill stores (their decode cost does not
   depend on the values; a real O(P^2) prefill of 32k tokens is not affordable here); module states
   (Titans, FIT) come from a real prefill.
2. Prefill: forward + backward at n = 16384 of each fast form beside fused SDPA (functional) or the dense
   ``Attention`` layer (modules); peak memory in a fresh process (``attnzoo.bench.measure.peak_memory``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import attnzoo
from attnzoo.bench.measure import median_time, peak_memory
from attnzoo.mechanisms.memory.cca import CCAState
from attnzoo.mechanisms.memory.longheads import LongHeadsState
from attnzoo.mechanisms.memory.recycled import (
    RecycledState,
    recycled_sets,  # noqa: F401  (imported for the subprocess cases)
)
from attnzoo.state import KVCache, LandmarkCache, SinkWindowCache

H, D, DIM = 8, 64, 512
DT = torch.float32

# Paper-default options (inference settings where the paper has them).
FUNCTIONAL = {
    "softmax": {},
    "landmark": {"block_size": 50, "top_k": 4},
    "cca": {"group_size": 16, "window": 1024},
    "longheads": {"chunk_size": 256, "max_chunks": 16},
    "sinklora": {"group_size": 2048, "sinks": 4, "shift": False},
    "recycled": {"stride": 50, "top_k": 2048, "aggregate": "sum"},  # start = the prefix length
}
MODULES = {
    "softmax_layer": ("softmax", {}),
    "titans_mac": ("titans", {"variant": "mac"}),
    "titans_mag": ("titans_mag", {}),
    "titans_mal": ("titans_mal", {}),
    "fit": ("fit", {"group_size": 256, "latents": 16}),
}
PER_RUN = {"fit": 256, "titans_mac": 64, "titans_mag": 64, "titans_mal": 64}  # tokens per timed run (else 100)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# --------------------------------------------------------------------------------------------------------
# Decode states of prefix P (functional mechanisms)
# --------------------------------------------------------------------------------------------------------
def functional_state(name: str, P: int):
    opts = FUNCTIONAL[name]
    k, v = _rand(1, H, P, D, seed=1), _rand(1, H, P, D, seed=2)
    if name == "softmax":
        st = KVCache(1, H, D, D, dtype=DT)
        st.append(k, v)
    elif name == "landmark":
        st = LandmarkCache(1, H, D, D, block_size=opts["block_size"], dtype=DT)
        st.append(k, v)
    elif name == "cca":
        g, w = opts["group_size"], opts["window"]
        st = CCAState(1, H, D, D, group_size=g, window=w, query_heads=H, dtype=DT)
        st.raw.append(k, v)
        st.raw.evict()
        st.cores.append(_rand(1, H, P // g, D, seed=3), _rand(1, H, P // g, D, seed=4))
    elif name == "longheads":
        w = opts["chunk_size"]
        st = LongHeadsState(1, H, D, D, chunk_size=w, dtype=DT)
        st.kv.append(k, v)
        st.add_summary(_rand(1, H, P // w, D, seed=3), torch.ones(1, P // w, dtype=torch.bool))
        st.push_queries(_rand(1, H, P % w, D, seed=5))
        st.q_start = (P // w) * w
    elif name == "sinklora":
        st = SinkWindowCache(1, H, D, D, window=opts["group_size"], sinks=opts["sinks"], dtype=DT)
        st.append(k, v)
        st.evict()
    elif name == "recycled":
        st = RecycledState(1, H, D, D, stride=opts["stride"], start=P, dtype=DT)
        st.kv.append(k, v)
        K = min(opts["top_k"], P)
        idx = torch.randperm(P, generator=torch.Generator().manual_seed(6))[:K].view(1, 1, K).expand(1, H, K)
        st.record(P - 1, idx.contiguous(), torch.ones(1, H, K, dtype=torch.bool))
    else:
        raise ValueError(name)
    return st


def functional_decode(name: str, P: int, per_run: int):
    mech = attnzoo.get(name)
    opts = dict(FUNCTIONAL[name])
    if name == "recycled":
        opts["start"] = P
    st = functional_state(name, P)
    nbytes = st.nbytes()
    q, k, v = _rand(1, H, 4096, D, seed=7), _rand(1, H, 4096, D, seed=8), _rand(1, H, 4096, D, seed=9)
    pos = [0]
    scale = 1 / math.sqrt(D)

    def run():
        with torch.no_grad():
            for _ in range(per_run):
                i = pos[0] % 4096
                sl = slice(i, i + 1)
                mech.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], st, scale=scale, **opts)
                pos[0] += 1

    return median_time(run, min_run_time=1.0, warmup=1) / per_run, nbytes


def module_decode(key: str, P: int, per_run: int):
    name, opts = MODULES[key]
    torch.manual_seed(0)
    layer = attnzoo.build(name, DIM, H, causal=True, **opts)
    st = layer.init_state(1)
    with torch.no_grad():
        if name == "softmax":  # the dense baseline's cache: only keys/values, no attention needed
            st.append(_rand(1, H, P, D, seed=1), _rand(1, H, P, D, seed=2))
        else:
            for i in range(0, P, 4096):
                layer(_rand(1, min(4096, P - i), DIM, seed=10 + i), state=st)
    nbytes = st.nbytes()
    x = _rand(1, 4096, DIM, seed=11)
    pos = [0]

    def run():
        with torch.no_grad():
            for _ in range(per_run):
                i = pos[0] % 4096
                layer(x[:, i : i + 1], state=st)
                pos[0] += 1

    return median_time(run, min_run_time=1.0, warmup=1) / per_run, nbytes


# --------------------------------------------------------------------------------------------------------
# Prefill forward + backward (cases rebuilt in a fresh process by peak_memory)
# --------------------------------------------------------------------------------------------------------
def _reset_peak() -> None:
    """Reset the process's peak-RSS counter (Linux ``clear_refs``) at the end of a case's set-up, so that
    ``peak_memory`` (peak after the run minus peak after set-up) sees what the run adds, not the
    transient peak of importing torch."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def prefill_functional(name: str, n: int):
    torch.set_num_threads(1)
    opts = {k: v for k, v in FUNCTIONAL[name].items()}
    if name == "landmark":
        opts["top_k"] = None  # the training form: grouped softmax over every block
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g, dtype=DT, requires_grad=True) for _ in range(3))

    def run():  # softmax: fused SDPA (its fast form)
        attnzoo.attention(q, k, v, mechanism=name, causal=True, backend="fast", **opts).sum().backward()

    _reset_peak()
    return run


def prefill_module(name: str, n: int):
    torch.set_num_threads(1)
    name, opts = MODULES[name]
    torch.manual_seed(0)
    layer = attnzoo.build(name, DIM, H, causal=True, **opts)
    x = torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(0), dtype=DT, requires_grad=True)

    def run():
        layer(x).sum().backward()

    _reset_peak()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--peaks-only", action="store_true", help="prefill: peak memory only, no timing")
    ap.add_argument("--only", nargs="+", default=None, help="measure only these mechanisms (beside their baseline)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    # glibc's dynamic mmap threshold keeps freed blocks resident, which inflates peak RSS unevenly across
    # cases; a fixed threshold returns them, so peaks reflect what a case really holds.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    prefixes = [256, 1024] if args.quick else [1024, 8192, 32768]
    n_prefill = 1024 if args.quick else 16384
    results = {"config": {"dtype": "float32", "batch": 1, "heads": H, "head_dim": D, "model_dim": DIM,
                          "threads": 1, "prefixes": prefixes, "prefill_n": n_prefill, "torch": torch.__version__},
               "decode": {}, "prefill": {}}

    # The machine is shared and its load drifts over minutes: every mechanism is timed right after its
    # dense baseline (same prefix), and its ratio is taken against that adjacent baseline.
    if not args.skip_decode:
        print(f"# decode: per-token time and state bytes (fp32, B=1, H={H}, d={D}; modules dim {DIM})", flush=True)
        for P in prefixes:
            for name in [n for n in list(FUNCTIONAL) + list(MODULES) if n not in ("softmax", "softmax_layer")
                         and (args.only is None or n in args.only)]:
                t0 = time.time()
                base_name = "softmax_layer" if name in MODULES else "softmax"
                measure = module_decode if name in MODULES else functional_decode
                base_sec, base_bytes = measure(base_name, P, PER_RUN.get(base_name, 100))
                sec, nbytes = measure(name, P, PER_RUN.get(name, 100))
                results["decode"].setdefault(name, {})[P] = {
                    "sec_per_token": sec, "state_bytes": nbytes, "dense_sec_per_token": base_sec,
                    "dense_state_bytes": base_bytes}
                print(f"{name:14s} P={P:6d}  {sec * 1e3:9.3f} ms/token ({sec / base_sec:6.2f}x dense "
                      f"{base_sec * 1e3:.3f})  state {nbytes / 2**20:9.2f} MiB ({nbytes / base_bytes:.3f}x)   "
                      f"({time.time() - t0:.0f} s)", flush=True)

    if not args.skip_prefill:
        print(f"# prefill: forward + backward at n = {n_prefill}", flush=True)
        peaks = {}
        for base_name, fn in (("softmax", "prefill_functional"), ("softmax_layer", "prefill_module")):
            peaks[base_name] = peak_memory(f"memory_perf:{fn}", {"name": base_name, "n": n_prefill}, threads=1,
                                           timeout=3600)
        cases = [("prefill_functional", n) for n in FUNCTIONAL if n != "softmax"]
        cases += [("prefill_module", k) for k in MODULES if k != "softmax_layer"]
        cases = [c for c in cases if args.only is None or c[1] in args.only]
        for fn, name in cases:
            t0 = time.time()
            base_name = "softmax_layer" if fn == "prefill_module" else "softmax"
            # one timed call each (no warm-up): at n = 16384 a call takes tens of seconds on this machine
            base_sec = sec = float("nan")
            if not args.peaks_only:
                base_sec = median_time(globals()[fn](base_name, n_prefill), min_run_time=0.1, warmup=0)
                sec = median_time(globals()[fn](name, n_prefill), min_run_time=0.1, warmup=0)
            peak = peak_memory(f"memory_perf:{fn}", {"name": name, "n": n_prefill}, threads=1, timeout=3600)
            results["prefill"][name] = {"sec": sec, "peak_bytes": peak, "dense_sec": base_sec,
                                        "dense_peak_bytes": peaks[base_name]}
            print(f"{name:14s} n={n_prefill}  {sec:9.2f} s ({sec / base_sec:6.2f}x dense {base_sec:.2f})  "
                  f"peak {peak / 2**20:9.1f} MiB ({peak / max(peaks[base_name], 1):.2f}x dense "
                  f"{peaks[base_name] / 2**20:.1f})   ({time.time() - t0:.0f} s)", flush=True)

    print()
    print(report(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def report(results) -> str:
    """Markdown tables; every ratio is against the dense baseline timed just before the mechanism."""
    lines = []
    dec = results["decode"]
    if dec:
        prefixes = results["config"]["prefixes"]
        lines.append("| decode (per token) | " + " | ".join(f"ms @{p} (x dense)" for p in prefixes) + " | "
                     + " | ".join(f"state MiB @{p} (x dense)" for p in prefixes) + " |")
        lines.append("|" + "---|" * (2 * len(prefixes) + 1))
        for name, row in dec.items():
            cells = []
            for p in prefixes:
                r = row[p]
                cells.append(f"{r['sec_per_token'] * 1e3:.2f} ({r['sec_per_token'] / r['dense_sec_per_token']:.2f}x)")
            for p in prefixes:
                r = row[p]
                cells.append(f"{r['state_bytes'] / 2**20:.2f} ({r['state_bytes'] / r['dense_state_bytes']:.3f}x)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        dense = {p: [] for p in prefixes}
        for row in dec.values():
            for p in prefixes:
                dense[p].append(row[p]["dense_sec_per_token"])
        lines.append("")
        lines.append("dense per-token time, median of its adjacent measurements: "
                     + ", ".join(f"@{p}: {sorted(v)[len(v) // 2] * 1e3:.2f} ms" for p, v in dense.items()))
    pre = results["prefill"]
    if pre:
        n = results["config"]["prefill_n"]
        lines.append("")
        lines.append(f"| prefill fwd+bwd n={n} | seconds | x dense | peak MiB | x dense |")
        lines.append("|---|---|---|---|---|")
        for name, row in pre.items():
            peak_ratio = row["peak_bytes"] / max(row["dense_peak_bytes"], 1)
            lines.append(f"| {name} | {row['sec']:.2f} | {row['sec'] / row['dense_sec']:.2f}x | "
                         f"{row['peak_bytes'] / 2**20:.0f} | {peak_ratio:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
