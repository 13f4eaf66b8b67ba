"""Time of the dense-family mechanisms against dense SDPA attention measured in the same run.

    python benchmarks/dense_perf.py                 # n = 1024, forward and forward+backward, float32
    python benchmarks/dense_perf.py --n 256 --reference-all

Every module mechanism is compared with attnzoo's ``softmax`` layer (same dim/heads, its projections and
PyTorch's fused SDPA); the functional ``illama_soft_mask`` with ``attnzoo.attention(mechanism="softmax")``
on the same q/k/v; SpectFormer's grid mixer on a sqrt(n) x sqrt(n) grid with the softmax layer over the
same n tokens. Numbers are medians (attnzoo.bench.measure.median_time) and only meaningful as ratios to
the baseline of the same run. Reference forms that build an (N, N, d) tensor (complexformer, rcmha) are
skipped at large n unless --reference-all.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import attnzoo  # noqa: E402
from attnzoo.bench.measure import median_time  # noqa: E402

HEAVY_REFERENCE = {"complexformer", "rcmha"}  # reference materialises (B, H, N, N, d) or (N, N, H, d)


def module_case(name, dim, heads, n, causal, backend, options, train):
    torch.manual_seed(0)
    m = attnzoo.build(name, dim, heads, causal=causal, **options)
    if backend is not None:
        m.backend = backend
    x = torch.randn(1, n, dim, requires_grad=train)

    def run():
        out = m(x)
        if train:
            out.sum().backward()

    return run


def grid_case(dim, side, backend, train):
    torch.manual_seed(0)
    m = attnzoo.build("spectformer", dim, 1, height=side, width=side)
    m.backend = backend
    x = torch.randn(1, side, side, dim, requires_grad=train)

    def run():
        out = m(x)
        if train:
            out.sum().backward()

    return run


def functional_case(mechanism, n, heads, head_dim, causal, backend, options, train):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).requires_grad_(train) for _ in range(3))

    def run():
        out = attnzoo.attention(q, k, v, mechanism=mechanism, causal=causal, backend=backend, **options)
        if train:
            out.sum().backward()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--reference-all", action="store_true", help="also time the O(N^2 d)-memory references")
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args()
    n, dim, heads = args.n, args.dim, args.heads
    side = int(math.isqrt(n))
    modes = [("fwd", False)] + ([] if args.no_backward else [("fwd+bwd", True)])
    rows = []

    def measure(label, make):
        times = {}
        for mode, train in modes:
            t = median_time(make(train), min_run_time=args.min_run_time)
            rows.append((label, mode, t))
            times[mode] = t
            print(f"{label:58s} {mode:8s} {t * 1e3:9.2f} ms", flush=True)
        return times

    base = {}
    for causal in (False, True):
        label = f"BASELINE softmax layer (SDPA) {'causal' if causal else 'noncausal'}"
        times = measure(label, lambda tr, c=causal: module_case("softmax", dim, heads, n, c, None, {}, tr))
        base.update({(causal, mode): t for mode, t in times.items()})
    fbase = measure("BASELINE softmax functional noncausal",
                    lambda tr: functional_case("softmax", n, heads, dim // heads, False, "auto", {}, tr))

    ratios = []
    modules = [
        ("selective_attention", True, {"token_temperature": True, "value_temperature": True}),
        ("complexformer", True, {}),
        ("minimal_symmetric", True, {"qk": "symmetric", "value": "identity"}),
        ("minimal_symmetric", True, {"qk": "collapsed", "value": "identity"}),
        ("mqsa", True, {"long_window": 4, "short_window": 1}),
        ("rcmha", True, {}),
        ("gaam", False, {"axis": "features"}),
        ("gaam", False, {"axis": "tokens"}),
    ]
    for name, causal, opts in modules:
        backends = ["fast"] + (["reference"] if args.reference_all or name not in HEAVY_REFERENCE else [])
        for backend in backends:
            label = f"{name} {' '.join(f'{k}={v}' for k, v in opts.items())} [{backend}]"
            times = measure(label, lambda tr, nm=name, c=causal, o=opts, b=backend:
                            module_case(nm, dim, heads, n, c, b, o, tr))
            ratios += [(label, mode, t / base[(causal, mode)]) for mode, t in times.items()]
        if name in HEAVY_REFERENCE and not args.reference_all:
            print(f"{name} [reference] skipped: builds an (N, N, d)-sized tensor (use --reference-all)")
    for form in ("official", "mixture"):
        for backend in ("fast", "reference"):
            label = f"illama_soft_mask rate=0.5 form={form} [{backend}]"
            times = measure(label, lambda tr, f=form, b=backend: functional_case(
                "illama_soft_mask", n, heads, dim // heads, False, b, {"rate": 0.5, "form": f}, tr))
            ratios += [(label, mode, t / fbase[mode]) for mode, t in times.items()]
    for backend in ("fast", "reference"):
        label = f"spectformer grid {side}x{side} [{backend}]"
        times = measure(label, lambda tr, b=backend: grid_case(dim, side, b, tr))
        ratios += [(label, mode, t / base[(False, mode)]) for mode, t in times.items()]

    print(f"\nRatios to dense SDPA of the same run (n={n}, dim={dim}, heads={heads}, float32, "
          f"{torch.get_num_threads()} threads); > 1 = slower than SDPA:")
    for lab, mode, r in ratios:
        print(f"  {lab:58s} {mode:8s} x{r:7.2f}")


if __name__ == "__main__":
    main()
