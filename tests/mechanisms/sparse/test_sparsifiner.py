"""Oracles for Sparsifiner (CATALOG P074)."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.mechanisms.sparse.sparsifiner import sparse_attention_fast
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def _layer(n=13, dim=16, heads=2, seed=0, **opts):
    torch.manual_seed(seed)
    m = attnzoo.build("sparsifiner", dim, heads, num_tokens=n, reduce_n_factor=2.0, **opts).double()
    with torch.no_grad():
        m.proj_back_n.mul_(5.0)  # larger basis entries, so the 0.02 threshold keeps a mix
    return m


def _x(B, n, dim=16, seed=1):
    return torch.randn(B, n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mask(B, n, seed=2):
    m = torch.rand(B, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    m[:, 0] = True
    return m


def _qkv(m, x):
    B, N, C = x.shape
    qkv = m.qkv(x).view(B, N, 3, m.heads, m.head_dim).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("cls_tokens,masked", [(0, False), (1, True), (2, False)])
def test_keep_rate_one_is_dense_attention(backend, cls_tokens, masked):
    m = _layer(keep_rate=1.0, cls_tokens=cls_tokens, backend=backend)
    x = _x(2, 13)
    kpm = _mask(2, 13) if masked else None
    q, k, v = _qkv(m, x)
    dense = softmax_attention(q, k, v, key_padding_mask=kpm, scale=m.scale).transpose(1, 2).reshape(2, 13, 16)
    assert_close(m(x, key_padding_mask=kpm), m.proj(dense), torch.float64, f"keep_rate=1 ({backend})")


def _predictor_by_hand(m, q, k, kpm=None):
    """The official MaskPredictor inference path, written out (float64)."""
    q_r, k_r = m.proj_c_q(q), m.proj_c_k(k)
    if kpm is not None:
        k_r = k_r * kpm.view(k.shape[0], 1, -1, 1)
    k_d = k_r.transpose(-1, -2) @ m.proj_n
    coef = ((q_r @ k_d) * m.heads ** -0.5)[:, :, m.cls_tokens:].softmax(-1)
    vals, idx = coef.topk(m.coef_topk, dim=-1)
    coef = torch.zeros_like(coef).scatter(-1, idx, vals)
    basis = m.proj_back_n.t().abs()
    basis = basis * (basis > m.basis_threshold)
    approx = coef @ basis
    if kpm is not None:
        approx = approx.masked_fill(~kpm.view(k.shape[0], 1, 1, -1), float("-inf"))
    return approx


@pytest.mark.parametrize("masked", [False, True])
def test_selection_is_top_k_of_the_predicted_connectivity_and_rows_have_k_ones(masked):
    m = _layer(keep_rate=0.3, coef_topk=4, cls_tokens=1)
    x = _x(2, 13, seed=3)
    kpm = _mask(2, 13, seed=4) if masked else None
    q, k, _ = _qkv(m, x)
    idx = m.select(q, k, kpm)
    k_sel = math.ceil(0.3 * 13)
    assert idx.shape == (2, 2, 12, k_sel)
    approx = _predictor_by_hand(m, q, k, kpm)
    for b in range(2):
        for h in range(2):
            for i in range(12):
                row = approx[b, h, i]
                chosen = set(idx[b, h, i].tolist())
                assert len(chosen) == k_sel  # exactly k distinct keys per row
                worst_kept = min(row[j] for j in chosen)
                best_dropped = max((row[j] for j in range(13) if j not in chosen), default=-math.inf)
                assert worst_kept >= best_dropped  # the kept set is a top-k of the connectivity
    if masked:  # kept and attended: padded keys never carry weight
        mask = torch.zeros(2, 2, 12, 13, dtype=torch.bool).scatter_(-1, idx, True) & kpm.view(2, 1, 1, 13)
        assert (mask.sum(-1) == torch.minimum(torch.tensor(k_sel), kpm.sum(-1).view(2, 1, 1))).all()


def test_gathered_equals_dense_sdpa_with_the_produced_mask():
    m = _layer(keep_rate=0.35, cls_tokens=1)
    x = _x(2, 13, seed=5)
    kpm = _mask(2, 13, seed=6)
    q, k, v = _qkv(m, x)
    idx = m.select(q, k, kpm)
    mask = torch.zeros(2, 2, 13, 13, dtype=torch.bool)
    mask[:, :, 0] = True
    mask[:, :, 1:].scatter_(-1, idx, True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & kpm.view(2, 1, 1, 13), scale=m.scale)
    got = sparse_attention_fast(q, k, v, idx, kpm, m.scale, 1)
    assert_close(got, want, torch.float64, "gathered top-k vs SDPA with the mask")


@pytest.mark.parametrize("n,cls_tokens", [(65, 1), (7, 0)])
def test_fast_equals_reference_outputs_and_gradients(n, cls_tokens):
    m = _layer(n=n, keep_rate=0.25, cls_tokens=cls_tokens)
    m.eval()
    x = _x(2, n, seed=7)
    kpm = _mask(2, n, seed=8)
    res = {}
    for backend in ("reference", "fast"):
        m.backend = backend
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = m(xi, key_padding_mask=kpm)
        out.backward(torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        res[backend] = (out.detach(), xi.grad, {p: t.grad for p, t in m.named_parameters() if t.grad is not None})
    (ro, rx, rp), (fo, fx, fp) = res["reference"], res["fast"]
    assert_close(fo, ro, torch.float64, "output")
    assert_close(fx, rx, torch.float64, "grad x")
    assert set(rp) == set(fp) == {"qkv.weight", "proj.weight", "proj.bias"}  # the predictor learns via aux_loss
    for name in rp:
        assert_close(fp[name], rp[name], torch.float64, name)


def test_aux_loss_is_the_distillation_to_dense_attention():
    m = _layer(keep_rate=0.3, cls_tokens=1, distill_weight=0.5)
    x = _x(2, 13, seed=9)
    m.train()
    m(x)
    q, k, _ = _qkv(m, x)
    q_r, k_r = m.proj_c_q(q), m.proj_c_k(k)
    coef = ((q_r @ (k_r.transpose(-1, -2) @ m.proj_n)) * m.heads ** -0.5)[:, :, 1:].softmax(-1)
    approx = coef @ m.proj_back_n.t()
    teacher = torch.softmax(q @ k.transpose(-1, -2) * m.scale, dim=-1)[:, :, 1:]
    want = 0.5 * ((approx - teacher) ** 2).sum()
    assert_close(m.aux_loss, want, torch.float64, "aux_loss")
    m.aux_loss.backward()
    assert m.proj_n.grad.abs().sum() > 0 and m.proj_c_q.weight.grad.abs().sum() > 0
    m.eval()
    m(x)
    assert m.aux_loss is None


def test_sparse_when_keep_rate_small():
    m = _layer(keep_rate=0.2)
    x = _x(1, 13)
    q, k, v = _qkv(m, x)
    dense = m.proj(softmax_attention(q, k, v, scale=m.scale).transpose(1, 2).reshape(1, 13, 16))
    assert (m(x) - dense).abs().max() > 1e-4


def test_errors():
    m = _layer()
    with pytest.raises(ValueError, match="num_tokens"):
        m(_x(1, 12))
    with pytest.raises(ValueError, match="context"):
        m(_x(1, 13), _x(1, 13))
    with pytest.raises(ValueError, match="causal"):
        attnzoo.build("sparsifiner", 16, 2, causal=True)
    with pytest.raises(ValueError, match="kv_heads"):
        attnzoo.build("sparsifiner", 16, 2, kv_heads=1)
    with pytest.raises(ValueError, match="keep_rate"):
        attnzoo.build("sparsifiner", 16, 2, keep_rate=1.5)
