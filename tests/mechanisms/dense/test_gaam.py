"""Oracles for GAAM (P011)."""

import math

import pytest
import torch

from attnzoo.mechanisms.dense.gaam import GaussianAdaptiveAttention, gaussian_weights, gaussian_weights_fast
from attnzoo.testing import assert_close

F64 = torch.float64


def _x(b=2, n=7, dim=12, seed=0):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _module(dim=12, heads=3, axis="features", eps=1e-8, seed=0, offsets=True, G=3, normalizer="official"):
    torch.manual_seed(seed)
    m = GaussianAdaptiveAttention(dim, heads, gaussians=G, axis=axis, eps=eps, normalizer=normalizer).double()
    if offsets:
        with torch.no_grad():
            m.offsets.normal_(0, 0.5)
    return m


def test_hand_computed_single_gaussian():
    x = torch.tensor([[[1.0, 2.0, 4.0]]], dtype=F64)  # one token, one head of 3 channels
    m = GaussianAdaptiveAttention(3, 1, gaussians=1, eps=1e-8).double()
    with torch.no_grad():
        m.scales.fill_(1.5)
    mu, var = 7 / 3, 7 / 3 + 1e-8  # unbiased variance of (1, 2, 4) is 7/3
    g = [math.exp(-((xi - mu) / math.sqrt(var)) ** 2 / (2 * 1.5**2)) / math.sqrt(2 * math.pi * 1.5**2)
         for xi in (1.0, 2.0, 4.0)]
    w = torch.tensor([gi / sum(g) for gi in g], dtype=F64)
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x)[0, 0], x[0, 0] * w, F64, backend)


def test_official_normalizer_floors_at_eps_softmax_does_not():
    m = _module(normalizer="official")
    with torch.no_grad():
        m.scales.fill_(0.15)  # narrow Gaussians: densities underflow eps for most channels
    x = _x()
    s_off = torch.stack([c.sum(-1) for c in torch.split(m.weights(x), m.sizes, -1)])
    assert (s_off < 0.5).any()  # the official floor breaks the normalisation
    m.normalizer = "softmax"
    s_soft = torch.stack([c.sum(-1) for c in torch.split(m.weights(x), m.sizes, -1)])
    assert_close(s_soft, torch.ones_like(s_soft), F64, "softmax normalizer")


def test_matches_official_formula_with_remainder_head():
    """Transcription of the official MultiHeadGaussianAdaptiveAttention (norm_axis=-1): chunks of
    dim // heads, the last head takes the remainder; product of Gaussians; sum clamped at eps."""
    m = _module(dim=10, heads=3)
    x = _x(dim=10)
    outs, start = [], 0
    for h, size in enumerate([3, 3, 4]):
        c = x[..., start : start + size]
        start += size
        mean, var = c.mean(-1, keepdim=True), c.var(-1, keepdim=True) + 1e-8
        mix = 1
        for i in range(3):
            yn = (c - (mean + m.offsets[h, i])) / torch.sqrt(var)
            c2 = m.scales[h, i] ** 2
            mix = mix * torch.exp(-(yn**2) / (2.0 * c2)) / torch.sqrt(2 * torch.pi * c2)
        mix = mix / mix.sum(-1, keepdim=True).clamp(min=1e-8)
        outs.append(c * mix)
    want = torch.cat(outs, -1)
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), want, F64, backend)


@pytest.mark.parametrize("axis", ["features", "tokens"])
@pytest.mark.parametrize("normalizer", ["official", "softmax"])
def test_weights_sum_to_one(axis, normalizer):
    m = _module(axis=axis, normalizer=normalizer)
    if normalizer == "official":  # official form: only while the product of densities stays above eps
        with torch.no_grad():
            m.scales.fill_(1.0)
    x = _x()
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 4:] = False
    w = m.weights(x, kpm if axis == "tokens" else None)
    if axis == "features":
        for chunk in torch.split(w, m.sizes, dim=-1):
            assert_close(chunk.sum(-1), torch.ones(2, 7, dtype=F64), F64, "per head, per token")
    else:
        assert_close(w.sum(1), torch.ones(2, 12, dtype=F64), F64, "per channel over tokens")
        assert (w[1, 4:] == 0).all()


