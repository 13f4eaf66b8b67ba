"""``attnzoo analyze``: the command line of the analysis package (``attnzoo.cli`` hands ``attnzoo analyze ...`` here).

    attnzoo analyze smollm2 --what retrieval-heads,sinks          # real models: smollm2, minilm, dinov2, whisper
    attnzoo analyze smollm2 --what retrieval-heads --mechanism sink_window --option window=256 --option sinks=4
    attnzoo analyze whisper --what alignment                      # cross-attention alignment heads -> word times
    attnzoo analyze hip --what maps                               # a mechanism's effective operator
    attnzoo analyze icl                                           # P037 in-context regression structure
    attnzoo analyze operators                                     # every mechanism's operator vs its reference
    attnzoo analyze all --out benchmarks/results/analysis         # the full report of issue 17
    attnzoo analyze report --out DIR                               # re-render DIR/results.json (+ memory results)

Each run writes PNG figures, results.json, summary.md and a self-contained report.html into ``--out`` (default
``analysis-out``), with a progress bar on stderr (``--no-progress`` to silence it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..errors import AttnzooError
from .run import MODELS, SUPPORTED, WHAT

SPECIAL = ("all", "icl", "operators", "report")

MOA_SPANS = (16, 32, 64, 128, 16, 32, 64, 128, 256)  # one span per SmolLM2 query head: MoA's heterogeneous windows

# The full report (``attnzoo analyze all``): (target, what, mechanism, options, reduced)
FULL_PLAN: tuple[tuple[str, tuple[str, ...], str, dict[str, Any], bool], ...] = (
    ("smollm2", SUPPORTED["smollm2"], "softmax", {}, False),
    ("smollm2", ("retrieval-heads", "sinks"), "sink_window", {"window": 256, "sinks": 4}, True),
    ("smollm2", ("retrieval-heads",), "hip", {}, True),
    ("smollm2", ("maps", "importance"), "moa", {"alphas": MOA_SPANS, "betas": 0.0, "sinks": 4}, True),
    ("minilm", ("importance", "maps", "sinks"), "softmax", {}, False),
    ("dinov2", ("importance", "maps", "sinks"), "softmax", {}, False),
    ("dinov2", ("maps",), "agent", {"agents": 16}, True),
    ("whisper", ("alignment",), "softmax", {}, False),
)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise AttnzooError(f"--option: expected NAME=VALUE (e.g. window=256), got {item!r}")
        out[key] = _parse_value(value)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnzoo analyze", description="Attention analysis on real models and on any "
                                "mechanism's effective operator (retrieval heads, sinks and calibration, head "
                                "importance, attention maps and flow).")
    p.add_argument("target", help=f"a model ({', '.join(MODELS)}), a registered functional mechanism, or one of "
                                  f"{list(SPECIAL)}")
    p.add_argument("--what", default="all", help=f"comma-separated sections among {list(WHAT)} (default: every "
                                                 "section the target has)")
    p.add_argument("--mechanism", default="softmax", help="run the model's attention through this attnzoo mechanism")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="an option of --mechanism "
                   "(or of the target mechanism); repeatable")
    p.add_argument("--out", default="analysis-out", help="output directory (default: analysis-out)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke runs, tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--memory-results", default=None, help="stats_memory.json of benchmarks/analysis_stats_memory.py "
                   "to include (default: benchmarks/results/analysis/stats_memory.json when it exists)")
    return p


def _sections(target_kind: str, what: str) -> list[str]:
    if what == "all":
        return list(SUPPORTED[target_kind])
    out = [w.strip() for w in what.split(",") if w.strip()]
    bad = [w for w in out if w not in WHAT]
    if bad:
        raise AttnzooError(f"--what: unknown section {bad[0]!r}; expected some of {list(WHAT)} or 'all'")
    return out


ICL_RUNS = ((2, 0), (2, 1), (2, 2), (4, 0))  # (heads, seed) of the full report; 8000 Adam steps each


def run_icl(out_dir: str, *, quick: bool, progress=None) -> dict[str, Any]:
    """P037: train one-layer multi-head softmax attention on in-context linear regression for each (heads, seed) and
    measure the KQ / OV structure."""
    from . import plots
    from .icl import ICLTask, baselines, structure, train_icl

    task = ICLTask(d=5, n=20, noise=0.0)
    steps, lr = (200, 3e-2) if quick else (8000, 3e-2)
    runs, figs = [], []
    for heads, seed in (ICL_RUNS[:1] if quick else ICL_RUNS):
        if progress is not None:
            progress.message(f"ICL regression: {heads} heads, seed {seed}, {steps} steps")
        model, curve = train_icl(task, heads=heads, steps=steps, lr=lr, seed=seed, progress=progress)
        base = baselines(task, model)
        runs.append({"heads": heads, "seed": seed, "structure": structure(model), "baselines": base,
                     "final_loss": sum(curve[-50:]) / min(50, len(curve))})
        path = plots.curve(curve, os.path.join(out_dir, f"icl_loss_h{heads}_s{seed}.png"),
                           title=f"ICL regression, {heads} heads, seed {seed}: training loss", ylabel="MSE",
                           hlines={"one-step GD": base["one_step_gd"], "zero": base["zero"]})
        figs.append({"file": os.path.basename(path), "title": f"ICL regression (P037), {heads} heads, seed {seed}",
                     "caption": "Training MSE of one-layer multi-head softmax attention on fresh prompts, beside the "
                                "optimal one-step gradient-descent predictor and the zero predictor."})
    return {"task": {"d": task.d, "n": task.n, "noise": task.noise}, "steps": steps, "lr": lr, "runs": runs,
            "figures": figs}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv or []))
    import torch

    from ..bench.measure import environment
    from ..bench.runner import Progress
    from .report import SCHEMA, render
    from .run import analyze, target_kind

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    mem = args.memory_results or os.path.join("benchmarks", "results", "analysis", "stats_memory.json")
    if args.target == "report":
        src = os.path.join(args.out, "results.json")
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src}: no results to re-render (run `attnzoo analyze ... --out {args.out}`)")
        with open(src) as f:
            doc = json.load(f)
        if os.path.exists(mem):
            with open(mem) as f:
                doc["memory"] = json.load(f)
        print(f"attnzoo analyze: wrote {', '.join(render(doc, args.out))}", file=sys.stderr)
        return 0
    options = parse_options(args.option)
    progress = Progress(not args.no_progress)
    progress.total(None)  # steps are counted as they come (model forwards, calibrated heads, training steps)
    command = "attnzoo analyze " + " ".join(list(argv or []))
    doc: dict[str, Any] = {"schema": SCHEMA, "command": command, "environment": environment(args.threads),
                           "runs": []}
    t0 = time.time()
    try:
        if args.target in ("all", "operators"):
            from .operator import operator_table

            progress.message("effective operators of the registry")
            doc["operators"] = operator_table()
        if args.target == "all":
            cache: dict[str, Any] = {}
            for target, what, mech, opts, reduced in FULL_PLAN:
                doc["runs"].append(analyze(target, list(what), out_dir=args.out, mechanism=mech, options=opts,
                                           quick=args.quick, reduced=reduced, progress=progress, cache=cache))
        if args.target in ("all", "icl"):
            doc["icl"] = run_icl(args.out, quick=args.quick, progress=progress)
        if args.target not in SPECIAL:
            what = _sections(target_kind(args.target), args.what)
            doc["runs"].append(analyze(args.target, what, out_dir=args.out, mechanism=args.mechanism,
                                       options=options, quick=args.quick, progress=progress))
    finally:
        progress.close()
    if os.path.exists(mem) and (args.target == "all" or args.memory_results):
        with open(mem) as f:
            doc["memory"] = json.load(f)
    doc["duration_s"] = time.time() - t0
    paths = render(doc, args.out)
    print(f"attnzoo analyze: wrote {', '.join(paths)} ({doc['duration_s']:.0f} s)", file=sys.stderr)
    return 0
