"""The reliability probes must catch real bugs: broken mechanisms, registered only here, each fail the probe written
for their bug (and the registry's own mechanisms pass the same probes in test_reliability.py)."""

import importlib.util
import os

import pytest

from attnzoo import reliability

HERE = os.path.dirname(__file__)


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def planted():
    mod = _load("planted")
    mod.register_all()
    reliability._FOUND.clear()
    yield mod
    mod.unregister_all()
    reliability._FOUND.clear()


def failure(probe_id):
    return reliability.run(reliability.find(probe_id))


def test_nan_rows_caught(planted):
    assert "non-finite output" in failure("_planted_nan_rows::numeric.fully_masked")
    assert failure("softmax::numeric.fully_masked") is None


def test_hidden_nan_caught(planted):
    for which in "qkv":
        assert "vanished" in failure(f"_planted_hides_nan::numeric.nan_{which}")


def test_loose_step_caught(planted):
    assert failure("_planted_loose_step::step.mask_float").startswith("accepted silently")
    assert failure("_planted_loose_step::step.scale_inf").startswith("accepted silently")
    assert "does not name state" in failure("_planted_loose_step::step.state_batch")
    assert failure("softmax::step.mask_float") is None


def test_forgetful_crop_caught(planted):
    assert "relative error" in failure("_planted_forgetful::state.crop_continue")
    assert failure("softmax::state.crop_continue") is None


def test_interpreter_crash_is_isolated(planted):
    """A probe that kills the interpreter fails alone; the probes after it still run (in a new child)."""
    ids = ["_planted_fpe::empty.module_length", "_planted_fpe::empty.module_batch", "softmax::empty.batch"]
    out = reliability.run_isolated(ids, imports=[os.path.join(HERE, "planted_register.py")])
    assert out["_planted_fpe::empty.module_length"].startswith("killed the interpreter (signal 8)")
    assert out["_planted_fpe::empty.module_batch"] is not None  # its module validates nothing: accepted silently
    assert out["softmax::empty.batch"] is None


def test_source_dict_probes_caught(planted):
    """The module probes perturb one source of a {source: tensor} context and pass per-source masks: a layer that
    validates neither is caught; the contract's layer passes the same probes."""
    assert failure("_planted_loose_sources::module.mask_float").startswith("accepted silently")
    assert "does not name context" in failure("_planted_loose_sources::module.context_list")
    assert failure("_planted_loose_sources::module.context_batch").startswith("crashed inside")
    for probe in ("module.mask_float", "module.context_list", "module.context_batch"):
        assert failure(f"cross_attention::{probe}") is None


def test_decode_prefill_is_read(planted):
    """The decode probes prefill a record's ``decode_prefill`` in one step: without it, Croc's visual span would
    be decoded token by token, which Croc refuses by design."""
    assert "cut the visual span" in failure("_planted_croc_no_prefill::state.crop_continue")
    assert failure("croc::state.crop_continue") is None
    assert reliability.decode_chunks(0, 6, 0, 4) == [(0, 4), (4, 5), (5, 6)]
    assert reliability.decode_chunks(2, 5, 9, 4) == [(2, 3), (3, 4), (4, 5)]


def test_expect_error_outcomes():
    def raises(exc):
        def call():
            raise exc
        return call

    reliability.expect_error(raises(ValueError("x: expected a 3-D tensor")), "x")
    with pytest.raises(reliability.ProbeFailure, match="does not name"):
        reliability.expect_error(raises(ValueError("expected a 3-D tensor")), "x")
    with pytest.raises(reliability.ProbeFailure, match="crashed inside with RuntimeError"):
        reliability.expect_error(raises(RuntimeError("x: shape mismatch")), "x")
    with pytest.raises(reliability.ProbeFailure, match="accepted silently"):
        reliability.expect_error(lambda: 1, "x")
    assert reliability.names_argument("k, v: batch size must match", "k")
    assert not reliability.names_argument("keys must match", "k")
