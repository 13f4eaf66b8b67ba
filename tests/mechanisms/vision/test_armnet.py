"""Oracles of ARM-Net (P082): parity with the official ``SparseAttLayer`` + the ARM part of ``ARMNetModel.forward``
(written out from nusdbsystem/ARM-Net, with its bisection entmax) with copied weights; the attention over fields is
on the simplex with exact zeros before the value gates; alpha = 1 is softmax; a neuron with one active field is
exp(v * e_f); a hand-computed two-field case."""

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.kernels.entmax import entmax
from attnzoo.mechanisms.vision.armnet import ExponentialNeurons
from attnzoo.testing import assert_close

F64 = torch.float64


def official_entmax_bisect(X, alpha=1.5, dim=-1, n_iter=50):
    """``EntmaxBisectFunction.forward`` (utils/entmax.py) with ensure_sum_one, written out."""
    alpha_shape = list(X.shape)
    alpha_shape[dim] = 1
    alpha = torch.tensor(alpha, dtype=X.dtype).expand(*alpha_shape)
    d = X.shape[dim]
    X = X * (alpha - 1)
    max_val, _ = X.max(dim=dim, keepdim=True)
    gp = lambda x, a: x ** (a - 1)
    p_ = lambda x, a: torch.clamp(x, min=0) ** (1 / (a - 1))
    tau_lo = max_val - gp(1, alpha)
    tau_hi = max_val - gp(1 / d, alpha)
    f_lo = p_(X - tau_lo, alpha).sum(dim) - 1
    dm = tau_hi - tau_lo
    for _ in range(n_iter):
        dm /= 2
        tau_m = tau_lo + dm
        p_m = p_(X - tau_m, alpha)
        f_m = p_m.sum(dim) - 1
        mask = (f_m * f_lo >= 0).unsqueeze(dim)
        tau_lo = torch.where(mask, tau_m, tau_lo)
    return p_m / p_m.sum(dim=dim).unsqueeze(dim=dim)


class OfficialARM(nn.Module):
    """``SparseAttLayer`` + ``exp(einsum)`` + ``arm_bn`` of ``ARMNetModel.forward``."""

    def __init__(self, nhead, nfield, nemb, d_k, nhid, alpha):
        super().__init__()
        self.alpha = alpha
        self.scale = d_k ** -0.5
        self.bilinear_w = nn.Parameter(torch.zeros(nhead, nemb, d_k))
        self.query = nn.Parameter(torch.zeros(nhead, nhid, d_k))
        self.values = nn.Parameter(torch.zeros(nhead, nhid, nfield))
        self.arm_bn = nn.BatchNorm1d(nhead * nhid)

    def forward(self, x_arm):
        att_gates = torch.einsum('bfx,kxy,koy->bkof', x_arm, self.bilinear_w, self.query) * self.scale
        sparse = torch.softmax(att_gates, -1) if self.alpha == 1 else official_entmax_bisect(att_gates, self.alpha)
        arm_weight = torch.einsum('bkof,kof->bkof', sparse, self.values)
        x = torch.exp(torch.einsum('bfe,bkof->bkoe', x_arm, arm_weight))
        B, K, O, E = x.shape
        return self.arm_bn(x.reshape(B, K * O, E))


@pytest.mark.parametrize("alpha", [1.7, 1.5, 2.0, 1.0])
@pytest.mark.parametrize("train", [False, True])
def test_parity_with_official(alpha, train):
    torch.manual_seed(0)
    ours = ExponentialNeurons(10, 4, fields=10, neurons=16, alpha=alpha)
    official = OfficialARM(4, 10, 10, 10, 16, alpha)
    official.load_state_dict(ours.state_dict())
    ours.train(train)
    official.train(train)
    x = 0.5 * torch.randn(8, 10, 10)
    assert (ours(x) - official(x)).abs().max().item() < 1e-5


def test_attention_over_fields_is_sparse_simplex():
    torch.manual_seed(1)
    m = ExponentialNeurons(8, 2, fields=12, neurons=5, alpha=1.5).double()
    x = 4 * torch.randn(3, 12, 8, dtype=F64)
    w = m.interaction_weights(x)  # (B, K, O, m) = entmax * values
    keys = torch.einsum("bfx,kxy->bkfy", x, m.bilinear_w)
    scores = torch.einsum("bkfy,koy->bkof", keys, m.query) * 8 ** -0.5
    p = entmax(scores, 1.5)
    assert_close(w, p * m.values, F64, "weights = entmax(scores) * value gates")
    assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-12)
    assert (p == 0).any() and (p >= 0).all()


def test_softmax_limit_and_hand_computed_neuron():
    torch.manual_seed(2)
    m = ExponentialNeurons(3, 1, fields=2, neurons=1, alpha=1.0, norm=False).double()
    x = torch.randn(1, 2, 3, dtype=F64)
    e0, e1 = x[0, 0], x[0, 1]
    s = torch.stack([e0 @ m.bilinear_w[0] @ m.query[0, 0], e1 @ m.bilinear_w[0] @ m.query[0, 0]]) * 3 ** -0.5
    a = torch.softmax(s, 0) * m.values[0, 0]
    assert_close(m(x)[0, 0], torch.exp(a[0] * e0 + a[1] * e1), F64, "one neuron, softmax, by hand")
    # sparsemax with a dominant field: one active field, y = exp(v_f e_f)
    with torch.no_grad():
        m.query.copy_(10 * (m.bilinear_w[0].T @ e0).view(1, 1, 3))  # field 0 scores far higher
    m.alpha = 2.0
    w = m.interaction_weights(x)[0, 0, 0]
    assert w[1] == 0
    assert_close(m(x)[0, 0], torch.exp(m.values[0, 0, 0] * e0), F64, "one active field")


def test_build_and_errors():
    m = attnzoo.build("armnet", 10, 4, fields=10)
    assert m(torch.randn(5, 10, 10)).shape == (5, 4 * 32, 10)
    with pytest.raises(ValueError, match="fields"):
        attnzoo.build("armnet", 10, 4)
    with pytest.raises(ValueError, match=r"x: expected \(B, 10, 10\)"):
        m(torch.randn(5, 9, 10))
    with pytest.raises(ValueError, match="alpha"):
        ExponentialNeurons(4, 1, fields=3, alpha=0.5)
