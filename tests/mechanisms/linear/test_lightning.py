"""Oracles of `lightning` (Lightning Attention-2)."""

import dataclasses
import math

import pytest
import torch

import attnzoo
from attnzoo import testing
from attnzoo.mechanisms.linear.lightning import LIGHTNING, alibi_slopes, default_decay
from attnzoo.mechanisms.linear.linear_attention import recurrent_linear_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def qkv(n, hq=4, hk=2, d=5, dv=3, b=2, seed=0):
    return rand(b, hq, n, d, seed=seed), rand(b, hk, n, d, seed=seed + 1), rand(b, hk, n, dv, seed=seed + 2)


def official_masked(q, k, v, slopes):
    """The official torch reference (lightning_attn/ops/torch/linear_attention.py), rewritten: M_ij =
    exp(-slope (i - j)) for j <= i, o = (Q K^T (.) M) V, unscaled; one key/value head per query head."""
    n = q.shape[2]
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    mask = torch.stack([torch.where(j <= i, torch.exp(-s * (i - j).to(F64)), torch.zeros((), dtype=F64))
                        for s in slopes])  # (H, n, n)
    return ((q @ k.transpose(-1, -2)) * mask) @ v


@pytest.mark.parametrize("n", [1, 7, 65])
def test_block_equals_recurrent_equals_masked(n):
    q, k, v = qkv(n)
    decay = torch.tensor([0.9, 0.55], dtype=F64)
    ref = attnzoo.attention(q, k, v, mechanism="lightning", causal=True, decay=decay, backend="reference")
    rec, _, _ = recurrent_linear_attention(q / math.sqrt(5), k, v, decay=decay, normalize=False, eps=0.0)
    assert_close(rec, ref, F64, "recurrent scan vs masked quadratic")
    for chunk in (1, 3, 4, 64):
        fast = attnzoo.attention(q, k, v, mechanism="lightning", causal=True, decay=decay, chunk=chunk,
                                 backend="fast")
        assert_close(fast, ref, F64, f"block form (B = {chunk}) vs masked quadratic")


def test_matches_the_official_formula_with_default_decay():
    q, k, v = qkv(20, hq=8, hk=8)
    out = attnzoo.attention(q, k, v, mechanism="lightning", causal=True, scale=1.0, chunk=8)
    assert_close(out, official_masked(q, k, v, alibi_slopes(8)), F64, "lightning vs official masked form")


def test_default_decay_is_exp_minus_alibi_slope():
    # power of two: slope_h = 2^(-8 (h+1) / H)
    assert alibi_slopes(8) == [2.0 ** -(h + 1) for h in range(8)]
    assert alibi_slopes(4) == pytest.approx([2.0 ** (-2 * (h + 1)) for h in range(4)])
    # H = 6: the 4-head slopes, then every other slope of the 8-head series (2^-1, 2^-3)
    assert alibi_slopes(6) == pytest.approx([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])
    assert torch.allclose(default_decay(8), torch.exp(-torch.tensor([2.0 ** -(h + 1) for h in range(8)], dtype=F64)))


def test_decay_one_is_causal_linear_attention():
    q, k, v = qkv(33)
    light = attnzoo.attention(q, k, v, mechanism="lightning", causal=True, decay=1.0, chunk=8)
    lin = attnzoo.attention(q, k, v, mechanism="linear", causal=True, feature_map="identity", normalize=False)
    assert_close(light, lin, F64, "lightning(decay 1) vs linear(identity, unnormalised)")
    # ... and the cumsum form of linear attention: S_i = cumsum_j k_j v_j^T, o_i = q_i S_i / sqrt(d)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    S = torch.cumsum(kk.unsqueeze(-1) * vv.unsqueeze(-2), dim=2)  # (B, H, N, d, dv)
    cum = torch.einsum("bhnd,bhnde->bhne", q, S) / math.sqrt(5)
    assert_close(light, cum, F64, "lightning(decay 1) vs cumsum form")


def test_noncausal_needs_decay_one():
    q, k, v = qkv(6)
    with pytest.raises(ValueError, match="decay"):
        attnzoo.attention(q, k, v, mechanism="lightning", causal=False)  # default decays < 1
    out = attnzoo.attention(q, k, v, mechanism="lightning", causal=False, decay=1.0)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    assert_close(out, (q @ (kk.transpose(-1, -2) @ vv)) / math.sqrt(5), F64, "global summary")


def test_conformance_with_decay_below_one():
    """The registry record runs the conformance suite at decay 1 (its non-causal patterns need it); here the
    same checks run on the causal patterns with per-head decays 0.9 and 0.6 (and the default schedule)."""
    for decay in ([0.9, 0.6], None):
        mech = dataclasses.replace(LIGHTNING, patterns=("causal_self", "causal_cross"),
                                   test_options={"decay": decay, "chunk": 3})
        failures = testing.run_all(mech)
        assert not failures, failures


def test_decay_gradient_through_the_reference():
    q, k, v = (t[:1, :2, :6].clone() for t in qkv(6))
    k, v = k[:, :1], v[:, :1]
    decay = torch.tensor([0.7], dtype=F64, requires_grad=True)
    fn = lambda d: attnzoo.attention(q, k, v, mechanism="lightning", causal=True, decay=d)  # auto -> reference
    assert torch.autograd.gradcheck(fn, (decay,))
    with pytest.raises(ValueError, match="backend"):
        attnzoo.attention(q, k, v, mechanism="lightning", causal=True, decay=decay, backend="fast")


def test_decay_validation():
    q, k, v = qkv(4)
    for bad in (0.0, 1.5, [0.5], [0.5, 0.5, 0.5]):
        with pytest.raises(ValueError, match="decay"):
            attnzoo.attention(q, k, v, mechanism="lightning", causal=True, decay=bad)
    with pytest.raises(ValueError, match="decay"):  # OptionError, a ValueError, names the option
        attnzoo.attention(q, k, v, mechanism="lightning", causal=True, decay="slow")
    with pytest.raises(TypeError, match="decay"):
        attnzoo.attention(q, k, v, mechanism="lightning", causal=True, decay=[0.5, "x"])
