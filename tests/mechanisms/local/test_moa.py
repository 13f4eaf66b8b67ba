"""MoA oracles: spans >= N are dense attention; each head equals sink_window with its own window (and an
explicit per-row loop); the elastic span rule by hand; fast == dense masked reference (outputs, gradients,
GQA, padding); gradcheck; decoding == causal forward with a per-head bounded cache; reorder/crop."""

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.local.moa import MoAState, PerHeadWindowCache, moa_fast, moa_windows
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

MECH = "moa"


def qkv(B, Hq, Hk, Nq, Nk, D=8, Dv=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    return tuple(torch.randn(B, h, n, d, generator=g, dtype=torch.float64).requires_grad_(grad)
                 for h, n, d in ((Hq, Nq, D), (Hk, Nk, D), (Hk, Nk, Dv)))


def test_elastic_span_rule_by_hand():
    # span = min(int(alpha + beta N), N); window = span - sinks
    assert moa_windows(3, 100, alphas=(10, -20, 50), betas=(0.0, 0.5, 1.0), sinks=4) == [6, 26, 96]
    # official runtime rounding: at least 128, multiple of 64 (cache sizes 128, 192, 1024 for N = 1000)
    got = moa_windows(3, 1000, alphas=(0, 100, 0), betas=(0.1, 0.05, 2.0), sinks=64, min_span=128, span_multiple=64)
    assert got == [128 - 64, 192 - 64, 1024 - 64]
    # a span that does not exceed the sinks still keeps the query's own key
    assert moa_windows(1, 50, alphas=3, betas=0.0, sinks=8) == [1]


def test_spans_covering_everything_are_dense_causal_attention():
    q, k, v = qkv(2, 4, 2, 33, 33)
    want = softmax_attention(q, k, v, causal=True)
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, alphas=(33, 40, 0, 10), betas=(0, 0, 1, 1),
                                sinks=3, backend=backend)
        assert_close(got, want, torch.float64, f"spans >= N ({backend})")


def test_each_head_is_sink_window_with_its_own_window():
    n, sinks = 50, 3
    alphas, betas = (8, 12, 20, 5, 31, 9), (0.0, 0.1, 0.2, 0.0, 0.0, 0.3)
    q, k, v = qkv(2, 6, 3, n, n, seed=2)
    windows = moa_windows(6, n, alphas=alphas, betas=betas, sinks=sinks)
    assert len(set(windows)) == 6
    got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, alphas=alphas, betas=betas, sinks=sinks,
                            backend="fast")
    for h, w in enumerate(windows):
        want = attnzoo.attention(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1],
                                 mechanism="sink_window", causal=True, window=w, sinks=sinks, backend="reference")
        assert_close(got[:, h : h + 1], want, torch.float64, f"head {h} (window {w})")


def test_explicit_loop():
    n, sinks = 12, 2
    q, k, v = qkv(1, 2, 1, n, n, seed=4)
    windows = [3, 5]
    got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, alphas=(5, 7), sinks=sinks, backend="fast")
    scale = 8 ** -0.5
    for h, w in enumerate(windows):
        for i in range(n):
            keys = sorted({j for j in range(n) if j <= i and (j < sinks or i - j < w)})
            s = (k[0, 0, keys] @ q[0, h, i]) * scale
            want = torch.softmax(s, 0) @ v[0, 0, keys]
            assert_close(got[0, h, i], want, torch.float64, f"head {h} row {i}")


@pytest.mark.parametrize("n", [1, 7, 65])
def test_fast_matches_reference(n):
    q, k, v = qkv(2, 6, 2, n, n, Dv=5, grad=True, seed=n)
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.3
    opts = dict(mechanism=MECH, causal=True, alphas=(4, 9, 2, 16, 3, 9), betas=(0, 0.2, 0, 0, 0.1, 0.2), sinks=2,
                key_padding_mask=kpm)
    ref = attnzoo.attention(q, k, v, backend="reference", **opts)
    got = attnzoo.attention(q, k, v, backend="fast", **opts)
    assert_close(got, ref, torch.float64, "output")
    g = torch.randn_like(ref)
    for a, b, name in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), "qkv"):
        assert_close(a, b, torch.float64, f"grad {name}")


def test_causal_cross_and_float32():
    q, k, v = qkv(1, 4, 4, 20, 130, D=16, seed=9)
    opts = dict(mechanism=MECH, causal=True, alphas=(10, 40, 70, 200), sinks=4)
    ref = attnzoo.attention(q, k, v, backend="reference", **opts)
    assert_close(attnzoo.attention(q, k, v, backend="fast", **opts), ref, torch.float64, "causal cross")
    got = attnzoo.attention(q.float(), k.float(), v.float(), backend="fast", **opts)
    assert_close(got, ref, torch.float32, "float32")


