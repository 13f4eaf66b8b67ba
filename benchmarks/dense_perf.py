"""Time of the dense-family mechanisms against dense SDPA attention measured in the same run.

    python benchmarks/dense_perf.py                 # n = 1024, forward and forward+backward, float32
    python benchmarks/dense_perf.py --n 256 --reference-all

Every module mechanism is compared with attnzoo's ``softmax`` layer (same dim/heads, its projections and
PyTorch's fused SDPA); the functional ``illama_soft_mask`` with ``attnzoo.attention(mechanism="softmax")``
on the same q/k/v; SpectFormer's grid mixer on a sqrt(n) x sqrt(n) grid with the softmax layer over the
same n tokens. Numbers are medians (attnzoo.bench.measure.median_time) and only meaningful as ratios to
the baseline, which is measured alternately with each case (--rounds times; the median ratio is kept)
because the machine may be shared. Reference forms that build an (N, N, d) tensor (complexformer, rcmha)
or sum every grid shift (spectformer) are skipped unless --reference-all.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="baseline/case alternations; the median ratio is kept")
    ap.add_argument("--min-run-time", type=float, default=0.3)
    ap.add_argument("--reference-all", action="store_true",
                    help="also time the references that build (N, N, d) tensors or loop over every grid shift")
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, dim, heads = args.n, args.dim, args.heads
    side = int(math.isqrt(n))
    modes = [("fwd", False)] + ([] if args.no_backward else [("fwd+bwd", True)])
    results = []

    def paired(label, make_case, make_base):
        """Alternate baseline and case ``rounds`` times (a shared machine drifts); median ratio."""
        for mode, train in modes:
            case, base = make_case(train), make_base(train)
            tc, tb = [], []
            for _ in range(args.rounds):
                tb.append(median_time(base, min_run_time=args.min_run_time))
                tc.append(median_time(case, min_run_time=args.min_run_time))
            ratio = statistics.median(c / b for c, b in zip(tc, tb))
            results.append((label, mode, statistics.median(tc), statistics.median(tb), ratio))
            print(f"{label:58s} {mode:8s} {statistics.median(tc) * 1e3:9.2f} ms  "
                  f"(SDPA {statistics.median(tb) * 1e3:8.2f} ms)  x{ratio:6.2f}", flush=True)

    layer_base = {c: (lambda tr, c=c: module_case("softmax", dim, heads, n, c, None, {}, tr)) for c in (False, True)}
    func_base = lambda tr: functional_case("softmax", n, heads, dim // heads, False, "auto", {}, tr)
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
            paired(label, lambda tr, nm=name, c=causal, o=opts, b=backend: module_case(nm, dim, heads, n, c, b, o, tr),
                   layer_base[causal])
        if name in HEAVY_REFERENCE and not args.reference_all:
            print(f"{name} [reference] skipped: builds an (N, N, d)-sized tensor (use --reference-all)")
    for form in ("official", "mixture"):
        for backend in ("fast", "reference"):
            paired(f"illama_soft_mask rate=0.5 form={form} [{backend}]",
                   lambda tr, f=form, b=backend: functional_case("illama_soft_mask", n, heads, dim // heads, False,
                                                                 b, {"rate": 0.5, "form": f}, tr), func_base)
    for backend in ["fast"] + (["reference"] if args.reference_all else []):
        paired(f"spectformer grid {side}x{side} [{backend}]", lambda tr, b=backend: grid_case(dim, side, b, tr),
               layer_base[False])
    if not args.reference_all:
        print("spectformer [reference] skipped: sums H*W shifted copies, O((HW)^2 C) (use --reference-all)")

    print(f"\nMedian ratio to dense SDPA measured alternately in the same run (n={n}, dim={dim}, heads={heads}, "
          f"float32, {args.threads} thread(s)); > 1 = slower than SDPA. Baselines: the softmax layer for modules "
          f"and the grid mixer, attnzoo.attention(mechanism='softmax') for illama_soft_mask.")
    for label, mode, _, _, r in results:
        print(f"  {label:58s} {mode:8s} x{r:6.2f}")


if __name__ == "__main__":
    main()
