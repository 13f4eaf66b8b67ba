"""Issue 4 acceptance (1-D local attention): neighborhood_1d / sliding_window vs dense SDPA and the
`local-attention` package, plus S2-Attention and MoA at the same size.

    python benchmarks/local_seq_perf.py [--n 16384] [--window 256] [--skip-memory] [--cases ...]

fp32, B=1, H=8, d=64, causal. Forward (under torch.no_grad) and forward+backward (sum().backward()).
Times are medians (attnzoo.bench.measure.median_time, torch.utils.benchmark) measured in this run; peak memory
is measured per case in a fresh process (attnzoo.bench.measure.peak_memory: peak RSS added by one call above
its set-up). Everything is reported as a ratio against SDPA causal measured in the same run.

Baselines:
- sdpa_causal: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) (fused flash kernel).
- sdpa_mask: the same SDPA with the equivalent dense bool mask (the window band, N x N).
- local_attention_pkg: lucidrains' `local-attention` 1.11.2 (pip install local-attention==1.11.2 --no-deps;
  deps einops, hyper-connections), configured as
  ``LocalAttention(window_size=W, causal=True, look_backward=1, look_forward=0, exact_windowsize=True,
  autopad=False, dropout=0.0)`` without rotary embeddings (no ``dim`` given) and the same default scale
  d^-0.5, called on (1, 8, N, 64) tensors. With exact_windowsize it masks keys with p - j > W, so each query sees
  W + 1 keys (its bucket and the previous one, trimmed to the exact band): the same mask as attnzoo's causal
  window W + 1. The script checks that both give the same output before timing, and times attnzoo with
  window W + 1 against it ("sliding_window (W+1)"), besides the W rows.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.bench.measure import median_time, peak_memory
from attnzoo.masks import materialize, sliding_window
from attnzoo.testing import rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
B, H, D = 1, 8, 64

# MoA plan used here: 8 heads with spans from 128 to 2048 (sinks 64), i.e. windows 64 .. 1984.
MOA_ALPHAS = (128, 256, 256, 512, 512, 1024, 1024, 2048)


def _inputs(n: int, backward: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g).requires_grad_(backward) for _ in range(3))


def forward_fn(kind: str, n: int, window: int):
    """The forward computation of case ``kind`` as a function of (q, k, v)."""
    if kind == "sdpa_causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if kind == "sdpa_mask":
        mask = materialize(sliding_window(window, causal=True), 1, 1, n, n)  # (1, 1, N, N) bool
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if kind == "local_attention_pkg":
        from local_attention import LocalAttention

        peer = LocalAttention(window_size=window, causal=True, look_backward=1, look_forward=0,
                              exact_windowsize=True, autopad=False, dropout=0.0)
        return lambda q, k, v: peer(q, k, v)
    if kind == "sliding_window":
        return lambda q, k, v: attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True, window=window)
    if kind == "sliding_window_plus1":  # the peer's exact mask: W + 1 keys
        return lambda q, k, v: attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True,
                                                 window=window + 1)
    if kind == "neighborhood_1d":
        return lambda q, k, v: attnzoo.attention(q, k, v, mechanism="neighborhood_1d", causal=True,
                                                 kernel_size=window)
    if kind == "s2_attention":  # Phi-3-small's pattern: blocks of 64, 16 local blocks, vertical stride 8
        return lambda q, k, v: attnzoo.attention(q, k, v, mechanism="s2_attention", causal=True, block_size=64,
                                                 local_blocks=16, vert_stride=8)
    if kind == "moa":
        return lambda q, k, v: attnzoo.attention(q, k, v, mechanism="moa", causal=True, alphas=MOA_ALPHAS, sinks=64)
    raise ValueError(f"kind: unknown case {kind!r}")


def case(kind: str, n: int, window: int, backward: bool):
    """Zero-argument closure for timing / peak memory (attnzoo.bench.measure)."""
    q, k, v = _inputs(n, backward)
    fn = forward_fn(kind, n, window)

    def run():
        if backward:
            fn(q, k, v).sum().backward()
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                fn(q, k, v)

    return run


LABELS = {
    "sdpa_causal": "SDPA is_causal=True (dense)",
    "sdpa_mask": "SDPA + dense bool window mask",
    "local_attention_pkg": "local-attention 1.11.2 (W exact, look_backward=1)",
    "sliding_window": "attnzoo sliding_window (W)",
    "sliding_window_plus1": "attnzoo sliding_window (W+1 = peer's mask)",
    "neighborhood_1d": "attnzoo neighborhood_1d causal (kernel W)",
    "s2_attention": "attnzoo s2_attention (b=64, local 16, stride 8)",
    "moa": "attnzoo moa (8 heads, spans 128..2048, sinks 64)",
}
DEFAULT_CASES = list(LABELS)


def correctness_gate(window: int) -> None:
    """Same outputs before any number: peer vs attnzoo (W+1), NA vs sliding window, ours vs SDPA + mask."""
    n = 4 * window
    q, k, v = _inputs(n, False, seed=1)
    with torch.no_grad():
        ours = forward_fn("sliding_window_plus1", n, window)(q, k, v)
        peer = forward_fn("local_attention_pkg", n, window)(q, k, v)
        na = forward_fn("neighborhood_1d", n, window)(q, k, v)
        sw = forward_fn("sliding_window", n, window)(q, k, v)
        dense = forward_fn("sdpa_mask", n, window)(q, k, v)
    checks = {"local-attention vs attnzoo window W+1": rel_err(peer, ours),
              "neighborhood_1d (causal, kernel W) vs sliding_window W": rel_err(na, sw),
              "sliding_window W vs SDPA + mask": rel_err(sw, dense)}
    for what, err in checks.items():
        print(f"  gate: {what}: rel err {err:.1e}")
        if not err < 1e-5:
            raise SystemExit(f"correctness gate failed: {what}: rel err {err:.3e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=DEFAULT_CASES)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--min-run-time", type=float, default=2.0)
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, HERE)
    import local_attention  # noqa: F401  (fail early if the peer is missing)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32 B={B} H={H} d={D} causal, "
          f"N={args.n}, W={args.window}")
    correctness_gate(args.window)
    rows = {}
    for kind in args.cases:
        for backward in (False, True):
            t = median_time(case(kind, args.n, args.window, backward), min_run_time=args.min_run_time)
            mem = None
            if not args.skip_memory:
                mem = peak_memory("local_seq_perf:case", {"kind": kind, "n": args.n, "window": args.window,
                                                          "backward": backward})
            rows[(kind, backward)] = (t, mem)
            print(f"  measured {kind} {'fwd+bwd' if backward else 'fwd'}: {t:.3f} s", flush=True)
    base = {bw: rows.get(("sdpa_causal", bw)) for bw in (False, True)}
    peer = {bw: rows.get(("local_attention_pkg", bw)) for bw in (False, True)}
    print()
    print("| case | fwd (s) | fwd+bwd (s) | fwd+bwd speedup vs SDPA causal | fwd+bwd speedup vs local-attention "
          "| fwd speedup vs local-attention | peak MB fwd | peak MB fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.cases:
        (tf, mf), (tb, mb) = rows[(kind, False)], rows[(kind, True)]
        sp = f"{base[True][0] / tb:.1f}x" if base[True] else "-"
        pb = f"{peer[True][0] / tb:.1f}x" if peer[True] else "-"
        pf = f"{peer[False][0] / tf:.1f}x" if peer[False] else "-"
        mfs = "-" if mf is None else f"{mf / 2**20:.0f}"
        mbs = "-" if mb is None else f"{mb / 2**20:.0f}"
        print(f"| {LABELS[kind]} | {tf:.3f} | {tb:.3f} | {sp} | {pb} | {pf} | {mfs} | {mbs} |")


if __name__ == "__main__":
    main()
