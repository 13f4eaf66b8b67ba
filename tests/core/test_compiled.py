"""compile_decode: compiled decode == eager decode; every fallback path returns eager results, records why and warns.

One default test compiles a tiny layer for real (inductor, dim 32, 2 heads); the fallback paths replace
``torch.compile`` by fakes (no compile cost); real-dynamo runs of other mechanisms are marked slow.
"""

import copy

import pytest
import torch

import attnzoo
from attnzoo.state import CompiledDecode, compile_decode

DIM, H = 32, 2


def _layer_and_state(name="sliding_window", prefill=12, **opts):
    torch.manual_seed(0)
    layer = attnzoo.build(name, DIM, H, causal=True, **opts).eval()
    st = layer.init_state(1)
    with torch.no_grad():
        _, st = layer(torch.randn(1, prefill, DIM, generator=torch.Generator().manual_seed(1)), state=st)
    return layer, st


def _tokens(n=16):
    return torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(2))


def _decode(fn, st, xs):
    outs = []
    with torch.no_grad():
        for i in range(xs.shape[1]):
            y, st = fn(xs[:, i: i + 1], state=st)
            outs.append(y)
    return torch.cat(outs, 1), st


def _eager_reference(layer, st, xs):
    return _decode(layer, copy.deepcopy(st), xs)[0]  # an independent eager run from a cloned state


def test_compiled_decode_equals_eager_sliding_window():
    layer, st = _layer_and_state("sliding_window", window=8)  # the window slides and the ring buffer wraps
    xs = _tokens(16)
    ref = _eager_reference(layer, st, xs)
    dec = compile_decode(layer)
    out, st2 = _decode(dec, st, xs)
    assert dec.compiled and dec.fallback_reason is None, dec.fallback_reason
    assert dec.graphs >= 1 and dec.compile_time_s > 0
    assert dec.calls == 16 and dec.recompiles <= dec.max_recompiles
    assert st2.seq_len == 12 + 16
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear", "lightning", "sink_window", "moa"])
def test_compiled_decode_equals_eager_slow(name):
    opts = {"sink_window": {"window": 8, "sinks": 2}}.get(name, {})
    layer, st = _layer_and_state(name, **opts)
    xs = _tokens(16)
    ref = _eager_reference(layer, st, xs)
    dec = compile_decode(layer)
    out, _ = _decode(dec, st, xs)
    assert dec.compiled, dec.fallback_reason
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cca_keeps_recompiling_and_falls_back():
    """CCA's step branches in Python on the positions of the new tokens (which complete a group of g): dynamo
    specialises on seq_len and recompiles every token; the wrapper falls back, warns and stays correct."""
    torch._dynamo.reset()
    layer, st = _layer_and_state("cca", group_size=4, window=6)
    xs = _tokens(16)
    ref = _eager_reference(layer, st, xs)
    dec = compile_decode(layer, backend="eager", max_recompiles=2)
    with pytest.warns(RuntimeWarning, match="recompiled"):
        out, _ = _decode(dec, st, xs)
    assert not dec.compiled and "recompiled" in dec.fallback_reason
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


class _CountingState:
    def __init__(self):
        self.seq_len = 0
        self.total = torch.zeros(1, 1, DIM)


class _SpecialisingLayer(torch.nn.Module):
    """A decode call whose Python loop runs ``seq_len mod 5`` times: dynamo must specialise on seq_len."""

    def init_state(self, batch):
        return _CountingState()

    def forward(self, x, *, state, key_padding_mask=None):
        y = x
        for _ in range(state.seq_len % 5):
            y = y * 1.5
        state.total = state.total + y
        state.seq_len += 1
        return y + state.total, state


