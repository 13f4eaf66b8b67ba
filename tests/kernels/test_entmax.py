"""Sparse normalisers (attnzoo.kernels.entmax): simplex outputs with exact zeros, hand-computed cases, sparsemax is
the Euclidean projection onto the simplex, the sort-based forms equal the bisection at alpha 1.5 and 2, alpha -> 1
approaches softmax, gradcheck of every form, -inf scores and whole -inf rows."""

import pytest
import torch

from attnzoo.kernels.entmax import entmax, entmax15, sparsemax
from attnzoo.testing import assert_close

F64 = torch.float64
FORMS = {"sparsemax": sparsemax, "entmax15": entmax15, "entmax 1.7": lambda x, dim=-1: entmax(x, 1.7, dim),
         "entmax 3.0": lambda x, dim=-1: entmax(x, 3.0, dim)}


@pytest.mark.parametrize("name", list(FORMS))
def test_on_the_simplex_with_exact_zeros(name):
    torch.manual_seed(0)
    x = 3 * torch.randn(5, 7, 11, dtype=F64)
    for dim in (-1, 1, 0):
        p = FORMS[name](x, dim=dim)
        assert p.shape == x.shape
        assert (p >= 0).all()
        assert torch.allclose(p.sum(dim), torch.ones_like(p.sum(dim)), atol=1e-12)
    p = FORMS[name](x)
    assert (p == 0).any(), "scores spread over 3 standard deviations leave exact zeros"
    # the zeros are the smallest scores: every zero score is below every positive one in its row
    for row_x, row_p in zip(x.reshape(-1, 11), p.reshape(-1, 11)):
        if (row_p == 0).any():
            assert row_x[row_p == 0].max() < row_x[row_p > 0].min()


def test_hand_computed_cases():
    x = torch.tensor([[0.5, 0.3, -1.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=F64)
    want = torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=F64)
    assert_close(sparsemax(x), want, F64, "sparsemax")
    # 1.5-entmax of [0, 0]: [1/2, 1/2]; of [2, 0]: z/2 = [1, 0], tau = 0 -> [1, 0]; of [1, 0]: tau from
    # (0.5 - t)^2 + (0 - t)^2 = 1 -> t = (0.5 - sqrt(1.75)) / 2, p = [(0.5 - t)^2, t^2]
    t = (0.5 - 1.75 ** 0.5) / 2
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]], dtype=F64)
    want = torch.tensor([[0.5, 0.5], [1.0, 0.0], [(0.5 - t) ** 2, t ** 2]], dtype=F64)
    assert_close(entmax15(x), want, F64, "entmax15")


def test_sparsemax_is_the_euclidean_projection():
    """Optimality of the projection onto the simplex: p - x = -tau on the support, >= -tau off it (KKT)."""
    torch.manual_seed(1)
    x = torch.randn(50, 9, dtype=F64)
    p = sparsemax(x)
    for row_x, row_p in zip(x, p):
        supp = row_p > 0
        tau = (row_x - row_p)[supp]
        assert torch.allclose(tau, tau[0].expand_as(tau), atol=1e-12)
        assert (row_x[~supp] <= tau[0] + 1e-12).all()
    # and it is closer to x than random points of the simplex
    r = torch.distributions.Dirichlet(torch.ones(9, dtype=F64)).sample((50,))
    assert ((p - x).norm(dim=-1) <= (r - x).norm(dim=-1) + 1e-12).all()


def test_sort_based_forms_equal_bisection():
    torch.manual_seed(2)
    x = 2 * torch.randn(20, 13, dtype=F64)
    from attnzoo.kernels.entmax import _EntmaxBisect

    assert_close(entmax15(x), _EntmaxBisect.apply(x, 1.5, 1), F64, "entmax15 vs bisection")
    assert_close(sparsemax(x), _EntmaxBisect.apply(x, 2.0, 1), F64, "sparsemax vs bisection")
    assert torch.equal(entmax(x, 1.5), entmax15(x)) and torch.equal(entmax(x, 2.0), sparsemax(x))
    assert torch.equal(entmax(x, 1.0), torch.softmax(x, -1))


def test_alpha_to_one_approaches_softmax():
    torch.manual_seed(3)
    x = torch.randn(10, 6, dtype=F64)
    err = [(entmax(x, a) - torch.softmax(x, -1)).abs().max().item() for a in (1.5, 1.1, 1.01, 1.001)]
    assert err[0] > err[1] > err[2] > err[3] and err[3] < 2e-3


def test_large_gap_is_one_hot():
    x = torch.tensor([[5.0, 1.0, 0.5, -2.0]], dtype=F64)
    for f in (sparsemax, entmax15, lambda t: entmax(t, 1.7)):
        assert torch.equal(f(x), torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=F64))


@pytest.mark.parametrize("name", list(FORMS))
def test_gradcheck(name):
    torch.manual_seed(4)
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: FORMS[name](t), (x,))
    x2 = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: FORMS[name](t, dim=1), (x2,))


def test_neg_inf_scores_and_empty_rows():
    x = torch.tensor([[0.2, float("-inf"), 0.1], [float("-inf")] * 3], dtype=F64)
    for name, f in FORMS.items():
        p = f(x)
        assert torch.isfinite(p).all(), name
        assert p[0, 1] == 0 and torch.allclose(p[0].sum(), torch.tensor(1.0, dtype=F64)), name
        assert torch.equal(p[1], torch.zeros(3, dtype=F64)), name


def test_low_precision_and_errors():
    x = torch.randn(4, 9)
    for f in (sparsemax, entmax15):
        assert f(x.bfloat16()).dtype == torch.bfloat16
        assert (f(x.bfloat16()).float() - f(x.bfloat16().float())).abs().max() < 1e-2
    with pytest.raises(ValueError, match="alpha"):
        entmax(x, 0.5)
    with pytest.raises(ValueError, match="dim"):
        sparsemax(x, dim=2)
    with pytest.raises(TypeError, match="x"):
        entmax15([1.0, 2.0])
