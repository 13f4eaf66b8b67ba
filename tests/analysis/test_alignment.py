"""Whisper-style word alignment from cross-attention (attnzoo.analysis.alignment): DTW is the cheapest monotone path
(brute force over every path of small matrices, a hand-computed case), the median filter is the windowed median,
and a synthetic diagonal attention gives back the word starts it was built from. The real Whisper test is in
tests/models/test_whisper_alignment.py."""

import itertools

import numpy as np
import pytest
import torch

from attnzoo.analysis.alignment import FRAME_SECONDS, alignment_matrix, dtw, median_filter, word_timings


def _paths(n, m):
    """Every monotone path from (0, 0) to (n-1, m-1) with steps (1, 1), (1, 0), (0, 1)."""
    if (n, m) == (1, 1):
        yield [(0, 0)]
        return
    for di, dj in ((1, 1), (1, 0), (0, 1)):
        if n - di >= 1 and m - dj >= 1:
            for p in _paths(n - di, m - dj):
                yield p + [(n - 1, m - 1)]


@pytest.mark.parametrize("n,m", [(1, 1), (1, 4), (3, 1), (3, 4), (4, 5), (5, 3)])
def test_dtw_is_the_cheapest_monotone_path(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    for _ in range(5):
        cost = torch.rand(n, m, generator=g, dtype=torch.float64)
        rows, cols = dtw(cost)
        cells = list(zip(rows.tolist(), cols.tolist()))
        assert cells[0] == (0, 0) and cells[-1] == (n - 1, m - 1)
        assert all((b[0] - a[0], b[1] - a[1]) in ((1, 1), (1, 0), (0, 1)) for a, b in itertools.pairwise(cells))
        best = min(sum(float(cost[i, j]) for i, j in p) for p in _paths(n, m))
        assert abs(sum(float(cost[i, j]) for i, j in cells) - best) < 1e-12


def test_dtw_hand_computed():
    # the zero cells form the only free path (0,0) (1,0) (2,1) (2,2); every other cell costs 9
    cost = torch.tensor([[0.0, 9, 9], [0, 9, 9], [9, 0, 0]])
    rows, cols = dtw(cost)
    assert rows.tolist() == [0, 1, 2, 2] and cols.tolist() == [0, 0, 1, 2]


def test_median_filter_is_the_windowed_median():
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    got = median_filter(x, 5)
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2)), mode="reflect")
    want = np.stack([np.median(xp[..., t:t + 5], -1) for t in range(20)], -1)
    assert np.abs(got.numpy() - want).max() == 0
    assert torch.equal(median_filter(x, 1), x)
    with pytest.raises(ValueError, match="width: expected an odd window"):
        median_filter(x, 4)


def test_diagonal_attention_gives_back_its_word_starts():
    """Token t attends to frames [10 t, 10 t + 10) (plus noise and 30 s of padding frames that must not count):
    words of 2, 1 and 3 tokens start at frames 0, 20 and 30."""
    g = torch.Generator().manual_seed(0)
    tokens, frames = 6, 60
    w = 0.05 * torch.rand(3, tokens, 1500, generator=g, dtype=torch.float64)
    for t in range(tokens):
        w[:, t, 10 * t:10 * t + 10] += 1.0
    w[:, :, frames:] += 5.0  # padding beyond the audio: renormalising over the audio frames removes it
    w = w / w.sum(-1, keepdim=True)
    m = alignment_matrix(w, frames=frames)
    assert m.shape == (tokens, frames)
    timings = word_timings(m, [("a", [1, 2]), ("b", [3]), ("c", [4, 5, 6])])
    assert [round(t.start / FRAME_SECONDS) for t in timings] == [0, 20, 30]
    assert [round(t.end / FRAME_SECONDS) for t in timings] == [20, 30, 60]


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="cost: expected a 2-D"):
        dtw(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="frames: expected at most"):
        alignment_matrix(torch.rand(2, 3, 10), frames=11)
    with pytest.raises(ValueError, match="matrix: expected 3 rows"):
        word_timings(torch.rand(4, 10), [("a", [1, 2]), ("b", [3])])
