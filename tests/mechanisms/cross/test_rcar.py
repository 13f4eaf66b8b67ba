"""RCAR (P087) against the official lib/encoders.py forward written out (cross_attention, Alignment_vector,
Correpondence_regulator, Aggregation_regulator, EncoderSimilarity for only_rcr and coop_rcar), the CATALOG limit (zero
regulator steps with neutral factors = SCAN's attention), and the regulator's effect.

Distinctive term: the recurrent regulator update (RCR). Removing it (the regulators returning their inputs, checked
below) leaves SCAN's attention, and the parity test fails (verified by hand: with ``_Regulator.forward`` returning
``matrix, smooth`` unchanged, ``test_equals_the_official_only_rcr_forward`` fails with rel err 0.56, and the
coop_rcar score test with 0.05)."""

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _l2(x, dim=-1):
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + 1e-8)


def _official_attention(query, context, matrix, smooth):
    """lib/encoders.py cross_attention: scores (B, M, N), LeakyReLU 0.1, l2norm over the queries, softmax * smooth."""
    attn = torch.bmm(context, (query * matrix).transpose(1, 2))  # (B, M, N)
    attn = _l2(F.leaky_relu(attn, 0.1), dim=-1).transpose(1, 2)  # (B, N, M)
    attn = F.softmax(attn * smooth, dim=2)
    return _l2(torch.bmm(attn, context), dim=-1)


def _official_alignment(lin, q, c, matrix, smooth):
    return _l2(lin((q - _official_attention(q, c, matrix, smooth)).pow(2)), dim=-1)


def _official_rcr(reg, h, matrix, smooth):
    return (torch.tanh(reg.matrix(h)) + matrix).clamp(min=-1, max=1), F.relu(reg.smooth(h) + smooth)


def _official_rar(agg, mid, hig):
    w = agg.v(torch.tanh(agg.k(mid)) * torch.tanh(agg.q(hig)).unsqueeze(1).repeat(1, mid.shape[1], 1))
    w = F.softmax(w.squeeze(2), dim=1)
    return _l2((w.unsqueeze(2) * mid).sum(1), dim=-1)


def _cosine(a, b, eps=1e-8):
    """lib/encoders.py cosine_sim: w12 / (w1 * w2).clamp(min=eps)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=eps)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 12, generator=g, dtype=F64), torch.randn(2, 7, 12, generator=g, dtype=F64)


def _build(**kw):
    torch.manual_seed(0)
    return attnzoo.build("rcar", 12, 1, sim_dim=6, **kw).double()


def test_zero_steps_is_scan_attention():
    m = _build(regulator="rcr", steps=0, smooth=9.0)
    x, c = _inputs()
    assert_close(m(x, c), _official_attention(x, c, torch.ones(12, dtype=F64), 9.0), F64, "SCAN")
    want = _cosine(x, _official_attention(x, c, torch.ones(12, dtype=F64), 9.0)).mean(1)
    assert_close(m.similarity(x, c), want, F64, "SCAN score")


def test_equals_the_official_only_rcr_forward():
    m = _build(regulator="rcr", steps=2)
    x, c = _inputs()
    matrix, smooth = torch.ones(12, dtype=F64), 10.0
    for align, reg in zip(m.align, m.regulators):
        h = _official_alignment(align, x, c, matrix, smooth)
        matrix, smooth = _official_rcr(reg, h, matrix, smooth)
    want = _official_attention(x, c, matrix, smooth)
    assert_close(m(x, c), want, F64, "only_rcr attention")
    assert_close(m.similarity(x, c), _cosine(x, want).mean(1), F64, "only_rcr score")
    assert (want - _official_attention(x, c, torch.ones(12, dtype=F64), 10.0)).abs().max() > 1e-3  # RCR matters


def test_equals_the_official_coop_rcar_forward():
    m = _build(regulator="rcar", steps=3)
    x, c = _inputs()
    matrix, smooth = torch.ones(12, dtype=F64), 10.0
    for s in range(3):
        mid = _official_alignment(m.align[s], x, c, matrix, smooth)
        if s == 0:
            hig = mid.mean(1)
        if s < 2:
            matrix, smooth = _official_rcr(m.regulators[s], mid, matrix, smooth)
        hig = _official_rar(m.aggregators[s], mid, hig)
    assert_close(m.similarity(x, c), torch.sigmoid(m.score(hig)).squeeze(-1), F64, "coop_rcar score")
    assert_close(m(x, c), _official_attention(x, c, matrix, smooth), F64, "coop_rcar attention (2 updates)")


def test_removing_the_regulator_update_changes_the_result():
    m = _build(regulator="rcr", steps=2)
    x, c = _inputs()
    base = m(x, c)
    for reg in m.regulators:
        reg.forward = lambda h, matrix, smooth: (matrix, smooth)
    assert_close(m(x, c), _official_attention(x, c, torch.ones(12, dtype=F64), 10.0), F64, "no update = SCAN")
    assert (m(x, c) - base).abs().max() > 1e-3


def test_padded_queries_and_keys_are_the_sliced_caption():
    m = _build(regulator="rcar", steps=2)
    x, c = _inputs()
    xm = torch.tensor([[True] * 5, [True, True, True, False, False]])
    km = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    out = m(x, c, key_padding_mask=km, x_padding_mask=xm)
    score = m.similarity(x, c, key_padding_mask=km, x_padding_mask=xm)
    assert_close(out[1, :3], m(x[1:, :3], c[1:, :5])[0], F64, "padding = slicing")
    assert_close(score[1], m.similarity(x[1:, :3], c[1:, :5])[0], F64, "score: padding = slicing")
    assert_close(out[0], m(x[:1], c[:1])[0], F64, "unpadded row")
