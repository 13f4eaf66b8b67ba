"""DMMI (P043): each branch is torch's post-norm nn.TransformerDecoderLayer (copied weights, dropout 0); the
cross-attention to the other modality is what the parity sees; text padding is honoured."""

import torch
from torch import nn

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _pair():
    torch.manual_seed(0)
    torch_layer = nn.TransformerDecoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=True).double()
    mine = attnzoo.build("dmmi", 16, 4, ffn=24).double()
    mine.decoder.load_torch(torch_layer)
    return mine, torch_layer


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 7, 16, generator=g, dtype=F64), torch.randn(2, 5, 16, generator=g, dtype=F64)


def test_both_directions_equal_torch_decoder_layer():
    mine, torch_layer = _pair()
    visual, text = _inputs()
    kpm = torch.tensor([[True] * 5, [True, True, True, False, False]])
    want = torch_layer(visual, text, memory_key_padding_mask=~kpm)
    assert_close(mine(visual, text, key_padding_mask=kpm), want, F64, "text-to-image")
    assert_close(mine(text, visual), torch_layer(text, visual), F64, "image-to-text")


def test_the_other_modality_is_what_the_parity_sees():
    mine, torch_layer = _pair()
    visual, text = _inputs()
    want = torch_layer(visual, text)
    mine.decoder.cross_attn.attn.forward = lambda x, c, **kw: torch.zeros_like(x)  # drop the cross-attention
    assert (mine(visual, text) - want).abs().max() > 1e-3
