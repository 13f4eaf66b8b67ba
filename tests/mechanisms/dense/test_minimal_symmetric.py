"""Oracles for the minimal transformer attention (P032)."""

import math

import pytest
import torch

from attnzoo.mechanisms.dense.minimal_symmetric import QK_FORMS, VALUE_FORMS, MinimalAttention
from attnzoo.testing import assert_close

F64 = torch.float64


def _x(b=2, n=7, dim=12, seed=0):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("qk", QK_FORMS)
def test_symmetric_forms_give_symmetric_scores(qk):
    torch.manual_seed(0)
    m = MinimalAttention(12, 3, qk=qk).double()
    S = m.scores(_x())
    asym = (S - S.transpose(-2, -1)).abs().max().item()
    if qk.startswith("symmetric"):
        assert asym < 1e-12
    else:
        assert asym > 1e-3  # the check can fail: the asymmetric forms are not symmetric


@pytest.mark.parametrize("value", VALUE_FORMS)
def test_collapsed_equals_two_matrix_form(value):
    torch.manual_seed(1)
    sep = MinimalAttention(12, 3, qk="separate", value=value, causal=True).double()
    col = MinimalAttention(12, 3, qk="collapsed", value=value, causal=True).double()
    with torch.no_grad():
        col.w_qk.copy_(sep.qk_matrix())  # W_h = W_Q^h^T W_K^h
        for name, p in sep.named_parameters():
            if not name.startswith(("q_proj", "k_proj")):
                dict(col.named_parameters())[name].copy_(p)
    x = _x()
    for backend in ("reference", "fast"):
        sep.backend = col.backend = backend
        assert_close(col(x), sep(x), F64, f"collapsed vs separate ({backend})")
    # Symmetric = shared W_Q = W_K, and its collapsed form W^T W.
    sym = MinimalAttention(12, 3, qk="symmetric", value=value).double()
    symc = MinimalAttention(12, 3, qk="symmetric_collapsed", value=value).double()
    with torch.no_grad():
        symc.a_qk.copy_(sym.qk_matrix())
        for name, p in sym.named_parameters():
            if name != "qk_proj.weight":
                dict(symc.named_parameters())[name].copy_(p)
    assert_close(symc(x), sym(x), F64, "symmetric collapsed vs shared W_Q = W_K")


def test_identity_value_is_softmax_times_input_slices():
    """W_V = W_O = I: head h outputs softmax(S_h) X[:, :, h-th channel slice]; explicit loop."""
    torch.manual_seed(2)
    m = MinimalAttention(12, 3, qk="symmetric", value="identity").double()
    x = _x(b=1, n=5)
    S = m.scores(x)
    want = torch.zeros_like(x)
    for h in range(3):
        for i in range(5):
            p = torch.softmax(S[0, h, i], dim=0)
            want[0, i, 4 * h : 4 * h + 4] = sum(p[j] * x[0, j, 4 * h : 4 * h + 4] for j in range(5))
    # the scores themselves: (x_i W)(x_j W) / sqrt(d) with W the shared projection
    qk = x @ m.qk_proj.weight.T
    s01 = (qk[0, 0, 4:8] @ qk[0, 1, 4:8]) / math.sqrt(4)
    assert abs(S[0, 1, 0, 1].item() - s01.item()) < 1e-12
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), want, F64, backend)


def test_parameter_counts():
    D = 12
    count = lambda **kw: sum(p.numel() for p in MinimalAttention(D, 3, **kw).parameters())
    assert count(qk="separate", value="separate") == 4 * D * D
    assert count(qk="symmetric", value="identity") == D * D  # half of W_Q, W_K; no W_V, W_O
    assert count(qk="symmetric", value="collapsed") == 2 * D * D
    assert count(qk="collapsed", value="identity") == 3 * D * D  # one D x D per head


@pytest.mark.parametrize("qk", QK_FORMS)
@pytest.mark.parametrize("value", ["identity", "separate"])
def test_fast_matches_reference_cross_and_padding(qk, value):
    torch.manual_seed(3)
    m = MinimalAttention(12, 3, qk=qk, value=value, causal=True).double()
    x, ctx = _x(n=5), _x(n=9, seed=1)
    kpm = torch.rand(2, 9, generator=torch.Generator().manual_seed(4)) > 0.3
    kpm[:, 0] = True
    outs = {}
    for backend in ("reference", "fast"):
        m.backend = backend
        outs[backend] = m(x, ctx, key_padding_mask=kpm)
    assert_close(outs["fast"], outs["reference"], F64, "fast vs reference")


@pytest.mark.parametrize("qk", QK_FORMS)
def test_decode_every_form(qk):
    torch.manual_seed(5)
    m = MinimalAttention(12, 3, qk=qk, value="separate", causal=True).double().eval()
    x = _x(n=9)
    full = m(x)
    st = m.init_state(2)
    outs = [m(x[:, :3], state=st)[0]] + [m(x[:, t : t + 1], state=st)[0] for t in range(3, 9)]
    assert_close(torch.cat(outs, 1), full, F64, "decode")


def test_bad_options_raise():
    with pytest.raises(ValueError, match="qk"):
        MinimalAttention(12, 3, qk="tied")
    with pytest.raises(ValueError, match="kv_heads"):
        MinimalAttention(12, 3, kv_heads=1)
