"""Context parallelism: per-rank peak memory against one process, and bytes sent per rank against the
analytic minimum (CATALOG P025 ring/halo, P117 LASP-2; project issue 18).

    python benchmarks/distributed_perf.py                        # n = 65536 over 4 ranks (the acceptance setting)
    python benchmarks/distributed_perf.py --n 16384 --world 2    # a quick look
    python benchmarks/distributed_perf.py --md benchmarks/results/distributed_perf.md \\
        --json benchmarks/results/distributed_perf.json

Setting: float32, B = 1, H = 8 (key/value heads 8), d = 64, causal self attention, forward + backward of a
fixed random output gradient. ``sliding_window`` (window 256) runs the halo layout; ``lightning`` (the
ALiBi-slope default decays, chunk 64) runs LASP-2; both on contiguous shards of ``n / W`` tokens. The
single-process baseline is ``attnzoo.attention(..., backend="fast")`` on the whole sequence, measured in the
same run.

Peak memory: the resident memory one forward + backward adds above its set-up (inputs already built), read
from the process's high-water mark after a reset and one warm-up call (:func:`attnzoo.bench.measure.measure_peak`);
the single process in a fresh interpreter, every rank in its own process of a fresh ``W``-process gloo world,
all with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so the high-water mark follows live tensors.
The acceptance bound is the largest rank's peak <= 0.35 x the single-process peak.

Bytes: the data bytes each rank *sent* during one forward + backward, counted by the wrapper around every
send / all-gather / all-to-all (:mod:`attnzoo.distributed.comm`), against the analytic minimum of
:func:`attnzoo.distributed.checks.analytic_bytes` (derived from the mask and the sharding, not from the plan
code); control bytes (the pre-flight all-gather of 64 int64 per call) are listed apart. The ring rows also
run softmax under causal zig-zag sharding at a length where quadratic attention is affordable on a CPU.

Numbers are ratios measured in one run on a possibly shared machine; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import attnzoo  # noqa: E402
import attnzoo.distributed as cp  # noqa: E402
from attnzoo.bench.measure import MALLOC_ENV, measure_peak, peak_memory  # noqa: E402
from attnzoo.distributed import checks, launch  # noqa: E402

B, H, D = 1, 8, 64
WINDOW = 256
LAYOUT = {"sliding_window": "halo", "lightning": "lasp2"}
OPTIONS = {"sliding_window": {"window": WINDOW}, "lightning": {"chunk": 64}}


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g) for _ in range(4)]  # q, k, v, upstream gradient


def single_case(mech: str, n: int):
    """The single-process forward + backward (a peak_memory case: built in a fresh process)."""
    q, k, v, g = _inputs(n)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def run():
        q.grad = k.grad = v.grad = None
        attnzoo.attention(q, k, v, mechanism=mech, causal=True, backend="fast", **OPTIONS[mech]).backward(g)
    return run


def rank_case(rank: int, world: int, mech: str, n: int, measure_memory: bool) -> dict:
    """One rank's forward + backward of the distributed layout: peak memory, bytes, time."""
    torch.set_num_threads(1)
    sh = cp.Sharding(n, world, "contiguous")
    q, k, v, g = (sh.shard(t, rank) for t in _inputs(n))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kw = dict(mechanism=mech, layout=LAYOUT[mech], sharding=sh, causal=True, **OPTIONS[mech])

    def run():
        q.grad = k.grad = v.grad = None
        cp.attention(q, k, v, **kw).backward(g)

    t0 = time.perf_counter()
    run()  # plan + warm-up
    first = time.perf_counter() - t0
    cp.reset_comm_stats()
    t0 = time.perf_counter()
    run()
    step = time.perf_counter() - t0
    sent = cp.comm_stats().snapshot()
    peak = measure_peak(run)["peak_bytes"] if measure_memory else None
    want = checks.analytic_bytes(LAYOUT[mech], mech, rank=rank, world=world, n=n, batch=B, hk=H, d=D, dv=D,
                                 elsize=4, window=WINDOW, features=D)
    return {"rank": rank, "peak_bytes": peak, "sent": sent, "minimum": want, "step_s": step, "first_call_s": first}


def ring_bytes_case(rank: int, world: int, n: int) -> dict:
    """Causal softmax on the ring with zig-zag shards: bytes of one forward + backward."""
    torch.set_num_threads(1)
    sh = cp.Sharding(n, world, "zigzag")
    q, k, v, g = (sh.shard(t, rank) for t in _inputs(n))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kw = dict(mechanism="softmax", layout="ring", sharding=sh, causal=True)
    cp.attention(q, k, v, **kw).backward(g)  # plan
    cp.reset_comm_stats()
    cp.attention(q, k, v, **kw).backward(g)
    sent = cp.comm_stats().snapshot()
    want = checks.analytic_bytes("ring", "softmax", rank=rank, world=world, n=n, batch=B, hk=H, d=D, dv=D, elsize=4,
                                 scheme="zigzag")
    return {"rank": rank, "sent": sent, "minimum": want}


