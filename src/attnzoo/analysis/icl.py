"""In-context linear regression with one-layer multi-head softmax attention, and the structure its training finds
(CATALOG P037).

Paper: "In-Context Linear Regression Demystified: Training Dynamics and Mechanistic Interpretability of Multi-Head
Softmax Attention", He, Pan, Yang, Wang, Xu, Wang, Fan et al., arXiv 2503.12734; no official code found. Prompt
``Z = [z_1 ... z_N]`` with ``z_i = (x_i, y_i)`` in R^(d+1), ``x_i ~ N(0, I_d)``, ``y_i = w^T x_i + noise``,
``w ~ N(0, I_d / d)`` per prompt, and the query token ``z_q = (x_q, 0)``. The model is one layer of H heads, each
with a key-query matrix W_KQ^h and an output-value matrix W_OV^h (both (d+1) x (d+1)); it predicts the last entry of
the output at the query: ``y_hat = sum_h e_{d+1}^T W_OV^h Z softmax(Z^T W_KQ^h z_q)`` (the query attends to the
N context tokens).

The paper's finding, measured here after training from a small random initialisation (``structure``):
- KQ: the block that acts (rows of every key entry, columns of the query's x entries) is ``c_h I_d`` in the x-x
  block and ~0 in the y row: ``kq_residual = ||K_h - c_h I|| / ||K_h||`` with ``c_h = tr(K_h) / d``;
- OV: only the last entry of the read-out row is used: ``ov_last_share = |mu_h| / ||(u_h, mu_h)||``;
- heads pair up with opposite signs so the constant part of the softmax cancels ("zero-sum" OV, a debiased
  one-step gradient-descent predictor): ``|sum_h mu_h| / sum_h |mu_h|`` near 0 and c_h mu_h of one sign.
Baselines on the same prompts (CATALOG oracle): the optimal one-step gradient-descent predictor
``y = eta x_q^T X^T y / N`` (eta fitted by least squares over training prompts) and ridge / Bayes posterior mean
``w = (X^T X + sigma^2 d I)^-1 X^T y``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import check_float, check_int

__all__ = ["ICLTask", "MultiHeadICL", "train_icl", "structure", "baselines"]


@dataclass(frozen=True)
class ICLTask:
    """The prompt distribution: dimension d, N context pairs, label noise std."""

    d: int = 5
    n: int = 40
    noise: float = 0.0

    def sample(self, batch: int, g: torch.Generator, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
        """(Z (B, N, d+1) context tokens, zq (B, d+1) query token) and the target y_q (B,). Reproducible from g."""
        check_int("batch", batch, low=1)
        d, n = self.d, self.n
        w = torch.randn(batch, d, generator=g, dtype=torch.float64) / d ** 0.5  # (B, d): E[y^2] = 1
        x = torch.randn(batch, n + 1, d, generator=g, dtype=torch.float64)  # (B, N + 1, d)
        y = torch.einsum("bnd,bd->bn", x, w) + self.noise * torch.randn(batch, n + 1, generator=g, dtype=torch.float64)
        z = torch.cat([x[:, :n], y[:, :n, None]], -1)  # (B, N, d + 1)
        zq = torch.cat([x[:, n], torch.zeros(batch, 1, dtype=torch.float64)], -1)  # (B, d + 1)
        return z.to(dtype), zq.to(dtype), y[:, n].to(dtype)


class MultiHeadICL(nn.Module):
    """One layer of H softmax heads with full (d+1) x (d+1) KQ and OV matrices; predicts y_q from the query token."""

    def __init__(self, d: int, heads: int, init_scale: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d, self.heads = check_int("d", d), check_int("heads", heads)
        self.kq = nn.Parameter(init_scale * torch.randn(heads, d + 1, d + 1, generator=g))
        self.ov = nn.Parameter(init_scale * torch.randn(heads, d + 1, d + 1, generator=g))

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """z (B, N, d+1), zq (B, d+1) -> y_hat (B,)."""
        scores = torch.einsum("bnk,hkq,bq->bhn", z, self.kq, zq)  # (B, H, N): z_i^T W_KQ^h z_q
        attn = torch.softmax(scores, dim=-1)  # (B, H, N)
        pooled = torch.einsum("bhn,bnk->bhk", attn, z)  # (B, H, d+1)
        return torch.einsum("bhk,hk->b", pooled, self.ov[:, -1])  # last entry of sum_h W_OV^h (Z attn)


def train_icl(task: ICLTask, *, heads: int = 4, steps: int = 3000, batch: int = 256, lr: float = 1e-2,
              seed: int = 0, progress=None) -> tuple[MultiHeadICL, list[float]]:
    """Adam on the mean squared error over fresh prompts each step; returns the model and the loss curve."""
    check_int("steps", steps, low=1)
    check_float("lr", lr, low=0.0)
    torch.manual_seed(seed)
    model = MultiHeadICL(task.d, heads, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed + 1)
    curve = []
    for step in range(steps):
        z, zq, y = task.sample(batch, g)
        loss = ((model(z, zq) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if progress is not None and step % 100 == 0:
            progress.tick(100)
    return model, curve


def structure(model: MultiHeadICL) -> dict[str, Any]:
    """The KQ / OV structure numbers of the paper's finding (see the module docstring), per head and summarised."""
    d = model.d
    kq, ov = model.kq.detach().double(), model.ov.detach().double()
    K = kq[:, :d, :d]  # (H, d, d): x-x block
    c = torch.diagonal(K, dim1=-2, dim2=-1).mean(-1)  # (H,) = tr(K) / d
    eye = torch.eye(d, dtype=torch.float64)
    resid = (K - c.view(-1, 1, 1) * eye).flatten(1).norm(dim=-1) / K.flatten(1).norm(dim=-1)
    y_row = kq[:, d, :d].norm(dim=-1) / K.flatten(1).norm(dim=-1)  # the key's y entry times the query's x
    read = ov[:, d]  # (H, d+1): the row that makes the prediction
    mu, u = read[:, d], read[:, :d]
    last_share = mu.abs() / read.norm(dim=-1)
    # heads of one sign act together (their softmax terms add up): the mu-weighted KQ of each sign group
    group = []
    for sign in (1.0, -1.0):
        sel = (mu * sign) > 0
        if bool(sel.any()):
            G = (mu[sel].view(-1, 1, 1) * K[sel]).sum(0)
            cg = torch.diagonal(G).mean()
            group.append(float((G - cg * eye).norm() / G.norm()))
    return {
        "group_kq_residual": group,
        "c": c.tolist(), "mu": mu.tolist(), "kq_residual": resid.tolist(), "kq_y_row": y_row.tolist(),
        "ov_last_share": last_share.tolist(), "ov_u_norm": u.norm(dim=-1).tolist(),
        "zero_sum": float(mu.sum().abs() / mu.abs().sum()),
        "c_mu_same_sign": bool(((c * mu) > 0).all() or ((c * mu) < 0).all()),
        "max_kq_residual": float(resid.max()), "min_ov_last_share": float(last_share.min()),
    }


