"""attnzoo.distributed: sharded runs equal single-process runs, in worlds of 2 and 4 local gloo processes that
the tests start themselves (attnzoo.distributed.launch), plus the single-process pieces (sharding, the masked
tile kernel, plan ranges, head splits).

Each world runs many checks (attnzoo.distributed.checks) so that only a few worlds are started: a world of
processes costs seconds on a 2-core machine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from attnzoo import masks
from attnzoo.distributed import Sharding, checks, launch, split_heads
from attnzoo.distributed.blocks import BlockAttention, needed_keys, plan_block
from attnzoo.distributed.ring import key_ranges
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _assert_world(results: list[launch.RankResult], world: int) -> None:
    bad = [f"rank {r.rank}: {r.status} {r.error_type}: {r.error}\n{r.traceback}" for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    assert len(results) == world
    failed = [str(res) for r in results for res in r.value if not res.ok]
    assert not failed, "\n".join(failed)
    names = {res.name for res in results[0].value}
    assert all({res.name for res in r.value} == names for r in results), "ranks ran different checks"


# --------------------------------------------------------------------------------------------------------
# Worlds
# --------------------------------------------------------------------------------------------------------
def test_world_of_2_float64_every_layout_equals_single_process():
    """ring / halo / hybrid / ulysses / lasp2 / heads x their mechanisms, N = 23 (padded), GQA, key padding,
    document + prefix masks, cross attention; outputs, lse, dq, dk, dv (and lightning's decay) to 1e-10;
    split-KV and split recurrent decoding; the ContextParallel wrapper; refusals with clear errors."""
    results = launch.run(checks.suite_float64, 2, timeout=600)
    _assert_world(results, 2)
    names = " | ".join(res.name for res in results[0].value)
    for needle in ("ring softmax causal zigzag", "halo sliding_window", "hybrid softmax", "lasp2 lightning causal",
                   "decay-grad", "lasp2 based", "ulysses s2_attention", "split decode sliding_window",
                   "split decode based", "ContextParallel", "ulysses refuses head-coupled"):
        assert needle in names, f"suite lost the check {needle!r}"


def test_world_of_4_float32_hybrid_bytes_and_mask_dropping():
    """4 ranks, float32 (1e-5): zig-zag ring, halo, hybrid 2 x 2, Ulysses with 6 heads over 4 ranks and Hk = 1,
    LASP-2 with the decay's gradient; bytes sent per rank within 1.1x of the analytic minimum for ring, halo and
    LASP-2; a sliding-window model sharded over 4 ranks equals its single-process run and differs from full
    causal attention (the window is not dropped across shards)."""
    results = launch.run(checks.suite_float32, 4, timeout=600)
    _assert_world(results, 4)
    byte_checks = [res for res in results[1].value if res.name.startswith("bytes")]
    assert len(byte_checks) == 4
    for res in byte_checks:  # a rank in the middle sends in both passes: the ratio is exactly measured
        assert all(1.0 <= v <= 1.1 for v in res.errors.values() if v), str(res)


def test_mismatched_ranks_raise_on_every_rank():
    results = launch.run(checks.suite_mismatch, 3, timeout=300)
    _assert_world(results, 3)


_SCENARIO = textwrap.dedent("""
    import json, sys, time
    from attnzoo.distributed import checks, launch
    if __name__ == "__main__":
        t = time.monotonic()
        rs = launch.run(checks.scenario_failure, 3, sys.argv[1], float(sys.argv[2]), timeout=50, linger=3)
        print(json.dumps({"seconds": time.monotonic() - t,
                          "ranks": [[r.status, r.error_type, r.error, r.exitcode] for r in rs]}))
""")


@pytest.mark.parametrize("mode", ["die", pytest.param("hang", marks=pytest.mark.slow)])
def test_dead_or_hung_rank_gives_a_clear_error_on_every_survivor(tmp_path, mode):
    """A rank that exits (or hangs) before an attention call: the two others raise DistributedError naming the
    failed operation; the whole scenario, process start-up included, ends inside the subprocess timeout."""
    script = tmp_path / "scenario.py"
    script.write_text(_SCENARIO)
    proc = subprocess.run([sys.executable, str(script), mode, "8"], capture_output=True, text=True, timeout=60,
                          env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    survivors, last = report["ranks"][:2], report["ranks"][2]
    for status, etype, msg, _ in survivors:
        assert status == "error" and etype == "DistributedError", (status, etype, msg)
        assert "died, hung" in msg and "timeout 8 s" in msg, msg
    assert last[0] in ("died", "killed")


def launch_env():
    import os

    env = dict(os.environ)
    src = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# --------------------------------------------------------------------------------------------------------
# Single-process pieces
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["contiguous", "zigzag"])
@pytest.mark.parametrize("n,world,ulysses", [(23, 4, 1), (16, 4, 1), (23, 4, 2), (5, 2, 1)])
def test_sharding_round_trip_and_positions(scheme, n, world, ulysses):
    sh = Sharding(n, world, scheme, ulysses)
    pos = torch.cat(sh.all_positions())
    assert sorted(pos.tolist()) == list(range(sh.padded_len))  # every slot once
    assert all(p.numel() == sh.local_len for p in sh.all_positions())
    x = torch.randn(2, 3, n, 4, dtype=F64)
    shards = [sh.shard(x, r) for r in range(world)]
    assert torch.equal(sh.unshard(shards), x)
    for r in range(world):  # padding slots are zero
        assert bool((shards[r][:, :, ~sh.valid(r)] == 0).all())
    if scheme == "zigzag" and ulysses == 1:
        c = sh.piece  # rank r holds chunks r and 2W - 1 - r
        assert sh.positions(0)[:c].tolist() == list(range(c))
        assert sh.positions(0)[c:].tolist() == list(range((2 * world - 1) * c, 2 * world * c))


def test_sharding_validates():
    with pytest.raises(ValueError, match="sharding"):
        Sharding(10, 2, "striped")
    with pytest.raises(ValueError, match="ulysses"):
        Sharding(10, 4, "contiguous", 3)
    with pytest.raises(ValueError, match="tokens along dim"):
        Sharding(10, 2).shard(torch.zeros(1, 1, 9, 2), 0)


@pytest.mark.parametrize("pred_name", ["none", "causal", "window", "document", "prefix", "heads"])
def test_block_kernel_equals_reference_with_lse_and_gradients(pred_name):
    """The tile kernel on scrambled global positions (tiles smaller than the block) == dense softmax attention
    under the materialized predicate: output, lse, and the gradients of q, k, v through both."""
    g = torch.Generator().manual_seed(1)
    B, Hq, Hk, N, D = 2, 4, 2, 29, 5
    q, k = torch.randn(B, Hq, N, D, generator=g, dtype=F64), torch.randn(B, Hk, N, D, generator=g, dtype=F64)
    v = torch.randn(B, Hk, N, 3, generator=g, dtype=F64)
    kpm = torch.rand(B, N, generator=g) > 0.3
    ids = torch.randint(0, 3, (B, N), generator=g)
    preds = {"none": None, "causal": masks.causal(), "window": masks.sliding_window(6, causal=False),
             "document": masks.and_masks(masks.causal(), masks.document(ids)), "prefix": masks.prefix_lm(4),
             "heads": lambda b, h, qi, kj: (kj <= qi) & ((h % 2 == 0) | (qi - kj < 3))}
    pred = preds[pred_name]
    perm = torch.randperm(N, generator=g)  # the block's keys in any order: positions are explicit
    plan = plan_block(pred, batch=B, heads=torch.arange(Hq), qpos=torch.arange(N), kpos=perm, q_limit=N, k_limit=N,
                      tq=7, tk=5)
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = BlockAttention.apply(qa, ka[:, :, perm], va[:, :, perm], plan, 0.4, kpm[:, perm])
    dense = None if pred is None else masks.materialize(pred, B, Hq, N, N)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = softmax_attention(qr, kr, vr, key_padding_mask=kpm, attn_mask=dense, scale=0.4, return_lse=True)
    assert_close(out, ref, F64, "output")
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_close(lse[fin], ref_lse[fin], F64, "lse")
    go, gl = torch.randn(ref.shape, generator=g, dtype=F64), torch.randn(ref_lse.shape, generator=g, dtype=F64)
    ((out * go).sum() + (torch.where(fin, lse, 0) * gl).sum()).backward()
    ((ref * go).sum() + (torch.where(fin, ref_lse, 0) * gl).sum()).backward()
    for a, b, name in ((qa, qr, "dq"), (ka, kr, "dk"), (va, vr, "dv")):
        assert_close(a.grad, b.grad, F64, name)
    if pred_name == "window":
        assert int((plan.classes == 0).sum()) > 0  # tiles outside the band are skipped


def test_block_kernel_gradcheck():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 6, 3, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(1, 1, 7, 3, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(1, 1, 7, 2, generator=g, dtype=F64, requires_grad=True)
    plan = plan_block(masks.sliding_window(3, offset=1), batch=1, heads=torch.arange(2), qpos=torch.arange(6),
                      kpos=torch.arange(7), q_limit=6, k_limit=7, tq=4, tk=3)
    assert torch.autograd.gradcheck(lambda a, b, c: BlockAttention.apply(a, b, c, plan, 0.7, None), (q, k, v))


def test_padding_positions_are_never_attended_and_pad_queries_are_zero():
    q = torch.randn(1, 1, 4, 2, dtype=F64)
    k = torch.randn(1, 1, 4, 2, dtype=F64)
    pos = torch.tensor([2, 3, 4, 5])  # positions 4, 5 are padding of a 4-token sequence
    plan = plan_block(None, batch=1, heads=torch.arange(1), qpos=pos, kpos=pos, q_limit=4, k_limit=4)
    out, lse = BlockAttention.apply(q, k, k, plan, 1.0, None)
    assert bool((out[:, :, 2:] == 0).all()) and bool(torch.isinf(lse[:, :, 2:]).all())
    ref = softmax_attention(q[:, :, :2], k[:, :, :2], k[:, :, :2], scale=1.0)
    assert_close(out[:, :, :2], ref, F64, "real rows see only real keys")


def test_needed_keys_and_ranges_of_a_window():
    """Queries 20..29 under a causal window of 4 need keys 17..29 of 0..29: one range, w - 1 keys before."""
    need = needed_keys(masks.sliding_window(4), batch=1, heads=torch.arange(1), qpos=torch.arange(20, 30),
                       kpos=torch.arange(30), q_limit=30, k_limit=30)
    assert key_ranges(need) == [(17, 30)]
    assert key_ranges(torch.tensor([1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)) == [(0, 2), (3, 4), (6, 7)]
    assert key_ranges(torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool), max_ranges=2) == [(0, 3), (5, 6)]


@pytest.mark.parametrize("hq,hk,world", [(8, 2, 4), (6, 2, 4), (12, 6, 4), (4, 1, 4), (6, 3, 4), (4, 4, 2)])
def test_split_heads_covers_every_head_once_and_reads_the_right_kv_head(hq, hk, world):
    shards = split_heads(hq, hk, world)
    assert [h for s in shards for h in range(s.q_start, s.q_stop)] == list(range(hq))
    G = hq // hk
    for s in shards:
        assert len(set(s.kv_recv)) == len(s.kv_recv)  # each key/value head crosses the wire once
        Gl = s.q_heads // len(s.kv_local)
        for j, h in enumerate(range(s.q_start, s.q_stop)):
            assert s.kv_local[j // Gl] == h // G  # local GQA mapping reads the global head's key/value head


def test_split_heads_refuses_fewer_heads_than_ranks():
    with pytest.raises(ValueError, match="at least one query head"):
        split_heads(2, 1, 4)


def test_analytic_bytes_formulas():
    kw = dict(world=4, n=64, batch=1, hk=2, d=8, dv=8, elsize=4)
    key = 2 * 16 * 4
    sw = [checks.analytic_bytes("ring", "sliding_window", rank=r, window=5, **kw) for r in range(4)]
    assert [s["forward"] for s in sw] == [4 * key] * 3 + [0]
    zz = [checks.analytic_bytes("ring", "softmax", rank=r, scheme="zigzag", **kw)["forward"] for r in range(4)]
    # chunk 8: rank o sends 8 (W - 1 - o) + 16 o keys; the total equals what the ranks need
    assert zz == [24 * key, 32 * key, 40 * key, 48 * key]


@pytest.mark.slow
def test_demo_trains_with_the_sequence_split_and_matches_one_process():
    """`python -m attnzoo.distributed.demo --nproc 2`: the losses of the sharded and the single-process model agree
    at every step (float64), and the attention bytes equal the analytic minimum."""
    proc = subprocess.run([sys.executable, "-m", "attnzoo.distributed.demo", "--nproc", "2", "--steps", "2",
                           "--seq-len", "97", "--float64"], capture_output=True, text=True, timeout=300,
                          env=launch_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    steps = [ln for ln in lines if ln.strip()[:1].isdigit() and ln.count("|") == 3]
    assert len(steps) == 2, proc.stdout
    for ln in steps:
        dist_loss, single_loss, diff = (float(x) for x in ln.split("|")[1:])
        assert abs(dist_loss - single_loss) < 1e-10 and diff < 1e-10, ln
    ratios = [ln.split("|")[4].strip() for ln in lines if ln.count("|") == 5 and ln.strip()[:1].isdigit()]
    assert ratios == ["1.000", "1.000"], proc.stdout


def test_a_sliding_window_on_8_ranks_talks_only_to_its_neighbour():
    """The plan of every rank of 8 (the same code the ring runs, without the gather): a causal window of 64 over
    contiguous shards of 512 needs exactly the 63 last keys of the previous rank and nothing from the others; a
    non-causal one needs 63 keys from each neighbour; full causal attention needs every earlier rank whole."""
    from attnzoo.distributed.ring import needed_ranges

    sh = Sharding(8 * 512, 8)
    kpos = sh.all_positions()
    for r in range(8):
        common = dict(batch=1, heads=torch.arange(2), qpos=sh.positions(r), k_positions=kpos, q_limit=4096,
                      k_limit=4096)
        causal = needed_ranges(masks.sliding_window(64), **common)
        want = [[(512 - 63, 512)] if o == r - 1 else [(0, 512)] if o == r else [] for o in range(8)]
        assert causal == want, (r, causal)
        both = needed_ranges(masks.sliding_window(64, causal=False), **common)
        assert [o for o in range(8) if both[o]] == [o for o in (r - 1, r, r + 1) if 0 <= o < 8]
        assert all(sum(b - a for a, b in both[o]) == 63 for o in (r - 1, r + 1) if 0 <= o < 8)
        full = needed_ranges(masks.causal(), **common)
        assert full == [[(0, 512)] if o <= r else [] for o in range(8)]