def ring_window_bytes_case(rank: int, world: int, n: int) -> dict:
    torch.set_num_threads(1)
    sh = cp.Sharding(n, world, "contiguous")
    q, k, v, g = (sh.shard(t, rank) for t in _inputs(n))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kw = dict(mechanism="sliding_window", window=WINDOW, layout="ring", sharding=sh, causal=True)
    cp.attention(q, k, v, **kw).backward(g)
    cp.reset_comm_stats()
    cp.attention(q, k, v, **kw).backward(g)
    want = checks.analytic_bytes("ring", "sliding_window", rank=rank, world=world, n=n, batch=B, hk=H, d=D, dv=D,
                                 elsize=4, window=WINDOW)
    return {"rank": rank, "sent": cp.comm_stats().snapshot(), "minimum": want}


def _values(results):
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit("\n".join(f"rank {r.rank}: {r.status} {r.error}\n{r.traceback}" for r in bad))
    return [r.value for r in results]


def _bytes_rows(label: str, ranks: list[dict]) -> list[str]:
    rows = []
    for r in ranks:
        s, m = r["sent"], r["minimum"]
        mn = m["forward"] + m["backward"]
        ratio = "-" if mn == 0 else f"{s['data_bytes'] / mn:.3f}"
        rows.append(f"| {label} | {r['rank']} | {s['data_bytes']:,} | {mn:,} | {ratio} | {s['control_bytes']:,} |")
    tot, mn = sum(r["sent"]["data_bytes"] for r in ranks), sum(r["minimum"]["forward"] + r["minimum"]["backward"]
                                                               for r in ranks)
    rows.append(f"| {label} | all | {tot:,} | {mn:,} | {tot / mn:.3f} | "
                f"{sum(r['sent']['control_bytes'] for r in ranks):,} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--ring-n", type=int, default=4096, help="length of the causal-softmax ring bytes run")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--md", default=None, help="write the Markdown table here")
    ap.add_argument("--json", default=None, help="write the raw results here")
    args = ap.parse_args()
    os.environ.update(MALLOC_ENV)  # the world's processes inherit it (the forkserver starts now)
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, os.path.join(os.path.dirname(HERE), "src"),
                                                os.environ.get("PYTHONPATH", "")])
    load = os.getloadavg()
    head = (f"# distributed_perf: float32, B={B}, H={H}, d={D}, causal, n={args.n} over {args.world} ranks, "
            f"torch {torch.__version__}, 1 thread per process, load average {load[0]:.1f} at start")
    print(head, flush=True)
    out: dict = {"setting": head, "memory": {}, "bytes": {}}
    lines = [head, "", "Per-rank peak memory of one forward + backward (resident memory added above the set-up):", "",
             "| mechanism (layout) | single process MiB | largest rank MiB | ratio | per-rank MiB | bound |",
             "|---|---|---|---|---|---|"]
    for mech in ("sliding_window", "lightning"):
        t0 = time.perf_counter()
        single = None if args.no_memory else peak_memory("distributed_perf:single_case", {"mech": mech, "n": args.n},
                                                         threads=1, timeout=3600)
        ranks = _values(launch.run(rank_case, args.world, mech, args.n, not args.no_memory, timeout=3600,
                                   preload=["distributed_perf"]))
        out["memory"][mech] = {"single_bytes": single, "ranks": ranks}
        if single is not None:
            worst = max(r["peak_bytes"] for r in ranks)
            per = ", ".join(f"{r['peak_bytes'] / 2**20:.0f}" for r in ranks)
            lines.append(f"| {mech} ({LAYOUT[mech]}) | {single / 2**20:.0f} | {worst / 2**20:.0f} | "
                         f"{worst / single:.3f} | {per} | <= 0.35 |")
        print(f"  {mech}: done in {time.perf_counter() - t0:.0f} s; step times "
              + ", ".join(f"{r['step_s']:.2f}" for r in ranks) + " s", flush=True)
        out["bytes"][f"{mech} ({LAYOUT[mech]}) n={args.n}"] = ranks
    ring = _values(launch.run(ring_bytes_case, args.world, args.ring_n, timeout=3600, preload=["distributed_perf"]))
    ringw = _values(launch.run(ring_window_bytes_case, args.world, args.n, timeout=3600, preload=["distributed_perf"]))
    out["bytes"][f"softmax (ring, zigzag) n={args.ring_n}"] = ring
    out["bytes"][f"sliding_window (ring) n={args.n}"] = ringw
    lines += ["", "Data bytes sent per rank in one forward + backward, against the analytic minimum "
              "(control bytes apart):", "",
              "| case | rank | sent | minimum | sent / minimum | control |", "|---|---|---|---|---|---|"]
    for label, ranks in out["bytes"].items():
        lines += _bytes_rows(label, ranks)
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
