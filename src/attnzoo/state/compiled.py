"""``torch.compile`` of the one-token decode call, with an eager fallback and the compile time reported.

    dec = compile_decode(layer)                    # layer = attnzoo.build(name, dim, heads, causal=True)
    state = layer.init_state(batch)
    out, state = dec(x_token, state=state)         # exactly like ``layer(x_token, state=state)``
    dec.compiled, dec.compile_time_s, dec.fallback_reason

    step = StepModule(mech.step, mech.resolve_options({}))   # a functional mechanism's step on projected q, k, v
    out, state = compile_decode(step)(q, k, v, state=state, scale=d ** -0.5)   # what swap_attention(compile=True) runs

What the wrapper does
    - The first ``check_calls`` calls are *checked*: the module runs eagerly on the caller's state (that is
      what they return) and the compiled module runs on a private deep copy of the state taken at the first
      call; their outputs must agree within ``rtol`` (relative to the largest output magnitude). The copy
      follows the real state through the checked calls, so the graphs the first few tokens compile (the
      first one, then the one dynamo recompiles with the positions as symbolic ints) are both checked.
    - After that the compiled module runs on the caller's state.
    - Fallback to eager (for good: ``compiled`` becomes False, ``fallback_reason`` says why, a
      ``RuntimeWarning`` is issued -- never silently) when compiling or running the compiled call raises
      during a checked call, when its output differs from eager, or when dynamo keeps recompiling after the
      checked calls: more than ``max_recompiles`` cache misses (new graphs, or frames dynamo gives up on
      after its own ``recompile_limit``), e.g. a state keeping a Python int that dynamo specialises on every
      token. An exception in a later compiled call also falls back; the call is retried eagerly when the
      state's ``seq_len`` shows it was not advanced, and re-raised otherwise (a state partly updated by a
      failed call cannot be trusted).
    - Errors of the call itself (a wrong input shape, a wrong state) are raised by the eager run of a checked
      call exactly as without the wrapper, and cause no fallback.

``compile_time_s`` sums the wall time of the calls during which dynamo compiled something (the first call,
the recompile of the second one, any later recompile; a checked call's eager run is not counted).

Dynamo caches compiled code per Python function, so layers of one class (every functional mechanism goes
through ``Attention.forward``) share dynamo's ``recompile_limit`` (8 per function by default): compiling
many different layers in one process can reach it, which this wrapper then reports as recompiles and falls
back from. ``torch._dynamo.reset()`` between unrelated layers avoids that (the benchmark does).

Decode states mutate in place: buffers are written by index, and ``seq_len``/``length``/``_off`` are
Python ints. Dynamo specialises on the first value of such an int and, when it changes at the next token,
recompiles once with it symbolic (automatic dynamic shapes), so a bounded cache (sliding window, sinks)
and a recurrent state compile to two or three graphs and then stay compiled; branches on those ints
(the ring buffer moving back to the front once per slack, eviction) become guards. The caches write new
tokens with ``index_copy_``: inductor compiled the equivalent slice assignments (the append, the sinks'
move in :class:`~attnzoo.state.SinkWindowCache`) into a rewrite of the whole preallocated buffer every
token.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch

from ..errors import check_bool, check_choice, check_float, check_int

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # else (bf16/fp16): 2e-2 (the project's tolerances)

__all__ = ["CompiledDecode", "StepModule", "compile_decode"]


def _compiles() -> tuple[int, int]:
    """(graphs compiled, frames dynamo tried to convert) so far in this process: any cache miss moves the second."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["frames"]["total"]


class StepModule(torch.nn.Module):
    """A functional mechanism's decode step as a module, so it can be compiled: ``forward(q, k, v, *, state, scale,
    key_padding_mask=None) -> (out, state)`` runs ``step(q, k, v, state, scale=..., key_padding_mask=..., **options)``
    (q (B, Hq, T, D), k/v (B, Hk, T, D/Dv) of the new tokens; out (B, Hq, T, Dv); the state advances in place).
    It holds no parameters: one instance serves every layer of a model (dynamo then compiles one graph for all)."""

    def __init__(self, step, options: dict | None = None) -> None:
        super().__init__()
        if not callable(step):
            raise TypeError(f"step: expected a mechanism's decode step (registry.get(name).step), got {step!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options: expected a dict of the mechanism's options, got {type(options).__name__}")
        self.step = step
        self.options = dict(options or {})

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, state, scale: float,
                key_padding_mask: torch.Tensor | None = None):
        out = self.step(q, k, v, state, scale=scale, key_padding_mask=key_padding_mask,
                        **self.options)  # (B, Hq, T, Dv)
        return out, state


class _Group:
    """What the wrappers of one module share (``share_with``): one compiled function, so one set of graphs, one
    count of recompiles, one fallback."""

    def __init__(self) -> None:
        self.fn = None
        self.fallback_reason: str | None = None
        self.recompiles = 0


