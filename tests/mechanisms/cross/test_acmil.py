"""ACMIL (P013): gated attention written out; masked instances get exactly 0 and the rest sum to 1; STKIM masks
int(K * p) of each branch's top K in training only; eval is deterministic and order-invariant; the diversity loss
is the mean pairwise cosine similarity (the official training script's)."""

import pytest
import torch

from attnzoo.mechanisms.cross.acmil import MultiBranchAttentionPooling, diversity_loss, stochastic_top_k_mask
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _pool(**kw):
    torch.manual_seed(0)
    kw.setdefault("branches", 3)
    kw.setdefault("gate_dim", 8)
    return MultiBranchAttentionPooling(12, **kw).double()


def test_gated_attention_written_out_and_the_bag_feature():
    m = _pool().eval()
    x = torch.randn(2, 9, 12, generator=_g(1), dtype=F64)
    y = m(x)
    s = m.attention_w(torch.tanh(m.attention_v(x)) * torch.sigmoid(m.attention_u(x))).transpose(1, 2)
    a = torch.softmax(s, dim=-1)
    assert_close(y, a @ x, F64, "branch features")
    assert_close(m.last_bag, a.mean(1, keepdim=True) @ x, F64, "bag feature")
    p = torch.randperm(9, generator=_g(2))
    assert_close(m(x[:, p]), y, F64, "instance order")


def test_stkim_masks_a_random_share_of_each_branch_top_k_in_training_only():
    m = _pool(top_k=4, mask_drop=0.5)
    x = torch.randn(2, 9, 12, generator=_g(3), dtype=F64)
    m.train()
    m(x, generator=_g(4))
    a = m.last_attention
    with torch.no_grad():
        s = m.scores(x)
    top = torch.topk(s, 4, dim=-1).indices
    zeros = a == 0
    assert (zeros.sum(-1) == 2).all()  # int(4 * 0.5) masked per branch, exactly zero weight
    assert torch.equal(zeros.gather(-1, top).sum(-1), zeros.sum(-1))  # only among the top K
    assert_close(a.sum(-1), torch.ones(2, 3, dtype=F64), F64, "the rest sums to 1")
    m.eval()
    y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2) and (m.last_attention > 0).all()
    keep = stochastic_top_k_mask(s, 4, 0.0)
    assert keep.all()


def test_padding_is_never_attended_nor_counted_in_the_top_k():
    m = _pool(top_k=3, mask_drop=1.0)
    x = torch.randn(2, 6, 12, generator=_g(5), dtype=F64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    m.train()
    m(x, key_padding_mask=mask, generator=_g(6))
    a = m.last_attention
    assert (a[0, :, 4:] == 0).all()
    assert ((a[0] > 0).sum(-1) == 1).all()  # 4 real instances, the top 3 dropped
    assert_close(a.sum(-1), torch.ones(2, 3, dtype=F64), F64, "rows sum to 1")


def test_diversity_loss_is_mean_pairwise_cosine():
    a = torch.softmax(torch.randn(2, 4, 7, generator=_g(7), dtype=F64), -1)
    want = torch.stack([torch.cosine_similarity(a[:, i], a[:, j], dim=-1).mean()
                        for i in range(4) for j in range(i + 1, 4)]).mean()
    assert_close(diversity_loss(a), want, F64, "diversity loss")
    assert diversity_loss(a[:, :1]).item() == 0


def test_validation():
    with pytest.raises(ValueError, match="mask_drop"):
        MultiBranchAttentionPooling(12, mask_drop=1.5)
    with pytest.raises(ValueError, match=r"x: expected \(B, N, 12\)"):
        MultiBranchAttentionPooling(12)(torch.randn(2, 5, 10))
