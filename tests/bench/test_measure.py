"""Measurement primitives: contamination accounting, retries, peak memory. No wall-clock assertions."""

import torch

from attnzoo.bench import measure
from attnzoo.bench.measure import CpuSample, other_cpu


def test_other_cpu_subtracts_our_own_time():
    hz = measure._HZ
    a = CpuSample(wall=10.0, busy=1000, own=100, children=0)
    # 2 s later: the machine was busy 3 s of CPU (3 * hz jiffies), we used 1 s ourselves -> others 1 core on average
    b = CpuSample(wall=12.0, busy=1000 + 3 * hz, own=100 + hz, children=0)
    assert abs(other_cpu(a, b) - 1.0) < 1e-9
    # our finished children (the memory worker) are not "others" either
    c = CpuSample(wall=12.0, busy=1000 + 3 * hz, own=100 + hz, children=hz)
    assert abs(other_cpu(a, c) - 0.5) < 1e-9
    assert other_cpu(a, CpuSample(12.0, None, None, 0)) is None


def test_cpu_sample_reads_proc():
    s = CpuSample.now()
    x = torch.randn(300, 300)
    for _ in range(20):
        x = x @ x.T / 300
    t = CpuSample.now()
    if s.busy is not None:
        assert t.own >= s.own and t.busy >= s.busy
        assert other_cpu(s, t) >= 0


def test_contaminated_measurement_is_retried_then_flagged(monkeypatch):
    calls = []
    monkeypatch.setattr(measure, "other_cpu", lambda a, b: 99.0)  # someone always hogs every core
    monkeypatch.setattr(measure.time, "sleep", lambda s: calls.append(s))
    t = measure.time_call(lambda: torch.ones(10).sum(), min_run_time=0.001, retries=2, threads=1)
    assert t.attempts == 3 and t.contaminated and len(t.other_cpu_attempts) == 3
    assert len(calls) == 2  # backed off between attempts
    monkeypatch.setattr(measure, "other_cpu", lambda a, b: 0.0)
    t = measure.time_call(lambda: torch.ones(10).sum(), min_run_time=0.001, retries=2, threads=1)
    assert t.attempts == 1 and not t.contaminated and t.median > 0 and t.repeats >= 1


def test_clean_attempt_after_contaminated_one_is_kept(monkeypatch):
    seq = iter([5.0, 0.0])
    monkeypatch.setattr(measure, "other_cpu", lambda a, b: next(seq))
    monkeypatch.setattr(measure.time, "sleep", lambda s: None)
    t = measure.time_call(lambda: torch.ones(10).sum(), min_run_time=0.001, retries=3, threads=1)
    assert t.attempts == 2 and not t.contaminated and t.other_cpu == 0.0


def test_time_prepared_runs_prepare_outside_each_call():
    log = []
    t = measure.time_prepared(lambda: log.append("p") or len(log), lambda arg: log.append("r"),
                              min_run_time=0.0, retries=0, threads=1, min_repeats=3)
    assert log[:2] == ["p", "r"] and log.count("p") == log.count("r") and t.repeats >= 3


def test_peak_memory_sees_a_large_temporary():
    # a 64 MiB temporary inside the call, freed before it returns
    n = 16 * 2 ** 20
    peak = measure.peak_memory("attnzoo.bench.measure:_demo_case", {"numel": n}, threads=1)
    assert 0.9 * 4 * n <= peak <= 2.5 * 4 * n
