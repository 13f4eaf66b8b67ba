"""DCAL (P058): rollout of identity attention is I and follows the paper's order; GLCA rows equal full attention's
rows at the top-R rollout tokens; PWCA with the pair masked is self-attention, and with it one softmax over both."""

import pytest
import torch

from attnzoo.mechanisms.cross.dcal import (
    GlobalLocalCrossAttention,
    PairWiseCrossAttention,
    attention_rollout,
    top_tokens,
)
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _maps(B=2, H=3, N=6, L=3, seed=0):
    g = _g(seed)
    return [torch.softmax(torch.randn(B, H, N, N, generator=g, dtype=F64), -1) for _ in range(L)]


def test_rollout_of_identity_is_identity_and_order_is_later_times_earlier():
    eye = torch.eye(5, dtype=F64).expand(2, 4, 5, 5)
    assert_close(attention_rollout([eye, eye, eye]), torch.eye(5, dtype=F64).expand(2, 5, 5), F64, "identity")
    maps = _maps()
    bars = [0.5 * m.mean(1) + 0.5 * torch.eye(6, dtype=F64) for m in maps]
    want = bars[2] @ bars[1] @ bars[0]
    assert_close(attention_rollout(maps), want, F64, "S_bar_3 S_bar_2 S_bar_1")
    assert (attention_rollout(maps) - bars[0] @ bars[1] @ bars[2]).abs().max() > 1e-6  # the order matters
    assert_close(attention_rollout(maps).sum(-1), torch.ones(2, 6, dtype=F64), F64, "rows stay stochastic")


def _full_rows(m, x):
    """Rows of the layer's full self-attention (every token a query) after the output projection."""
    q, k, v = (m.split(t) for t in m.qkv(x).chunk(3, dim=-1))
    return m.merge(softmax_attention(q, k, v))


def test_glca_rows_equal_full_attention_rows_at_the_top_rollout_tokens():
    torch.manual_seed(0)
    m = GlobalLocalCrossAttention(12, 3, ratio=0.3).double()
    g = _g(1)
    x = torch.randn(2, 11, 12, generator=g, dtype=F64)
    rollout = attention_rollout(_maps(N=11, seed=2))
    y = m(x, rollout=rollout)
    idx = m.last_indices
    assert idx.shape == (2, 1 + 3) and (idx[:, 0] == 0).all()
    want_top = torch.topk(rollout[:, 0, 1:], 3).indices + 1
    assert torch.equal(idx[:, 1:], want_top)
    full = _full_rows(m, x)
    assert_close(y, torch.stack([full[b, idx[b]] for b in range(2)]), F64, "GLCA rows")
    # the selection is the distinctive term: the lowest-ranked tokens' rows are other outputs
    low = torch.topk(rollout[:, 0, 1:], 3, largest=False).indices + 1
    assert (y[:, 1:] - torch.stack([full[b, low[b]] for b in range(2)])).abs().max() > 1e-4


def test_glca_never_selects_padding_and_ranks_by_its_own_attention_by_default():
    torch.manual_seed(0)
    m = GlobalLocalCrossAttention(12, 3, ratio=0.5).double()
    x = torch.randn(2, 7, 12, generator=_g(3), dtype=F64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 2:] = False  # row 1 has one real patch: the surplus slots return zeros
    scores = torch.arange(7, dtype=F64).expand(2, 7)  # the padded tokens score highest
    y = m(x, cls_scores=scores, key_padding_mask=mask)
    assert m.last_indices[0].tolist() == [0, 6, 5, 4] and m.last_indices[1, 1].item() == 1
    assert (y[1, 2:] == 0).all()
    idx, valid = top_tokens(scores, 3, key_padding_mask=mask)
    assert valid[1].tolist() == [True, False, False]
    m(x)  # ranks by its own CLS attention
    q, k, _ = (m.split(t) for t in m.qkv(x).chunk(3, dim=-1))
    own = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) * m.scale, -1).mean(1)[:, 0, 1:]
    assert torch.equal(m.last_indices[:, 1:], torch.topk(own, 3).indices + 1)


def test_pwca_with_the_pair_masked_is_self_attention_and_otherwise_one_softmax_over_both():
    torch.manual_seed(0)
    m = PairWiseCrossAttention(12, 3).double()
    g = _g(4)
    x1 = torch.randn(2, 6, 12, generator=g, dtype=F64)
    x2 = torch.randn(2, 5, 12, generator=g, dtype=F64)
    sa = m(x1)
    assert_close(sa, _full_rows(m, x1), F64, "SA branch")
    none = torch.zeros(2, 5, dtype=torch.bool)
    assert_close(m(x1, x2, key_padding_mask=none), sa, F64, "pair masked -> SA")
    q1, k1, v1 = (m.split(t) for t in m.qkv(x1).chunk(3, dim=-1))
    _, k2, v2 = (m.split(t) for t in m.qkv(x2).chunk(3, dim=-1))
    want = m.merge(softmax_attention(q1, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2)))
    y, mass = m(x1, x2, return_source_mass=True)
    assert_close(y, want, F64, "one softmax over [K1; K2]")
    assert (y - sa).abs().max() > 1e-4
    assert_close(mass["self"] + mass["pair"], torch.ones_like(mass["self"]), F64, "masses")
    assert (mass["pair"] > 0.05).all()


def test_validation():
    with pytest.raises(ValueError, match="attention_maps: expected at least one"):
        attention_rollout([])
    with pytest.raises(ValueError, match="rollout: expected"):
        GlobalLocalCrossAttention(12, 3)(torch.randn(1, 5, 12), rollout=torch.randn(1, 4, 4))
    with pytest.raises(ValueError, match="ratio"):
        GlobalLocalCrossAttention(12, 3, ratio=0.0)
    with pytest.raises(ValueError, match="a mask for 'pair' needs"):
        PairWiseCrossAttention(12, 3)(torch.randn(1, 5, 12), key_padding_mask={"pair": torch.ones(1, 2, dtype=bool)})
