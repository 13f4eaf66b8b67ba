"""Oracles for ComplexFormer / CMHA (P020; implemented from the abstract, the paper is withdrawn)."""

import math

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.dense.complexformer import ComplexMultiHeadAttention, polar
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _x(b=2, n=7, dim=16, seed=0):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _proj(m, x, ctx):
    B, N, _ = x.shape
    M = ctx.shape[1]
    d, H, Hk = m.head_dim, m.heads, m.kv_heads
    q = (x @ m.q_proj.weight.T).view(B, N, H, d).transpose(1, 2)
    k = (ctx @ m.k_proj.weight.T).view(B, M, Hk, d).transpose(1, 2)
    v = (ctx @ m.v_proj.weight.T).view(B, M, Hk, d).transpose(1, 2)
    return q, k, v


def _rope(t, pos, freqs):
    """Independent RoPE: channels (2j, 2j+1) as a complex number times exp(i pos freqs_j)."""
    d = t.shape[-1]
    rot = torch.polar(torch.ones(len(pos), d // 2, dtype=F64), pos.to(F64).view(-1, 1) * freqs)
    z = torch.view_as_complex(t.reshape(*t.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * rot).flatten(-2)


@pytest.mark.parametrize("causal,n,m,kv", [(False, 7, 7, 4), (True, 7, 7, 2), (True, 5, 9, 2), (False, 4, 11, 1)])
def test_identity_adapt_is_rope_attention(causal, n, m, kv):
    torch.manual_seed(0)
    mod = ComplexMultiHeadAttention(16, 4, kv_heads=kv, causal=causal, adapt="identity").double()
    x = _x(n=n)
    ctx = x if n == m else _x(n=m, seed=1)
    q, k, v = _proj(mod, x, ctx)
    # The module's initial frequencies are RoPE's base^(-2j/d) (stored in the default float32 dtype).
    freqs = mod.omega[0]
    assert_close(freqs, 10000.0 ** (-torch.arange(0, 4, 2, dtype=F64) / 4), torch.float32, "RoPE frequencies")
    assert (mod.omega == freqs).all()
    qr, kr = _rope(q, torch.arange(n) + (m - n), freqs), _rope(k, torch.arange(m), freqs)
    want = softmax_attention(qr, kr, v, causal=causal)
    want = want.transpose(1, 2).reshape(2, n, 16) @ mod.o_proj.weight.T
    for backend in ("reference", "fast"):
        mod.backend = backend
        assert_close(mod(x, None if n == m else ctx), want, F64, f"RoPE ({backend})")


def test_zero_frequency_identity_adapt_is_plain_dot_product():
    torch.manual_seed(1)
    mod = ComplexMultiHeadAttention(16, 4, kv_heads=2, causal=True).double()
    with torch.no_grad():
        mod.omega.zero_()
    ref = attnzoo.build("softmax", 16, 4, kv_heads=2, causal=True).double()
    ref.load_state_dict({k: v for k, v in mod.state_dict().items() if k.endswith("_proj.weight")})
    x = _x()
    for backend in ("reference", "fast"):
        mod.backend = backend
        assert_close(mod(x), ref(x), F64, backend)


def test_affine_adapt_explicit_loop():
    """score_mn = sum_j r_q r_k cos(alpha (theta_q - theta_k) + beta + omega (m - n)) / sqrt(d), by hand."""
    torch.manual_seed(2)
    mod = ComplexMultiHeadAttention(8, 2, causal=True).double()
    with torch.no_grad():
        mod.alpha.uniform_(0.5, 1.5)
        mod.beta.normal_()
        mod.omega.uniform_(-1, 1)
    x = _x(b=1, n=4, dim=8, seed=3)
    q, k, v = _proj(mod, x, x)
    want = torch.zeros(1, 2, 4, 4, dtype=F64)
    for h in range(2):
        for mm in range(4):
            s = []
            for nn in range(mm + 1):
                tot = 0.0
                for j in range(2):
                    a, b = q[0, h, mm, 2 * j].item(), q[0, h, mm, 2 * j + 1].item()
                    c, e = k[0, h, nn, 2 * j].item(), k[0, h, nn, 2 * j + 1].item()
                    ang = mod.alpha[h, j].item() * (math.atan2(b, a) - math.atan2(e, c)) + mod.beta[h, j].item() \
                        + mod.omega[h, j].item() * (mm - nn)
                    tot += math.hypot(a, b) * math.hypot(c, e) * math.cos(ang)
                s.append(tot / 2.0)
            p = torch.softmax(torch.tensor(s, dtype=F64), 0)
            want[0, h, mm] = sum(p[i] * v[0, h, i] for i in range(mm + 1))
    want = want.transpose(1, 2).reshape(1, 4, 8) @ mod.o_proj.weight.T
    for backend in ("reference", "fast"):
        mod.backend = backend
        assert_close(mod(x), want, F64, backend)


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(4)
    mod = ComplexMultiHeadAttention(16, 4).double()
    with torch.no_grad():
        mod.beta.normal_()
        mod.alpha.uniform_(0.5, 1.5)
    q, k, _ = _proj(mod, _x(), _x())
    p = torch.arange(7)
    s0 = mod.scores_reference(q, k, p, p)
    s1 = mod.scores_reference(q, k, p + 1000, p + 1000)
    assert_close(s1, s0, F64, "shifted positions", tol=1e-9)
    assert (mod.scores_reference(q, k, p + 3, p) - s0).abs().max() > 1e-3


def test_zero_pairs_have_finite_gradients():
    x = torch.zeros(1, 1, 3, 4, dtype=F64)
    x[0, 0, 1] = torch.tensor([1.0, 2.0, 0.0, 0.0])
    x.requires_grad_(True)
    r, theta = polar(x)
    (r * torch.cos(theta + 0.3)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gqa_decode():
    torch.manual_seed(5)
    mod = ComplexMultiHeadAttention(16, 4, kv_heads=1, causal=True).double().eval()
    with torch.no_grad():
        mod.beta.normal_()
    x = _x(n=9)
    full = mod(x)
    st = mod.init_state(2)
    outs = [mod(x[:, :2], state=st)[0]] + [mod(x[:, t : t + 1], state=st)[0] for t in range(2, 9)]
    assert_close(torch.cat(outs, 1), full, F64, "decode")


def test_odd_head_dim_raises():
    with pytest.raises(ValueError, match="even"):
        ComplexMultiHeadAttention(12, 4)
