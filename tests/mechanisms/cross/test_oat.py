"""OAT (P024) against torch's post-norm nn.TransformerEncoderLayer / nn.TransformerDecoderLayer stacks with copied
weights and the official pointer (src/model/models.py ``Cross_Attention`` + readout) written out; the CATALOG oracle:
the pointer distribution sums to 1 over the objects, and the logits at fixation t do not depend on later fixations.

Distinctive terms: the decoder's causal mask and the pointer's readout. Verified by hand: building the decoder with
``causal=False`` fails the parity test and ``test_logits_at_t_do_not_depend_on_later_fixations`` (later fixations reach
earlier rows, as ``test_without_the_causal_mask_later_fixations_leak`` shows in place); replacing the readout by a
mean over the pointer heads fails the parity test (rel err 1.1)."""

import math

import torch
from torch import nn

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _model(**kw):
    torch.manual_seed(0)
    return attnzoo.build("oat", 16, 4, ffn=24, encoder_layers=2, decoder_layers=2, pointer_dim=16, **kw).double()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 16, generator=g, dtype=F64), torch.randn(2, 9, 16, generator=g, dtype=F64)


def _official(m, fix, obj, obj_pad=None, fix_pad=None):
    """torch encoder/decoder (batch-first, post-norm, no dropout) + Cross_Attention heads + readout."""
    enc_layers = [nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True).double() for _ in range(2)]
    dec_layers = [nn.TransformerDecoderLayer(16, 4, 24, dropout=0.0, batch_first=True).double() for _ in range(2)]
    for mine, theirs in zip(m.encoder, enc_layers):  # same weights: copy torch's into ours
        mine.load_torch(theirs)
    for mine, theirs in zip(m.decoder, dec_layers):
        mine.load_torch(theirs)
    kpm = None if obj_pad is None else ~obj_pad
    memory = obj
    for layer in enc_layers:
        memory = layer(memory, src_key_padding_mask=kpm)
    T = fix.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = not allowed
    out = fix
    for layer in dec_layers:
        out = layer(out, memory, tgt_mask=causal, tgt_key_padding_mask=None if fix_pad is None else ~fix_pad,
                    memory_key_padding_mask=kpm)
    heads = []
    for dec, enc in zip(m.decode_proj, m.encode_proj):
        lg = torch.bmm(dec(out), enc(memory).transpose(1, 2))  # (B, T, N)
        lg = torch.cat([lg, torch.zeros(*lg.shape[:2], 1, dtype=F64)], -1) / math.sqrt(16)
        heads.append(lg.unsqueeze(-1))
    return m.readout(torch.cat(heads, -1)).squeeze(-1)


def test_equals_torch_layers_and_the_official_pointer():
    m = _model()
    fix, obj = _inputs()
    want = _official(m, fix, obj)
    assert_close(m(fix, obj), want, F64, "OAT vs torch layers + official pointer")
    obj_pad = torch.tensor([[True] * 9, [True] * 6 + [False] * 2 + [True]])
    fix_pad = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    want = _official(m, fix, obj, obj_pad, fix_pad)  # (loads fresh torch weights into m)
    got = m(fix, obj, key_padding_mask=obj_pad, x_padding_mask=fix_pad)
    keep = torch.cat([obj_pad, torch.ones(2, 1, dtype=torch.bool)], 1)[:, None].expand_as(want)
    assert_close(got[:, :4][keep[:, :4]], want[:, :4][keep[:, :4]], F64, "padded objects and fixations")
    assert torch.isinf(got[1, :, 6:8]).all()  # padded objects are never pointed at


def test_pointer_distribution_sums_to_one_over_the_objects():
    m = _model()
    fix, obj = _inputs()
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    p = m(fix, obj, key_padding_mask=mask).softmax(-1)  # (B, T, N + 1)
    assert_close(p.sum(-1), torch.ones(2, 6, dtype=F64), F64, "sum to 1")
    assert (p[1, :, 5:9] == 0).all()
    p = _model(null_logit=False)(fix, obj).softmax(-1)
    assert p.shape == (2, 6, 9)


def test_logits_at_t_do_not_depend_on_later_fixations():
    m = _model()
    fix, obj = _inputs()
    base = m(fix, obj)
    for t in range(5):
        moved = fix.clone()
        moved[:, t + 1:] += 3 * torch.randn_like(moved[:, t + 1:])
        out = m(moved, obj)
        assert_close(out[:, : t + 1], base[:, : t + 1], F64, f"rows <= {t}")
        assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-6  # later rows do see them
    assert_close(m(fix[:, :3], obj), base[:, :3], F64, "a prefix of the scanpath")


def test_without_the_causal_mask_later_fixations_leak():
    m = _model()
    fix, obj = _inputs()
    base = m(fix, obj)
    moved = fix.clone()
    moved[:, 3:] += 3.0
    for layer in m.decoder:
        layer.causal = False  # ablate the distinctive term
    leak = m(moved, obj)[:, :3] - m(fix, obj)[:, :3]
    assert leak.abs().max() > 1e-6
    assert (m(fix, obj) - base).abs().max() > 1e-6


def test_encoded_objects_are_order_free_and_the_pointer_follows_them():
    m = _model()
    fix, obj = _inputs()
    base = m(fix, obj)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    out = m(fix, obj[:, perm])
    assert_close(out[..., :9], base[..., perm], F64, "pointer permutes with the objects")
    assert_close(out[..., 9], base[..., 9], F64, "padding class unchanged")
