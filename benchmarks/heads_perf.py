"""Head-level mechanisms: MoH compute saving and Sigma KV-cache size, against multi-head attention.

    PYTHONPATH=src python benchmarks/heads_perf.py            # fp32, N = 4096, B = 1, dim 512, 8 heads
    PYTHONPATH=src python benchmarks/heads_perf.py --quick    # N = 1024, one round (smoke run)

MoH (forward + backward, median of ``--rounds`` interleaved rounds of ``attnzoo.bench.measure.median_time``):
- ``mha``: attnzoo's softmax layer (PyTorch fused SDPA), the baseline.
- ``moh K/8``: MoH with no shared heads and K of the 8 routed heads active per token (50%, 75%), fast form
  (only the routed query rows of each head are attended), and ``moh 8/8`` (every head through the same routed
  path: separates the routing saving from the cost of the routed code path).
- ``core``: the attention alone (SDPA on all heads vs the routed rows), to give the attention-only ratio.
Ideal ratios: attention-only ``K / 8``; whole layer ``1 - (1 - K/8) * core_mha / layer_mha`` (the projections and the
router are not skipped). Sigma: KV-cache bytes after a 4096-token prefill, MHA / GQA / Sigma DiffQKV at dim 512,
8 query heads (Sigma-1.5B's 32:4:16 head ratio is 8:1:4 here).

Numbers are wall-clock on whatever machine runs this; report ratios to the same-run baseline only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.bench.measure import median_time
from attnzoo.mechanisms.heads._routing import gather_positions, routed_attention
from attnzoo.mechanisms.heads.moh import MixtureOfHeadsAttention
from attnzoo.mechanisms.heads.sigma_diffqkv import DiffQKVAttention


def moh_cases(n: int, dim: int, heads: int, causal: bool) -> dict:
    """name -> zero-argument forward+backward closure."""
    torch.manual_seed(0)
    x = torch.randn(1, n, dim, requires_grad=True)
    cases = {}
    mha = attnzoo.build("softmax", dim, heads, causal=causal)
    cases["mha"] = lambda: mha(x).sum().backward()
    hd = dim // heads
    q = torch.randn(1, heads, n, hd, requires_grad=True)
    k = torch.randn(1, heads, n, hd, requires_grad=True)
    v = torch.randn(1, heads, n, hd, requires_grad=True)
    cases["core mha"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    for K in (heads // 2, 3 * heads // 4, heads):
        m = MixtureOfHeadsAttention(dim, heads, shared_heads=0, routed_topk=K, causal=causal, backend="fast")
        cases[f"moh {K}/{heads}"] = (lambda m=m: m(x).sum().backward())
        if K == heads:
            continue
        with torch.no_grad():
            m(x)
        pos, valid = gather_positions(m.last_active)  # the router's real head assignment
        qr = q.detach().gather(2, pos.unsqueeze(-1).expand(1, heads, pos.shape[-1], hd)).requires_grad_(True)
        cases[f"core moh {K}/{heads}"] = (lambda qr=qr, pos=pos, valid=valid: routed_attention(
            qr, k, v, pos, valid, causal=causal, offset=0, key_padding_mask=None, scale=hd ** -0.5).sum().backward())
        cases[f"rows {K}/{heads}"] = (int(valid.sum(-1).max()), float(valid.sum()) / heads)
    return cases


def sigma_cache(n: int, dim: int, heads: int) -> list[dict]:
    rows = []
    x = torch.randn(1, n, dim)
    configs = [
        ("MHA (8 K, 8 V heads)", lambda: attnzoo.build("softmax", dim, heads, causal=True)),
        ("GQA (4 K, 4 V heads)", lambda: attnzoo.build("softmax", dim, heads, kv_heads=heads // 2, causal=True)),
        ("Sigma DiffQKV (1 K, 4 V heads)", lambda: DiffQKVAttention(dim, heads, key_heads=heads // 8,
                                                                    value_heads=heads // 2, causal=True)),
        ("Sigma DiffQKV + aug Q 768", lambda: DiffQKVAttention(dim, heads, key_heads=heads // 8,
                                                               value_heads=heads // 2, aug_q_dim=3 * dim // 2,
                                                               causal=True)),
        ("Sigma DiffQKV, K dim 32", lambda: DiffQKVAttention(dim, heads, key_heads=heads // 8,
                                                             value_heads=heads // 2, key_dim=dim // heads // 2,
                                                             causal=True)),
    ]
    for name, make in configs:
        layer = make()
        with torch.no_grad():
            state = layer.init_state(1)
            layer(x, state=state)
        rows.append({"layer": name, "cache_bytes": state.nbytes(),
                     "params": sum(p.numel() for p in layer.parameters())})
    base = rows[0]["cache_bytes"]
    for r in rows:
        r["vs_mha"] = r["cache_bytes"] / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds, args.min_run_time = 1024, 1, 0.2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# heads_perf: fp32, N={args.n}, B=1, dim={args.dim}, heads={args.heads}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    results = {"config": vars(args), "moh": {}, "sigma": None}
    for causal in (False, True):
        pattern = "causal_self" if causal else "noncausal_self"
        cases = moh_cases(args.n, args.dim, args.heads, causal)
        rows_info = {k: v for k, v in cases.items() if k.startswith("rows")}
        timed = {k: v for k, v in cases.items() if not k.startswith("rows")}
        times = {k: [] for k in timed}
        for _ in range(args.rounds):
            for name, fn in timed.items():
                times[name].append(median_time(fn, min_run_time=args.min_run_time))
        med = {k: statistics.median(v) for k, v in times.items()}
        results["moh"][pattern] = {"seconds": med, "rounds": times, "rows": rows_info}
        H = args.heads
        print(f"\n## MoH forward+backward, {pattern}\n")
        print("| case | time (s) | ratio to MHA | ideal ratio | attention-only ratio | ideal attention-only |")
        print("|---|---|---|---|---|---|")
        print(f"| MHA (SDPA) | {med['mha']:.3f} | 1.000 | 1.000 | 1.000 | 1.000 |")
        share = med["core mha"] / med["mha"]
        for K in (H // 2, 3 * H // 4, H):
            name = f"moh {K}/{H}"
            frac = K / H
            ideal = 1 - (1 - frac) * share
            core = med.get(f"core moh {K}/{H}")
            core_s = f"{core / med['core mha']:.3f}" if core is not None else "-"
            print(f"| MoH {K}/{H} heads ({100 * frac:.0f}%) | {med[name]:.3f} | {med[name] / med['mha']:.3f} | "
                  f"{ideal:.3f} | {core_s} | {frac:.3f} |")
        for k, (mx, mean) in rows_info.items():
            print(f"\n{k}: rows per head max {mx}, mean {mean:.0f} of {args.n} (padding to the busiest head)")
        print(f"attention share of the MHA layer time: {share:.2f}")
    print("\n## Sigma DiffQKV KV cache after a prefill of N tokens (fp32, B=1)\n")
    rows = sigma_cache(args.n, args.dim, args.heads)
    results["sigma"] = rows
    print("| layer | KV-cache bytes | ratio to MHA | parameters |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['cache_bytes']:,} | {r['vs_mha']:.4f} | {r['params']:,} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