def baselines(task: ICLTask, model: MultiHeadICL | None = None, *, prompts: int = 4096, seed: int = 123
              ) -> dict[str, float]:
    """Mean squared error on fresh prompts of: the trained model, optimal one-step GD, ridge (Bayes), zero."""
    g = torch.Generator().manual_seed(seed)
    z, zq, y = task.sample(prompts, g, dtype=torch.float64)
    d, n = task.d, task.n
    X, Y, xq = z[..., :d], z[..., d], zq[:, :d]
    gd_dir = torch.einsum("bd,bnd,bn->b", xq, X, Y) / n  # x_q^T X^T y / N
    zt, zqt, yt = task.sample(prompts, torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    gd_t = torch.einsum("bd,bnd,bn->b", zqt[:, :d], zt[..., :d], zt[..., d]) / n
    eta = float((gd_t * yt).sum() / (gd_t * gd_t).sum())  # the best step, fitted on other prompts
    lam = max(task.noise ** 2 * d, 1e-8)  # prior w ~ N(0, I/d): ridge strength sigma^2 d
    A = X.transpose(1, 2) @ X + lam * torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(A, (X.transpose(1, 2) @ Y.unsqueeze(-1))).squeeze(-1)
    out = {"one_step_gd": float(((eta * gd_dir - y) ** 2).mean()), "gd_step": eta,
           "ridge": float((((xq * w).sum(-1) - y) ** 2).mean()), "zero": float((y ** 2).mean())}
    if model is not None:
        with torch.no_grad():
            out["model"] = float(((model.double()(z, zq) - y) ** 2).mean())
        model.float()
    return out
