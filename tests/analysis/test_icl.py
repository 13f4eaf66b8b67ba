"""P037 in-context linear regression: a reproducible generator, the model's prediction written out, the structure
numbers on a hand-built ideal solution (c I KQ, last-entry OV, paired heads), the closed-form baselines, and a short
training run that beats the zero predictor (the full training and its measured structure are in the report)."""

import math

import torch

from attnzoo.analysis.icl import ICLTask, MultiHeadICL, baselines, structure, train_icl


def test_generator_is_reproducible_and_linear():
    task = ICLTask(d=3, n=8, noise=0.0)
    a = task.sample(4, torch.Generator().manual_seed(0), dtype=torch.float64)
    b = task.sample(4, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    z, zq, y = a
    assert torch.all(zq[:, -1] == 0)
    w = torch.linalg.lstsq(z[0, :, :3], z[0, :, 3:]).solution  # noise-free: the context fixes w
    assert torch.allclose(zq[0, :3] @ w, y[0].view(1), atol=1e-10)


def test_prediction_written_out():
    m = MultiHeadICL(d=2, heads=2).double()
    with torch.no_grad():
        m.kq.zero_()
        m.ov.zero_()
        m.kq[0, :2, :2] = 0.7 * torch.eye(2)
        m.kq[1, :2, :2] = -0.7 * torch.eye(2)
        m.ov[0, 2, 2], m.ov[1, 2, 2] = 1.5, -1.5
    z, zq, _ = ICLTask(d=2, n=5).sample(3, torch.Generator().manual_seed(2), dtype=torch.float64)
    want = torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for c, mu in ((0.7, 1.5), (-0.7, -1.5)):
            s = [c * float(z[b, i, :2] @ zq[b, :2]) for i in range(5)]
            e = [math.exp(x) for x in s]
            want[b] += mu * sum(e[i] / sum(e) * float(z[b, i, 2]) for i in range(5))
    assert torch.allclose(m(z, zq), want, atol=1e-12)
    st = structure(m)
    assert st["max_kq_residual"] < 1e-12 and st["min_ov_last_share"] == 1.0
    assert st["zero_sum"] == 0.0 and st["c_mu_same_sign"]


def test_baselines_and_short_training():
    task = ICLTask(d=3, n=16, noise=0.0)
    b = baselines(task, prompts=512)
    assert b["ridge"] < 1e-10 and b["one_step_gd"] < b["zero"]
    model, curve = train_icl(task, heads=2, steps=150, batch=128, lr=3e-2)
    res = baselines(task, model, prompts=512)
    assert res["model"] < 0.8 * res["zero"]
    assert sum(curve[-10:]) < sum(curve[:10])
