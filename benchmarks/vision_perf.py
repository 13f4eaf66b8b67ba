"""ECA-Net: attnzoo's ``eca`` module against the official ``eca_layer``, forward + backward, in the same run.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/vision_perf.py              # (32, 256, 56, 56) fp32
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/vision_perf.py --quick      # (8, 256, 28, 28), one round

Cases (forward + backward of ``sum(out * g)`` w.r.t. the input and the kernel, median of ``--rounds`` interleaved
rounds of ``attnzoo.bench.measure.time_call``, which re-measures while other processes hold the cores):
- ``official eca_layer``: BangguWu/ECANet ``models/eca_module.py``, written out below (AdaptiveAvgPool2d, Conv1d
  over channels, sigmoid, ``x * y.expand_as(x)``), the baseline;
- ``attnzoo eca``: ``attnzoo.build("eca", C, 1)`` with the same weights (outputs checked equal first);
- ``attnzoo eca, channels_last memory``: the same module on the input in ``torch.channels_last`` memory format;
- ``official eca_layer, channels_last memory``: the baseline on that input.
The acceptance ratio is attnzoo / official on the (B, C, H, W) contiguous input (target <= 1.2). Writes
``benchmarks/results/vision_perf.{json,md}`` (``--out`` to change). Wall-clock numbers depend on the machine; only the
ratios to the same-run baseline mean something.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch import nn

import attnzoo
from attnzoo.bench.measure import environment, time_call


class OfficialEcaLayer(nn.Module):
    """``eca_layer`` of https://github.com/BangguWu/ECANet, written out from its source."""

    def __init__(self, channel, k_size=3):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = self.avg_pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        y = self.sigmoid(y)
        return x * y.expand_as(x)


def cases(shape: tuple[int, int, int, int]) -> dict:
    B, C, H, W = shape
    torch.manual_seed(0)
    ours = attnzoo.build("eca", C, 1)
    official = OfficialEcaLayer(C, ours.kernel_size)
    official.load_state_dict(ours.state_dict())
    x = torch.randn(*shape)
    xl = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(*shape)
    with torch.no_grad():
        err = (ours(x) - official(x)).abs().max().item()
    if err > 1e-5:
        raise AssertionError(f"attnzoo eca differs from the official eca_layer by {err:.2e}")

    def fwd_bwd(module, inp):
        inp = inp.detach().requires_grad_(True)

        def run():
            inp.grad = None
            module.zero_grad(set_to_none=True)
            module(inp).backward(g)

        return run

    return {
        "official eca_layer": fwd_bwd(official, x),
        "attnzoo eca": fwd_bwd(ours, x),
        "official eca_layer, channels_last memory": fwd_bwd(official, xl),
        "attnzoo eca, channels_last memory": fwd_bwd(ours, xl),
    }, {"kernel_size": ours.kernel_size, "max_abs_diff": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[32, 256, 56, 56])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=3.0)
    ap.add_argument("--out", default="benchmarks/results/vision_perf")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.shape, args.rounds, args.min_run_time = [8, 256, 28, 28], 1, 0.3
    threads = torch.get_num_threads()
    load0 = os.getloadavg()
    print(f"# vision_perf: ECA fwd+bwd, fp32, shape {tuple(args.shape)}, torch {torch.__version__}, threads={threads}, "
          f"load average {load0[0]:.1f} on {os.cpu_count()} cores")
    fns, info = cases(tuple(args.shape))
    times: dict[str, list[float]] = {k: [] for k in fns}
    others: dict[str, list] = {k: [] for k in fns}
    for r in range(args.rounds):
        for name, fn in fns.items():
            t = time_call(fn, min_run_time=args.min_run_time, warmup=2, threads=threads)
            times[name].append(t.median)
            others[name].append(t.other_cpu)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()))
        sys.stdout.flush()
    med = {k: statistics.median(v) for k, v in times.items()}
    base, base_cl = med["official eca_layer"], med["official eca_layer, channels_last memory"]
    ratio = med["attnzoo eca"] / base
    per_round = [a / b for a, b in zip(times["attnzoo eca"], times["official eca_layer"])]
    rows = [
        ("official eca_layer", med["official eca_layer"], 1.0),
        ("attnzoo eca", med["attnzoo eca"], ratio),
        ("official eca_layer, channels_last memory", base_cl, base_cl / base),
        ("attnzoo eca, channels_last memory", med["attnzoo eca, channels_last memory"],
         med["attnzoo eca, channels_last memory"] / base),
    ]
    load1 = os.getloadavg()
    lines = [
        f"# ECA forward + backward, fp32, shape {tuple(args.shape)}",
        "",
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} PYTHONPATH=src python benchmarks/vision_perf.py` "
        f"(torch {torch.__version__}, {threads} thread(s), {args.rounds} interleaved rounds, median of rounds; "
        f"load average {load0[0]:.1f} before, {load1[0]:.1f} after, on {os.cpu_count()} cores). "
        f"Kernel size {info['kernel_size']}; outputs equal to the official eca_layer (max abs diff "
        f"{info['max_abs_diff']:.1e}).",
        "",
        "| case | fwd+bwd (ms) | ratio to official eca_layer |",
        "|---|---|---|",
        *[f"| {name} | {t * 1e3:.1f} | {r:.3f} |" for name, t, r in rows],
        "",
        f"attnzoo / official per round: {', '.join(f'{r:.3f}' for r in per_round)} (target <= 1.2: "
        f"{'met' if ratio <= 1.2 else 'NOT met'}, median {ratio:.3f}).",
        "",
    ]
    print("\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines))
        with open(args.out + ".json", "w") as f:
            json.dump({"config": vars(args), "info": info, "seconds": med, "rounds": times, "other_cpu": others,
                       "ratio": ratio, "per_round_ratio": per_round, "load_average": [load0, load1],
                       "environment": environment(threads)}, f, indent=1)


if __name__ == "__main__":
    main()
