"""Per-token decode of every mechanism whose paper promises cheaper decoding, beside dense KV-cache decode (issue 19).

    PYTHONPATH=src python benchmarks/decode_perf.py                      # prefixes 4096 and 32768
    PYTHONPATH=src python benchmarks/decode_perf.py --prefixes 1024 -m sliding_window,linear   # a smoke run
    PYTHONPATH=src python benchmarks/decode_perf.py --prefixes 32768 -m hip --append   # add/replace rows of a table
    PYTHONPATH=src python benchmarks/decode_perf.py --compile --prefixes 4096 -m sliding_window,linear
        # also torch.compile each decode call (attnzoo.state.compile_decode): compiled vs eager in the same run

One attention layer of model dim 512, 8 heads of dim 64, fp32, batch 1, one thread (the machine is shared;
only ratios against the dense layer measured in the same run mean anything): ``attnzoo.build(mechanism, 512,
8, causal=True, **options)`` -- the generic ``Attention`` layer with the mechanism's step for functional
mechanisms, the mechanism's own module otherwise -- prefilled with P random tokens through its decode state
(chunks of 4096 tokens), then decoding one token per call. The baseline is the ``softmax`` layer with its
``KVCache`` (SDPA per token), prefilled the same way. Per-token time = the median over runs of ``K``
consecutive decode calls divided by ``K`` (the dense cache is cropped back to P before each run, so that
the baseline stays at P..P+K tokens of context through the whole run; periodic work -- a full step every
``stride`` tokens, a core token every ``group_size``, a landmark every block -- is amortised as in real
decoding; a mechanism's own context grows by the few hundred tokens its timing decodes). Each mechanism is timed
between two timings of the dense layer; its ratio uses their mean, and the spread of the dense timings is
reported as the run's noise. Options: the papers' inference settings (``OPTIONS``). The table (``--out``: .json
and .md) is rewritten after every row, so a long run leaves its finished rows; ``--append`` keeps the rows of an
earlier run (other mechanisms or prefixes) and replaces the ones measured again. The machine's load average
(``os.getloadavg``) is recorded per row.

``--compile`` (table under ``benchmarks/results/decode_compile/``): each mechanism's decode call is also wrapped
in :func:`attnzoo.state.compile_decode` (a deep copy of the prefilled state, ``torch._dynamo.reset()`` first so
mechanisms do not share dynamo's recompile budget), decoded for ``WARM`` tokens (its first calls are checked
against eager and compile), then timed like the eager layer, between the same two dense timings. The row gets
the compiled per-token time, its ratio to the eager time of the same run, the compile time (wall time of the
calls that compiled), the graphs compiled, and ``compiled`` or the fallback reason. Set
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` for cold compile times (recorded in the table).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

import attnzoo
from attnzoo.bench.measure import median_time

DIM, H = 512, 8
DT = torch.float32
CHUNK = 4096

OPTIONS: dict[str, dict] = {
    "softmax": {},
    "sliding_window": {"window": 256},
    "linear": {},
    "lightning": {},
    "sink_window": {},  # StreamingLLM: 4 sinks + 2000 recent tokens
    "moa": {},
    "hip": {},
    "hip(refresh=1)": {"refresh_interval": 1},  # variant rows "name(...)": that mechanism with these options
    "hip(refresh=8)": {"refresh_interval": 8},  # (not in the default -m list; results/decode_hip_refresh/)
    "s2_attention": {},
    "cca": {},
    "landmark": {"block_size": 50, "top_k": 4},  # the paper's inference setting
    "longheads": {},
    "recycled": {"stride": 50, "top_k": 2048},  # start = the prefix length: the prompt is prefilled fully
    "sinklora": {},
    "titans": {},
    "fit": {},
}
BOUNDED = ("sliding_window", "sink_window", "linear", "lightning")
PER_RUN = {"fit": 256, "titans": 64}  # tokens per timed run (else 64): covers a whole group / chunk
WARM = 8  # tokens decoded by the compiled wrapper before its timing (checked calls + recompiles)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def prefilled(name: str, P: int):
    """(layer, state) after a prefill of P random tokens."""
    opts = dict(OPTIONS[name])
    if name == "recycled":
        opts["start"] = P
    torch.manual_seed(0)
    layer = attnzoo.build(name.split("(")[0], DIM, H, causal=True, **opts).eval()
    st = layer.init_state(1)
    with torch.no_grad():
        for i in range(0, P, CHUNK):
            out = layer(_rand(1, min(CHUNK, P - i), DIM, seed=10 + i), state=st)
            st = out[1]
    return layer, st


def decode_timer(layer, st, per_run: int, min_run_time: float, reset: int | None = None):
    """Seconds per decoded token. ``reset``: crop the state back to that many tokens before each run (the dense
    baseline, timed around every mechanism, would otherwise decode its context ever longer through the run)."""
    x = _rand(1, 4096, DIM, seed=11)
    pos = [0]
    holder = [st]

    def run():
        if reset is not None:
            holder[0].crop(reset)
        with torch.no_grad():
            for _ in range(per_run):
                i = pos[0] % 4096
                holder[0] = layer(x[:, i: i + 1], state=holder[0])[1]
                pos[0] += 1

    return lambda: median_time(run, min_run_time=min_run_time, warmup=1) / per_run


def compiled_decode(layer, st, row: dict, per_run: int, min_run_time: float):
    """Wrap ``layer`` in ``compile_decode`` on a copy of ``st``, decode ``WARM`` tokens (compiling), and return the
    per-token timer of the wrapper; the wrapper is left in ``row["_dec"]`` (its status is read after timing)."""
    from attnzoo.state import compile_decode

    torch._dynamo.reset()
    st = copy.deepcopy(st)
    dec = compile_decode(layer)
    x = _rand(1, WARM, DIM, seed=12)
    with torch.no_grad():
        for i in range(WARM):
            st = dec(x[:, i: i + 1], state=st)[1]
    row["_dec"] = dec
    return decode_timer(dec, st, per_run, min_run_time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefixes", default="4096,32768", help="comma-separated prefill lengths")
    ap.add_argument("-m", "--mechanisms", default=",".join(k for k in OPTIONS if k != "softmax" and "(" not in k))
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/decode_perf/decode_perf")
    ap.add_argument("--append", action="store_true", help="keep the rows of an existing table at --out")
    ap.add_argument("--compile", action="store_true",
                    help="also time each decode call through attnzoo.state.compile_decode (default --out: "
                         "benchmarks/results/decode_compile/decode_compile)")
    args = ap.parse_args()
    if args.compile and args.out == ap.get_default("out"):
        args.out = "benchmarks/results/decode_compile/decode_compile"
    torch.set_num_threads(args.threads)
    prefixes = [int(p) for p in args.prefixes.split(",")]
    names = [n for n in args.mechanisms.split(",") if n]
    command = "python " + " ".join(sys.argv)
    results = {"commands": [], "threads": args.threads, "dim": DIM, "heads": H, "dtype": "float32",
               "options": {}, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "rows": []}
    if args.compile:
        results["inductor_caches"] = ("disabled (cold compile times)"
                                      if os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1"
                                      else "enabled (compile times may be warm)")
    if args.append and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            results = json.load(f)
    results["commands"].append(command)
    results["options"].update({n: OPTIONS[n] for n in ["softmax", *names]})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    def save():
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(results))

    for P in prefixes:
        dense_layer, dense_state = prefilled("softmax", P)
        dense = decode_timer(dense_layer, dense_state, 64, args.min_run_time, reset=P)
        dense_bytes = dense_state.nbytes()
        for name in names:
            row = {"mechanism": name, "prefix": P, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "command": command, "load_before": os.getloadavg()}
            try:
                t0 = time.monotonic()
                layer, st = prefilled(name, P)
                row["prefill_s"] = time.monotonic() - t0
                row["state_bytes"] = st.nbytes()
                timer = decode_timer(layer, st, PER_RUN.get(name, 64), args.min_run_time)
                ctimer = compiled_decode(layer, st, row, PER_RUN.get(name, 64), args.min_run_time) if args.compile \
                    else None
                d0 = dense()
                t = timer()
                tc = ctimer() if ctimer is not None else None
                d1 = dense()
                row.update(time_s=t, dense_time_s=(d0 + d1) / 2, dense_spread=abs(d0 - d1) / min(d0, d1),
                           speedup=(d0 + d1) / 2 / t, dense_state_bytes=dense_bytes)
                if tc is not None:
                    dec = row.pop("_dec")
                    row.update(time_compiled_s=tc, speedup_compiled=(d0 + d1) / 2 / tc, compiled_vs_eager=t / tc,
                               compiled=dec.compiled, fallback_reason=dec.fallback_reason,
                               compile_time_s=dec.compile_time_s, graphs=dec.graphs, recompiles=dec.recompiles,
                               check_max_rel_err=dec.max_rel_err)
                del layer, st
            except Exception as e:  # noqa: BLE001 - a failing mechanism is a result
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            row["load_after"] = os.getloadavg()
            results["rows"] = [r for r in results["rows"] if (r["mechanism"], r["prefix"]) != (name, P)] + [row]
            save()
            row.pop("_dec", None)
            if "time_s" in row:
                msg = (f"{row['time_s'] * 1e3:8.3f} ms/token  dense {row['dense_time_s'] * 1e3:8.3f}  "
                       f"x{row['speedup']:.2f} (dense spread {row['dense_spread']:.0%}, load "
                       f"{row['load_after'][0]:.1f})")
                if "time_compiled_s" in row:
                    msg += (f"  compiled {row['time_compiled_s'] * 1e3:8.3f} ms/token x{row['compiled_vs_eager']:.2f} "
                            f"eager, compile {row['compile_time_s']:.1f} s, "
                            + ("compiled" if row["compiled"] else f"fallback: {row['fallback_reason']}"))
            else:
                msg = row["error"]
            print(f"{name:16s} P={P:6d}  {msg}", flush=True)
        del dense_layer, dense_state
    print(f"wrote {args.out}.json and {args.out}.md")


def markdown(results: dict) -> str:
    prefixes = sorted({r["prefix"] for r in results["rows"]})
    order = [n for n in OPTIONS if n != "softmax"]
    names = sorted({r["mechanism"] for r in results["rows"]}, key=lambda n: order.index(n) if n in order else 99)
    if "inductor_caches" in results:
        return markdown_compile(results, prefixes, names)
    lines = ["# Per-token decode vs dense KV-cache decode", "",
             "Commands: " + "; ".join(f"`{c}`" for c in results["commands"]), "",
             f"{results['machine']}, torch {results['torch']}, {results['threads']} thread(s), layer dim "
             f"{results['dim']}, {results['heads']} heads, fp32, batch 1. Speedup = dense time / mechanism time per "
             "token (> 1: faster than dense), dense timed just before and after each mechanism; the spread "
             "between those two dense timings is the noise of the shared machine (2 cores shared with other "
             "jobs); load = 1-min load average after the row.", "",
             "| mechanism | options | " + " | ".join(f"ms/token @{p} (×dense; dense spread; load) | state @{p}"
                                                   for p in prefixes) + " |",
             "|---|---|" + "---|---|" * len(prefixes)]
    for name in names:
        cells = [f"`{name}`", json.dumps(results["options"].get(name, {}))]
        for p in prefixes:
            r = next((r for r in results["rows"] if r["mechanism"] == name and r["prefix"] == p), None)
            if r is None:
                cells += ["—", "—"]
            elif "error" in r:
                cells += [f"error: {r['error'][:80]}", "—"]
            else:
                cells += [f"{r['time_s'] * 1e3:.3g} (**{r['speedup']:.2f}×**; {r['dense_spread']:.0%}; "
                          f"{r['load_after'][0]:.1f})",
                          f"{r['state_bytes'] / 2 ** 20:.3g} MiB (dense {r['dense_state_bytes'] / 2 ** 20:.3g})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Rows measured at: " + ", ".join(sorted({r["date"] for r in results["rows"]}))]
    return "\n".join(lines) + "\n"



def markdown_compile(results: dict, prefixes: list[int], names: list[str]) -> str:
    lines = ["# Per-token decode: torch.compile (attnzoo.state.compile_decode) vs eager vs dense KV-cache decode", "",
             "Commands: " + "; ".join(f"`{c}`" for c in results["commands"]), "",
             f"{results['machine']}, torch {results['torch']}, {results['threads']} thread(s), layer dim "
             f"{results['dim']}, {results['heads']} heads, fp32, batch 1; inductor caches "
             f"{results['inductor_caches']}. ×dense = dense time / time per token (> 1: faster than dense); "
             "compiled/eager = eager time / compiled time (> 1: compile helps); eager and compiled are timed "
             "between the same two dense timings (dense spread = their difference: the noise of the shared "
             "machine); compile = wall time of the calls that compiled; load = 1-min load average after the row. "
             "A row that fell back (before or during its timing) shows no compiled time: the JSON keeps the raw "
             "timing, which mixes recompiles and eager calls.",
             "", "| mechanism | prefix | eager ms/token (×dense) | compiled ms/token (×dense) | compiled/eager | "
             "compile s (graphs) | status | dense spread | load |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        for p in prefixes:
            r = next((r for r in results["rows"] if r["mechanism"] == name and r["prefix"] == p), None)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| `{name}` | {p} | error: {r['error'][:100]} | — | — | — | — | — | — |")
                continue
            if r["compiled"]:
                status = "compiled"
                comp = (f"{r['time_compiled_s'] * 1e3:.3g} ({r['speedup_compiled']:.2f}×) | "
                        f"**{r['compiled_vs_eager']:.2f}×**")
            else:  # its timing mixes recompiles and eager calls: not a compiled time
                status = f"eager fallback: {r['fallback_reason'][:160]}"
                comp = "— | —"
            lines.append(f"| `{name}` | {p} | {r['time_s'] * 1e3:.3g} ({r['speedup']:.2f}×) | {comp} | "
                         f"{r['compile_time_s']:.1f} ({r['graphs']}) | {status} | "
                         f"{r['dense_spread']:.0%} | {r['load_after'][0]:.1f} |")
    lines += ["", "Rows measured at: " + ", ".join(sorted({r["date"] for r in results["rows"]}))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
