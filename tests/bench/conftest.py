"""A tiny benchmark run shared by the bench tests (one run per session, well under a minute)."""

import os
import sys

import pytest

from attnzoo import registry

HERE = os.path.dirname(os.path.abspath(__file__))
FAKES = os.path.join(HERE, "fake_mechanisms.py")


def tiny_config(out, **kw):
    from attnzoo.bench import quick

    base = dict(
        mechanisms=["softmax", "sliding_window", "bench_fake_module", "bench_fake_grid", "bench_fake_channel"],
        lengths=(16, 32), min_run_time=0.002, warmup=1, retries=0, options={"sliding_window": {"window": 8}},
        tasks=("mqar", "digits"), quality_steps=3, quality_budget=5.0, deadline=None, mechanism_budget=60.0,
        progress=False, out=str(out), imports=[FAKES], command="pytest tiny bench run", decode_tokens=2,
    )
    base.update(kw)
    return quick(**base)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(results, out_dir, written paths) of a tiny end-to-end run with memory, quality, plots and report."""
    from attnzoo.bench.runner import run, write_outputs

    out = tmp_path_factory.mktemp("bench")
    try:
        results = run(tiny_config(out))
        paths = write_outputs(results, str(out))
    finally:
        for name in ("bench_fake_module", "bench_fake_grid", "bench_fake_channel"):
            if name in registry._REGISTRY:
                registry.unregister(name)
        sys.modules.pop("attnzoo_user_fake_mechanisms", None)
    return results, out, paths
