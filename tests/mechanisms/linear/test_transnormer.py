"""Oracles of `transnormer` (TransNormerLLM's gated linear attention)."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.mechanisms.linear.transnormer import lrpe, srms_norm, tnl_decay
from attnzoo.testing import assert_close

F64 = torch.float64


def layer(**kw):
    torch.manual_seed(0)
    return attnzoo.build("transnormer", 16, 4, causal=True, **kw).double()


def x_of(n, seed=0, b=2):
    return torch.randn(b, n, 16, generator=torch.Generator().manual_seed(seed), dtype=F64)


def core_by_hand(m, x, decay):
    """The block written from the paper with an explicit recurrence kv_t = lambda kv_(t-1) + k_t^T v_t."""
    B, N, _ = x.shape
    H, d = m.heads, m.head_dim
    q, k, v, u = m.qkvu_proj(x).chunk(4, dim=-1)
    q = F.silu(q).view(B, N, H, d).transpose(1, 2)
    k = F.silu(k).view(B, N, H, d).transpose(1, 2)
    v = v.view(B, N, H, d).transpose(1, 2)
    t = torch.arange(N, dtype=F64).view(-1, 1)
    th = m.theta * t  # (H, N, d)
    q = torch.cat([q * torch.cos(th), q * torch.sin(th)], -1)
    k = torch.cat([k * torch.cos(th), k * torch.sin(th)], -1)
    kv = torch.zeros(B, H, 2 * d, d, dtype=F64)
    lam = torch.tensor(decay, dtype=F64).view(1, H, 1, 1)
    outs = []
    for i in range(N):
        kv = lam * kv + k[:, :, i].unsqueeze(-1) * v[:, :, i].unsqueeze(-2)
        outs.append(torch.einsum("bhf,bhfe->bhe", q[:, :, i], kv))
    o = torch.stack(outs, 2).transpose(1, 2).reshape(B, N, H * d)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    return m.out_proj(o * u)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_equals_explicit_recurrence(backend):
    m = layer(layer_idx=1, num_layers=3, chunk=4)
    m.backend = backend
    x = x_of(11)
    assert_close(m(x), core_by_hand(m, x, tnl_decay(4, 1, 3)), F64, f"{backend} vs explicit recurrence")


def test_decay_schedule_from_official_code():
    # H = 4: slopes 2^-2, 2^-4, 2^-6, 2^-8; layer 1 of 3: factor 1 - 1/2 + 1e-5
    want = [math.exp(-(2.0 ** -(2 * (h + 1))) * (0.5 + 1e-5)) for h in range(4)]
    assert tnl_decay(4, 1, 3) == pytest.approx(want, rel=1e-15)
    assert tnl_decay(4, 2, 3) == pytest.approx([math.exp(-(2.0 ** -(2 * (h + 1))) * 1e-5) for h in range(4)])


def test_theta_zero_decay_one_gate_one_is_causal_linear_attention():
    """theta = 0 and lambda = 1 reduce the core to unnormalised causal linear attention; the identity gate
    (u = 1) leaves SRMSNorm(attention) before W_o."""
    m = layer(chunk=3)
    with torch.no_grad():
        m.theta.zero_()
    m.decay = [1.0] * 4
    x = x_of(9)
    B, N, _ = x.shape
    q, k, v, _ = m.qkvu_proj(x).chunk(4, dim=-1)
    sp = lambda t: t.view(B, N, 4, 4).transpose(1, 2)
    lin = attnzoo.attention(sp(F.silu(q)), sp(F.silu(k)), sp(v), mechanism="linear", causal=True, scale=1.0,
                            feature_map="identity", normalize=False)
    core = srms_norm(lin.transpose(1, 2).reshape(B, N, 16), 1e-6)
    with torch.no_grad():  # gate = 1: make u = x W_u equal 1 by a bias-only projection
        m.qkvu_proj.weight[48:].zero_()
    m.qkvu_proj.bias = torch.nn.Parameter(torch.cat([torch.zeros(48, dtype=F64), torch.ones(16, dtype=F64)]))
    assert_close(m(x), m.out_proj(core), F64, "theta=0, decay=1, gate=1 vs SRMSNorm(causal linear attention)")


def test_lrpe_is_relative():
    torch.manual_seed(1)
    theta = torch.rand(2, 1, 3, dtype=F64)
    q, k = torch.randn(1, 2, 5, 3, dtype=F64), torch.randn(1, 2, 5, 3, dtype=F64)
    a = lrpe(q, theta, 0) @ lrpe(k, theta, 0).transpose(-1, -2)
    b = lrpe(q, theta, 7) @ lrpe(k, theta, 7).transpose(-1, -2)
    assert_close(b, a, F64, "LRPE scores under a shift of every position")


def test_decode_long_prefill_then_steps():
    m = layer(chunk=8)
    m.eval()
    x = x_of(40)
    full = m(x)
    state = m.init_state(2)
    out0, state = m(x[:, :37], state=state)
    outs = [out0] + [m(x[:, t:t + 1], state=state)[0] for t in range(37, 40)]
    assert_close(torch.cat(outs, 1), full, F64, "prefill 37 (chunks of 8 + a tail) + 3 steps")
    assert state["kv"].shape == (2, 4, 8, 4) and state.seq_len == 40


def test_errors():
    with pytest.raises(ValueError, match="causal"):
        attnzoo.build("transnormer", 16, 4, causal=False)
    with pytest.raises(ValueError, match="kv_heads"):
        attnzoo.build("transnormer", 16, 4, kv_heads=2, causal=True)
    with pytest.raises(ValueError, match="layer_idx"):
        attnzoo.build("transnormer", 16, 4, causal=True, layer_idx=3, num_layers=2)
    with pytest.raises(ValueError, match="gate"):
        attnzoo.build("transnormer", 16, 4, causal=True, gate="relu")
    m = layer()
    with pytest.raises(ValueError, match="context"):
        m(x_of(3), x_of(4))
