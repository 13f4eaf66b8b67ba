"""kernels.select: selection scores that are bitwise the same whatever shapes they are computed with, and a
top-k that sends exact ties to the lower index."""

import pytest
import torch

from attnzoo.kernels import select
from attnzoo.kernels.select import selection_scores, top_k_indices


def _tree_dot(a, b):
    """The documented rule in Python floats (IEEE float64): products zero-padded to a power of two, then
    first half + second half until one number is left."""
    p = [x * y for x, y in zip(a, b)]
    p += [0.0] * ((1 << max(0, (len(p) - 1).bit_length())) - len(p))
    while len(p) > 1:
        p = [p[i] + p[i + len(p) // 2] for i in range(len(p) // 2)]
    return p[0]


def _python_scores(q, k):
    return torch.tensor([[_tree_dot(qr, kr) for kr in k.double().tolist()] for qr in q.double().tolist()],
                        dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scores_are_bitwise_the_same_for_every_shape(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 41, 24, generator=g).to(dtype)  # (B, H, T, D)
    k = torch.randn(2, 3, 13, 24, generator=g).to(dtype)  # (B, H, M, D)
    full = selection_scores(q, k)  # (B, H, T, M)
    assert full.dtype == torch.float64 and full.shape == (2, 3, 41, 13)
    want = _python_scores(q[1, 2], k[1, 2])
    assert torch.equal(full[1, 2], want)  # bit for bit, not merely close
    rows = torch.cat([selection_scores(q[:, :, t:t + 1], k) for t in range(41)], dim=2)  # one row at a time
    assert torch.equal(rows, full)
    cols = torch.cat([selection_scores(q, k[:, :, m:m + 1]) for m in range(13)], dim=3)
    assert torch.equal(cols, full)
    for d in (1, 5, 24):  # other widths (padded to 1, 8, 32)
        assert torch.equal(selection_scores(q[0, 0, :, :d], k[0, 0, :, :d]), _python_scores(q[0, 0, :, :d],
                                                                                           k[0, 0, :, :d]))
    monkeypatch.setattr(select, "SELECT_ELEMENTS", 2 * 2 * 3 * 13 * 32)  # products of two query rows at a time
    assert torch.equal(selection_scores(q, k), full)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # the same values in another memory layout
    assert not qt.is_contiguous() and torch.equal(selection_scores(qt, k), full)
    # broadcasting over a group axis (GQA): (B, H, G, T, D) against (B, H, 1, M, D)
    grouped = selection_scores(torch.stack([q, q], 2), k.unsqueeze(2))
    assert torch.equal(grouped[:, :, 1], full)


def test_equal_keys_tie_exactly_and_go_to_the_lower_index():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(37, 16, generator=g)
    k = torch.randn(1, 16, generator=g).expand(9, 16).contiguous()  # nine equal keys
    s = selection_scores(q, k)
    assert torch.equal(s, s[:, :1].expand_as(s))
    assert top_k_indices(s, 3).tolist() == [[0, 1, 2]] * 37
    s2 = s.clone()
    s2[:, 5] += 1.0  # one strictly better key comes first, then the ties in index order
    s2[:, 1] = float("-inf")
    assert top_k_indices(s2, 4).tolist() == [[5, 0, 2, 3]] * 37
    assert top_k_indices(s2, 20).shape == (37, 9)  # k larger than the axis: all of them
    assert top_k_indices(s2.T, 2, dim=0).T.tolist() == [[5, 0]] * 37


def test_scores_refuse_mismatched_dims():
    with pytest.raises(ValueError, match="last dim"):
        selection_scores(torch.randn(3, 4), torch.randn(2, 5))
