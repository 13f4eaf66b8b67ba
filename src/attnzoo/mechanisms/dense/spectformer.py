"""SpectFormer spectral gating: a learned global filter in the 2-D Fourier domain as the token mixer.

Paper: "SpectFormer: Frequency and Attention is what you need in a Vision Transformer", Patro,
Namboodiri, Agneeswaran, arXiv 2304.06446. Official code: https://github.com/badripatro/SpectFormers
SpectFormer stacks ``alpha`` spectral layers (this mixer, the GFNet global filter) before standard
multi-head self-attention layers (attnzoo's ``softmax`` mechanism). The spectral gating network maps a
token grid X (B, H, W, C) to ``irfft2(rfft2(X) * K)`` with a learned complex filter K (H, W//2+1, C),
both FFTs over the two spatial axes with orthonormal scaling (as ``SpectralGatingNetwork`` in
``vanilla_architecture/spectformer.py``; init K = 0.02 * N(0, 1) real and imaginary parts).

Kind: ``grid`` -- the paper is a ViT and the filter is defined on the H x W patch grid (one filter per
grid size), so the mixer takes channels-last grids (B, H, W, C), not sequences; it has no causal form
and no key padding (every grid cell is mixed with every other, circularly). It has no heads: the filter
is per channel, so ``heads`` must be 1 (the registry's common constructor signature).

Choices: ``height``/``width`` fix the grid the filter is learned for (a different grid raises);
low-precision inputs are transformed in float32 and cast back (torch.fft has no bfloat16 on CPU; the
official code casts to float32 too).

Forms: the reference is the equivalent circular 2-D convolution with the spatial kernel
``g = irfft2(K)`` written as a sum of shifted copies, O((HW)^2 C); the fast form is the paper's FFT,
O(HW log(HW) C).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import check_backend, check_int, check_module_input
from ...reference import acc_dtype
from ...registry import Mechanism, Option, register


def spectral_gating_fast(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, H, W, C) real, weight (H, W//2+1, C, 2) -> irfft2(rfft2(x, ortho) * K, ortho) (B, H, W, C)."""
    H, W = x.shape[1], x.shape[2]
    X = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")  # (B, H, W//2+1, C) complex
    K = torch.view_as_complex(weight.contiguous())  # (H, W//2+1, C)
    return torch.fft.irfft2(X * K, s=(H, W), dim=(1, 2), norm="ortho")  # (B, H, W, C)


def spatial_kernel(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The filter as a circular convolution kernel g (H, W, C) = irfft2(K) (standard normalisation)."""
    return torch.fft.irfft2(torch.view_as_complex(weight.contiguous()), s=(height, width), dim=(0, 1))


def spectral_gating_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Circular convolution y[p] = sum_s g[s] * x[p - s] (indices mod H, W) with g = irfft2(K)."""
    B, H, W, C = x.shape
    g = spatial_kernel(weight, H, W)  # (H, W, C)
    y = torch.zeros_like(x)
    for a in range(H):
        for b in range(W):
            y = y + g[a, b] * torch.roll(x, shifts=(a, b), dims=(1, 2))  # (B, H, W, C)
    return y


class SpectralGatingNetwork(nn.Module):
    """Spectral token mixer: x (B, height, width, dim) -> (B, height, width, dim)."""

    def __init__(self, dim: int, heads: int = 1, *, height: int = 14, width: int = 14, backend: str = "auto") -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        if heads != 1:
            raise ValueError(f"heads: the spectral gate has no heads (one complex filter per channel); expected 1, "
                             f"got {heads!r}")
        opts = SPECTFORMER.resolve_options({"height": height, "width": width})
        self.height, self.width = opts["height"], opts["width"]
        self.backend = check_backend(backend)
        self.complex_weight = nn.Parameter(0.02 * torch.randn(self.height, self.width // 2 + 1, self.dim, 2))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, height={self.height}, width={self.width}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_module_input(self, x, layout="(B, H, W, C)", channels=self.dim)
        if tuple(x.shape[1:]) != (self.height, self.width, self.dim):
            raise ValueError(f"x: expected (B, {self.height}, {self.width}, {self.dim}) channels-last (the filter is "
                             f"learned for this grid), got {tuple(x.shape)}")
        acc = acc_dtype(x.dtype)
        fn = spectral_gating_reference if self.backend == "reference" else spectral_gating_fast
        return fn(x.to(acc), self.complex_weight.to(acc)).to(x.dtype)


def build_spectformer(dim, heads=1, **options):
    return SpectralGatingNetwork(dim, heads, **options)


def _case_options(*, n, side, heads, causal):
    """Benchmark/training cases: one spectral gate (no heads) learned for the case's grid."""
    side = side or int(n ** 0.5)
    return {"heads": 1, "height": side, "width": side}

SPECTFORMER = register(Mechanism(
    name="spectformer",
    case_options=_case_options,
    aliases=("spectral_gating", "gfnet_filter"),
    family="dense",
    kind="grid",
    catalog="P036",
    title="SpectFormer: Frequency and Attention is what you need in a Vision Transformer",
    arxiv="2304.06446",
    code="https://github.com/badripatro/SpectFormers",
    summary="Token grid mixed by a learned complex filter in the 2-D Fourier domain (irfft2(rfft2(X) * K)); "
            "SpectFormer's early layers, before standard MHSA.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(HW log(HW) C) fast, O((HW)^2 C) reference; memory O(HW C)",
    module=build_spectformer,
    fast=spectral_gating_fast,
    options=(
        Option("height", 14, int, low=1, doc="grid height the filter is learned for (224/16 = 14 in the paper)"),
        Option("width", 14, int, low=1, doc="grid width the filter is learned for"),
    ),
    test_options={"height": 6, "width": 5},
    test_sizes={"heads": 1, "height": 6, "width": 5},
    notes="heads must be 1; a grid of another size raises. Circularly shift-equivariant.",
))
