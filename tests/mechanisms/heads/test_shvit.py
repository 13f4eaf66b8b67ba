"""Oracles of SHViT single-head attention (P073): with all channels attended and no norms it is single-head
softmax attention + ReLU + projection; the unattended channels reach the projection unchanged; an explicit
re-computation of the official block (GroupNorm, Conv-BN, softmax, ReLU, Conv-BN) in eval mode; fused equals
explicit; equivariance to permuting positions."""

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.heads.shvit import SingleHeadSelfAttention
from attnzoo.testing import assert_close

F64 = torch.float64


def test_all_channels_no_norm_is_single_head_attention():
    torch.manual_seed(0)
    m = SingleHeadSelfAttention(8, qk_dim=4, partial_dim=8, norm=False).double()
    x = torch.randn(2, 8, 3, 5, dtype=F64)
    t = x.flatten(2).transpose(1, 2)  # (B, HW, C) tokens
    w = m.qkv[0].weight.view(16, 8)
    q, k, v = (t @ w.T).split([4, 4, 8], dim=-1)
    att = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v  # (B, HW, 8), scale 1/sqrt(4)
    y = torch.relu(att) @ m.proj[1][0].weight.view(8, 8).T
    assert_close(m(x), y.transpose(1, 2).reshape(2, 8, 3, 5), F64, "SHSA r=1 vs single-head attention")


def test_unattended_channels_pass_unchanged():
    torch.manual_seed(1)
    m = SingleHeadSelfAttention(16, qk_dim=4, partial_dim=5).double()
    x = torch.randn(2, 16, 4, 4, dtype=F64)
    mixed = m.mix(x)
    assert torch.equal(mixed[:, 5:], x[:, 5:])
    assert (mixed[:, :5] - x[:, :5]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_official_block_recomputed(backend):
    torch.manual_seed(2)
    m = SingleHeadSelfAttention(16, qk_dim=4, partial_dim=6, backend=backend).double()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for bn in (m.qkv[1], m.proj[1][1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    m.eval()
    x = torch.randn(2, 16, 3, 4, dtype=F64)

    def bn(t, mod):  # eval BatchNorm over channel dim 1
        c = lambda p: p.view(1, -1, 1, 1)
        return (t - c(mod.running_mean)) * c((mod.running_var + mod.eps).rsqrt() * mod.weight) + c(mod.bias)

    xa, xr = x[:, :6], x[:, 6:]
    mu = xa.mean(dim=(1, 2, 3), keepdim=True)
    var = xa.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    gn_w, gn_b = m.pre_norm.weight.view(1, -1, 1, 1), m.pre_norm.bias.view(1, -1, 1, 1)
    xa = (xa - mu) / (var + m.pre_norm.eps).sqrt() * gn_w + gn_b
    qkv = bn(torch.einsum("oc,bchw->bohw", m.qkv[0].weight.view(14, 6), xa), m.qkv[1])
    q, k, v = (t.flatten(2) for t in qkv.split([4, 4, 6], dim=1))  # (B, c, HW)
    a = torch.softmax(q.transpose(1, 2) @ k / 2.0, dim=-1)  # (B, HW, HW)
    att = (v @ a.transpose(1, 2)).view(2, 6, 3, 4)
    mixed = torch.relu(torch.cat([att, xr], dim=1))
    want = bn(torch.einsum("oc,bchw->bohw", m.proj[1][0].weight.view(16, 16), mixed), m.proj[1][1])
    assert_close(m(x), want, F64, "SHSA vs official block recomputed")


def test_position_permutation_equivariance():
    torch.manual_seed(3)
    m = SingleHeadSelfAttention(16, qk_dim=4).double().eval()
    x = torch.randn(1, 16, 4, 5, dtype=F64)
    perm = torch.randperm(20)
    y = m(x).flatten(2)[..., perm]
    yp = m(x.flatten(2)[..., perm].view(1, 16, 4, 5)).flatten(2)
    assert_close(yp, y, F64, "permuted positions")


def test_build_and_errors():
    m = attnzoo.build("shvit", 224, 1)
    assert m.pdim == 48  # SHViT-S4 stage 1: 224 channels, 48 attended (1 / 4.67)
    with pytest.raises(ValueError, match="heads"):
        attnzoo.build("shvit", 16, 4)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 7, 7, 224)[..., :100])
    with pytest.raises(ValueError, match="partial_dim"):
        SingleHeadSelfAttention(8, partial_dim=9)
