"""Train a tiny model with its sequence split over N processes, beside the same model on one process.

CATALOG P025 (sharded attention), P117 (LASP-2). Run it either way:

    torchrun --nproc-per-node 4 -m attnzoo.distributed.demo
    python -m attnzoo.distributed.demo --nproc 4          # starts the 4 local gloo processes itself

The model (:func:`attnzoo.distributed.checks.tiny_model`) is an embedding, one block per attention layer --
``softmax`` (ring), ``sliding_window`` (halo), ``lightning`` and a TransNormerLLM layer (LASP-2) by default --
and a head, trained for a few SGD steps on an induction task (a random sequence followed by its repeat: the
second half is predictable only by attending back across the whole sequence, so across shards).
:class:`~attnzoo.distributed.ContextParallel` shards the sequence; rank 0 also trains an identical copy on
the whole sequence in one process. Every step prints both losses; at the end every rank's peak memory of a
step and the bytes it sent for attention, against the analytic minimum (the keys its queries need from other
ranks, from the dense mask; LASP-2's state all-gathers; Ulysses' all-to-alls), then the gradient all-reduce.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

PRESETS = {
    "mixed": (("softmax", {}), ("sliding_window", {"window": 64}), ("lightning", {"decay": [0.99, 0.95]})),
    "softmax": (("softmax", {}), ("softmax", {})),
    "window": (("sliding_window", {"window": 64}), ("sink_window", {"window": 64, "sinks": 4})),
    "linear": (("lightning", {"decay": [0.99, 0.95]}), ("linear", {}), ("based", {})),
}


def _data(seq_len: int, batch: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(0, vocab, (batch, (seq_len + 2) // 2), generator=g)
    seq = torch.cat([half, half], dim=1)[:, : seq_len + 1]
    return seq[:, :-1], seq[:, 1:]  # tokens, next-token labels


def _peak_reset() -> bool:
    from ..bench.measure import reset_peak

    return reset_peak()


def _minimum_bytes(model, layout_of, sharding, batch: int, elsize: int, world: int) -> list[int]:
    """Per rank: the attention bytes one forward + backward must move, from the dense global masks."""
    from .. import masks
    from ..layers import Attention
    from ..mechanisms.linear.transnormer import TransNormerAttention
    from .api import mask_predicate

    N, W = sharding.seq_len, world
    owner = torch.empty(sharding.padded_len, dtype=torch.long)
    for r in range(W):
        owner[sharding.positions(r)] = torch.arange(W).new_full((sharding.local_len,), r)
    owner = owner[:N]
    mins = [0] * W
    for m in model.modules():
        if isinstance(m, Attention):
            hq, hk, d = m.heads, m.kv_heads, m.head_dim
            layout = layout_of(m)
            if layout in ("ring", "halo", "hybrid"):
                pred = mask_predicate(m.mech, N, N, m.causal, m.options)
                dense = torch.ones(N, N, dtype=torch.bool) if pred is None else \
                    masks.materialize(pred, 1, hq, N, N).any(dim=(0, 1))  # (N, N): some head attends
                key = batch * hk * 2 * d * elsize
                for r in range(W):  # keys rank r's queries need from rank o != r
                    need = dense[owner == r].any(dim=0)
                    for o in range(W):
                        if o != r:
                            cnt = int((need & (owner == o)).sum())
                            mins[o] += cnt * key * (2 if layout == "ring" else 1)  # kv (again in the ring backward)
                            mins[r] += cnt * key  # the gradients of those keys go back
            elif layout == "lasp2":
                F_ = d
                if m.mech.name == "based":
                    from ..mechanisms.linear.based import taylor_feature_dim

                    F_ = taylor_feature_dim(d)
                extra = 1 if m.options.get("normalize", False) and m.mech.name != "lightning" else 0
                state = batch * hk * F_ * (d + extra) * max(elsize, 4)
                for r in range(W):
                    mins[r] += 2 * (W - 1) * state
            else:  # ulysses: (W - 1) / W of q, k, v, out each way
                per = batch * sharding.local_len * (2 * hq + 2 * hk) * d * elsize
                for r in range(W):
                    mins[r] += 2 * per * (W - 1) // W
        elif isinstance(m, TransNormerAttention):
            state = batch * m.heads * (2 * m.head_dim if m.use_lrpe else m.head_dim) * m.head_dim * max(elsize, 4)
            for r in range(W):
                mins[r] += 2 * (W - 1) * state
    return mins


def run(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    from ..bench.measure import status_bytes
    from .checks import tiny_model
    from .comm import comm_stats, reset_comm_stats
    from .module import ContextParallel, auto_layout

    torch.set_num_threads(1)
    dtype = torch.float64 if args.float64 else torch.float32
    mechs = PRESETS[args.preset]
    kw = dict(dim=args.dim, heads=4, kv_heads=2, vocab=args.vocab, mechanisms=mechs,
              transnormer=args.preset == "mixed", dtype=dtype, max_len=args.seq_len)
    model = tiny_model(**kw)
    tokens, labels = _data(args.seq_len, args.batch, args.vocab)
    cp = ContextParallel(model, layout=args.layout, sharding=args.sharding, position_kwarg="positions")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    twin = topt = None
    if rank == 0:
        twin = tiny_model(**kw)
        twin.load_state_dict(model.state_dict())
        topt = torch.optim.SGD(twin.parameters(), lr=args.lr)
    sh = cp.sharding(args.seq_len)
    valid = sh.valid(rank)
    lab = cp.shard_target(labels)
    count = labels.numel()
    if rank == 0:
        from .. import registry

        chosen = [auto_layout(registry.get(name), sh) if args.layout == "auto" else args.layout for name, _ in mechs]
        layers = [f"{name}{opts or ''} -> {lay}" for (name, opts), lay in zip(mechs, chosen)]
        layers += ["transnormer -> lasp2"] if args.preset == "mixed" else []
        print(f"attnzoo.distributed demo: {world} processes, sequence of {args.seq_len} tokens ({sh.local_len} per "
              f"rank, {args.sharding} shards), preset {args.preset!r}: " + ", ".join(layers), flush=True)
        print(f"{'step':>4} | {'loss, ' + str(world) + ' ranks':>16} | {'loss, 1 process':>16} | {'|difference|':>12}",
              flush=True)
    peak = sent = None
    for step in range(1, args.steps + 1):
        last = step == args.steps
        if last:
            can_reset = _peak_reset()
            before = status_bytes("VmRSS") or 0
            reset_comm_stats()
        opt.zero_grad()
        out = cp(tokens)  # (B, n, vocab)
        loss = F.cross_entropy(out[:, valid].reshape(-1, args.vocab), lab[:, valid].reshape(-1),
                               reduction="sum")
        (loss / count).backward()
        attn_bytes = comm_stats().data_bytes if last else 0
        cp.all_reduce_gradients()
        opt.step()
        if last:
            peak = (status_bytes("VmHWM") or 0) - before if can_reset else None
            sent = (attn_bytes, comm_stats().data_bytes - attn_bytes)
        total = loss.detach().double().clone()
        dist.all_reduce(total)
        total = float(total) / count
        if rank == 0:
            topt.zero_grad()
            ref = F.cross_entropy(twin(tokens).reshape(-1, args.vocab), labels.reshape(-1))
            ref.backward()
            topt.step()
            r = ref.item()
            print(f"{step:>4} | {total:>16.6f} | {r:>16.6f} | {abs(total - r):>12.2e}", flush=True)
    stats = [None] * world
    dist.all_gather_object(stats, {"rank": rank, "peak": peak, "attn_bytes": sent[0], "allreduce_bytes": sent[1]})
    if rank == 0:
        layout_of = lambda m: cp.layouts.get(id(m)) or auto_layout(m.mech, sh)  # noqa: E731
        mins = _minimum_bytes(model, layout_of, sh, args.batch, torch.empty((), dtype=dtype).element_size(), world)
        nparam = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
        print(f"\nlast step, per rank (attention bytes against the analytic minimum; the gradient all-reduce "
              f"of {nparam:,} parameter bytes apart, minimum 2 (W-1)/W of it = {2 * (world - 1) * nparam // world:,}):")
        print(f"{'rank':>4} | {'peak MiB':>9} | {'attention bytes sent':>20} | {'minimum':>12} | {'ratio':>6} | "
              f"{'all-reduce bytes':>16}")
        for s, mn in zip(stats, mins):
            pk = "-" if s["peak"] is None else f"{s['peak'] / 2**20:.1f}"
            ratio = "-" if mn == 0 else f"{s['attn_bytes'] / mn:.3f}"
            print(f"{s['rank']:>4} | {pk:>9} | {s['attn_bytes']:>20,} | {mn:>12,} | {ratio:>6} | "
                  f"{s['allreduce_bytes']:>16,}")
    cp.unwrap()
    return None


def _worker(rank: int, world: int, args: argparse.Namespace):
    return run(rank, world, args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnzoo.distributed.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=None,
                    help="start this many local gloo processes (default: use torchrun's environment)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mixed")
    ap.add_argument("--layout", default="auto", help="auto, ring, halo, ulysses, lasp2 (every layer)")
    ap.add_argument("--sharding", choices=("contiguous", "zigzag"), default="contiguous")
    ap.add_argument("--seq-len", type=int, default=1001)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=17)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--float64", action="store_true", help="train in float64 (the losses then agree to ~1e-12)")
    args = ap.parse_args(argv)
    if args.nproc is not None:
        from .launch import run as launch

        results = launch(_worker, args.nproc, args, timeout=3600)
        bad = [r for r in results if not r.ok]
        for r in bad:
            print(f"rank {r.rank}: {r.status} {r.error_type}: {r.error}\n{r.traceback or ''}")
        return 1 if bad else 0
    if "RANK" not in os.environ:
        ap.error("run under torchrun (torchrun --nproc-per-node 4 -m attnzoo.distributed.demo) or pass --nproc N")
    dist.init_process_group("gloo")
    try:
        run(dist.get_rank(), dist.get_world_size(), args)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
