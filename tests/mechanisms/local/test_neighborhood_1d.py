"""neighborhood_1d oracles: kernel = N is dense attention, hand-computed NATTEN border windows and dilation
groups, dilation = NA on each sub-grid, an explicit per-row loop, fast == dense masked reference (outputs
and gradients), gradcheck, and decoding == causal forward with a bounded cache."""

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.local.neighborhood_1d import neighborhood_1d_fast, neighborhood_1d_mask
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

MECH = "neighborhood_1d"


def qkv(B, Hq, Hk, Nq, Nk, D=8, Dv=None, seed=0, grad=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    return tuple(torch.randn(B, h, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
                 for h, n, d in ((Hq, Nq, D), (Hk, Nk, D), (Hk, Nk, Dv)))


def rows(mask):
    return [set(torch.nonzero(r).flatten().tolist()) for r in mask[0, 0]]


def test_hand_computed_borders_shift_inwards():
    # n = 7, k = 3: every query sees exactly 3 keys; the first and last windows are shifted, not truncated.
    want = [{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}, {4, 5, 6}, {4, 5, 6}]
    assert rows(neighborhood_1d_mask(7, 7, 3)) == want
    # even kernel (k = 4): one more key left of the centre than right of it, as NATTEN
    want4 = [{0, 1, 2, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}, {1, 2, 3, 4}, {2, 3, 4, 5}, {2, 3, 4, 5}]
    assert rows(neighborhood_1d_mask(6, 6, 4)) == want4


def test_hand_computed_dilation_groups():
    # n = 7, k = 3, d = 2: groups {0, 2, 4, 6} and {1, 3, 5}; windows shifted inside each group.
    want = [{0, 2, 4}, {1, 3, 5}, {0, 2, 4}, {1, 3, 5}, {2, 4, 6}, {1, 3, 5}, {2, 4, 6}]
    assert rows(neighborhood_1d_mask(7, 7, 3, dilation=2)) == want
    # causal: keys p, p - d, ..., fewer at the start
    want_c = [{0}, {1}, {0, 2}, {1, 3}, {0, 2, 4}, {1, 3, 5}, {2, 4, 6}]
    assert rows(neighborhood_1d_mask(7, 7, 3, dilation=2, causal=True)) == want_c


def explicit_loop(q, k, v, sets, scale):
    """out[b, h, i] = softmax over the keys in sets[i] only, one row at a time (no mask tensor)."""
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype)
    G = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i, keys in enumerate(sets):
                idx = torch.tensor(sorted(keys))
                s = (k[b, h // G, idx] @ q[b, h, i]) * scale
                out[b, h, i] = torch.softmax(s, dim=0) @ v[b, h // G, idx]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_loop_dilated(causal):
    n, ks, d = 11, 3, 3
    q, k, v = qkv(1, 2, 1, n, n)
    sets = []
    for i in range(n):
        r = i % d
        group = list(range(r, n, d))
        gi = group.index(i)
        if causal:
            sets.append({group[j] for j in range(max(0, gi - ks + 1), gi + 1)})
        else:
            s = min(max(gi - ks // 2, 0), len(group) - ks)
            sets.append({group[j] for j in range(s, s + ks)})
    want = explicit_loop(q, k, v, sets, 8 ** -0.5)
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism=MECH, causal=causal, kernel_size=ks, dilation=d, backend=backend)
        assert_close(got, want, torch.float64, f"{backend} vs explicit loop")


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_covering_everything_is_dense_attention(causal):
    q, k, v = qkv(2, 4, 2, 65, 65)
    want = softmax_attention(q, k, v, causal=causal)
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism=MECH, causal=causal, kernel_size=65, backend=backend)
        assert_close(got, want, torch.float64, f"kernel_size = N ({backend})")
    # the blocked path (not the dense shortcut): causal kernel N - 1 sees the whole prefix except row N-1's key 0
    got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, kernel_size=64, backend="fast")
    ref = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, kernel_size=64, backend="reference")
    assert_close(got, ref, torch.float64, "causal kernel N - 1")
    dense_causal = softmax_attention(q, k, v, causal=True)
    assert_close(got[:, :, :64], dense_causal[:, :, :64], torch.float64, "rows whose window covers their prefix")


def test_dilation_equals_na_on_each_subgrid():
    n, ks, d = 23, 5, 3
    q, k, v = qkv(1, 2, 2, n, n, seed=3)
    got = attnzoo.attention(q, k, v, mechanism=MECH, kernel_size=ks, dilation=d, backend="fast")
    for r in range(d):
        sub = slice(r, n, d)
        want = attnzoo.attention(q[:, :, sub], k[:, :, sub], v[:, :, sub], mechanism=MECH, kernel_size=ks,
                                 dilation=1, backend="reference")
        assert_close(got[:, :, sub], want, torch.float64, f"dilation group {r}")


CASES = [(n, ks, d) for n in (7, 63, 130) for ks in (1, 4, 17) for d in (1, 2, 3) if ks * d <= n]
CASES += [(65, 2, 2), (65, 3, 1)]


@pytest.mark.parametrize("n,ks,d", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_fast_matches_reference(n, ks, d, causal):
    q, k, v = qkv(2, 4, 2, n, n, Dv=6, grad=True, seed=n + ks + d)
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.25
    opts = dict(mechanism=MECH, causal=causal, kernel_size=ks, dilation=d, key_padding_mask=kpm)
    ref = attnzoo.attention(q, k, v, backend="reference", **opts)
    got = attnzoo.attention(q, k, v, backend="fast", **opts)
    assert_close(got, ref, torch.float64, "output")
    g = torch.randn_like(ref)
    for a, b, name in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), "qkv"):
        assert_close(a, b, torch.float64, f"grad {name}")


@pytest.mark.parametrize("nq,nk", [(1, 9), (5, 9), (4, 30), (9, 5)])
def test_causal_cross_matches_reference(nq, nk):
    q, k, v = qkv(1, 2, 1, nq, nk, seed=7)
    for d in (1, 2, 3):
        ref = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, kernel_size=3, dilation=d, backend="reference")
        got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, kernel_size=3, dilation=d, backend="fast")
        assert_close(got, ref, torch.float64, f"causal cross Nq={nq} Nk={nk} d={d}")


