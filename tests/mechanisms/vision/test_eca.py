"""Oracles of ECA-Net (P067): the adaptive kernel size table, parity with the official ``eca_layer`` and timm's
``EcaModule`` forwards (written out below from their source) with copied weights, the gate as an explicit banded
(Toeplitz) matrix, invariance of the gates to spatial permutations, equal results in both layouts."""

import math

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.mechanisms.vision.eca import EfficientChannelAttention, eca_fast, eca_kernel_size
from attnzoo.testing import assert_close

F64 = torch.float64


class OfficialEcaLayer(nn.Module):
    """BangguWu/ECANet ``models/eca_module.py`` ``eca_layer``, written out: AdaptiveAvgPool2d(1), Conv1d(1, 1, k,
    padding (k - 1) // 2, no bias) over the channel axis, sigmoid, ``x * y.expand_as(x)``."""

    def __init__(self, channel, k_size=3):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = self.avg_pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        y = self.sigmoid(y)
        return x * y.expand_as(x)


def timm_eca_forward(conv, x):
    """timm ``EcaModule.forward`` (default, no MLP): mean over (2, 3), view (B, 1, C), conv, sigmoid gate."""
    y = x.mean((2, 3)).view(x.shape[0], 1, -1)
    y = conv(y)
    y = torch.sigmoid(y).view(x.shape[0], -1, 1, 1)
    return x * y.expand_as(x)


def timm_kernel_size(channels, gamma=2, beta=1):
    """timm's ``EcaModule.__init__`` kernel-size rule."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


def test_adaptive_kernel_size_table():
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 5, 7]
    for c in [2, 3, 5, 8, 16, 24, 64, 96, 100, 255, 256, 257, 1000, 4096, 100000]:
        assert eca_kernel_size(c) == timm_kernel_size(c), c
    assert eca_kernel_size(4, min_size=1) == 1  # the formula alone: (2 + 1) / 2 -> 1
    assert EfficientChannelAttention(256).kernel_size == 5
    assert EfficientChannelAttention(256, gamma=1.0, beta=2.0).kernel_size == 11  # (8 + 2) / 1 = 10 -> 11


@pytest.mark.parametrize("channels,k", [(64, 3), (256, 5), (40, 7)])
def test_parity_with_official_eca_layer_and_timm(channels, k):
    torch.manual_seed(0)
    ours = EfficientChannelAttention(channels, kernel_size=k if channels == 40 else None)
    assert ours.kernel_size == k
    official = OfficialEcaLayer(channels, k)
    official.load_state_dict(ours.state_dict())  # same parameter name and shape: conv.weight (1, 1, k)
    x = torch.randn(3, channels, 9, 7)
    got, want = ours(x), official(x)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - timm_eca_forward(ours.conv, x)).abs().max().item() < 1e-5
    # gradients too (fp32)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    ours(xa).backward(g)
    official(xb).backward(g)
    assert (xa.grad - xb.grad).abs().max().item() < 1e-5
    assert (ours.conv.weight.grad - official.conv.weight.grad).abs().max().item() < 1e-4


def test_gate_is_a_banded_toeplitz_matrix():
    torch.manual_seed(1)
    C, k = 11, 5
    m = EfficientChannelAttention(C, kernel_size=k).double()
    x = torch.randn(2, C, 4, 3, dtype=F64)
    taps = m.conv.weight.view(k)
    band = torch.zeros(C, C, dtype=F64)  # gate of channel i reads channels i - 2 .. i + 2 (zero padded)
    for i in range(C):
        for j in range(C):
            if abs(i - j) <= k // 2:
                band[i, j] = taps[j - i + k // 2]
    y = x.mean(dim=(2, 3))  # (B, C)
    w = torch.sigmoid(y @ band.T)
    assert_close(m(x), x * w[:, :, None, None], F64, "ECA vs banded matrix gate")
    assert_close(m.gate(x), w, F64, "ECA gate")


def test_gates_invariant_to_spatial_permutation():
    torch.manual_seed(2)
    m = EfficientChannelAttention(32).double()
    x = torch.randn(2, 32, 5, 6, dtype=F64)
    perm = torch.randperm(30)
    xp = x.flatten(2)[..., perm].view(2, 32, 5, 6)
    assert_close(m.gate(xp), m.gate(x), F64, "gates of a spatially permuted map")
    assert_close(m(xp).flatten(2), m(x).flatten(2)[..., perm], F64, "ECA output permutes with the positions")


def test_channels_last_layouts_agree():
    torch.manual_seed(3)
    m = EfficientChannelAttention(24)
    cl = EfficientChannelAttention(24, channels_last=True)
    cl.load_state_dict(m.state_dict())
    x = torch.randn(2, 24, 7, 5)
    base = m(x)
    mem = m(x.contiguous(memory_format=torch.channels_last))  # (B, C, H, W) in channels_last memory format
    nhwc = cl(x.permute(0, 2, 3, 1).contiguous())  # (B, H, W, C)
    assert (mem - base).abs().max().item() < 1e-6
    assert nhwc.shape == (2, 7, 5, 24)
    assert (nhwc.permute(0, 3, 1, 2) - base).abs().max().item() < 1e-6


def test_build_and_errors():
    m = attnzoo.build("eca", 512, 1)
    assert isinstance(m, EfficientChannelAttention) and m.kernel_size == 5
    with pytest.raises(ValueError, match="heads"):
        attnzoo.build("eca", 64, 4)
    with pytest.raises(ValueError, match="kernel_size"):
        EfficientChannelAttention(64, kernel_size=4)
    with pytest.raises(ValueError, match=r"x: expected \(B, 64, H, W\)"):
        m = EfficientChannelAttention(64)
        m(torch.randn(1, 7, 7, 64))
    with pytest.raises(ValueError, match=r"x: expected \(B, H, W, 64\)"):
        EfficientChannelAttention(64, channels_last=True)(torch.randn(1, 64, 7, 7))
    with pytest.raises(ValueError, match="x: expected a 4-D tensor"):
        EfficientChannelAttention(64)(torch.randn(64, 7, 7))
    with pytest.raises(TypeError, match="dtype"):
        EfficientChannelAttention(8)(torch.randn(1, 8, 3, 3, dtype=F64))
    with pytest.raises(ValueError, match="gamma"):
        eca_kernel_size(64, gamma=0.0)


@pytest.mark.parametrize("memory", [torch.contiguous_format, torch.channels_last])
def test_fast_backward_equals_autograd(memory):
    torch.manual_seed(4)
    m = EfficientChannelAttention(12, kernel_size=5).double()
    x = torch.randn(2, 12, 5, 7, dtype=F64).contiguous(memory_format=memory)
    g = torch.randn(2, 12, 5, 7, dtype=F64)
    grads = {}
    for backend in ("reference", "fast"):
        m.backend = backend
        m.zero_grad()
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        out = m(xi)
        out.backward(g)
        grads[backend] = (out.detach(), xi.grad, m.conv.weight.grad.clone())
    for a, b, what in zip(grads["fast"], grads["reference"], ("output", "input grad", "kernel grad")):
        assert_close(a, b, F64, f"ECA fast vs autograd: {what}")
    xg = x[:1, :, :3, :4].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, w: eca_fast(t, w), (xg, m.conv.weight.detach().requires_grad_(True)),
                                    fast_mode=True)
