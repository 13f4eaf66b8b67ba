"""Oracles for SpectFormer's spectral gating network (P036)."""

import math

import pytest
import torch

from attnzoo.mechanisms.dense.spectformer import SpectralGatingNetwork, spatial_kernel
from attnzoo.testing import assert_close

F64 = torch.float64


def _grid(b=2, h=6, w=5, c=3, seed=0):
    return torch.randn(b, h, w, c, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("h,w", [(6, 5), (4, 4), (1, 7)])
def test_unit_filter_is_identity(h, w):
    m = SpectralGatingNetwork(3, height=h, width=w).double()
    with torch.no_grad():
        m.complex_weight.zero_()
        m.complex_weight[..., 0] = 1.0  # K = 1 + 0i everywhere
    x = _grid(h=h, w=w)
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), x, F64, backend)


def test_equals_explicit_circular_convolution():
    """y[p, q, c] = sum_{a, b} g[a, b, c] x[(p - a) mod H, (q - b) mod W, c], g = irfft2(K), by loops."""
    torch.manual_seed(1)
    m = SpectralGatingNetwork(2, height=4, width=5).double()
    with torch.no_grad():
        m.complex_weight.normal_()
    x = _grid(b=1, h=4, w=5, c=2)
    g = spatial_kernel(m.complex_weight, 4, 5)
    want = torch.zeros_like(x)
    for p in range(4):
        for q in range(5):
            for c in range(2):
                want[0, p, q, c] = sum(g[a, b, c] * x[0, (p - a) % 4, (q - b) % 5, c]
                                       for a in range(4) for b in range(5))
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), want, F64, backend)


def test_official_forward_on_token_sequence():
    """Transcription of the official forward: tokens (B, N, C) viewed as (B, a, b, C), rfft2/irfft2 ortho."""
    torch.manual_seed(2)
    m = SpectralGatingNetwork(4, height=6, width=6).double()
    x = _grid(h=6, w=6, c=4)
    tokens = x.reshape(2, 36, 4)
    a = b = int(math.sqrt(36))
    X = torch.fft.rfft2(tokens.view(2, a, b, 4), dim=(1, 2), norm="ortho")
    y = torch.fft.irfft2(X * torch.view_as_complex(m.complex_weight), s=(a, b), dim=(1, 2), norm="ortho")
    assert_close(m(x), y, F64, "official")


def test_circular_shift_equivariance_and_gradients():
    torch.manual_seed(3)
    m = SpectralGatingNetwork(3, height=6, width=5).double()
    x = _grid()
    y = m(x)
    assert_close(m(torch.roll(x, (2, -1), (1, 2))), torch.roll(y, (2, -1), (1, 2)), F64, "shift")
    small = SpectralGatingNetwork(2, height=3, width=4).double()
    xs = _grid(b=1, h=3, w=4, c=2).requires_grad_(True)
    for backend in ("reference", "fast"):
        small.backend = backend
        assert torch.autograd.gradcheck(lambda t: small(t), (xs,), fast_mode=True)


def test_bfloat16_runs_in_float32():
    m = SpectralGatingNetwork(3, height=6, width=5)
    x = _grid().float()
    y32 = m(x)
    y16 = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert_close(y16.float(), y32, torch.bfloat16, "bf16")


def test_errors():
    m = SpectralGatingNetwork(3, height=6, width=5)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 5, 6, 3))
    with pytest.raises(ValueError, match="heads"):
        SpectralGatingNetwork(3, 4)
    with pytest.raises(ValueError, match="height"):
        SpectralGatingNetwork(3, height=0)