@pytest.mark.parametrize("axis", ["features", "tokens"])
def test_affine_invariance_exact_statement(axis):
    x = _x()
    # zero offsets and eps = 0: weights invariant under x -> a x + b for any a != 0
    m0 = _module(axis=axis, eps=0.0, offsets=False)
    for a, b in ((3.0, -2.0), (-0.5, 7.0)):
        assert_close(m0.weights(a * x + b), m0.weights(x), F64, f"affine a={a}")
    # with offsets: translation invariant, not scale invariant
    m1 = _module(axis=axis, eps=0.0, offsets=True)
    assert_close(m1.weights(x + 5.0), m1.weights(x), F64, "translation", tol=1e-9)
    assert (m1.weights(3.0 * x) - m1.weights(x)).abs().max() > 1e-4
    # the output itself is not invariant
    assert (m0(2 * x) - m0(x)).abs().max() > 1e-3


@pytest.mark.parametrize("axis", ["features", "tokens"])
def test_fast_matches_reference(axis):
    x = _x(n=65)
    g = torch.Generator().manual_seed(1)
    off, sc = torch.randn(4, generator=g, dtype=F64), torch.exp(torch.randn(4, generator=g, dtype=F64))
    mask = None
    if axis == "tokens":
        mask = (torch.rand(2, 65, 1, generator=g) > 0.3)
        mask[:, 0] = True
    dim = -1 if axis == "features" else 1
    for normalizer in ("official", "softmax"):
        a = gaussian_weights(x, off, sc, dim=dim, mask=mask, normalizer=normalizer)
        b = gaussian_weights_fast(x, off, sc, dim=dim, mask=mask, normalizer=normalizer)
        assert_close(b, a, F64, f"weights ({normalizer})")
    assert_close(gaussian_weights(x, off, sc * 3, dim=dim, mask=mask, normalizer="softmax"),
                 gaussian_weights(x, off, sc * 3, dim=dim, mask=mask), F64, "forms agree when sum >= eps")


def test_tokens_axis_padding_passes_through_and_is_ignored():
    m = _module(axis="tokens")
    x = _x()
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[0, 2] = kpm[1, 6] = False
    y = m(x, key_padding_mask=kpm)
    assert torch.equal(y[0, 2], x[0, 2]) and torch.equal(y[1, 6], x[1, 6])
    x2 = x.clone()
    x2[0, 2] += 10.0
    x2[1, 6] -= 4.0
    y2 = m(x2, key_padding_mask=kpm)
    assert_close(y2[kpm], y[kpm], F64, "padding changes nothing else")
    # the same as dropping the padded token
    assert_close(m(x[:1, [0, 1, 3, 4, 5, 6]]), y[:1, [0, 1, 3, 4, 5, 6]], F64, "drop padded token")


def test_tokens_axis_permutation_equivariant_and_gradcheck():
    m = _module(axis="tokens")
    x = _x()
    p = torch.randperm(7, generator=torch.Generator().manual_seed(2))
    assert_close(m(x[:, p]), m(x)[:, p], F64, "permutation")
    xs = x[:1, :4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: m(t), (xs,), fast_mode=True)


def test_errors():
    with pytest.raises(ValueError, match="causal"):
        GaussianAdaptiveAttention(12, 3, axis="tokens", causal=True)
    with pytest.raises(ValueError, match="kv_heads"):
        GaussianAdaptiveAttention(12, 3, kv_heads=3)
    with pytest.raises(ValueError, match="context"):
        _module()(_x(), _x())
    with pytest.raises(ValueError, match="gaussians"):
        GaussianAdaptiveAttention(12, 3, gaussians=0)
