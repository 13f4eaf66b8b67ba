"""Greedy decoding inside SmolLM2 with attnzoo's decode states, eager and with the step compiled (issue 19).

    PYTHONPATH=src python benchmarks/generate_compile.py                       # sink_window, sliding_window; 4k
    PYTHONPATH=src python benchmarks/generate_compile.py --prefill 4096 -m sink_window,hip,longheads,moa,recycled
    PYTHONPATH=src python benchmarks/generate_compile.py --prefill 256 --new-tokens 8 -m sink_window   # smoke run

SmolLM2-135M-Instruct (30 layers, 9 query / 3 key-value heads of dim 64; GGUF de-quantized to float32), the
prompt = the first ``--prefill`` tokens of the real-text corpus of ``attnzoo bench real``. Per mechanism: the model
with ``attnzoo.hf.swap_attention(model, name, **options)`` (eager) and a second copy with ``compile=True`` (each
layer's one-token step through :func:`attnzoo.state.compile_decode`; the prompt's prefill stays eager). The prompt
is prefilled once, by the eager copy; the cache (the 30 layers' decode states) is deep-copied for the compiled copy,
so both decode from the same state. Each then decodes greedily, ``WARMUP`` untimed tokens (the compiled copy
compiles and checks against eager there) and ``--new-tokens`` timed ones, each step timed alone with one thread;
tokens/s = 1 / the median step time (as ``attnzoo bench real``). The baseline: the model's own SDPA with its
DynamicCache, prefilled and timed the same way, before the first and after the last mechanism (its two timings are
averaged; their spread is the run's noise). Options: the rows of ``attnzoo bench real`` (``attnzoo.bench.real.ROWS``).

Reported per mechanism: eager and compiled tokens/s, each x SDPA, compiled / eager, the compile report
(``attnzoo.hf.compile_report``: layers compiled, compile time, graphs, fallbacks), and whether the compiled copy
decoded the same tokens as the eager one. Only ratios within the run mean anything on a shared machine; the load
average is recorded per row.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

from attnzoo.bench.real.stages import prefill, timed_decode

WARMUP = 3  # untimed decode steps: the compiled wrapper's 2 checked calls per layer, and one more


def _tokens_per_s(model, cache, first, new_tokens: int) -> tuple[float, list[int]]:
    """Greedy decoding from ``cache`` (``timed_decode`` of ``attnzoo bench real``): (1 / median step time, ids)."""
    steps, ids = timed_decode(model, cache, first, new_tokens, warmup=WARMUP, threads=1)
    return 1.0 / statistics.median(steps), ids


def sdpa_row(model, ids, new_tokens: int) -> dict:
    cache, first, prefill_s = prefill(model, ids)
    tps, toks = _tokens_per_s(model, cache, first, new_tokens)
    return {"tokens_per_s": tps, "prefill_s": prefill_s, "ids": toks, "load": os.getloadavg()[0]}


def mechanism_row(model, name: str, options: dict, ids, new_tokens: int) -> dict:
    import attnzoo.hf as azhf

    eager, comp = copy.deepcopy(model), copy.deepcopy(model)
    azhf.swap_attention(eager, name, **options)
    azhf.swap_attention(comp, name, compile=True, **options)
    cache, first, prefill_s = prefill(eager, ids)
    cache2 = copy.deepcopy(cache)
    torch._dynamo.reset()  # each mechanism compiles from scratch (dynamo's recompile budget is per function)
    eager_tps, eager_ids = _tokens_per_s(eager, cache, first, new_tokens)
    comp_tps, comp_ids = _tokens_per_s(comp, cache2, first, new_tokens)
    report = azhf.compile_report(comp)
    return {"eager_tokens_per_s": eager_tps, "compiled_tokens_per_s": comp_tps,
            "compiled_over_eager": comp_tps / eager_tps, "prefill_s": prefill_s,
            "same_tokens": comp_ids == eager_ids, "compile": report, "load": os.getloadavg()[0]}


def markdown(doc: dict) -> str:
    lines = [f"# Decoding inside SmolLM2 `generate`: eager vs compiled attnzoo decode step ({doc['prefill']}-token "
             "prompt)", "", f"`{doc['command']}`", "",
             f"{doc['environment']}. Greedy decoding, {doc['new_tokens']} timed tokens after {WARMUP} untimed ones, "
             "one thread, tokens/s = 1 / median step time. SDPA = the model's own attention and DynamicCache, timed "
             f"before and after the mechanisms: {doc['sdpa_tokens_per_s'][0]:.3g} and {doc['sdpa_tokens_per_s'][1]:.3g}"
             " tok/s (ratios use their mean).", "",
             "| mechanism (options) | eager tok/s (x SDPA) | compiled tok/s (x SDPA) | compiled / eager "
             "| compiled layers | compile s | graphs | same tokens as eager | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = statistics.mean(doc["sdpa_tokens_per_s"])
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} | | | | | | | |")
            continue
        c = r["compile"]
        fb = "" if c["fallback_reason"] is None else f" (eager fallback: {c['fallback_reason'][:110]})"
        lines.append(f"| {r['label']} | {r['eager_tokens_per_s']:.3g} ({r['eager_tokens_per_s'] / base:.2f}x) | "
                     f"{r['compiled_tokens_per_s']:.3g} ({r['compiled_tokens_per_s'] / base:.2f}x) | "
                     f"{r['compiled_over_eager']:.2f}x | {c['compiled']}/{c['layers']}{fb} | "
                     f"{c['compile_time_s']:.1f} | {c['graphs']} | {'yes' if r['same_tokens'] else 'no'} | "
                     f"{r['load']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from attnzoo import models
    from attnzoo.bench.real.rows import ROWS, corpus_text

    rows = {r.mechanism: r.decoder for r in ROWS}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("-m", "--mechanisms", default="sink_window,sliding_window",
                    help=f"comma-separated, from attnzoo bench real's rows: {sorted(rows)}")
    ap.add_argument("--out", default="benchmarks/results/generate_compile/generate_compile")
    args = ap.parse_args()
    names = [m for m in args.mechanisms.split(",") if m]
    unknown = [m for m in names if m not in rows]
    if unknown:
        ap.error(f"--mechanisms: {unknown} have no row in attnzoo.bench.real.ROWS; expected some of {sorted(rows)}")
    if args.prefill < 1 or args.new_tokens < 1:
        ap.error(f"--prefill/--new-tokens: expected positive counts, got {args.prefill}/{args.new_tokens}")

    model, tok = models.load_smollm2(dtype=torch.float32)
    corpus, text = corpus_text()
    ids = tok(text, return_tensors="pt")["input_ids"][:, : args.prefill]  # (1, P)
    if ids.shape[1] < args.prefill:
        ap.error(f"--prefill: the corpus ({corpus}) has only {ids.shape[1]} tokens")
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
           f"corpus {corpus}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    doc = {"command": "python benchmarks/" + " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
           "environment": env, "prefill": args.prefill, "new_tokens": args.new_tokens, "rows": [],
           "sdpa_tokens_per_s": []}

    def save() -> None:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(doc, f, indent=1)
        if len(doc["sdpa_tokens_per_s"]) == 2:
            with open(args.out + ".md", "w") as f:
                f.write(markdown(doc))

    first = sdpa_row(model, ids, args.new_tokens)
    doc["sdpa_tokens_per_s"].append(first["tokens_per_s"])
    print(f"sdpa: {first['tokens_per_s']:.3g} tok/s (prefill {first['prefill_s']:.0f} s)", flush=True)
    for name in names:
        opts = rows[name]
        label = name + ("(" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")" if opts else "")
        try:
            row = {"label": label, **mechanism_row(model, name, opts, ids, args.new_tokens)}
        except Exception as e:  # noqa: BLE001 - a failing row is reported, the others still run
            row = {"label": label, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        doc["rows"].append(row)
        print(json.dumps(row, default=str)[:400], flush=True)
        save()
    last = sdpa_row(model, ids, args.new_tokens)
    doc["sdpa_tokens_per_s"].append(last["tokens_per_s"])
    save()
    print(markdown(doc))


if __name__ == "__main__":
    main()
