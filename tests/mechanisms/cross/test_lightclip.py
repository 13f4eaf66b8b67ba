"""LightCLIP (P112): the fusion is PMP's residual cross-attention with LightCLIP's defaults (the alias shares the
implementation), and token_alignment is the best one-to-one word-patch matching: brute force over all assignments on
small cases, scipy's linear_sum_assignment where installed; padded tokens never matched."""

import itertools

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.mechanisms.cross.lightclip import linear_assignment, token_alignment
from attnzoo.mechanisms.cross.pmp import PromptGuidedQueries
from attnzoo.testing import assert_close

F64 = torch.float64


def _brute(cost):
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))
    return _brute(cost.t())


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3), (1, 5), (5, 5)])
def test_linear_assignment_is_the_minimum_cost_matching(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        cost = torch.randn(*shape, generator=g, dtype=F64)
        pairs = linear_assignment(cost)
        assert len(pairs) == min(shape)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
        assert abs(sum(cost[r, c].item() for r, c in pairs) - _brute(cost).item()) < 1e-10


def test_linear_assignment_agrees_with_scipy():
    scipy_opt = pytest.importorskip("scipy.optimize")
    cost = torch.randn(12, 20, generator=torch.Generator().manual_seed(7), dtype=F64)
    r, c = scipy_opt.linear_sum_assignment(cost.numpy())
    assert abs(sum(cost[r_, c_].item() for r_, c_ in linear_assignment(cost)) - cost[r, c].sum().item()) < 1e-10


def test_token_alignment_matches_words_to_their_patches_and_skips_padding():
    g = torch.Generator().manual_seed(1)
    patches = torch.randn(7, 8, generator=g, dtype=F64)
    words = patches[[5, 1, 3]] + 0.01 * torch.randn(3, 8, generator=g, dtype=F64)
    match, sim = token_alignment(words, patches)
    assert match.tolist() == [5, 1, 3] and sim > 0.99
    keep = torch.tensor([True, False, True])
    match, _ = token_alignment(words, patches, word_mask=keep, patch_mask=torch.arange(7) != 5)
    assert match[1] == -1 and match[0] != 5 and match[2] == 3
    with pytest.raises(TypeError, match="word_mask"):
        token_alignment(words, patches, word_mask=torch.ones(3))


def test_fusion_is_the_pmp_implementation_with_lightclip_defaults_and_equals_prenorm_mha():
    torch.manual_seed(0)
    fuse = attnzoo.build("lightclip", 16, 4, context_dim=12).double()
    assert type(fuse) is PromptGuidedQueries and fuse.block.norm_kind == "pre"
    mha = nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=True).double()
    fuse.block.attn.load_multihead_attention(mha)
    g = torch.Generator().manual_seed(2)
    t, img = torch.randn(2, 5, 16, generator=g, dtype=F64), torch.randn(2, 9, 12, generator=g, dtype=F64)
    want = t + mha(fuse.block.norm(t), img, img, need_weights=False)[0]
    assert_close(fuse(t, img), want, F64, "t + MHA(LN(t), image)")
    assert (want - t).abs().max() > 1e-3  # not initialised to the identity: the image term is present
