"""Streaming head statistics (from q, k and the log-sum-exp, in chunks of rows) equal the statistics of the dense
attention matrix at n = 512 in float64 (1e-10): entropy, sink mass, token-set masses, argmax, top-k, distances;
under causal, key padding, a mechanism's declared mask and grouped heads; with the LSE of the fused forward."""

import math

import pytest
import torch

from attnzoo import masks
from attnzoo.analysis.operator import effective_operator
from attnzoo.analysis.stats import head_statistics, token_set, weight_statistics
from attnzoo.kernels.sdpa import sdpa_with_lse
from attnzoo.reference import softmax_weights
from attnzoo.testing import rel_err

N = 512


def qkv(n=N, hq=6, hk=2, d=16, seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(b, hk, n, d, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(b, hk, n, d, generator=g, dtype=torch.float64)
    return q, k, v


def assert_same(a, b):
    for name in ("entropy", "sink_mass", "topk_values"):
        x, y = getattr(a, name), getattr(b, name)
        assert rel_err(x, y) < 1e-10, name
    assert torch.equal(a.argmax, b.argmax)
    assert torch.equal(a.topk_indices, b.topk_indices)
    assert a.set_mass.keys() == b.set_mass.keys()
    for name in a.set_mass:
        assert rel_err(a.set_mass[name], b.set_mass[name]) < 1e-10, name
    for name in ("mean_distance", "distance_histogram"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert rel_err(x, y) < 1e-10, name


SETS = {"needle": [100, 101, 102, 300], "span": torch.arange(N) % 7 == 3}
BINS = [0, 1, 4, 16, 64, 256, 1024]


@pytest.mark.parametrize("causal", [False, True])
def test_streaming_equals_dense_at_512(causal):
    q, k, _ = qkv()
    kpm = torch.ones(2, N, dtype=torch.bool)
    kpm[1, 400:] = False
    kw = dict(sink=4, sets=SETS, topk=7, distance_bins=BINS)
    dense = weight_statistics(softmax_weights(q, k, causal=causal, key_padding_mask=kpm), **kw)
    stream = head_statistics(q, k, causal=causal, key_padding_mask=kpm, budget=8 << 20, **kw)  # ~10 row chunks
    assert_same(stream, dense)
    assert dense.entropy.max() <= math.log(N) + 1e-12


def test_streaming_with_the_fused_forward_lse_and_selected_rows():
    q, k, v = qkv(b=1)
    _, lse = sdpa_with_lse(q, k, v, causal=True, scale=0.25)
    rows = torch.tensor([0, 5, 511, 300])
    kw = dict(sets={"needle": [3, 4]}, topk=3)
    stream = head_statistics(q[:, :, rows], k, rows=rows, nq=N, causal=True, scale=0.25, lse=lse[:, :, rows], **kw)
    dense = weight_statistics(softmax_weights(q, k, causal=True, scale=0.25), rows=rows, **kw)
    assert_same(stream, dense)


def test_streaming_under_a_declared_mask_equals_the_mechanism_operator():
    q, k, v = qkv(b=1)
    pred = masks.sliding_window(32, causal=True)
    kw = dict(sink=1, topk=4, distance_bins=[0, 8, 16, 32, 64])
    stream = head_statistics(q, k, causal=True, predicate=pred, budget=4 << 20, **kw)
    dense = weight_statistics(effective_operator("sliding_window", q, k, v, causal=True, window=32), **kw)
    assert_same(stream, dense)
    assert float(dense.distance_histogram[..., 3].sum()) == 0.0  # a window of 32 never reaches distance 32


def test_hand_computed_statistics():
    w = torch.tensor([[[[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]]]], dtype=torch.float64)
    s = weight_statistics(w, sink=1, sets={"x": [1, 2]}, topk=2, distance_bins=[0, 1, 2, 4], nq=2)
    assert torch.allclose(s.entropy[0, 0, 0], torch.tensor(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)),
                                                           dtype=torch.float64))
    assert s.sink_mass[0, 0].tolist() == [0.5, 0.1]
    assert torch.allclose(s.set_mass["x"][0, 0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert s.argmax[0, 0].tolist() == [0, 3]
    assert s.topk_indices[0, 0, 0].tolist() == [0, 1]  # tie 0.25/0.25 goes to the lower index
    # query 0 sits at key 2 (bottom-right, nq=2 < Nk=4): distances 2, 1, 0, 1; query 1 at key 3: 3, 2, 1, 0
    assert torch.allclose(s.mean_distance[0, 0], torch.tensor([1.25, 1.0], dtype=torch.float64))
    assert torch.allclose(s.distance_histogram[0, 0], torch.tensor([0.65, 0.55, 0.8], dtype=torch.float64))


def test_grid_positions_give_patch_distances():
    yx = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 2)
    w = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    w[0, 0, torch.arange(16), (torch.arange(16) + 1) % 16] = 1.0  # each patch looks at the next one
    s = weight_statistics(w, positions=yx)
    want = torch.cdist(yx.double(), yx.double())[torch.arange(16), (torch.arange(16) + 1) % 16]
    assert torch.allclose(s.mean_distance[0, 0], want)


def test_validation():
    q, k, _ = qkv(n=8, b=1)
    with pytest.raises(ValueError, match="rows"):
        head_statistics(q, k, rows=[9])
    with pytest.raises(ValueError, match="token set"):
        head_statistics(q, k, sets={"a": [8]})
    with pytest.raises(ValueError, match="lse"):
        head_statistics(q, k, lse=torch.zeros(1, 6, 3))
    with pytest.raises(ValueError, match="distance_bins"):
        head_statistics(q, k, distance_bins=[3, 1])
    assert token_set(torch.tensor([True, False]), 2, 3).shape == (3, 2)
