"""Oracles of ULSAM (P072): parity with the official per-subspace loop (``SubSpace``/``ULSAM`` written out from
Nandan91/ULSAM with the weights copied slice by slice), each map sums to 1 over the positions, the output is
F * (1 + A) per subspace, subspaces do not interact, both layouts agree."""

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.mechanisms.vision.ulsam import SubspaceAttention
from attnzoo.testing import assert_close

F64 = torch.float64


class OfficialSubSpace(nn.Module):
    """Nandan91/ULSAM ``SubSpace``, written out."""

    def __init__(self, nin):
        super().__init__()
        self.conv_dws = nn.Conv2d(nin, nin, kernel_size=1, stride=1, padding=0, groups=nin)
        self.bn_dws = nn.BatchNorm2d(nin, momentum=0.9)
        self.relu_dws = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.conv_point = nn.Conv2d(nin, 1, kernel_size=1, stride=1, padding=0, groups=1)
        self.bn_point = nn.BatchNorm2d(1, momentum=0.9)
        self.relu_point = nn.ReLU(inplace=False)
        self.softmax = nn.Softmax(dim=2)

    def forward(self, x):
        out = self.relu_dws(self.bn_dws(self.conv_dws(x)))
        out = self.maxpool(out)
        out = self.relu_point(self.bn_point(self.conv_point(out)))
        m, n, p, q = out.shape
        out = self.softmax(out.view(m, n, -1))
        out = out.view(m, n, p, q)
        out = out.expand(x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        out = torch.mul(out, x)
        return out + x


class OfficialULSAM(nn.Module):
    def __init__(self, nin, num_splits):
        super().__init__()
        self.nin, self.num_splits = nin, num_splits
        self.subspaces = nn.ModuleList([OfficialSubSpace(nin // num_splits) for _ in range(num_splits)])

    def forward(self, x):
        sub_feat = torch.chunk(x, self.num_splits, dim=1)
        return torch.cat([self.subspaces[i](sub_feat[i]) for i in range(self.num_splits)], dim=1)


def _randomize_bn(m):
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.8)  # mostly positive: the ReLU before the softmax keeps a signal


def _copy_to_official(ours, official):
    c = ours.dim // ours.groups
    with torch.no_grad():
        for n, sub in enumerate(official.subspaces):
            sl = slice(n * c, (n + 1) * c)
            sub.conv_dws.weight.copy_(ours.conv_dws.weight[sl])
            sub.conv_dws.bias.copy_(ours.conv_dws.bias[sl])
            sub.conv_point.weight.copy_(ours.conv_point.weight[n:n + 1])
            sub.conv_point.bias.copy_(ours.conv_point.bias[n:n + 1])
            for mine, theirs, s in ((ours.bn_dws, sub.bn_dws, sl), (ours.bn_point, sub.bn_point, slice(n, n + 1))):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(theirs, name).copy_(getattr(mine, name)[s])


@pytest.mark.parametrize("train", [False, True])
def test_parity_with_official_loop(train):
    torch.manual_seed(0)
    ours = SubspaceAttention(32, 4)
    _randomize_bn(ours)
    official = OfficialULSAM(32, 4)
    _copy_to_official(ours, official)
    ours.train(train)
    official.train(train)
    x = torch.randn(3, 32, 9, 11)
    got, want = ours(x), official(x)
    assert (got - want).abs().max().item() < 1e-5
    if train:  # the running statistics were updated identically
        for n, sub in enumerate(official.subspaces):
            assert torch.allclose(sub.bn_dws.running_mean, ours.bn_dws.running_mean[n * 8:(n + 1) * 8], atol=1e-6)
            assert torch.allclose(sub.bn_point.running_var, ours.bn_point.running_var[n:n + 1], atol=1e-6)


def test_maps_sum_to_one_and_output_is_f_times_one_plus_a():
    torch.manual_seed(1)
    m = SubspaceAttention(12, 3).double()
    _randomize_bn(m)
    m.eval()
    x = torch.randn(2, 12, 5, 7, dtype=F64)
    a = m.attention_maps(x)  # (B, g, H, W)
    assert a.shape == (2, 3, 5, 7)
    assert torch.allclose(a.sum(dim=(2, 3)), torch.ones(2, 3, dtype=F64), atol=1e-12)
    assert (a >= 0).all()
    want = x * (1 + a.repeat_interleave(4, dim=1))
    assert_close(m(x), want, F64, "ULSAM = F * (1 + A) per subspace")


def test_subspaces_do_not_interact():
    torch.manual_seed(2)
    m = SubspaceAttention(12, 3).double().eval()
    _randomize_bn(m)
    x = torch.randn(2, 12, 4, 4, dtype=F64)
    x2 = x.clone()
    x2[:, 4:8] += torch.randn(2, 4, 4, 4, dtype=F64)  # perturb subspace 1 only
    y, y2 = m(x), m(x2)
    assert torch.equal(y[:, :4], y2[:, :4]) and torch.equal(y[:, 8:], y2[:, 8:])
    assert (y[:, 4:8] - y2[:, 4:8]).abs().max() > 1e-3


def test_channels_last_layouts_agree():
    torch.manual_seed(3)
    m = SubspaceAttention(16, 4).eval()
    _randomize_bn(m)
    cl = SubspaceAttention(16, 4, channels_last=True).eval()
    cl.load_state_dict(m.state_dict())
    x = torch.randn(2, 16, 6, 5)
    base = m(x)
    assert (m(x.contiguous(memory_format=torch.channels_last)) - base).abs().max().item() < 1e-6
    assert (cl(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2) - base).abs().max().item() < 1e-6


def test_build_and_errors():
    m = attnzoo.build("ulsam", 64, 8)
    assert m.groups == 8 and sum(p.numel() for p in m.parameters()) == 2 * 64 + 2 * 64 + (64 + 8) + 2 * 8
    with pytest.raises(ValueError, match="heads"):
        SubspaceAttention(10, 4)
    with pytest.raises(ValueError, match=r"x: expected \(B, 64, H, W\)"):
        m(torch.randn(1, 5, 5, 64))
