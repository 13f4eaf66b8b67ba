"""Conditional Cross-Attention (P084): each condition's output is torch's multi-head attention with that condition's
query token (copied weights); conditions change the output, per-row conditions equal separate calls, padding
honoured."""

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def test_each_condition_is_reference_attention_with_its_query():
    torch.manual_seed(0)
    cca = attnzoo.build("conditional_cross_attention", 16, 4, num_conditions=3, context_dim=12).double()
    mha = nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=True).double()
    cca.attn.load_multihead_attention(mha)
    x = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(1), dtype=F64)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[0, 6:] = False
    outs = []
    for c in range(3):
        q = cca.queries[c].unsqueeze(0).expand(2, -1, -1)
        want = mha(q, x, x, key_padding_mask=~kpm, need_weights=False)[0]
        got = cca(x, condition=c, key_padding_mask=kpm)
        assert_close(got, want, F64, f"condition {c}")
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the condition is what switches the embedding space
    per_row = cca(x, condition=torch.tensor([2, 0]), key_padding_mask=kpm)
    assert_close(per_row[0], outs[2][0], F64, "row 0 condition 2")
    assert_close(per_row[1], outs[0][1], F64, "row 1 condition 0")
    for bad in (3, -1, torch.tensor([0, 5]), torch.tensor([0.0, 1.0])):
        with pytest.raises((ValueError, TypeError), match="condition"):
            cca(x, condition=bad)
