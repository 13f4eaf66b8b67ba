"""Video Alchemist (P003): two pre-norm cross-attentions (text, then the bound subject tokens) equal torch's
nn.MultiheadAttention written out (copied weights); permuting subjects with their words and images changes nothing,
swapping which word binds to which image does; a masked word removes its subject."""

import torch
from torch import nn

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    m = attnzoo.build("video_alchemist", 16, 4, context_dims={"text": 12, "references": 10, "words": 12}).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 16, generator=g, dtype=F64)
    ctx = {"text": torch.randn(2, 5, 12, generator=g, dtype=F64),
           "references": torch.randn(2, 3 * 4, 10, generator=g, dtype=F64),  # 3 subjects x 4 tokens
           "words": torch.randn(2, 3, 12, generator=g, dtype=F64)}
    return m, x, ctx


def test_equals_two_residual_multihead_attentions_over_text_and_bound_tokens():
    m, x, ctx = _setup()
    text_mha = nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=True).double()
    pers_mha = nn.MultiheadAttention(16, 4, batch_first=True).double()
    m.text_attn.load_multihead_attention(text_mha)
    m.pers_attn.load_multihead_attention(pers_mha)
    x1 = x + text_mha(m.norm_text(x), ctx["text"], ctx["text"], need_weights=False)[0]
    words = ctx["words"].repeat_interleave(4, dim=1)
    P = m.binding(torch.cat([ctx["references"], words], -1))
    want = x1 + pers_mha(m.norm_pers(x1), P, P, need_weights=False)[0]
    assert_close(m(x, ctx), want, F64, "two layers")
    assert_close(m(x, {"text": ctx["text"]}), x1, F64, "no subjects: the text layer")


def test_subject_permutation_is_invariant_but_rebinding_is_not():
    m, x, ctx = _setup()
    base = m(x, ctx)
    order = [2, 0, 1]
    refs = ctx["references"].view(2, 3, 4, 10)[:, order].reshape(2, 12, 10)
    permuted = dict(ctx, references=refs, words=ctx["words"][:, order])
    assert_close(m(x, permuted), base, F64, "subjects permuted with their words")
    rebound = dict(ctx, words=ctx["words"][:, order])  # words swapped between subjects
    assert (m(x, rebound) - base).abs().max() > 1e-4
    mask = {"words": torch.tensor([[True, False, True], [True, True, True]])}
    dropped = dict(ctx, references=ctx["references"].clone())
    dropped["references"][0, 4:8] += 5  # subject 1 of row 0, whose word is masked
    assert_close(m(x, dropped, key_padding_mask=mask), m(x, ctx, key_padding_mask=mask), F64, "masked subject")
