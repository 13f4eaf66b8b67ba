"""sliding_window oracles: window >= N is exact causal attention, fast == masked reference at awkward
sizes, GQA, cross lengths, padding, gradients; and memory that never holds an N x N tensor."""

import pytest
import torch

import attnzoo
from attnzoo.kernels.local import local_attention
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def qkv(B, Hq, Hk, Nq, Nk, D=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, D, generator=g, dtype=torch.float64).requires_grad_(grad)
                 for h, n in ((Hq, Nq), (Hk, Nk), (Hk, Nk)))


@pytest.mark.parametrize("causal", [True, False])
def test_window_covering_everything_is_exact_attention(causal):
    q, k, v = qkv(2, 4, 2, 65, 65)
    ref = softmax_attention(q, k, v, causal=causal)
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism="sliding_window", causal=causal, window=65, backend=backend)
        assert_close(got, ref, torch.float64, f"window = N ({backend})")
    # the blocked kernel itself (not the SDPA shortcut) at window = N
    got = local_attention(q, k, v, window=65, causal=causal, scale=8 ** -0.5, block=16)
    assert_close(got, ref, torch.float64, "blocked kernel, window = N")


def test_window_one_causal_returns_values():
    q, k, v = qkv(1, 2, 2, 7, 7)
    got = attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True, window=1, backend="fast")
    assert_close(got, v, torch.float64, "window 1 = own value")


@pytest.mark.parametrize("n", [1, 7, 63, 65, 130])
@pytest.mark.parametrize("window", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("causal", [True, False])
def test_fast_matches_reference(n, window, causal):
    q, k, v = qkv(2, 4, 2, n, n, grad=True)
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.25
    ref = attnzoo.attention(q, k, v, mechanism="sliding_window", causal=causal, window=window,
                            key_padding_mask=kpm, backend="reference")
    got = attnzoo.attention(q, k, v, mechanism="sliding_window", causal=causal, window=window,
                            key_padding_mask=kpm, backend="fast")
    # the blocked kernel itself, whatever size the mechanism would route to fused SDPA
    blocked = local_attention(q, k, v, window=window, causal=causal, scale=8 ** -0.5, key_padding_mask=kpm, block=16)
    g = torch.randn_like(ref)
    for out in (got, blocked):
        assert_close(out, ref, torch.float64, "output")
        grads = zip(torch.autograd.grad(out, (q, k, v), g),
                    torch.autograd.grad(ref, (q, k, v), g, retain_graph=True), "qkv")
        for a, b, name in grads:
            assert_close(a, b, torch.float64, f"grad {name}")


@pytest.mark.parametrize("nq,nk,causal", [(7, 7, True), (33, 33, True), (33, 33, False), (5, 40, True),
                                          (40, 5, True), (70, 70, False)])
@pytest.mark.parametrize("window,sinks", [(1, 1), (4, 2), (9, 4), (20, 1)])
def test_blocked_kernel_with_sinks_matches_masked_reference(nq, nk, causal, window, sinks):
    """Attention sinks inside the blocked kernel == dense softmax with (window | first `sinks` keys)."""
    from attnzoo.mechanisms.memory.streaming_sinks import sink_window_mask
    q, k, v = qkv(2, 4, 2, nq, nk, grad=True)
    kpm = torch.rand(2, nk, generator=torch.Generator().manual_seed(2)) > 0.3
    mask = sink_window_mask(nq, nk, window, sinks, causal)
    ref = softmax_attention(q, k, v, key_padding_mask=kpm, attn_mask=mask, scale=0.4)
    got = local_attention(q, k, v, window=window, causal=causal, scale=0.4, key_padding_mask=kpm, sinks=sinks,
                          block=16)
    assert_close(got, ref, torch.float64, "output")
    g = torch.randn_like(ref)
    for a, b, name in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), "qkv"):
        assert_close(a, b, torch.float64, f"grad {name}")


@pytest.mark.parametrize("nq,nk", [(1, 40), (5, 40), (40, 40)])
def test_chunked_prefill_alignment(nq, nk):
    """causal_cross: the last nq queries of a length-nk sequence, bottom-right aligned."""
    q, k, v = qkv(1, 2, 1, nk, nk)
    full = attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True, window=9)
    part = attnzoo.attention(q[:, :, nk - nq :], k, v, mechanism="sliding_window", causal=True, window=9)
    assert_close(part, full[:, :, nk - nq :], torch.float64, "suffix queries")


def test_float32_and_bfloat16():
    q, k, v = qkv(1, 4, 4, 300, 300, D=32)
    ref = attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True, window=50, backend="reference")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = attnzoo.attention(*(t.to(dtype) for t in (q, k, v)), mechanism="sliding_window", causal=True,
                                window=50, backend="fast")
        assert got.dtype == dtype
        assert_close(got.float(), ref.float(), dtype, f"{dtype}", tol)


def test_gradcheck_blocked_kernel_with_sinks_and_padding():
    q, k, v = qkv(1, 2, 1, 21, 21, D=3, grad=True)
    kpm = torch.ones(1, 21, dtype=torch.bool)
    kpm[0, 4] = False
    for causal in (True, False):
        fn = lambda q, k, v, causal=causal: local_attention(
            q, k, v, window=5, causal=causal, scale=0.5, key_padding_mask=kpm, sinks=2, block=16)
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_fast_path_never_builds_n_by_n(monkeypatch):
    """Every intermediate of the blocked kernel is O(N * block) -- no tensor has N*N elements."""
    n, window = 2048, 64
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    biggest = 0

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    biggest = max(biggest, t.numel())
            return out

    with Watch():
        out = attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True, window=window, backend="fast")
        out.sum().backward()
    assert biggest < n * n / 4, f"largest intermediate has {biggest} elements, N*N = {n * n}"
