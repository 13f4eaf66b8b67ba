"""Oracles of DANet PAM/CAM (P015): parity with the official ``PAM_Module``/``CAM_Module`` forwards (written out
from sinAshish/Multi-Scale-Attention, identical to junfu1115/DANet) with their state dicts loaded, gamma = 0 is the
identity, PAM equals single-head reference softmax attention (scale 1) on the flattened pixels, CAM rows sum to 1
and softmax(max E - E) = softmax(-E), fused == explicit, both layouts agree."""

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.mechanisms.vision.danet import ChannelAttention, PositionAttention
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


class OfficialPAM(nn.Module):
    """``PAM_Module``, written out."""

    def __init__(self, in_dim):
        super().__init__()
        self.query_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        m_batchsize, C, height, width = x.size()
        proj_query = self.query_conv(x).view(m_batchsize, -1, width * height).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(m_batchsize, -1, width * height)
        energy = torch.bmm(proj_query, proj_key)
        attention = self.softmax(energy)
        proj_value = self.value_conv(x).view(m_batchsize, -1, width * height)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1))
        out = out.view(m_batchsize, C, height, width)
        return self.gamma * out + x


class OfficialCAM(nn.Module):
    """``CAM_Module``, written out."""

    def __init__(self, in_dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        m_batchsize, C, height, width = x.size()
        proj_query = x.view(m_batchsize, C, -1)
        proj_key = x.view(m_batchsize, C, -1).permute(0, 2, 1)
        energy = torch.bmm(proj_query, proj_key)
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        attention = self.softmax(energy_new)
        proj_value = x.view(m_batchsize, C, -1)
        out = torch.bmm(attention, proj_value)
        out = out.view(m_batchsize, C, height, width)
        return self.gamma * out + x


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_pam_parity_with_official(backend):
    torch.manual_seed(0)
    ours = PositionAttention(32, backend=backend)
    with torch.no_grad():
        ours.gamma.fill_(0.7)
    official = OfficialPAM(32)
    official.load_state_dict(ours.state_dict())
    x = torch.randn(2, 32, 7, 9)
    assert (ours(x) - official(x)).abs().max().item() < 1e-5


def test_cam_parity_with_official():
    torch.manual_seed(1)
    ours = ChannelAttention(24)
    with torch.no_grad():
        ours.gamma.fill_(-0.4)
    official = OfficialCAM(24)
    official.load_state_dict(ours.state_dict())
    x = 0.3 * torch.randn(2, 24, 6, 5)
    assert (ours(x) - official(x)).abs().max().item() < 1e-5


def test_gamma_zero_is_identity():
    torch.manual_seed(2)
    x = torch.randn(2, 16, 4, 5, dtype=F64)
    for m in (PositionAttention(16), ChannelAttention(16)):
        assert torch.equal(m.double()(x), x)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_pam_is_single_head_attention_on_flattened_pixels(backend):
    torch.manual_seed(3)
    m = PositionAttention(16, reduction=4, backend=backend).double()
    with torch.no_grad():
        m.gamma.fill_(1.3)
    x = torch.randn(2, 16, 3, 5, dtype=F64)
    t = x.flatten(2).transpose(1, 2)  # (B, N, C) pixels row-major
    lin = lambda conv: t @ conv.weight.view(conv.out_channels, -1).T + conv.bias  # 1x1 conv on tokens
    q, k, v = (lin(c).unsqueeze(1) for c in (m.query_conv, m.key_conv, m.value_conv))
    att = softmax_attention(q, k, v, scale=1.0).squeeze(1)  # (B, N, C)
    want = x + 1.3 * att.transpose(1, 2).reshape(2, 16, 3, 5)
    assert_close(m(x), want, F64, f"PAM vs reference SDPA ({backend})")


def test_pam_fast_matches_reference_with_gradients():
    torch.manual_seed(4)
    m = PositionAttention(16, reduction=2).double()
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = torch.randn(2, 16, 4, 6, dtype=F64)
    outs = {}
    for backend in ("reference", "fast"):
        m.backend = backend
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().sum().backward()
        outs[backend] = (y.detach(), xi.grad, m.query_conv.weight.grad.clone())
    for a, b in zip(outs["fast"], outs["reference"]):
        assert_close(a, b, F64, "PAM fast vs reference")


def test_cam_rows_sum_to_one_and_energy_is_negated_similarity():
    torch.manual_seed(5)
    x = torch.randn(2, 8, 4, 4, dtype=F64)
    off = ChannelAttention(8).double()
    sim = ChannelAttention(8, energy="similarity").double()
    a, s = off.attention(x), sim.attention(x)
    assert torch.allclose(a.sum(-1), torch.ones(2, 8, dtype=F64), atol=1e-12)
    f = x.flatten(2)
    e = f @ f.transpose(1, 2)
    assert_close(a, torch.softmax(-e, dim=-1), F64, "softmax(max E - E) = softmax(-E)")
    assert_close(s, torch.softmax(e, dim=-1), F64, "similarity energy")


def test_cam_and_pam_permute_with_positions():
    torch.manual_seed(6)
    x = torch.randn(1, 16, 4, 5, dtype=F64)
    perm = torch.randperm(20)
    for m in (PositionAttention(16, reduction=4), ChannelAttention(16)):
        m = m.double()
        with torch.no_grad():
            m.gamma.fill_(0.9)
        y = m(x).flatten(2)[..., perm]
        yp = m(x.flatten(2)[..., perm].view(1, 16, 4, 5)).flatten(2)
        assert_close(yp, y, F64, f"{type(m).__name__} permuted positions")


def test_channels_last_layouts_agree():
    torch.manual_seed(7)
    x = torch.randn(2, 16, 5, 6)
    for cls in (PositionAttention, ChannelAttention):
        m, cl = cls(16), cls(16, channels_last=True)
        with torch.no_grad():
            m.gamma.fill_(0.8)
        cl.load_state_dict(m.state_dict())
        base = m(x)
        assert (m(x.contiguous(memory_format=torch.channels_last)) - base).abs().max().item() < 1e-5
        assert (cl(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2) - base).abs().max().item() < 1e-5


def test_build_and_errors():
    assert isinstance(attnzoo.build("danet_pam", 64, 1), PositionAttention)
    assert isinstance(attnzoo.build("cam", 64, 1), ChannelAttention)
    with pytest.raises(ValueError, match="heads"):
        attnzoo.build("danet_pam", 64, 2)
    with pytest.raises(ValueError, match="reduction"):
        PositionAttention(4)
    with pytest.raises(ValueError, match="energy"):
        ChannelAttention(4, energy="cosine")
    with pytest.raises(ValueError, match="backend"):
        PositionAttention(16, backend="flash")
