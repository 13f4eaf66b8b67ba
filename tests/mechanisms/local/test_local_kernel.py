"""kernels/local.py: the two implementations (gathered windows through fused SDPA, and the score-tile kernel
with the hand-written backward) agree with each other and with the dense masked reference -- outputs and
gradients, with sinks, padding (including rows that see no key), GQA, cross lengths and both directions."""

import pytest
import torch

from attnzoo.kernels.local import local_attention
from attnzoo.mechanisms.memory.streaming_sinks import sink_window_mask
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def qkv(B, Hq, Hk, Nq, Nk, D=8, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, d, generator=g, dtype=torch.float64).requires_grad_(True)
                 for h, n, d in ((Hq, Nq, D), (Hk, Nk, D), (Hk, Nk, Dv)))


CASES = [
    # B, Hq, Hk, Nq, Nk, window, causal, sinks, padding, block
    (2, 4, 2, 37, 37, 5, True, 0, True, 16),
    (2, 4, 2, 37, 37, 5, False, 2, True, 16),
    (1, 2, 1, 5, 40, 7, True, 3, False, 16),
    (1, 2, 2, 40, 12, 7, True, 0, True, 16),
    (2, 3, 3, 65, 65, 20, False, 0, False, None),
    (1, 2, 1, 1, 9, 3, True, 1, True, None),
]


@pytest.mark.parametrize("B,Hq,Hk,Nq,Nk,w,causal,S,pad,block", CASES)
def test_impls_agree_with_dense_reference(B, Hq, Hk, Nq, Nk, w, causal, S, pad, block):
    q, k, v = qkv(B, Hq, Hk, Nq, Nk, seed=Nq + w)
    kpm = None
    if pad:
        kpm = torch.rand(B, Nk, generator=torch.Generator().manual_seed(3)) > 0.4
        kpm[0, : max(0, Nk - Nq) + 3] = False  # some query rows see no key at all
    mask = sink_window_mask(Nq, Nk, w, S, causal)  # (1, 1, Nq, Nk)
    ref = softmax_attention(q, k, v, causal=causal, key_padding_mask=kpm, attn_mask=mask, scale=0.3)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for impl in ("windows", "blocked"):
        got = local_attention(q, k, v, window=w, causal=causal, scale=0.3, key_padding_mask=kpm, sinks=S, block=block,
                              impl=impl)
        assert torch.isfinite(got).all()
        assert_close(got, ref, torch.float64, f"{impl} output")
        for a, b, name in zip(torch.autograd.grad(got, (q, k, v), g), want, "qkv"):
            assert torch.isfinite(a).all()
            assert_close(a, b, torch.float64, f"{impl} grad {name}", tol=1e-10 if b.norm() > 0 else 1e-12)


def test_float32_windows_impl():
    q, k, v = qkv(1, 8, 8, 300, 300, D=16, Dv=16, seed=4)
    ref = local_attention(q, k, v, window=40, causal=True, scale=0.25, sinks=4, impl="blocked")
    got = local_attention(q.float(), k.float(), v.float(), window=40, causal=True, scale=0.25, sinks=4, impl="windows")
    assert_close(got, ref, torch.float32, "float32 windows vs float64 blocked")


def test_unknown_impl_raises():
    q, k, v = qkv(1, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="impl"):
        local_attention(q, k, v, window=2, causal=True, scale=1.0, impl="flash")
