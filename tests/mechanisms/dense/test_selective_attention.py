"""Oracles for Selective Self-Attention (P079)."""

import math

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.dense.selective_attention import (
    SelectiveAttention,
    position_temperature,
    selective_attention,
    selective_attention_fast,
)
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _qkv(b=2, hq=4, hk=2, nq=7, nk=7, d=5, dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=F64)
    k = torch.randn(b, hk, nk, d, generator=g, dtype=F64)
    v = torch.randn(b, hk, nk, dv, generator=g, dtype=F64)
    return q, k, v


@pytest.mark.parametrize("causal,nq,nk", [(False, 7, 7), (True, 7, 7), (True, 5, 9), (False, 1, 65), (True, 63, 63)])
def test_temperature_one_is_softmax(causal, nq, nk):
    q, k, v = _qkv(nq=nq, nk=nk)
    kpm = torch.rand(2, nk, generator=torch.Generator().manual_seed(3)) > 0.3
    kpm[:, 0] = True
    tau = torch.ones(1, 1, nq, dtype=F64)
    for fn in (selective_attention, selective_attention_fast):
        out = fn(q, k, v, tau=tau, causal=causal, key_padding_mask=kpm)
        assert_close(out, softmax_attention(q, k, v, causal=causal, key_padding_mask=kpm), F64, fn.__name__)


def test_rows_scaled_by_one_plus_s_log_i_explicit_loop():
    """Row i (1-based, causal) logits are exactly (1 + s log i) q_i.k_j / sqrt(d)."""
    q, k, v = _qkv(b=1, hq=2, hk=2, nq=6, nk=6)
    s = torch.tensor([0.3, 0.05], dtype=F64)
    tau = position_temperature(s, 6, 6, True).unsqueeze(0)  # (1, 2, 6)
    out = selective_attention(q, k, v, tau=tau, causal=True)
    want = torch.zeros_like(out)
    for h in range(2):
        for i in range(6):
            t = 1 + s[h].item() * math.log(i + 1)
            logits = torch.stack([t * (q[0, h, i] @ k[0, h, j]) / math.sqrt(5) for j in range(i + 1)])
            p = torch.softmax(logits, dim=0)
            want[0, h, i] = sum(p[j] * v[0, h, j] for j in range(i + 1))
    assert_close(out, want, F64, "explicit loop")
    # Non-causal queries all see Nk keys: i = Nk for every row.
    tau_nc = position_temperature(s, 6, 9, False)
    assert torch.allclose(tau_nc, (1 + s.view(2, 1) * math.log(9)).expand(2, 6))


def test_module_matches_official_formula():
    """Module (position temperature only) == official code's att * (1 + exp(-exp(beta)) log(row)) then
    causal softmax, written out independently."""
    torch.manual_seed(0)
    m = SelectiveAttention(16, 4, causal=True, beta_init=0.3).double()
    x = torch.randn(2, 9, 16, dtype=F64)
    B, N, H, d = 2, 9, 4, 4
    q = (x @ m.q_proj.weight.T).view(B, N, H, d).transpose(1, 2)
    k = (x @ m.k_proj.weight.T).view(B, N, H, d).transpose(1, 2)
    v = (x @ m.v_proj.weight.T).view(B, N, H, d).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    row = torch.arange(1, N + 1, dtype=F64).view(1, 1, N, 1)
    att = att * (1 + torch.exp(-torch.exp(m.beta)) * torch.log(row))
    att = att.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    want = (att @ v).transpose(1, 2).reshape(B, N, 16) @ m.o_proj.weight.T
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), want, F64, backend)


def test_no_temperature_module_is_standard_mha():
    torch.manual_seed(1)
    m = SelectiveAttention(16, 4, kv_heads=2, causal=True, position_temperature=False).double()
    ref = attnzoo.build("softmax", 16, 4, kv_heads=2, causal=True).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items()})
    x = torch.randn(3, 7, 16, dtype=F64)
    assert_close(m(x), ref(x), F64, "no temperature vs softmax layer")
    # beta -> +inf switches the position temperature off (exp(-exp(40)) underflows to exactly 0).
    m2 = SelectiveAttention(16, 4, kv_heads=2, causal=True, beta_init=20.0).double()
    m2.load_state_dict({**m.state_dict(), "beta": torch.tensor([20.0], dtype=F64)})
    assert_close(m2(x), ref(x), F64, "beta large")


def test_larger_temperature_lowers_entropy():
    q, k, v = _qkv(b=1, hq=1, hk=1, nq=1, nk=33, seed=4)
    scores = (q @ k.transpose(-2, -1)).squeeze() / math.sqrt(5)
    ents = []
    for t in (0.5, 1.0, 2.0, 4.0):
        p = torch.softmax(t * scores, dim=0)
        ents.append(-(p * p.log()).sum().item())
    assert all(a > b for a, b in zip(ents, ents[1:])), ents


def test_decode_uses_absolute_positions():
    """Decoding token by token gives the causal forward, which the official row-of-chunk index would not."""
    torch.manual_seed(2)
    m = SelectiveAttention(16, 4, causal=True, beta_init=-1.0, token_temperature=True).double()
    with torch.no_grad():
        m.u.normal_()
    x = torch.randn(2, 11, 16, dtype=F64)
    full = m(x)
    st = m.init_state(2)
    outs = [m(x[:, :4], state=st)[0]] + [m(x[:, t : t + 1], state=st)[0] for t in range(4, 11)]
    assert_close(torch.cat(outs, 1), full, F64, "decode")
    assert st.seq_len == 11


def test_gradcheck_core_including_tau():
    q, k, v = (t[:1, :2, :4].clone().requires_grad_(True) for t in _qkv(hq=2, hk=1, nq=4, nk=4))
    q, k, v = q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_()
    tau = (1 + torch.rand(1, 2, 4, dtype=F64)).requires_grad_(True)
    for fn in (selective_attention, selective_attention_fast):
        assert torch.autograd.gradcheck(lambda *a, fn=fn: fn(a[0], a[1], a[2], tau=a[3], causal=True), (q, k, v, tau),
                                        fast_mode=True)


def test_bad_tau_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="tau"):
        selective_attention(q, k, v, tau=torch.ones(2, 4, 6, dtype=F64))
    with pytest.raises(ValueError, match="beta_init"):
        SelectiveAttention(16, 4, beta_init=99.0)
    with pytest.raises(ValueError, match="kv_heads"):
        SelectiveAttention(16, 4, kv_heads=3)
