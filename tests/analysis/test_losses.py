"""P052 attention adversarial training and P027 DisenDiff's calibration losses: ||r_adv|| = eps, eps = 0 is
standard training, the loss rises along r_adv to first order (AT) and falls along iAT's; token maps are the softmax
columns of plain cross-attention; the separation term vanishes for disjoint maps and the binding term for equal
ones, with no gradient into the class maps through the binding term."""

import pytest
import torch

from attnzoo import softmax_attention
from attnzoo.analysis.losses import (
    adversarial_attention_loss,
    adversarial_perturbation,
    disendiff_loss,
    soft_iou,
    token_maps,
)
from attnzoo.reference import softmax_weights


def test_perturbation_norm_and_sign():
    g = torch.randn(3, 2, 7, dtype=torch.float64)
    r = adversarial_perturbation(g, 0.3)
    assert torch.allclose(r.norm(dim=-1), torch.full((3, 2), 0.3, dtype=torch.float64))
    assert torch.allclose(adversarial_perturbation(g, 0.3, mode="iat"), -r)
    assert torch.equal(adversarial_perturbation(g, 0.0), torch.zeros_like(g))
    with pytest.raises(ValueError, match="mode"):
        adversarial_perturbation(g, 0.1, mode="x")


def _task(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 3, generator=g, dtype=torch.float64)
    target = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64)

    def forward(bias):  # an attention layer whose logits get the perturbation as an additive bias
        out = softmax_attention(q, k, v, bias=bias)
        return ((out - target) ** 2).mean()

    return forward, (2, 2, 5, 9)


def test_eps_zero_is_standard_training_and_first_order_increase():
    forward, shape = _task()
    total, clean, adv = adversarial_attention_loss(forward, shape, eps=0.0, dtype=torch.float64)
    assert float(adv.detach()) == pytest.approx(float(clean.detach()))
    assert float(total.detach()) == pytest.approx(2 * float(clean.detach()))
    d = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(forward(d), d)
    eps = 1e-4
    _, clean, adv = adversarial_attention_loss(forward, shape, eps=eps, dtype=torch.float64)
    gain = float((adv - clean).detach())
    expected = eps * float(g.norm(dim=-1).sum())  # <g, eps g/||g||> summed over the rows
    assert gain > 0 and gain == pytest.approx(expected, rel=1e-2)
    _, clean, adv_i = adversarial_attention_loss(forward, shape, eps=eps, mode="iat", dtype=torch.float64)
    assert float((adv_i - clean).detach()) < 0
    # the model's parameters keep their gradients for the optimiser
    total, _, _ = adversarial_attention_loss(forward, shape, eps=0.1, dtype=torch.float64)
    total.backward()


def test_token_maps_are_the_softmax_columns_of_cross_attention():
    g = torch.Generator().manual_seed(1)
    q_img = torch.randn(1, 2, 16, 8, generator=g, dtype=torch.float64)  # 4 x 4 image queries
    k_txt = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64)  # 6 text tokens
    w = softmax_weights(q_img, k_txt)
    manual = torch.softmax(q_img @ k_txt.transpose(-1, -2) / 8 ** 0.5, dim=-1)
    raw = token_maps(w, [2, 4], normalize=False)
    assert torch.allclose(raw, manual[..., [2, 4]].mean(1).transpose(1, 2))
    m = token_maps(w, [2, 4])
    assert torch.allclose(m.amax(-1), torch.ones(1, 2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(m.amin(-1), torch.zeros(1, 2, dtype=torch.float64))


def test_disendiff_terms():
    a = torch.zeros(1, 2, 10, dtype=torch.float64)
    a[0, 0, :5] = 1
    a[0, 1, 5:] = 1
    res = disendiff_loss(a, a.clone(), smooth=0.0)
    assert float(res["separate"]) == 0.0  # disjoint class maps
    assert float(res["bind"]) == 0.0  # modifiers on their class maps
    assert float(soft_iou(a[0, 0], a[0, 0], smooth=0.0)) == 1.0
    cls = a.clone().requires_grad_(True)
    mod = torch.rand(1, 2, 10, dtype=torch.float64, requires_grad=True)
    disendiff_loss(cls, mod, separate=False)["loss"].backward()
    assert cls.grad is None or torch.all(cls.grad == 0)  # binding never moves the class maps
    assert mod.grad is not None and mod.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="modifier_maps"):
        disendiff_loss(a, a[:, :1])