def test_real_recompiles_every_token_fall_back():
    torch._dynamo.reset()
    layer = _SpecialisingLayer()
    xs = _tokens(12)
    ref = _decode(layer, layer.init_state(1), xs)[0]
    dec = compile_decode(layer, backend="eager", max_recompiles=3)
    with pytest.warns(RuntimeWarning, match="recompiled 4 times"):
        out, st = _decode(dec, layer.init_state(1), xs)
    assert not dec.compiled and st.seq_len == 12 and dec.graphs >= 5
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_compile_error_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(torch, "compile", broken)
    layer, st = _layer_and_state()
    xs = _tokens(6)
    ref = _eager_reference(layer, st, xs)
    dec = compile_decode(layer)
    with pytest.warns(RuntimeWarning, match="inductor exploded"):
        out, st2 = _decode(dec, st, xs)
    assert not dec.compiled and "inductor exploded" in dec.fallback_reason
    assert st2.seq_len == 12 + 6
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_wrong_compiled_output_falls_back(monkeypatch):
    """A compiled call that returns a wrong output is caught on the first token; what the wrapper returns is
    eager (== an independent eager run), never the wrong output."""
    def wrong_compile(module, **kwargs):
        def fn(x, *, state, key_padding_mask=None):
            y, state = module(x, state=state, key_padding_mask=key_padding_mask)
            return y + 1e-3, state
        return fn

    monkeypatch.setattr(torch, "compile", wrong_compile)
    layer, st = _layer_and_state()
    xs = _tokens(6)
    ref = _eager_reference(layer, st, xs)
    dec = compile_decode(layer)
    with pytest.warns(RuntimeWarning, match="differs from eager"):
        out, _ = _decode(dec, st, xs)
    assert not dec.compiled and "differs from eager" in dec.fallback_reason
    assert dec.max_rel_err > 1e-5
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_later_compiled_error_and_recompiles_fall_back(monkeypatch):
    from torch._dynamo.utils import counters

    calls = [0]

    def flaky_compile(module, **kwargs):
        def fn(x, *, state, key_padding_mask=None):
            calls[0] += 1
            if calls[0] == 4:
                raise RuntimeError("guard failure")  # before touching the state: retried eagerly
            return module(x, state=state, key_padding_mask=key_padding_mask)
        return fn

    monkeypatch.setattr(torch, "compile", flaky_compile)
    layer, st = _layer_and_state()
    xs = _tokens(6)
    ref = _eager_reference(layer, st, xs)
    dec = compile_decode(layer, check_calls=2)
    with pytest.warns(RuntimeWarning, match="guard failure"):
        out, st2 = _decode(dec, st, xs)
    assert not dec.compiled and "call 4" in dec.fallback_reason and st2.seq_len == 18
    torch.testing.assert_close(out, ref, atol=0, rtol=0)

    def recompiling(module, **kwargs):  # a cache miss on every call, as a state int dynamo specialises on gives
        def fn(x, *, state, key_padding_mask=None):
            counters["frames"]["total"] += 1
            return module(x, state=state, key_padding_mask=key_padding_mask)
        return fn

    monkeypatch.setattr(torch, "compile", recompiling)
    layer, st = _layer_and_state()
    dec = compile_decode(layer, max_recompiles=2)
    with pytest.warns(RuntimeWarning, match="recompiled 3 times"):
        out, _ = _decode(dec, st, xs)
    assert not dec.compiled and dec.calls == 6
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_a_callers_error_is_raised_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    layer, st = _layer_and_state()
    dec = compile_decode(layer)
    with pytest.raises(ValueError, match="x"):
        dec(torch.randn(1, 1, DIM + 1), state=st)
    with pytest.raises(ValueError, match="state"):
        dec(torch.randn(1, 1, DIM), state=None)
    assert dec.compiled and dec.fallback_reason is None


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"mode": "fastest"}, ValueError, "mode"),
    ({"dynamic": 1}, TypeError, "dynamic"),
    ({"fullgraph": "yes"}, TypeError, "fullgraph"),
    ({"max_recompiles": -1}, ValueError, "max_recompiles"),
    ({"check_calls": 0}, ValueError, "check_calls"),
    ({"rtol": 0.0}, ValueError, "rtol"),
    ({"backend": ""}, TypeError, "backend"),
])
def test_bad_arguments(kwargs, exc, match):
    layer, _ = _layer_and_state()
    with pytest.raises(exc, match=match):
        compile_decode(layer, **kwargs)


def test_bad_module():
    with pytest.raises(TypeError, match="module"):
        compile_decode(lambda x: x)
    with pytest.raises(TypeError, match="module: .*init_state"):
        compile_decode(torch.nn.Linear(2, 2))
    assert isinstance(compile_decode(_layer_and_state()[0]), CompiledDecode)


class _UncopyableState(_CountingState):
    def __deepcopy__(self, memo):
        raise RuntimeError("no copies")


def test_uncopyable_state_falls_back():
    layer = _SpecialisingLayer()
    xs = _tokens(3)
    ref = _decode(layer, layer.init_state(1), xs)[0]
    dec = compile_decode(layer)
    with pytest.warns(RuntimeWarning, match="deep-copied"):
        out, st = _decode(dec, _UncopyableState(), xs)
    assert not dec.compiled and dec.calls == 3 and st.seq_len == 3
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_shared_wrappers_count_recompiles_together_and_fall_back_together():
    """Wrappers of one module with share_with (the layers of one model, each with its own state): the cache misses
    of all of them count against one max_recompiles, and a fallback (decided by whichever wrapper's call crosses
    it) switches every wrapper to eager. Each still returns exactly what eager returns for its own state."""
    torch._dynamo.reset()
    layer = _SpecialisingLayer()
    xs = _tokens(10)
    refs = [_decode(layer, layer.init_state(1), xs * (i + 1))[0] for i in range(3)]
    first = compile_decode(layer, backend="eager", max_recompiles=3)
    decs = [first] + [compile_decode(layer, backend="eager", max_recompiles=3, share_with=first) for _ in range(2)]
    states = [layer.init_state(1) for _ in decs]
    outs = [[] for _ in decs]
    with pytest.warns(RuntimeWarning, match="recompiled 4 times"):
        with torch.no_grad():
            for t in range(xs.shape[1]):  # token by token, layer by layer, as a model decodes
                for i, dec in enumerate(decs):
                    y, states[i] = dec(xs[:, t: t + 1] * (i + 1), state=states[i])
                    outs[i].append(y)
    assert all(not d.compiled and d.fallback_reason == first.fallback_reason for d in decs)
    assert all(d.recompiles == first.recompiles > 3 for d in decs)  # one shared count
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(torch.cat(out, 1), ref, atol=0, rtol=0)


def test_share_with_errors():
    layer, _ = _layer_and_state()
    with pytest.raises(TypeError, match="share_with: expected a CompiledDecode"):
        compile_decode(layer, share_with=layer)
    other = compile_decode(_layer_and_state()[0])
    with pytest.raises(ValueError, match="share_with: expected a CompiledDecode of this very module"):
        compile_decode(layer, share_with=other)
