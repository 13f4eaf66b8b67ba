"""Oracles of LAMA (P008): each head's weights sum to 1 and vanish on padding; the factorised score equals the
explicit bilinear form c^T V diag(p_k) U^T h_t computed densely (no activation); pooled output invariant to
token order with a mean context; a hand-computed case; the Hadamard reading by hand."""

import pytest
import torch

from attnzoo.mechanisms.heads.lama import LowRankMultiHeadPooling
from attnzoo.testing import assert_close

F64 = torch.float64


@pytest.mark.parametrize("form", ["mlb", "hadamard"])
def test_weights_sum_to_one_and_padding_gets_zero(form):
    torch.manual_seed(0)
    m = LowRankMultiHeadPooling(8, 3, form=form).double()
    x = torch.randn(2, 7, 8, dtype=F64)
    mask = torch.tensor([[True] * 7, [True, False, True, True, False, False, True]])
    m(x, key_padding_mask=mask)
    a = m.last_attention
    assert_close(a.sum(-1), torch.ones(2, 3, dtype=F64), F64, "head weights sum to 1")
    assert (a[1][:, ~mask[1]] == 0).all()
    # Padded tokens do not matter at all.
    x2 = x.clone()
    x2[1, ~mask[1]] += 10.0
    assert_close(m(x2, key_padding_mask=mask), m(x, key_padding_mask=mask), F64, "padding ignored")


def test_factorised_score_equals_dense_bilinear_form():
    torch.manual_seed(1)
    m = LowRankMultiHeadPooling(6, 4, rank=3, activation="none").double()
    x = torch.randn(2, 5, 6, dtype=F64)
    out = m(x)
    c = x.mean(1)  # (B, 6)
    U, V, P = m.u.weight.T, m.v.weight.T, m.p.weight.T  # (6, 3), (6, 3), (3, 4)
    W = torch.stack([V @ torch.diag(P[:, k]) @ U.T for k in range(4)])  # (4, 6, 6): c^T W_k h
    s = torch.einsum("bc,kcd,btd->bkt", c, W, x)
    a = torch.softmax(s, dim=-1)
    assert_close(m.last_attention, a, F64, "factorised vs dense bilinear attention")
    assert_close(out, a @ x, F64, "pooled output")


def test_mean_context_is_permutation_invariant():
    torch.manual_seed(2)
    m = LowRankMultiHeadPooling(8, 2).double()
    x = torch.randn(3, 9, 8, dtype=F64)
    perm = torch.randperm(9)
    assert_close(m(x[:, perm]), m(x), F64, "token order")


def test_hand_computed_single_head():
    # One head, rank 1, no activation: s_t = p (u . h_t)(v . c). u = v = e1, p = 1; h = (1, 0), (3, 0):
    # c = (2, 0), s = (2, 6), a = softmax = (1, e^4) / (1 + e^4); pooled = a_1 * 1 + a_2 * 3 on channel 0.
    m = LowRankMultiHeadPooling(2, 1, activation="none").double()
    with torch.no_grad():
        m.u.weight.copy_(torch.tensor([[1.0, 0.0]], dtype=F64))
        m.v.weight.copy_(torch.tensor([[1.0, 0.0]], dtype=F64))
        m.p.weight.fill_(1.0)
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]], dtype=F64)
    e4 = torch.exp(torch.tensor(4.0, dtype=F64))
    want = (1 + 3 * e4) / (1 + e4)
    assert abs(m(x)[0, 0, 0].item() - want.item()) < 1e-12


def test_hadamard_form_by_hand_and_last_context():
    torch.manual_seed(3)
    m = LowRankMultiHeadPooling(4, 2, form="hadamard", context="last").double()
    x = torch.randn(1, 3, 4, dtype=F64)
    mask = torch.tensor([[True, True, False]])
    m(x, key_padding_mask=mask)
    c = x[0, 1]  # last unpadded state
    s = torch.tanh((x[0] @ m.u.weight.T) * (m.v.weight @ c))  # (3, 2)
    s = s / s.norm(dim=-1, keepdim=True)
    s[2] = float("-inf")
    assert_close(m.last_attention[0], torch.softmax(s.T, -1), F64, "Hadamard form")
    with pytest.raises(ValueError, match="rank"):
        LowRankMultiHeadPooling(4, 2, form="hadamard", rank=3)