class CompiledDecode:
    """A decode call ``out, state = dec(x, state=state)`` compiled with ``torch.compile``; see the module
    docstring. Attributes: ``module``, ``compiled`` (bool: the compiled path is in use or still pending),
    ``compile_time_s``, ``graphs`` (graphs dynamo compiled during this wrapper's calls), ``recompiles``
    (cache misses after the checked calls, over the wrappers sharing its graphs), ``fallback_reason`` (None
    while compiled), ``calls``, ``max_rel_err``.

    ``share_with``: another wrapper of the same module (the layers of one model, each with its own state):
    they share the compiled function, the recompile count and the fallback -- a graph that keeps recompiling
    or differs from eager for one layer is given up for all of them -- while each checks its own first calls."""

    def __init__(self, module: torch.nn.Module, *, mode: str | None = None, dynamic: bool | None = None,
                 fullgraph: bool = False, max_recompiles: int = 4, check_calls: int = 2,
                 rtol: float | None = None, backend: str = "inductor",
                 share_with: CompiledDecode | None = None) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module (e.g. attnzoo.build(...)), got "
                            f"{type(module).__name__}")
        if not callable(getattr(module, "init_state", None)) and not isinstance(module, StepModule):
            raise TypeError(f"module: expected a module with a decode state (an init_state method) or a StepModule, "
                            f"got {type(module).__name__}")
        check_choice("mode", mode, MODES)
        if dynamic is not None:
            check_bool("dynamic", dynamic)
        check_bool("fullgraph", fullgraph)
        check_int("max_recompiles", max_recompiles, low=0)
        check_int("check_calls", check_calls, low=1)
        if rtol is not None:
            check_float("rtol", rtol, low=0.0, low_open=True)
        if not isinstance(backend, str) or not backend:
            raise TypeError(f"backend: expected the name of a torch.compile backend (e.g. 'inductor'), got "
                            f"{backend!r}")
        if share_with is not None:
            if not isinstance(share_with, CompiledDecode):
                raise TypeError(f"share_with: expected a CompiledDecode of the same module, got "
                                f"{type(share_with).__name__}")
            if share_with.module is not module:
                raise ValueError(f"share_with: expected a CompiledDecode of this very module (they share its compiled "
                                 f"graphs), got one of another {type(share_with.module).__name__}")
        self.module = module
        self.mode, self.dynamic, self.fullgraph, self.backend = mode, dynamic, fullgraph, backend
        self.max_recompiles, self.check_calls, self.rtol = max_recompiles, check_calls, rtol
        # what wrappers sharing one module share: the compiled function, the recompile count and the fallback
        self._group = share_with._group if share_with is not None else _Group()
        self.compile_time_s = 0.0
        self.graphs = 0
        self.calls = 0
        self.max_rel_err = 0.0  # largest relative difference seen in the checked calls
        self._shadow = None  # the compiled path's copy of the state during the checked calls

    @property
    def compiled(self) -> bool:
        """The compiled path is in use (or still pending); False after a fallback (of any wrapper sharing it)."""
        return self._group.fallback_reason is None

    @property
    def fallback_reason(self) -> str | None:
        return self._group.fallback_reason

    @property
    def recompiles(self) -> int:
        """Dynamo cache misses after the checked calls, counted over every wrapper sharing this one's graphs."""
        return self._group.recompiles

    def __repr__(self) -> str:
        status = "compiled" if self.compiled else f"eager fallback ({self.fallback_reason})"
        return (f"CompiledDecode({type(self.module).__name__}, {status}, compile_time_s={self.compile_time_s:.2f}, "
                f"graphs={self.graphs})")

    # -- internals ---------------------------------------------------------------------------------------
    def _fallback(self, reason: str) -> None:
        self._group.fallback_reason = reason
        self._group.fn = self._shadow = None
        warnings.warn(f"compile_decode({type(self.module).__name__}): falling back to eager decoding: {reason}",
                      RuntimeWarning, stacklevel=3)

    def _timed(self, fn, args, state, kwargs):
        """Run the compiled call; count graphs/cache misses and add the time of a compiling call."""
        g0, f0 = _compiles()
        t0 = time.perf_counter()
        out = fn(*args, state=state, **kwargs)
        dt = time.perf_counter() - t0
        g1, f1 = _compiles()
        if f1 != f0 or g1 != g0:
            self.compile_time_s += dt
            self.graphs += g1 - g0
        return out, f1 - f0

    def _checked(self, args, state, kwargs):
        """Eager on the caller's state (returned), compiled on the shadow copy; compare."""
        if self._shadow is None:
            try:
                self._shadow = copy.deepcopy(state)  # before the eager call advances the real state
            except Exception as e:  # noqa: BLE001 - a state that cannot be copied cannot be checked
                self._fallback(f"the state ({type(state).__name__}) cannot be deep-copied to check the compiled call "
                               f"against eager: {type(e).__name__}: {str(e)[:200]}")
                self.calls -= 1
                return self(*args, state=state, **kwargs)
        shadow = self._shadow
        try:
            out = self.module(*args, state=state, **kwargs)  # a caller's error raises here
        except Exception:
            self.calls -= 1  # not a checked call
            raise
        try:
            if self._group.fn is None:
                self._group.fn = torch.compile(self.module, mode=self.mode, dynamic=self.dynamic,
                                               fullgraph=self.fullgraph, backend=self.backend)
            got, _ = self._timed(self._group.fn, args, shadow, kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of dynamo/inductor means: decode eagerly
            self._fallback(f"torch.compile failed on call {self.calls}: {type(e).__name__}: {str(e)[:300]}")
            return out
        y, y_ref = got[0], out[0]
        if not isinstance(got, tuple) or y.shape != y_ref.shape or y.dtype != y_ref.dtype:
            self._fallback(f"the compiled call returned {type(got).__name__} {getattr(y, 'shape', None)} "
                           f"where eager returned {tuple(y_ref.shape)}")
            return out
        self._shadow = got[1]
        rtol = self.rtol if self.rtol is not None else _RTOL.get(y_ref.dtype, 2e-2)
        scale = y_ref.detach().abs().max().item() if y_ref.numel() else 0.0
        err = (y.detach() - y_ref.detach()).abs().max().item() if y_ref.numel() else 0.0
        rel = err / max(scale, torch.finfo(y_ref.dtype).tiny)
        self.max_rel_err = max(self.max_rel_err, rel)
        if not rel <= rtol:  # also catches NaN
            self._fallback(f"the compiled output differs from eager on call {self.calls}: max abs error {err:.3g}, "
                           f"relative {rel:.3g} > rtol {rtol:.3g}")
        elif getattr(got[1], "seq_len", None) != getattr(out[1], "seq_len", None):
            self._fallback(f"the compiled call left the state at seq_len {getattr(got[1], 'seq_len', None)}, "
                           f"eager at {getattr(out[1], 'seq_len', None)}")
        return out

    # -- the call ------------------------------------------------------------------------------------------
    def __call__(self, *args, state, **kwargs):
        """``out, state = dec(x, state=state)`` (a layer; ``key_padding_mask=`` as the layer takes it) or
        ``dec(q, k, v, state=state, scale=...)`` (a :class:`StepModule`): the module's decode call, compiled when
        it can be."""
        if state is None:
            raise ValueError("state: compile_decode wraps the decode call; expected a decode state "
                             "(module.init_state(batch)), got None")
        self.calls += 1
        if not self.compiled:
            return self.module(*args, state=state, **kwargs)
        if self.calls <= self.check_calls:
            out = self._checked(args, state, kwargs)
            if self.calls == self.check_calls:
                self._shadow = None
            return out
        seq_len = getattr(state, "seq_len", None)
        try:
            out, misses = self._timed(self._group.fn, args, state, kwargs)
        except Exception as e:  # noqa: BLE001
            self._fallback(f"the compiled call raised on call {self.calls}: {type(e).__name__}: {str(e)[:300]}")
            if getattr(state, "seq_len", None) != seq_len:
                raise RuntimeError("compile_decode: the compiled call failed after advancing the state; the state "
                                   "may be partly updated, rebuild it (the wrapper now decodes eagerly)") from e
            return self.module(*args, state=state, **kwargs)
        if misses:
            self._group.recompiles += misses
            if self.recompiles > self.max_recompiles:
                self._fallback(f"dynamo recompiled {self.recompiles} times after the first {self.check_calls} "
                               f"calls (max_recompiles={self.max_recompiles}): a Python int, branch or tensor shape "
                               "dynamo specialises on keeps changing (TORCH_LOGS=recompiles names it)")
        return out


def compile_decode(module: torch.nn.Module, *, mode: str | None = None, dynamic: bool | None = None,
                   fullgraph: bool = False, max_recompiles: int = 4, check_calls: int = 2,
                   rtol: float | None = None, backend: str = "inductor",
                   share_with: CompiledDecode | None = None) -> CompiledDecode:
    """Wrap ``module``'s one-token decode call (``out, state = module(x, state=state)``) in ``torch.compile``.

    Args:
        module: a layer with a decode state (``attnzoo.build(name, dim, heads, causal=True, ...)``), or a
            :class:`StepModule` (a functional mechanism's step on projected q, k, v: what ``swap_attention``
            compiles inside a transformers model).
        mode, dynamic, fullgraph, backend: passed to ``torch.compile``.
        max_recompiles: dynamo cache misses tolerated after the checked calls before falling back to eager.
        check_calls: how many first calls run eagerly beside the compiled call on a copy of the state and are
            compared (>= 1).
        rtol: largest relative output difference (to the largest |output|) accepted in the checked calls;
            default 1e-10 (float64), 1e-5 (float32), 2e-2 (16-bit).
        share_with: a wrapper of the same module to share the compiled function, the recompile count and the
            fallback with (one per layer of a model, each decoding its own state).

    Returns a :class:`CompiledDecode`; see this module's docstring for when and how it falls back.
    """
    return CompiledDecode(module, mode=mode, dynamic=dynamic, fullgraph=fullgraph, max_recompiles=max_recompiles,
                          check_calls=check_calls, rtol=rtol, backend=backend, share_with=share_with)
