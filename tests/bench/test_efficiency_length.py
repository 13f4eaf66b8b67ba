"""The efficiency length (CAB): where a mechanism's cost crosses dense attention's, on log-log axes."""

import math

import pytest

from attnzoo.bench.efficiency import attach_ratios, efficiency_length, efficiency_lengths

NS = [256, 512, 1024, 2048, 4096, 8192]


def test_power_laws_cross_exactly_where_they_meet():
    # dense ~ 1e-9 N^2, linear ~ 3e-6 N: equal at N* = 3000; on log-log axes the ratio is a straight line,
    # so the interpolation between the two measured lengths around N* is exact.
    dense = [1e-9 * n * n for n in NS]
    linear = [3e-6 * n for n in NS]
    out = efficiency_length(NS, [a / b for a, b in zip(linear, dense)])
    assert out["where"] == "crossing"
    assert out["n"] == pytest.approx(3000.0, rel=1e-9)


def test_crossing_between_arbitrary_points_is_log_log_linear():
    # ratio 2 at N=1000, 0.5 at N=4000: log ratio goes +ln2 -> -ln2, zero half-way in log N = 2000.
    out = efficiency_length([1000, 4000], [2.0, 0.5])
    assert out == {"n": pytest.approx(2000.0, rel=1e-12), "where": "crossing"}


def test_cheaper_everywhere_and_never_cheaper():
    assert efficiency_length(NS, [0.9] * len(NS)) == {"n": 256.0, "where": "below_range"}
    assert efficiency_length(NS, [1.5, 1.4, 1.3, 1.2, 1.1, 1.05]) == {"n": 8192.0, "where": "above_range"}


def test_noisy_curve_reports_the_persistent_crossing():
    # cheaper at 512 by noise, costlier again at 1024, cheaper for good from 2048 on
    ratios = [1.5, 0.95, 1.2, 0.8, 0.5, 0.3]
    out = efficiency_length(NS, ratios)
    assert out["where"] == "crossing"
    assert 1024 < out["n"] < 2048
    lo, hi = math.log(1.2), math.log(0.8)
    want = math.exp(math.log(1024) + lo / (lo - hi) * (math.log(2048) - math.log(1024)))
    assert out["n"] == pytest.approx(want)


def test_exactly_equal_point_is_the_crossing():
    assert efficiency_length([100, 200, 400], [2.0, 1.0, 0.5]) == {"n": pytest.approx(200.0), "where": "crossing"}


def test_invalid_points_are_ignored():
    assert efficiency_length([], []) == {"n": None, "where": "insufficient"}
    assert efficiency_length([100, 200], [float("nan"), 0.0]) == {"n": None, "where": "insufficient"}
    assert efficiency_length([100, 200, 400], [2.0, float("nan"), 0.5])["where"] == "crossing"


def _rec(series, impl, n, t, mem, base_id=None):
    return {"type": "efficiency", "id": f"{series}|{n}", "series": series, "mechanism": series, "impl": impl,
            "pattern": "causal_self", "mode": "forward", "n": n, "status": "ok", "time_s": t, "memory_bytes": mem,
            "baseline_id": base_id, "speedup": None, "memory_ratio": None}


def test_ratios_and_lengths_from_records():
    recs = []
    for n in NS:
        recs.append(_rec("sdpa", "sdpa", n, 1e-9 * n * n, 64 * n * n))
        recs.append(_rec("linear", "mechanism", n, 3e-6 * n, 2 ** 20 * 16 * n // 256, base_id=f"sdpa|{n}"))
    attach_ratios(recs)
    lin = [r for r in recs if r["series"] == "linear"]
    assert lin[0]["speedup"] == pytest.approx((1e-9 * 256 * 256) / (3e-6 * 256))
    (el,) = efficiency_lengths(recs)
    assert el["series"] == "linear" and el["time"]["n"] == pytest.approx(3000.0)
    # memory: 64 N^2 vs 65536 N -> equal at N = 1024 (both above the resolution floor there)
    assert el["memory"]["where"] == "crossing" and el["memory"]["n"] == pytest.approx(1024.0, rel=1e-6)
