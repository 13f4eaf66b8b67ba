"""Oracles of GhostNetV2 DFC attention (P122): parity with the official ``GhostModuleV2(mode='attn')`` forward
(written out from huawei-noah/Efficient-AI-Backbones) with its state dict loaded, the decoupled 1xK / Kx1 depthwise
passes equal one depthwise KxK convolution with the outer-product kernel, the gate's receptive field is the
+-K//2 band of the pooled map, both layouts agree."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.mechanisms.vision.ghostnetv2 import DFCGhostModule
from attnzoo.testing import assert_close

F64 = torch.float64


class OfficialGhostModuleV2(nn.Module):
    """``GhostModuleV2(inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True, mode='attn')``, written
    out from ``ghostnetv2_pytorch/model/ghostnetv2_torch.py``."""

    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
        super().__init__()
        self.gate_fn = nn.Sigmoid()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_channels),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )
        self.short_conv = nn.Sequential(
            nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(oup),
            nn.Conv2d(oup, oup, kernel_size=(1, 5), stride=1, padding=(0, 2), groups=oup, bias=False),
            nn.BatchNorm2d(oup),
            nn.Conv2d(oup, oup, kernel_size=(5, 1), stride=1, padding=(2, 0), groups=oup, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.oup, :, :] * F.interpolate(self.gate_fn(res), size=(out.shape[-2], out.shape[-1]),
                                                       mode='nearest')


def _randomize_bn(m):
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("dim,size,train", [(16, (10, 12), False), (15, (9, 7), False), (16, (8, 8), True)])
def test_parity_with_official_ghost_module_v2(dim, size, train):
    torch.manual_seed(0)
    ours = DFCGhostModule(dim)
    _randomize_bn(ours)
    official = OfficialGhostModuleV2(dim, dim)
    official.load_state_dict(ours.state_dict())  # the official parameter names and shapes
    ours.train(train)
    official.train(train)
    x = torch.randn(2, dim, *size)
    got, want = ours(x), official(x)
    assert got.shape == (2, dim, *size)
    assert (got - want).abs().max().item() < 1e-5


def test_decoupled_passes_equal_outer_product_conv():
    torch.manual_seed(1)
    m = DFCGhostModule(6, kernel_size=5).double().eval()
    h, v = m.short_conv[2].weight, m.short_conv[4].weight  # (C, 1, 1, K), (C, 1, K, 1)
    z = torch.randn(2, 6, 7, 9, dtype=F64)
    two = F.conv2d(F.conv2d(z, h, padding=(0, 2), groups=6), v, padding=(2, 0), groups=6)
    outer = v.view(6, 1, 5, 1) * h.view(6, 1, 1, 5)  # (C, 1, K, K): kernel[a, b] = v[a] h[b]
    one = F.conv2d(z, outer, padding=2, groups=6)
    assert_close(two, one, F64, "1xK then Kx1 depthwise vs KxK outer-product kernel")
    # the module's branch with identity BatchNorms is exactly that (after the 1x1 conv)
    with torch.no_grad():
        for bn in (m.short_conv[1], m.short_conv[3], m.short_conv[5]):
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.zero_()
    x = torch.randn(2, 6, 14, 18, dtype=F64)
    pooled = F.avg_pool2d(x, 2, 2)
    z = F.conv2d(pooled, m.short_conv[0].weight)
    want = torch.sigmoid(F.conv2d(z, outer, padding=2, groups=6)).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert_close(m.dfc_attention(x), want, F64, "DFC gate = sigmoid(KxK outer conv of 1x1 conv of the pooled map)")


def test_gate_receptive_field_is_the_pooled_band():
    torch.manual_seed(2)
    m = DFCGhostModule(4, kernel_size=3).double().eval()
    _randomize_bn(m)
    x = torch.randn(1, 4, 16, 16, dtype=F64)
    base = m.dfc_attention(x)
    x2 = x.clone()
    x2[:, :, 0:2, 0:2] += 5.0  # pooled pixel (0, 0)
    diff = (m.dfc_attention(x2) - base).abs().amax(dim=1)[0]  # (H, W)
    changed = diff > 1e-12
    # K = 3: pooled pixels (0..1, 0..1) see pooled (0, 0); at full resolution rows/cols 0..3
    assert changed[:4, :4].all() and not changed[4:].any() and not changed[:, 4:].any()


def test_channels_last_layouts_agree():
    torch.manual_seed(3)
    m = DFCGhostModule(8).eval()
    _randomize_bn(m)
    cl = DFCGhostModule(8, channels_last=True).eval()
    cl.load_state_dict(m.state_dict())
    x = torch.randn(2, 8, 9, 10)
    base = m(x)
    assert (m(x.contiguous(memory_format=torch.channels_last)) - base).abs().max().item() < 1e-6
    assert (cl(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2) - base).abs().max().item() < 1e-6


def test_build_and_errors():
    m = attnzoo.build("ghostnetv2_dfc", 32, 1)
    assert m.kernel_size == 5
    with pytest.raises(ValueError, match="heads"):
        attnzoo.build("ghostnetv2_dfc", 32, 2)
    with pytest.raises(ValueError, match="H, W >= 2"):
        m(torch.randn(1, 32, 1, 8))
    with pytest.raises(ValueError, match="kernel_size"):
        DFCGhostModule(8, kernel_size=4)