def test_float32_fast_matches_float64_reference():
    q, k, v = qkv(1, 8, 8, 300, 300, D=16, seed=5)
    ref = attnzoo.attention(q, k, v, mechanism=MECH, kernel_size=33, dilation=2, backend="reference")
    got = neighborhood_1d_fast(q.float(), k.float(), v.float(), causal=False, key_padding_mask=None,
                               scale=0.25, kernel_size=33, dilation=2)
    assert_close(got, ref, torch.float32, "float32 fast")


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_fast(causal):
    q, k, v = qkv(1, 2, 1, 9, 9, D=3, grad=True, seed=11)
    fn = lambda q, k, v: neighborhood_1d_fast(q, k, v, causal=causal, key_padding_mask=None, scale=0.5,
                                              kernel_size=3, dilation=2)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("ks,d", [(3, 1), (4, 2), (2, 3)])
def test_decode_equals_causal_forward_with_bounded_cache(ks, d):
    mech = attnzoo.get(MECH)
    n = 40
    q, k, v = qkv(2, 4, 2, n, n, Dv=5, seed=ks * d)
    full = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, kernel_size=ks, dilation=d)
    state = mech.init_state(batch=2, kv_heads=2, head_dim=8, value_dim=5, dtype=q.dtype, device=q.device,
                            kernel_size=ks, dilation=d)
    outs, t = [], 0
    for T in (7, 1, 3, 1, 1, 5, 1, 2, 19):
        outs.append(mech.step(q[:, :, t : t + T], k[:, :, t : t + T], v[:, :, t : t + T], state,
                              scale=8 ** -0.5, kernel_size=ks, dilation=d))
        t += T
        assert state.length <= (ks - 1) * d, f"cache holds {state.length} keys > (k - 1) d = {(ks - 1) * d}"
    assert t == n and state.seq_len == n
    assert_close(torch.cat(outs, dim=2), full, torch.float64, "decode vs causal forward")


def test_errors_name_the_argument():
    q, k, v = qkv(1, 2, 2, 7, 7)
    with pytest.raises(ValueError, match="kernel_size"):
        attnzoo.attention(q, k, v, mechanism=MECH, kernel_size=4, dilation=2)  # 8 > 7
    with pytest.raises(ValueError, match="kernel_size"):
        attnzoo.attention(q, k, v, mechanism=MECH, kernel_size=0)
    q2, k2, v2 = qkv(1, 2, 2, 5, 9)
    with pytest.raises(ValueError, match="noncausal_cross"):
        attnzoo.attention(q2, k2, v2, mechanism=MECH, kernel_size=3)
    # causal with a kernel larger than N is allowed (the window is truncated at the start)
    out = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, kernel_size=20, dilation=2)
    assert torch.isfinite(out).all()


def test_fast_path_never_builds_n_by_n():
    """Every intermediate of the fast path (forward and backward) has far fewer than N*N elements."""
    n = 2048
    q, k, v = qkv(1, 2, 2, n, n, D=8, dtype=torch.float32, grad=True)
    biggest = 0

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    biggest = max(biggest, t.numel())
            return out

    for causal in (False, True):
        with Watch():
            out = neighborhood_1d_fast(q, k, v, causal=causal, key_padding_mask=None, scale=0.3, kernel_size=15,
                                       dilation=2)
            out.sum().backward()
    assert biggest < n * n / 4, f"largest intermediate has {biggest} elements, N*N = {n * n}"


def test_noncausal_padding_is_per_sequence():
    """Right-padded rows equal each sequence alone (windows shift inwards at the row's own end); a hole is
    skipped; padded positions return zeros."""
    n = 20
    q, k, v = qkv(3, 2, 2, n, n, seed=31)
    kpm = torch.ones(3, n, dtype=torch.bool)
    kpm[0, 13:] = False  # right padding
    kpm[1, :4] = False  # left padding
    kpm[2, 7:9] = False  # a hole
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism=MECH, kernel_size=5, dilation=2, key_padding_mask=kpm,
                                backend=backend)
        for b in range(3):
            idx = torch.nonzero(kpm[b]).flatten()
            alone = attnzoo.attention(q[b : b + 1, :, idx], k[b : b + 1, :, idx], v[b : b + 1, :, idx],
                                      mechanism=MECH, kernel_size=5, dilation=2, backend="reference")
            assert_close(got[b : b + 1, :, idx], alone, torch.float64, f"row {b} ({backend})")
            assert (got[b, :, ~kpm[b]] == 0).all()
    short = torch.zeros(3, n, dtype=torch.bool)
    short[:, 3:10] = True  # 7 tokens < kernel_size * dilation = 10: every query sees its whole dilation group
    got = attnzoo.attention(q, k, v, mechanism=MECH, kernel_size=5, dilation=2, key_padding_mask=short, backend="fast")
    for r in (0, 1):
        idx = torch.arange(3 + r, 10, 2)
        want = softmax_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx])
        assert_close(got[:, :, idx], want, torch.float64, f"short row, group {r}")
