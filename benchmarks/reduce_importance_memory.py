"""Peak memory of token importance from q, K and the log-sum-exp vs materialising the n x n attention matrix
(attnzoo issue 16, acceptance: at n = 16384 the LSE row needs <= 1/20 of the matrix's memory).

    PYTHONPATH=src python benchmarks/reduce_importance_memory.py            # n = 4096 and 16384
    PYTHONPATH=src python benchmarks/reduce_importance_memory.py --quick    # n = 1024

fp32, B = 1, H = 2 heads, head dim 64, non-causal (a ViT's [CLS] row) and causal (an LM's last-token row), one
thread. Each case runs in a fresh process (``attnzoo.bench.measure.peak_memory``: the peak resident memory one call
adds above its set-up, i.e. above q, K, V already allocated):

- ``eager``: the [CLS]/last row taken from softmax(Q K^T * scale) materialised for all heads -- what
  ``output_attentions=True`` makes a model compute (the official FasterVLM/FastV route);
- ``lse_row``: ``attention_row`` for that one query from q, K and the LSE given by the forward
  (``sdpa_with_lse``, computed in the set-up, as a model's fused forward would have it);
- ``forward_and_row``: the fused forward that produces the LSE (``sdpa_with_lse``) plus the row: the whole cost of
  scoring under SDPA, which is O(n) memory per query as well.

The row's values are checked against the eager row at each n (max abs difference, float32). A peak of 0 means the
call stayed within memory the process already held (a (1, H, 1, n) row is below the allocator's mmap threshold at
n = 4096). Writes
``benchmarks/results/reduce/importance_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from attnzoo.bench.measure import environment, peak_memory
from attnzoo.kernels.sdpa import sdpa_with_lse
from attnzoo.reduce.importance import attention_row

H, D = 2, 64


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, n, D, generator=g) for _ in range(3))


def _row_index(n: int, causal: bool) -> int:
    return n - 1 if causal else 0


def case_eager(n: int, causal: bool):
    q, k, _ = _inputs(n)
    r = _row_index(n, causal)

    def run():
        s = q @ k.transpose(-1, -2) * D ** -0.5  # (1, H, n, n)
        if causal:
            s.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, dim=-1)[:, :, r].clone()

    return run


def case_lse_row(n: int, causal: bool):
    q, k, v = _inputs(n)
    r = _row_index(n, causal)
    _, lse = sdpa_with_lse(q, k, v, causal=causal, scale=D ** -0.5)

    def run():
        return attention_row(q[:, :, r:r + 1], k, rows=[r], nq=n, causal=causal, scale=D ** -0.5,
                             lse=lse[:, :, r:r + 1])

    return run


def case_forward_and_row(n: int, causal: bool):
    q, k, v = _inputs(n)
    r = _row_index(n, causal)

    def run():
        _, lse = sdpa_with_lse(q, k, v, causal=causal, scale=D ** -0.5)
        return attention_row(q[:, :, r:r + 1], k, rows=[r], nq=n, causal=causal, scale=D ** -0.5,
                             lse=lse[:, :, r:r + 1])

    return run


def check(n: int, causal: bool) -> float:
    """Max abs difference between the LSE row and the eager row (float32)."""
    a = case_eager(n, causal)()
    b = case_lse_row(n, causal)()[:, :, 0]
    return (a - b).abs().max().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "reduce"))
    a = p.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (here, os.environ.get("PYTHONPATH", "")) if x)
    torch.set_num_threads(1)
    lengths = [1024] if a.quick else [4096, 16384]
    rows = []
    for n in lengths:
        for causal in (False, True):
            peaks = {name: peak_memory(f"reduce_importance_memory:case_{name}", {"n": n, "causal": causal},
                                       threads=1, timeout=1800)
                     for name in ("eager", "lse_row", "forward_and_row")}
            diff = check(n, causal) if n <= 16384 else None
            row = {"n": n, "causal": causal, **{f"peak_{k}_bytes": v for k, v in peaks.items()},
                   "matrix_bytes": 4 * H * n * n, "ratio_lse_row": peaks["lse_row"] / peaks["eager"],
                   "ratio_forward_and_row": peaks["forward_and_row"] / peaks["eager"], "max_abs_diff": diff}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    os.makedirs(a.out, exist_ok=True)
    res = {"benchmark": "reduce_importance_memory", "heads": H, "head_dim": D, "dtype": "float32",
           "threads": 1, "rows": rows, "environment": environment(1)}
    with open(os.path.join(a.out, "importance_memory.json"), "w") as f:
        json.dump(res, f, indent=1)
    mib = 1 << 20
    lines = ["# Importance from q, K and the log-sum-exp vs the eager attention matrix", "",
             f"fp32, B = 1, H = {H}, head dim {D}, one row ([CLS] = row 0 non-causal, last token causal), 1 thread; "
             "peak resident memory one call adds in a fresh process (`attnzoo.bench.measure.peak_memory`).", "",
             "| n | causal | eager matrix (MiB) | LSE row (MiB) | ratio | fused forward + row (MiB) | ratio | "
             "max abs diff vs eager |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['causal']} | {r['peak_eager_bytes'] / mib:.1f} | "
                     f"{r['peak_lse_row_bytes'] / mib:.2f} | {r['ratio_lse_row']:.4f} | "
                     f"{r['peak_forward_and_row_bytes'] / mib:.2f} | {r['ratio_forward_and_row']:.4f} | "
                     f"{r['max_abs_diff']:.2e} |")
    with open(os.path.join(a.out, "importance_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
