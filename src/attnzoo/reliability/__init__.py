"""The reliability probes: what every registered mechanism does with bad, empty, extreme and adversarial input.

Where :mod:`attnzoo.testing` checks that a mechanism computes the right thing on good input, these probes check
that it never computes a wrong thing quietly: bad input gets a clear error, empty sizes get the empty result or a
clear error, large logits stay finite, fully masked rows give zeros, a NaN is not hidden, decode states refuse calls
they were not built for and roll back (``crop``) and reorder (``reorder``) exactly. ``tests/reliability`` runs them
over the whole registry; run them on your own mechanism with :func:`run_all` (or :func:`probes` + :func:`run`).

An error is correct only if it is a ``ValueError``/``TypeError`` (or an attnzoo error) whose message names the
argument; anything else (a ``RuntimeError``/``IndexError`` from deep inside, a silent result) fails the probe. A
probe that could kill the interpreter (empty sizes reach integer divisions in C kernels) runs in a subprocess:
:func:`run_isolated` runs a batch of them in one child and survives a crash, charging it to the probe that was
running.

Modules: :mod:`.core` (outcome rules, the probe record, call helpers), :mod:`.entry` (``attention.*``, ``empty.*``,
``build.*``, ``module.*``), :mod:`.decode` (``init_state.*``, ``step.*``, ``state.*``), :mod:`.numerics`
(``numeric.*``), :mod:`.runner` (assembly, lookup, running in process or isolated).

Probe groups (the first part of a probe's name):
- ``attention.*``: ``attnzoo.attention`` with a bad argument (rank, sizes, dtype, device, non-tensor, mask dtype,
  shape and device, scale, causal, backend, each option out of its range).
- ``empty.*``: B = 0 / Nq = 0 give the empty result; N = 0, Nk = 0, D = 0, Dv = 0, no heads, and empty module
  inputs give an error naming the argument (the contract in ARCHITECTURE.md, "Errors").
- ``build.*``, ``module.*``: ``attnzoo.build`` with bad integers; a module's ``forward`` with a bad ``x``,
  ``context`` or mask, and ``x`` of another dtype or device than the module's parameters.
- ``init_state.*``, ``step.*``, ``state.*``: bad integers and dtypes for ``init_state``; ``step`` (or a module's
  ``forward(state=...)``) with bad masks, a scale out of range, and a state built for another batch size, head
  count, head size, dtype or device, or of another type; ``crop``/``reorder`` with bad arguments and their
  semantics (crop then continue == decoding the prefix afresh; reorder == decoding the reordered batch); a state's
  own ``append`` with bad masks.
- ``numeric.*``: large logits (q, k x 100 in float32 and bfloat16 against float64), fully masked rows (zeros, no
  NaN, finite gradients), NaN propagation (a NaN in an input shows in its batch row and stays there), tied scores
  (identical keys: fast == reference, decode == forward), and long sequences (N = 8192 through the fast form with the
  default options; ``slow`` for forms whose complexity is quadratic).
"""

from .core import CLEAR_ERRORS, LARGE_LOGITS_TOL, LONG_N, Probe, ProbeFailure, expect_error, names_argument
from .decode import decode_chunks
from .numerics import quadratic
from .runner import find, probes, run, run_all, run_isolated

__all__ = ["CLEAR_ERRORS", "LARGE_LOGITS_TOL", "LONG_N", "Probe", "ProbeFailure", "decode_chunks", "expect_error",
           "find", "names_argument", "probes", "quadratic", "run", "run_all", "run_isolated"]
