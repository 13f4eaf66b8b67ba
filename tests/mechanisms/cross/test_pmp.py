"""PMP (P106): q + CrossAttn(q, text) with a zero-initialised output -- the original decoder at initialisation, torch's
nn.MultiheadAttention (copied weights) as the written-out reference, and the text term is what makes the difference."""

import torch
from torch import nn

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _layer_and_reference(norm="none"):
    torch.manual_seed(0)
    layer = attnzoo.build("pmp", 16, 4, context_dim=12, zero_init=False, norm=norm).double()
    mha = nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=True).double()
    layer.block.attn.load_multihead_attention(mha)
    return layer, mha


def _inputs():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 16, generator=g, dtype=F64)
    t = torch.randn(2, 5, 12, generator=g, dtype=F64)
    kpm = torch.tensor([[True] * 5, [True, True, False, True, False]])
    return q, t, kpm


def test_equals_torch_multihead_attention_residual():
    layer, mha = _layer_and_reference()
    q, t, kpm = _inputs()
    want = q + mha(q, t, t, key_padding_mask=~kpm, need_weights=False)[0]
    assert_close(layer(q, t, key_padding_mask=kpm), want, F64, "pmp vs q + MHA(q, text)")
    pre, mha_pre = _layer_and_reference(norm="pre")
    h = pre.block.norm(q)
    assert_close(pre(q, t), q + mha_pre(h, t, t, need_weights=False)[0], F64, "pre-norm")


def test_zero_initialised_module_is_the_identity_and_the_text_term_is_what_differs():
    q, t, _ = _inputs()
    fresh = attnzoo.build("pmp", 16, 4, context_dim=12).double()
    assert torch.equal(fresh(q, t), q)
    layer, mha = _layer_and_reference()
    want = q + mha(q, t, t, need_weights=False)[0]
    assert (want - q).abs().max() > 1e-3  # the text term is not negligible: the parity above sees it
    layer.block.attn.forward = lambda x, c, **kw: torch.zeros_like(x)  # ablate the cross-attention
    assert (layer(q, t) - want).abs().max() > 1e-3
