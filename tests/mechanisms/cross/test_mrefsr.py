"""MRefSR's multi-reference attention (P001) against the official MRAPAFusion written out (conv layers, per-pixel
softmax over references, SAFM), and the CATALOG oracles: one reference returns its value exactly, the references are
permutation-invariant, the softmax over references is not their average."""

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup(**kw):
    torch.manual_seed(0)
    m = attnzoo.build("mrefsr", 6, 1, context_dim=5, **kw).double()
    g = torch.Generator().manual_seed(1)
    return m, torch.randn(2, 6, 7, 8, generator=g, dtype=F64), torch.randn(2, 3, 5, 7, 8, generator=g, dtype=F64)


def _official(m, target, refs_list):
    """basicsr/archs/ref_mrapa_restoration_arch.py MRAPAFusion.forward without the reflect padding (sizes %4 here)."""
    n, _, h, w = target.shape
    t = len(refs_list)
    refs = torch.stack(refs_list, dim=1).flatten(0, 1)
    c = m.channels
    emb_t = (m.conv_emb1(target) * c ** -0.5).permute(0, 2, 3, 1).unsqueeze(3).flatten(0, 2)  # (nhw, 1, c)
    emb = m.conv_emb2(refs).unflatten(0, (n, t)).permute(0, 3, 4, 2, 1).flatten(0, 2)  # (nhw, c, t)
    ass = m.conv_ass(refs).unflatten(0, (n, t)).permute(0, 3, 4, 1, 2).flatten(0, 2)  # (nhw, t, 2c)
    fused = (F.softmax(emb_t @ emb, dim=2) @ ass).squeeze(1).unflatten(0, (n, h, w)).permute(0, 3, 1, 2)
    attn = F.leaky_relu(m.spatial_attn(torch.cat([target, fused], 1)), 0.1)
    mul = torch.sigmoid(m.mul2(F.leaky_relu(m.mul1(attn), 0.1)))
    add = m.add2(F.leaky_relu(m.add1(attn), 0.1))
    fused = fused * mul * 2 + add
    return F.leaky_relu(m.feat_fusion(torch.cat([target, fused], 1)), 0.1)


def test_equals_the_official_fusion_and_token_layout_agrees():
    m, target, refs = _setup()
    assert_close(m(target, refs), _official(m, target, list(refs.unbind(1))), F64, "maps")
    tokens = target.flatten(2).transpose(1, 2)  # (B, H W, C)
    ref_tokens = refs.flatten(3).transpose(2, 3).flatten(1, 2)  # (B, M H W, C_r)
    got = m(tokens, ref_tokens, hw=(7, 8))
    assert_close(got, m(target, refs).flatten(2).transpose(1, 2), F64, "tokens")


def test_one_reference_is_its_value_and_references_are_a_set():
    m, target, refs = _setup(safm=False)
    captured = {}
    real = attnzoo.mechanisms.cross.mrefsr.cross_attention

    def spy(q, sources, **kw):
        out = real(q, sources, **kw)
        captured["v"], captured["out"] = sources["references"][1], out
        return out

    attnzoo.mechanisms.cross.mrefsr.cross_attention = spy
    try:
        m(target, refs[:, :1])
        assert_close(captured["out"][:, :, 0], captured["v"][:, :, 0], F64, "softmax over one reference")
        base = m(target, refs)
        assert_close(m(target, refs[:, [2, 0, 1]]), base, F64, "references permuted")
        mean_v = captured["v"].mean(2)  # averaging the references instead of the softmax
        assert (captured["out"][:, :, 0] - mean_v).abs().max() > 1e-3
    finally:
        attnzoo.mechanisms.cross.mrefsr.cross_attention = real
    kpm = torch.tensor([[True, True, False], [True, True, True]])
    assert_close(m(target, refs, key_padding_mask=kpm)[0], m(target[:1], refs[:1, :2])[0], F64, "masked reference")
