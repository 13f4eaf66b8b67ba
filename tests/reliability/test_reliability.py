"""The registry-wide reliability suite: every probe of attnzoo.reliability on every registered mechanism.

Bad input must get a clear error naming the argument, empty sizes the empty result or a clear error, large logits
finite outputs, fully masked rows zeros, NaNs must show, decode states must refuse calls they were not built for
and crop/reorder exactly. Probes that could kill the interpreter run together in one child process (a crash fails
only the probe that caused it); the N = 8192 probes are ``slow``.
"""

import pytest

import attnzoo
from attnzoo import reliability

PROBES = [p for mech in attnzoo.list_mechanisms() for p in reliability.probes(mech)]

KNOWN: dict[str, str] = {}
"""Probe id -> the open issue it waits for: such a probe is xfail(strict), so it fails loudly once fixed (empty
now: the Landmark probes listed here before issue 12's Deliver 2 pass since that merge)."""


def _params(isolated: bool):
    out = []
    for p in PROBES:
        if p.isolate != isolated:
            continue
        marks = [pytest.mark.slow] if p.slow else []
        if p.id in KNOWN:
            marks.append(pytest.mark.xfail(reason=KNOWN[p.id], strict=True))
        out.append(pytest.param(p, id=f"{p.mech}-{p.name}", marks=marks))
    return out


@pytest.fixture(scope="session")
def isolated_results(request):
    """Results of the isolated probes this session selected, run in one child interpreter."""
    ids = [item.callspec.params["probe"].id for item in request.session.items
           if getattr(item, "originalname", None) == "test_isolated_probe" and hasattr(item, "callspec")]
    return reliability.run_isolated(ids)


@pytest.mark.parametrize("probe", _params(isolated=False))
def test_probe(probe):
    msg = reliability.run(probe)
    assert msg is None, f"{probe.id}: {msg}"


@pytest.mark.parametrize("probe", _params(isolated=True))
def test_isolated_probe(probe, isolated_results):
    assert probe.id in isolated_results, f"{probe.id}: not run by the child process"
    msg = isolated_results[probe.id]
    assert msg is None, f"{probe.id}: {msg}"


def test_every_mechanism_is_probed():
    assert set(KNOWN) <= {p.id for p in PROBES}, sorted(set(KNOWN) - {p.id for p in PROBES})
    names = {p.mech for p in PROBES}
    assert names == set(attnzoo.names()), sorted(set(attnzoo.names()) - names)
    assert len(PROBES) > 40 * len(names)
