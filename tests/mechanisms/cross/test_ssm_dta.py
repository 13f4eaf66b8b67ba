"""SSM-DTA (P054): [drug CLS -> protein ; protein CLS -> drug] through ONE shared multi-head attention, as the
official RobertaDTICrossAttn (fairseq MultiheadAttention = torch's math, copied weights); untied weights differ."""

import torch
from torch import nn

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def test_equals_one_shared_multihead_attention_both_ways_and_untied_weights_differ():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).double()
    fuse = attnzoo.build("ssm_dta", 16, 4).double()
    fuse.cross_attn.load_multihead_attention(mha)
    g = torch.Generator().manual_seed(4)
    drug, protein = torch.randn(2, 6, 16, generator=g, dtype=F64), torch.randn(2, 9, 16, generator=g, dtype=F64)
    pmask = torch.ones(2, 9, dtype=torch.bool)
    pmask[0, 7:] = False
    dmask = torch.ones(2, 6, dtype=torch.bool)
    dmask[1, 4:] = False
    want = torch.cat([mha(drug[:, :1], protein, protein, key_padding_mask=~pmask)[0],
                      mha(protein[:, :1], drug, drug, key_padding_mask=~dmask)[0]], dim=-1)
    got = fuse(drug, protein, key_padding_mask=pmask, x_padding_mask=dmask)
    assert got.shape == (2, 1, 32)
    assert_close(got, want, F64, "shared cross-attention both ways")
    other = nn.MultiheadAttention(16, 4, batch_first=True).double()  # a second, untied attention for one side
    untied = torch.cat([want[..., :16], other(protein[:, :1], drug, drug, key_padding_mask=~dmask)[0]], dim=-1)
    assert (untied - got).abs().max() > 1e-3
    everyone = mha(drug, protein, protein, key_padding_mask=~pmask)[0].mean(1, keepdim=True)  # all tokens as queries
    assert (everyone - got[..., :16]).abs().max() > 1e-3
