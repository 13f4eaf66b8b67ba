"""Speed and memory of the linear family's fast forms beside dense causal SDPA, measured in one run.

    python benchmarks/linear_perf.py                      # n = 1024, 4096, 16384, 65536
    python benchmarks/linear_perf.py --lengths 1024 4096  # a quick look

Setting (the acceptance setting of project issue 3): float32, B = 1, H = 8, d = 64, causal self attention.
``linear`` is elu+1 normalised linear attention, ``lightning`` the decayed unnormalised form (the ALiBi-slope
default decays), ``based`` the Taylor linear attention with q, k of BASED's feature dimension d' = 16 and v
of 64 (the layer's configuration; d' = 64 would mean 2145 features per head). The baseline is
``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)`` on the same shapes (d = 64).

Times are medians of ``attnzoo.bench.measure.median_time`` (torch.utils.benchmark, after a warm-up call),
with the process CPU time per call beside them (``cpu``: the work, much steadier on a shared machine);
"fwd" runs under ``torch.no_grad()`` (inference), "fwd+bwd" is a forward with inputs requiring grad and a
backward of a fixed random output gradient. Peak memory is ``attnzoo.bench.measure.peak_memory``: the
resident memory one call adds above its set-up, in a fresh process. Decoding: per-token time of ``step``
and the state's size after prefills of 1k and 16k tokens.

Numbers are only meaningful as ratios against the baseline of the same run (the machine may be shared).
Threads: every case runs with ``--threads`` torch threads (default 1). On a machine whose cores are shared
by more processes than it has cores, a 2-thread OpenMP region waits at every barrier for a thread that may
be descheduled; the chunked forms run a few hundred small operations per call and suffered up to 10x from
this at n = 1024 (SDPA's one large fused kernel far less), so one thread gives the fairer comparison there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import attnzoo  # noqa: E402
from attnzoo.bench.measure import median_time, peak_memory  # noqa: E402

B, H, D = 1, 8, 64
MECHS = ("linear", "lightning", "based")
QK_DIM = {"linear": D, "lightning": D, "based": 16, "sdpa": D}


def _inputs(mech: str, n: int, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dq = QK_DIM[mech]
    q = torch.randn(B, H, n, dq, generator=g)
    k = torch.randn(B, H, n, dq, generator=g)
    v = torch.randn(B, H, n, D, generator=g)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _call(mech: str, q, k, v):
    if mech == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attnzoo.attention(q, k, v, mechanism=mech, causal=True, backend="fast")


def case(mech: str, n: int, mode: str):
    """A zero-argument closure running one forward ("fwd") or forward + backward ("fwdbwd")."""
    if mode == "fwd":
        q, k, v = _inputs(mech, n, grad=False)

        def run():
            with torch.no_grad():
                _call(mech, q, k, v)
        return run
    q, k, v = _inputs(mech, n, grad=True)
    grad_out = torch.randn(B, H, n, D, generator=torch.Generator().manual_seed(1))

    def run():
        q.grad = k.grad = v.grad = None
        _call(mech, q, k, v).backward(grad_out)
    return run


def decode_case(mech: str, prefix: int):
    """(closure decoding one token, state) after a prefill of ``prefix`` tokens."""
    m = attnzoo.get(mech)
    opts = m.resolve_options({})
    dq = QK_DIM[mech]
    state = m.init_state(batch=B, kv_heads=H, head_dim=dq, value_dim=D, dtype=torch.float32, device="cpu", **opts)
    q, k, v = _inputs(mech, prefix + 1, grad=False)
    scale = 1 / math.sqrt(dq)
    with torch.no_grad():
        m.step(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], state, scale=scale, **opts)

    def run():  # each call decodes one more token (the same one): the work per token does not change
        with torch.no_grad():
            m.step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state, scale=scale, **opts)
    return run, state


def cpu_time(run, budget: float) -> float:
    """Process CPU seconds per call (``time.process_time``) over as many calls as fit in ``budget`` seconds
    (at least one), after one warm-up call. With one thread this is the work of a call, much less sensitive
    than wall time to the other processes sharing the machine."""
    run()
    calls, total = 0, 0.0
    while calls == 0 or total < budget:
        c0 = time.process_time()
        run()
        total += time.process_time() - c0
        calls += 1
    return total / calls


def correctness_gate() -> None:
    """fast == reference (float64, awkward length) before any number is reported."""
    for mech in MECHS:
        q, k, v = (t.double() for t in _inputs(mech, 77, grad=False))
        ref = attnzoo.attention(q[..., :16], k[..., :16], v[..., :8], mechanism=mech, causal=True, backend="reference")
        fast = attnzoo.attention(q[..., :16], k[..., :16], v[..., :8], mechanism=mech, causal=True, backend="fast")
        err = ((fast - ref).norm() / ref.norm()).item()
        if not err < 1e-10:
            raise SystemExit(f"correctness gate: {mech} fast vs reference relative error {err:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--sdpa-max", type=int, default=16384, help="skip SDPA above this length (too slow on CPU)")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every case, SDPA included (default 1: see the module docstring)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])  # for peak_memory

    correctness_gate()
    load = os.getloadavg()
    print(f"# linear family vs causal SDPA: float32, B={B}, H={H}, d={D} (based: q/k d'=16), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load[0]:.1f} at start")
    res: dict = {}
    for n in args.lengths:
        for mech in ("sdpa", *MECHS):
            if mech == "sdpa" and n > args.sdpa_max:
                continue
            for mode in ("fwd", "fwdbwd"):
                t0 = time.perf_counter()
                run = case(mech, n, mode)
                t = median_time(run, min_run_time=args.min_run_time)
                c = cpu_time(run, budget=args.min_run_time)
                del run
                mem = None if args.no_memory else peak_memory("linear_perf:case", {"mech": mech, "n": n, "mode": mode},
                                                              threads=args.threads)
                res[(mech, n, mode)] = (t, mem, c)
                print(f"  measured {mech:9s} n={n:6d} {mode:6s}: {t:9.4f} s (cpu {c:9.4f} s), peak "
                      f"{'-' if mem is None else f'{mem / 2**20:.0f} MiB'} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)

    def cell(mech, n, mode):
        if (mech, n, mode) not in res:
            return "skipped", "", "", ""
        t, mem, c = res[(mech, n, mode)]
        base = res.get(("sdpa", n, mode))
        ratio = f"{base[0] / t:.1f}x (cpu {base[2] / c:.1f}x)" if base and mech != "sdpa" else ""
        return f"{t * 1e3:.1f}", f"{c * 1e3:.1f}", ratio, "-" if mem is None else f"{mem / 2**20:.0f}"

    print("\n| mechanism | n | fwd ms | fwd cpu ms | fwd speedup vs SDPA | fwd peak MiB | fwd+bwd ms | fwd+bwd cpu ms "
          "| fwd+bwd speedup vs SDPA | fwd+bwd peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mech in ("sdpa", *MECHS):
        for n in args.lengths:
            row = [*cell(mech, n, "fwd"), *cell(mech, n, "fwdbwd")]
            print(f"| {mech} | {n} | " + " | ".join(row) + " |")
    if 16384 in args.lengths and 65536 in args.lengths:
        print("\nGrowth of time from n = 16384 to 65536 (4.0 = linear), wall (cpu):")
        for mech in MECHS:
            g = [res[(mech, 65536, m)][i] / res[(mech, 16384, m)][i] for m in ("fwd", "fwdbwd") for i in (0, 2)]
            print(f"  {mech}: fwd {g[0]:.2f}x ({g[1]:.2f}x), fwd+bwd {g[2]:.2f}x ({g[3]:.2f}x)")

    print("\nDecoding (one token after a prefill; state size in bytes):")
    print("| mechanism | prefix | per-token ms | per-token cpu ms | state bytes |")
    print("|---|---|---|---|---|")
    for mech in MECHS:
        for prefix in (1024, 16384):
            run, state = decode_case(mech, prefix)
            t = median_time(run, min_run_time=args.min_run_time / 2)
            c = cpu_time(run, budget=args.min_run_time / 2)
            res[(mech, prefix, "decode")] = (t, state.state_nbytes(), c)
            print(f"| {mech} | {prefix} | {t * 1e3:.3f} | {c * 1e3:.3f} | {state.state_nbytes()} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{m}|{n}|{mode}": v for (m, n, mode), v in res.items()}, f, indent=1)


if __name__ == "__main__":
    main()
