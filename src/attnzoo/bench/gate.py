"""The correctness gate: no number is reported for a form that disagrees with its reference.

Before a mechanism is timed, its fast form is compared with its reference on small random inputs (the
conformance checks of :mod:`attnzoo.testing`, at the record's ``test_options``/``test_sizes``, so windows,
blocks and top-k are smaller than the sequence): outputs in float64 and float32, input gradients in float64
(``assert_close``, relative error 1e-10 / 1e-5). Module mechanisms with a fast form compare
``backend="fast"`` with ``backend="reference"`` (outputs and every gradient). Decoding (``step`` or a module
state) must equal the causal forward, and decoding against a ContextCache must equal the full run (cross
mechanisms that declare ``cross.cache``). A mechanism that declares a static ``mask`` must equal softmax
attention under that mask, or its FlexAttention / masked-SDPA peers would not be the same computation.

A failing fast form blocks every non-decode case of the mechanism (reported ``gate_failed``); a failing
decode blocks its decode cases; a failing mask check disables the mask peers.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch

from .. import testing
from ..registry import Mechanism


def _run(name: str, pattern: str | None, fn, *args) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        fn(*args)
        status, msg = "pass", ""
    except AssertionError as e:
        status, msg = "fail", str(e)
    except Exception as e:  # noqa: BLE001 - a crashing check is an error of the mechanism
        status, msg = "error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
    return {"check": name, "pattern": pattern, "status": status, "message": msg[:1500],
            "seconds": round(time.perf_counter() - t0, 4)}


def run_gate(mech: Mechanism, patterns: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Gate of ``mech`` over ``patterns`` (default: all it declares). Returns a JSON-able dict with
    ``status`` ("pass", "fail" or "error"), ``blocks`` (what each failure blocks) and every check."""
    pats = list(patterns) if patterns is not None else (
        list(mech.patterns) if mech.kind == "sequence" else ["noncausal_self"])
    checks: list[dict[str, Any]] = []
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for p in pats:
            if mech.fast is not None and mech.functional:
                checks.append(_run("fast_vs_reference", p, testing.check_fast_matches_reference, mech, p))
            elif mech.fast is not None and mech.module is not None:
                checks.append(_run("module_fast_vs_reference", p, testing.check_module_fast_matches_reference,
                                   mech, p))
            if mech.mask is not None and mech.functional:
                checks.append(_run("mask_vs_reference", p, testing.check_declared_mask, mech, p))
        if mech.decodable and "causal_self" in mech.patterns:
            checks.append(_run("decode_vs_forward", None, testing.check_decode, mech))
        cross = mech.cross_spec()
        if cross is not None and cross.cache:  # decoding from a ContextCache == the full run
            for p in (p for p in mech.patterns if p.endswith("cross")):
                if mech.kind != "pooling" or p.startswith("causal"):
                    checks.append(_run("context_decode", p, testing.check_context_decode, mech, p))
    finally:
        torch.set_num_threads(old)
    blocks: dict[str, str] = {}
    for c in checks:
        if c["status"] == "pass":
            continue
        what = {"decode_vs_forward": "decode", "context_decode": "decode", "mask_vs_reference": "mask"}.get(
            c["check"], "fast")
        blocks.setdefault(what, f"{c['check']} {c['pattern'] or ''}: {c['status']}: {c['message']}".strip())
    status = "pass"
    if any(c["status"] == "error" for c in checks):
        status = "error"
    elif any(c["status"] == "fail" for c in checks):
        status = "fail"
    compared = sorted({c["check"] for c in checks})
    return {"mechanism": mech.name, "status": status, "checks": checks, "blocks": blocks,
            "note": "" if checks else "reference form only: nothing to compare (the reference is what is timed)",
            "compared": compared}
