"""Peak memory of streaming head statistics vs the dense attention matrix (attnzoo issue 17, acceptance: at
n = 32768 on SmolLM2-sized heads the streaming statistics need < 1/20 of the dense matrix; and they equal the dense
statistics in float64 at n = 512).

    PYTHONPATH=src python benchmarks/analysis_stats_memory.py            # n = 4096 (all cases) and 32768
    PYTHONPATH=src python benchmarks/analysis_stats_memory.py --quick    # n = 2048

SmolLM2-135M's attention shape: 9 query heads, 3 key/value heads, head dim 64, batch 1, float32, causal, one thread.
Statistics of every query row at n = 4096 and of every 16th row at n = 32768 (``--stride``; the chunks and so the
peak are those of a full pass, the time 1/16): entropy, sink mass (first 4 tokens), the mass on a 32-token
"needle", argmax, top-5 keys, mean distance and a distance histogram (powers of two). Each case runs in a fresh
process (``attnzoo.bench.measure.peak_memory``: the peak resident memory one call adds above its set-up, i.e. above
q, K, V -- and the LSE where the case takes it as given):

- ``stats``: :func:`attnzoo.analysis.stats.head_statistics` from q, K and the LSE of the forward (computed in the
  set-up by ``sdpa_with_lse``, as a model's fused forward would have it);
- ``forward_and_stats``: the fused forward that produces the LSE (``sdpa_with_lse``) plus the statistics;
- ``eager`` (n <= 4096 only: at 32768 the matrix is 36 GiB): the dense weights (``softmax_weights``) and the same
  statistics from them (``weight_statistics``) -- the ``output_attentions=True`` route.

``matrix_bytes`` is the dense (1, 9, n, n) float32 matrix the streaming pass never forms; ``ratio`` = peak / matrix.
The equality check at n = 512 (float64, causal, key padding, grouped heads) reports the largest relative error of
the statistics and whether argmax / top-k indices are identical. Writes
``benchmarks/results/analysis/stats_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from attnzoo.analysis.stats import dense_bytes, head_statistics, weight_statistics
from attnzoo.bench.measure import environment, peak_memory
from attnzoo.kernels.sdpa import sdpa_with_lse
from attnzoo.reference import softmax_weights

HQ, HK, D = 9, 3, 64  # SmolLM2-135M
SCALE = D ** -0.5


def _inputs(n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HQ, n, D, generator=g).to(dtype)
    k = torch.randn(1, HK, n, D, generator=g).to(dtype)
    v = torch.randn(1, HK, n, D, generator=g).to(dtype)
    return q, k, v


def _kwargs(n: int) -> dict:
    bins = [0] + [2 ** i for i in range(n.bit_length())]
    return {"causal": True, "scale": SCALE, "sink": 4, "topk": 5, "sets": {"needle": list(range(n // 3, n // 3 + 32))},
            "distance_bins": bins}


def _rows(n: int, stride: int) -> torch.Tensor:
    """Every ``stride``-th query row, ending at the last one (whose row sees every key)."""
    return torch.arange(n - 1, -1, -stride).flip(0)


def case_stats(n: int, stride: int = 1):
    q, k, v = _inputs(n)
    _, lse = sdpa_with_lse(q, k, v, causal=True, scale=SCALE)
    kw = _kwargs(n)
    rows = _rows(n, stride)

    def run():
        return head_statistics(q[:, :, rows], k, rows=rows, nq=n, lse=lse[:, :, rows], **kw)

    return run


def case_forward_and_stats(n: int, stride: int = 1):
    q, k, v = _inputs(n)
    kw = _kwargs(n)
    rows = _rows(n, stride)

    def run():
        out, lse = sdpa_with_lse(q, k, v, causal=True, scale=SCALE)
        return out, head_statistics(q[:, :, rows], k, rows=rows, nq=n, lse=lse[:, :, rows], **kw)

    return run


def case_eager(n: int):
    q, k, _ = _inputs(n)
    kw = _kwargs(n)
    kw.pop("causal"), kw.pop("scale")

    def run():
        w = softmax_weights(q, k, causal=True, scale=SCALE)  # (1, 9, n, n)
        return weight_statistics(w, **kw)

    return run


def equality_check(n: int = 512) -> dict:
    """Streaming vs dense statistics, float64, causal, a padded batch row, grouped heads."""
    q, k, v = (torch.cat([t, t.flip(2)]) for t in _inputs(n, torch.float64))
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, n - 100:] = False
    kw = _kwargs(n)
    stream = head_statistics(q, k, key_padding_mask=kpm, budget=8 << 20, **kw)
    kw.pop("causal"), kw.pop("scale")
    dense = weight_statistics(softmax_weights(q, k, causal=True, scale=SCALE, key_padding_mask=kpm), **kw)
    worst = 0.0
    a, b = stream.as_dict(), dense.as_dict()
    for key in a:
        if key in ("argmax", "topk_indices", "rows"):
            continue
        x, y = a[key].double(), b[key].double()
        worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-300)))
    return {"n": n, "max_rel_err": worst, "argmax_equal": bool(torch.equal(a["argmax"], b["argmax"])),
            "topk_indices_equal": bool(torch.equal(a["topk_indices"], b["topk_indices"]))}


def write_markdown(res: dict, out: str) -> None:
    mib = 1 << 20
    eq = res["equality"]
    lines = ["# Streaming head statistics vs the dense attention matrix", "",
             f"SmolLM2-sized heads ({HQ} query / {HK} key-value heads, head dim {D}), float32, causal, batch 1, one "
             "thread; per reported query row: entropy, sink mass, needle mass, argmax, top-5, mean distance, "
             "distance histogram. Peak = resident memory one call adds above its set-up, fresh process each "
             "(`python benchmarks/analysis_stats_memory.py`). At n = 32768 every 16th query row is reported: the "
             "rows are formed in the same chunks as a full pass, so the peak is a full pass's, at 1/16 of the time.",
             "",
             f"Equality at n = {eq['n']} (float64, causal, key padding, GQA): max relative error "
             f"{eq['max_rel_err']:.1e}; argmax identical: {eq['argmax_equal']}; top-k indices identical: "
             f"{eq['topk_indices_equal']}.", "",
             "| n | case | rows reported | peak (MiB) | dense matrix (MiB) | peak / matrix | time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        rep = "all" if r["row_stride"] == 1 else f"every {r['row_stride']}th"
        lines.append(f"| {r['n']} | {r['case']} | {rep} | {r['peak_bytes'] / mib:.1f} | "
                     f"{r['matrix_bytes'] / mib:.0f} | {r['ratio']:.4f} | {r['seconds']} |")
    lines += ["", f"Load average at the end of the run: {' '.join(res['loadavg_at_end'])} (2 cores shared with other "
              "jobs: times are noisy, memory is not)."]
    with open(os.path.join(out, "stats_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--stride", type=int, default=16, help="query-row stride at n = 32768 (1: every row)")
    p.add_argument("--render", action="store_true", help="only rewrite stats_memory.md from stats_memory.json")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "analysis"))
    a = p.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (here, os.environ.get("PYTHONPATH", "")) if x)
    torch.set_num_threads(1)
    # (n, cases, row stride): at n = 32768 the statistics of every 16th query row (2048 rows, each over all the
    # keys it sees, the last row over all 32768): the same chunks as every row -- the peak does not depend on how
    # many rows are reported -- at 1/16 of the time (one full pass is ~5e11 multiply-adds on one thread)
    plan = [(2048, ("eager", "stats", "forward_and_stats"), 1)] if a.quick else \
        [(4096, ("eager", "stats", "forward_and_stats"), 1), (32768, ("stats", "forward_and_stats"), a.stride)]
    if a.render:  # rewrite the .md from the committed .json
        with open(os.path.join(a.out, "stats_memory.json")) as f:
            write_markdown(json.load(f), a.out)
        return 0
    check = equality_check()
    print(json.dumps(check), file=sys.stderr)
    rows = []
    for n, cases, stride in plan:
        for name in cases:
            t0 = time.time()
            kw = {"n": n} if name == "eager" else {"n": n, "stride": stride}
            peak = peak_memory(f"analysis_stats_memory:case_{name}", kw, threads=1, timeout=4 * 3600)
            row = {"n": n, "case": name, "row_stride": 1 if name == "eager" else stride, "peak_bytes": peak,
                   "matrix_bytes": dense_bytes(1, HQ, n),
                   "ratio": peak / dense_bytes(1, HQ, n), "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    os.makedirs(a.out, exist_ok=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    res = {"benchmark": "analysis_stats_memory", "heads": HQ, "kv_heads": HK, "head_dim": D, "dtype": "float32",
           "threads": 1, "equality": check, "rows": rows, "loadavg_at_end": load, "environment": environment(1)}
    with open(os.path.join(a.out, "stats_memory.json"), "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(res, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
