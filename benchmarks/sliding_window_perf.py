"""Issue 2 acceptance: sliding_window forward+backward vs dense SDPA causal, and its memory growth.

    python benchmarks/sliding_window_perf.py [--lengths 4096 16384 65536] [--window 256] [--threads 1]

fp32, B=1, H=8, d=64, causal. Times are medians (torch.utils.benchmark) measured in this run; peak
memory is measured per case in a fresh process. Reported as ratios against SDPA in the same run.
(To be folded into `attnzoo bench`.)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.bench.measure import median_time, peak_memory

HERE = os.path.dirname(os.path.abspath(__file__))


def case(kind: str, n: int, window: int, backward: bool = True):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64, requires_grad=backward) for _ in range(3))

    def run():
        if kind == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True, window=window)
        if backward:
            out.sum().backward()
            q.grad = k.grad = v.grad = None

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sdpa-max", type=int, default=16384, help="skip SDPA above this length (quadratic)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every case (timing and memory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, HERE)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, window {args.window}, "
          "fp32 B=1 H=8 d=64 causal")
    print("| n | SDPA fwd+bwd (s) | sliding_window fwd+bwd (s) | speedup | SDPA peak MB | sliding_window peak MB |")
    print("|---|---|---|---|---|---|")
    peaks = {}
    for n in args.lengths:
        sw = case("sliding_window", n, args.window)
        t_sw = median_time(sw, min_run_time=2.0)
        m_sw = peak_memory("sliding_window_perf:case", {"kind": "sliding_window", "n": n, "window": args.window},
                           threads=args.threads)
        peaks[n] = m_sw
        if n <= args.sdpa_max:
            t_sd = median_time(case("sdpa", n, args.window), min_run_time=2.0)
            m_sd = peak_memory("sliding_window_perf:case", {"kind": "sdpa", "n": n, "window": args.window},
                               threads=args.threads)
            print(f"| {n} | {t_sd:.3f} | {t_sw:.3f} | {t_sd / t_sw:.1f}x | {m_sd / 2**20:.0f} | {m_sw / 2**20:.0f} |")
        else:
            print(f"| {n} | (skipped) | {t_sw:.3f} | - | - | {m_sw / 2**20:.0f} |")
    ns = sorted(peaks)
    growth = ", ".join(f"{a} -> {b}: {peaks[b] / peaks[a]:.2f}x peak for {b / a:.0f}x tokens"
                       for a, b in zip(ns, ns[1:]))
    print(f"\nsliding_window peak-memory growth (linear = the token ratio): {growth}")


if __name__ == "__main__":
    main()
