"""The suites of distributed checks that one spawned world runs (tests/distributed): float64 and float32 worlds,
mismatched ranks, a dead or slow rank, and the case lists they draw from (mask-defined mechanisms over ring and
halo, LASP-2). Each suite returns :class:`attnzoo.distributed.checks.Result` rows; the checks themselves live in
:mod:`attnzoo.distributed.checks`. CATALOG P025, P117, P089, P075 (see that module).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .api import attention
from .checks import (
    Case,
    Result,
    check_bytes,
    check_context_parallel,
    check_heads,
    check_heads_decode,
    check_mask_dropping,
    check_split_kv,
    expect_error,
    run_checks,
    ulysses_cases,
)

SW = (("window", 4),)
SINKS = (("sinks", 2), ("window", 3))
NA = (("dilation", 2), ("kernel_size", 3))


def mask_cases(dtype=torch.float64, schemes=("contiguous", "zigzag")) -> list[Case]:
    """Ring and halo over the mask-defined mechanisms, with padding (N = 23), GQA and a key-padding mask."""
    out = []
    for scheme in schemes:
        out += [
            Case("ring", "softmax", True, scheme=scheme, dtype=dtype, lse=True),
            Case("ring", "softmax", False, scheme=scheme, dtype=dtype),
            Case("ring", "sliding_window", True, SW, scheme, dtype=dtype, lse=True),
            Case("ring", "sliding_window", False, SW, scheme, dtype=dtype),
            Case("ring", "sink_window", True, SINKS, scheme, dtype=dtype),
            Case("ring", "neighborhood_1d", True, NA, scheme, dtype=dtype),
            Case("ring", "neighborhood_1d", False, NA, scheme, dtype=dtype, padding=False),
            Case("ring", "softmax", True, scheme=scheme, dtype=dtype, mask="document", lse=True),
            Case("halo", "sliding_window", True, SW, scheme, dtype=dtype, lse=True),
            Case("halo", "sliding_window", False, SW, scheme, dtype=dtype),
            Case("halo", "neighborhood_1d", False, NA, scheme, dtype=dtype, padding=False),
            Case("halo", "sink_window", True, SINKS, scheme, dtype=dtype),
        ]
    out += [
        Case("ring", "softmax", True, scheme="zigzag", dtype=dtype, mask="prefix"),
        Case("ring", "softmax", False, scheme="zigzag", dtype=dtype, n=13, nk=23, lse=True),  # cross attention
        Case("ring", "softmax", True, scheme="contiguous", dtype=dtype, n=13, nk=23),  # causal cross (bottom-right)
        Case("ring", "softmax", True, scheme="zigzag", dtype=dtype, hq=4, hk=1),  # multi-query
        Case("ulysses", "softmax", False, scheme="contiguous", dtype=dtype, n=13, nk=23),
    ]
    return out


def lasp2_cases(dtype=torch.float64) -> list[Case]:
    return [
        Case("lasp2", "linear", True, (("chunk", 3),), dtype=dtype),
        Case("lasp2", "linear", False, (("chunk", 3),), dtype=dtype),
        Case("lasp2", "lightning", True, (("chunk", 3),), dtype=dtype, decay_grad=True),
        Case("lasp2", "lightning", True, (("chunk", 4),), dtype=dtype),  # the ALiBi-slope default decay
        Case("lasp2", "lightning", False, (("chunk", 3), ("decay", 1.0)), dtype=dtype),
        Case("lasp2", "based", True, (("chunk", 3),), dtype=dtype, d=4),
        Case("lasp2", "based", False, (("chunk", 3),), dtype=dtype, d=4),
    ]


def _refusals(group=None) -> list[Result]:
    W = dist.get_world_size(group)
    x = torch.randn(1, 4, 6, 4, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    out = [
        expect_error(lambda: attention(x, k, k, mechanism="hyperattention", group=group, layout="ulysses",
                                       seq_len=6 * W), ValueError, "cannot be sharded by heads",
                     "ulysses refuses head-coupled hyperattention", group),
        expect_error(lambda: attention(x, k, k, mechanism="dma", group=group, layout="ring", seq_len=6 * W),
                     ValueError, "not defined by one", "ring refuses a mechanism without a mask predicate", group),
        expect_error(lambda: attention(x, k, k, mechanism="lightning", group=group, layout="lasp2",
                                       sharding="zigzag", causal=True), ValueError, "contiguous",
                     "lasp2 refuses zig-zag shards", group),
        expect_error(lambda: attention(x[:, :1], k[:, :1], k[:, :1], mechanism="softmax", group=group,
                                       layout="ulysses") if W > 1 else (_ for _ in ()).throw(ValueError("heads")),
                     ValueError, "heads", "ulysses refuses fewer query heads than ranks", group),
        expect_error(lambda: attention(x, k, k, mechanism="softmax", group=group, layout="ring", seq_len=5 * W + 3),
                     ValueError, "local tokens", "a wrong local length names the expected one", group),
        expect_error(lambda: attention(x, k, k, mechanism="neighborhood_1d", group=group, layout="halo",
                                       kernel_size=3, key_padding_mask=torch.ones(1, 6, dtype=torch.bool)),
                     ValueError, "variable-length", "non-causal neighborhood + padding refused on halo", group),
    ]
    return out


def suite_float64(rank: int, world: int) -> list[Result]:
    """Every layout x mechanism at float64 (1e-10), lengths that pad, GQA, key padding; refusals; decoding."""
    res = run_checks(mask_cases(torch.float64) + lasp2_cases(torch.float64) + ulysses_cases(torch.float64, world)
                     + [Case("ulysses", "lightning", True, (("chunk", 3),)),  # per-head (ALiBi) decays sliced
                        Case("ulysses", "s2_attention", True, (("block_size", 2), ("local_blocks", 1),
                                                                ("vert_stride", 2)), n=17, hq=4, hk=4)])
    if world % 2 == 0:
        hg = hybrid_groups_cached(2)
        res += run_checks([Case("hybrid", "softmax", True, scheme="zigzag", lse=True),
                           Case("hybrid", "sliding_window", True, SW, "contiguous")], hybrid=hg)
    res.append(check_heads("s2_attention", {"block_size": 2, "local_blocks": 1, "vert_stride": 2}))
    res.append(check_heads("s2_attention", {"block_size": 2, "local_blocks": 1, "vert_stride": 4,
                                            "num_dense_heads": 1}, hq=4, hk=4))
    res.append(check_heads("moa", {"alphas": (2, 3, 5, 4), "betas": (0.0, 0.25, 0.0, 0.5), "sinks": 1, "length": 8}))
    res.append(check_heads("lightning", {}))
    res.append(check_heads_decode("s2_attention", {"block_size": 2, "local_blocks": 1, "vert_stride": 2}))
    res.append(check_heads_decode("s2_attention", {"block_size": 2, "local_blocks": 2, "vert_stride": 4,
                                                   "num_dense_heads": 1}))
    res.append(check_heads_decode("lightning", {}))
    for mech, opts in (("softmax", {}), ("sliding_window", {"window": 3}), ("sink_window", {"window": 3, "sinks": 2}),
                       ("neighborhood_1d", {"kernel_size": 3, "dilation": 2}), ("linear", {}), ("lightning", {}),
                       ("based", {})):
        res.append(check_split_kv(mech, opts))
    res.append(check_split_kv("softmax", {}, from_ring=True))
    res.append(check_split_kv("sliding_window", {"window": 3}, from_ring=True, block=2))
    res.append(check_context_parallel())
    res.append(check_context_parallel(layout="ulysses", sharding="zigzag", transnormer=False))
    res += _refusals()
    return res


_HYBRID: dict[int, Any] = {}


def hybrid_groups_cached(ulysses: int):
    """One HybridGroups per Ulysses size per process (creating groups is a collective)."""
    from .ulysses import hybrid_groups

    if ulysses not in _HYBRID:
        _HYBRID[ulysses] = hybrid_groups(ulysses)
    return _HYBRID[ulysses]


def suite_float32(rank: int, world: int) -> list[Result]:
    """float32 (1e-5) on a bigger world: ring/halo/hybrid/ulysses/lasp2 with uneven heads, bytes against the
    analytic minimum, the mask-dropping check, split-KV decoding."""
    f32 = torch.float32
    cases = [
        Case("ring", "softmax", True, scheme="zigzag", dtype=f32, n=45, lse=True),
        Case("ring", "sliding_window", True, SW, "contiguous", dtype=f32, n=45),
        Case("halo", "sliding_window", False, SW, "contiguous", dtype=f32, n=45, lse=True),
        Case("ring", "neighborhood_1d", True, NA, "zigzag", dtype=f32, n=45),
        Case("ring", "softmax", True, scheme="zigzag", dtype=f32, n=45, mask="document"),
        Case("ulysses", "softmax", True, scheme="zigzag", dtype=f32, n=45, hq=6, hk=2),  # 6 heads over 4 ranks
        Case("ulysses", "lightning", True, (("chunk", 4),), "contiguous", dtype=f32, n=45, hq=6, hk=3),
        Case("ulysses", "sliding_window", True, SW, "contiguous", dtype=f32, n=45, hq=4, hk=1),
        Case("lasp2", "lightning", True, (("chunk", 4),), dtype=f32, n=45, decay_grad=True),
        Case("lasp2", "linear", True, (("chunk", 4),), dtype=f32, n=45),
        Case("lasp2", "based", True, (("chunk", 4),), dtype=f32, n=45, d=4),
    ]
    res = run_checks(cases)
    if world % 2 == 0:
        res += run_checks([Case("hybrid", "softmax", True, scheme="zigzag", dtype=f32, n=45, lse=True),
                           Case("hybrid", "sink_window", True, SINKS, "contiguous", dtype=f32, n=45)],
                          hybrid=hybrid_groups_cached(2))
    res.append(check_bytes("ring", "sliding_window", {"window": 5}, n=16 * world))
    res.append(check_bytes("halo", "sliding_window", {"window": 5}, n=16 * world))
    res.append(check_bytes("ring", "softmax", {}, scheme="zigzag", n=16 * world))
    res.append(check_bytes("lasp2", "lightning", {"chunk": 4}, n=16 * world))
    res.append(check_mask_dropping())
    res.append(check_split_kv("softmax", {}, dtype=f32))
    res.append(check_split_kv("lightning", {}, dtype=f32))
    res.append(check_context_parallel(dtype=f32, n=37))
    return res


def suite_mismatch(rank: int, world: int) -> list[Result]:
    """Ranks that disagree (shapes, dtypes, mechanisms, options, grad mode) get a RankMismatchError on every rank,
    naming the field; the group stays usable afterwards."""
    from .comm import RankMismatchError

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 8, 4, generator=g)
    k = torch.randn(1, 2, 8, 4, generator=g)
    last = rank == world - 1
    res = [
        expect_error(lambda: attention(q[:, :, : 7 if last else 8], k[:, :, : 7 if last else 8],
                                       k[:, :, : 7 if last else 8], layout="ulysses", seq_len=None),
                     RankMismatchError, "q:", "mismatched local shapes"),
        expect_error(lambda: attention(q.double() if last else q, k.double() if last else k,
                                       k.double() if last else k, layout="ring"),
                     RankMismatchError, "dtype", "mismatched dtypes"),
        expect_error(lambda: attention(q, k, k, mechanism="sliding_window" if last else "softmax", layout="ring",
                                       **({"window": 3} if last else {})),
                     RankMismatchError, "mechanism", "mismatched mechanisms"),
        expect_error(lambda: attention(q, k, k, mechanism="sliding_window", layout="halo", window=3 if last else 4),
                     RankMismatchError, "options", "mismatched options"),
        expect_error(lambda: attention(q, k, k, layout="ring" if last else "halo"),
                     RankMismatchError, "op", "mismatched layouts"),
    ]
    # still usable: a matching call goes through
    out = attention(q, k, k, layout="ring", causal=True)
    res.append(Result("the group works after the mismatches", rank, out.shape == (1, 4, 8, 4)))
    return res


def scenario_failure(rank: int, world: int, mode: str, timeout: float) -> str:
    """Rank world - 1 dies (``mode="die"``: exits without a word) or hangs (``"hang"``: sleeps) before an
    attention call; every other rank must raise :class:`DistributedError` within about ``timeout`` seconds (the
    error propagates to :func:`attnzoo.distributed.launch.run`, which records it)."""
    import os
    import time

    q = torch.randn(1, 4, 8, 4)
    k = torch.randn(1, 2, 8, 4)
    attention(q, k, k, layout="ring", causal=True, timeout=timeout)  # everyone alive: works
    if rank == world - 1:
        if mode == "die":
            os._exit(3)
        time.sleep(20 * timeout)
        os._exit(4)
    attention(q, k, k, layout="ring", causal=True, timeout=timeout)
    return "no error"