def test_gradcheck_fast():
    q, k, v = qkv(1, 2, 1, 9, 9, D=3, grad=True, seed=5)
    fn = lambda q, k, v: moa_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.5, alphas=(3, 5), betas=0.0,
                                  sinks=1, length=None, min_span=1, span_multiple=1)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def decode(q, k, v, chunks, state, **opts):
    mech = attnzoo.get(MECH)
    outs, t = [], 0
    for T in chunks:
        outs.append(mech.step(q[:, :, t : t + T], k[:, :, t : t + T], v[:, :, t : t + T], state, scale=8 ** -0.5,
                              **mech.resolve_options(opts)))
        t += T
    return torch.cat(outs, dim=2)


def test_decode_equals_causal_forward_with_per_head_bounded_cache():
    n, sinks = 60, 3
    opts = dict(alphas=(6, 10, 25, 8, 14, 40), betas=(0, 0, 0, 0.1, 0, 0), sinks=sinks, length=80)
    q, k, v = qkv(2, 6, 3, n, n, Dv=5, seed=8)
    full = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, **opts)
    state = MoAState(2, 3, 8, 5, sinks=sinks, dtype=q.dtype)
    got = decode(q, k, v, (10, 1, 1, 4, 1, 1, 1, 20, 1, 21), state, **opts)
    assert_close(got, full, torch.float64, "decode vs causal forward")
    windows = moa_windows(6, 80, alphas=opts["alphas"], betas=opts["betas"], sinks=sinks)  # [3, 7, 22, 13, 11, 37]
    per_kv = [max(windows[2 * x : 2 * x + 2]) for x in range(3)]
    stored = state.cache.stored_tokens()
    assert stored == [sinks + w - 1 for w in per_kv], (stored, per_kv)
    full_cache_bytes = 2 * 3 * n * (8 + 5) * 8
    assert state.nbytes() < full_cache_bytes


def test_decode_fixes_windows_at_prefill_length():
    n = 40
    opts = dict(alphas=(4, 2), betas=(0.1, 0.25), sinks=2)
    q, k, v = qkv(1, 2, 2, n, n, seed=12)
    state = MoAState(1, 2, 8, sinks=2, dtype=q.dtype)
    got = decode(q, k, v, (16,) + (1,) * 24, state, **opts)
    want = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, length=16, **opts)
    assert state.query_windows == moa_windows(2, 16, alphas=(4, 2), betas=(0.1, 0.25), sinks=2)
    assert_close(got, want, torch.float64, "decode with windows fixed at the prefill length")


def test_reorder_and_crop():
    n = 30
    opts = dict(alphas=(5, 9), sinks=2, length=30)
    q, k, v = qkv(3, 2, 2, n, n, seed=13)
    full = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, **opts)
    state = MoAState(3, 2, 8, sinks=2, extra=4, dtype=q.dtype)
    decode(q[:, :, :20], k[:, :, :20], v[:, :, :20], (20,), state, **opts)
    decode(q[:, :, 20:23], k[:, :, 20:23], v[:, :, 20:23], (1, 1, 1), state, **opts)  # speculative tokens
    state.crop(20)  # reject them
    assert state.seq_len == 20
    got = decode(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], (10,), state, **opts)
    assert_close(got, full[:, :, 20:], torch.float64, "after crop")
    with pytest.raises(ValueError, match="extra"):
        state.crop(10)  # 20 tokens back: more than extra = 4 allows
    assert state.seq_len == n
    idx = torch.tensor([2, 0])
    state.reorder(idx)
    nxt = qkv(2, 2, 2, 1, 1, seed=14)
    out = decode(*nxt, (1,), state, **opts)
    qq, kk, vv = (torch.cat([t[idx], x], dim=2) for t, x in zip((q, k, v), nxt))
    want = attnzoo.attention(qq, kk, vv, mechanism=MECH, causal=True, **opts)[:, :, -1:]
    assert_close(out, want, torch.float64, "after reorder")


def test_per_head_window_cache_checks():
    with pytest.raises(ValueError, match="windows"):
        PerHeadWindowCache(1, 2, 4, windows=[3], sinks=1)
    with pytest.raises(ValueError, match="windows"):
        PerHeadWindowCache(1, 2, 4, windows=[3, 0], sinks=1)


def test_option_errors_name_the_argument():
    q, k, v = qkv(1, 4, 2, 10, 10)
    with pytest.raises(ValueError, match="alphas"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=True, alphas=(1, 2, 3))
    with pytest.raises(ValueError, match="betas"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=True, betas=-0.5)
    with pytest.raises(ValueError, match="alphas"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=True, alphas=(1, 2, "3", 4))
    with pytest.raises(ValueError, match="sinks"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=True, sinks=-1)
    with pytest.raises(ValueError, match="noncausal_self"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=False)
