"""Mask predicates: each against a hand-written definition; composition; FlexAttention agreement."""

import pytest
import torch

from attnzoo import masks


def dense(pred, nq, nk, B=1, H=1):
    return masks.materialize(pred, B, H, nq, nk)[0, 0]


def brute(fn, nq, nk):
    return torch.tensor([[bool(fn(i, j)) for j in range(nk)] for i in range(nq)])


@pytest.mark.parametrize("nq,nk", [(7, 7), (3, 8), (8, 3), (1, 1)])
def test_causal_bottom_right(nq, nk):
    assert torch.equal(dense(masks.causal(nk - nq), nq, nk), brute(lambda i, j: j <= i + nk - nq, nq, nk))


@pytest.mark.parametrize("w", [1, 2, 5, 20])
def test_sliding_window(w):
    n = 11
    assert torch.equal(dense(masks.sliding_window(w), n, n), brute(lambda i, j: 0 <= i - j < w, n, n))
    assert torch.equal(dense(masks.sliding_window(w, causal=False), n, n), brute(lambda i, j: abs(i - j) < w, n, n))
    # every causal row sees exactly min(w, i + 1) keys (Mistral's convention)
    counts = dense(masks.sliding_window(w), n, n).sum(1)
    assert counts.tolist() == [min(w, i + 1) for i in range(n)]


def test_dilated_window():
    got = dense(masks.dilated_window(3, 2), 10, 10)
    assert torch.equal(got, brute(lambda i, j: (i - j) in (0, 2, 4), 10, 10))
    got = dense(masks.dilated_window(2, 3, causal=False), 10, 10)
    assert torch.equal(got, brute(lambda i, j: (i - j) in (-3, 0, 3), 10, 10))


def test_block_local_and_prefix_lm():
    assert torch.equal(dense(masks.block_local(3), 8, 8), brute(lambda i, j: i // 3 == j // 3, 8, 8))
    assert torch.equal(dense(masks.prefix_lm(3), 6, 6), brute(lambda i, j: j < 3 or j <= i, 6, 6))


def test_document():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    got = masks.materialize(masks.document(ids), 1, 1, 6, 6)[0, 0]
    assert torch.equal(got, brute(lambda i, j: ids[0, i] == ids[0, j], 6, 6))
    with pytest.raises(ValueError, match="q_ids: expected an integer tensor"):
        masks.document(torch.zeros(6))


def test_neighborhood_1d_natten_semantics():
    # n = 8, kernel 3: the window is centred, shifted inwards at the borders, always 3 keys.
    got = dense(masks.neighborhood_1d(8, 3), 8, 8)
    starts = [0, 0, 1, 2, 3, 4, 5, 5]
    assert torch.equal(got, brute(lambda i, j: starts[i] <= j < starts[i] + 3, 8, 8))
    assert (got.sum(1) == 3).all()
    # dilation 2: groups {0,2,4,6,8} and {1,3,5,7}; neighbours inside the group only
    got = dense(masks.neighborhood_1d(9, 3, dilation=2), 9, 9)
    assert (got.sum(1) == 3).all()
    assert got[0].nonzero().flatten().tolist() == [0, 2, 4]
    assert got[8].nonzero().flatten().tolist() == [4, 6, 8]
    assert got[3].nonzero().flatten().tolist() == [1, 3, 5]
    assert got[7].nonzero().flatten().tolist() == [3, 5, 7]
    # causal: i, i-d, ..., i-(k-1)d
    got = dense(masks.neighborhood_1d(9, 3, dilation=2, causal=True), 9, 9)
    assert got[6].nonzero().flatten().tolist() == [2, 4, 6]
    assert got[1].nonzero().flatten().tolist() == [1]


def test_key_padding_and_composition():
    kpm = torch.tensor([[True, False, True, True], [False, True, True, False]])
    pred = masks.and_masks(masks.causal(), masks.key_padding(kpm))
    got = masks.materialize(pred, 2, 1, 4, 4)
    for b in range(2):
        assert torch.equal(got[b, 0], brute(lambda i, j, b=b: j <= i and bool(kpm[b, j]), 4, 4))
    first_key = lambda b, h, q_idx, kv_idx: kv_idx < 1
    union = dense(masks.or_masks(masks.sliding_window(2), first_key), 5, 5)
    assert torch.equal(union, brute(lambda i, j: (0 <= i - j < 2) or (j < 1), 5, 5))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_agrees():
    """The same predicate drives FlexAttention: its output equals the dense-masked reference."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from attnzoo.reference import softmax_attention
    n = 256
    pred = masks.sliding_window(40)
    bm = masks.block_mask(pred, None, None, n, n)
    assert bm is not None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    out = flex.flex_attention(q, k, v, block_mask=bm)
    ref = softmax_attention(q.double(), k.double(), v.double(), attn_mask=dense(pred, n, n))
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
