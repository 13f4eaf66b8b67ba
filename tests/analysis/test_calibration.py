"""ACT (P046) and VAR (P098): the CATALOG oracles on the dense references (rows keep their sums, causal zeros stay,
no sinks / beta = 1 / p = 0 is the identity, moved mass = (1 - beta) or p times the sink mass, other heads untouched),
ACT == the official code's update written out, and the streamed corrections (only the sink / span columns, from q, k
and the LSE) == the dense calibration @ v in float64."""

import pytest
import torch

from attnzoo.analysis.calibration import (
    act_calibrate,
    act_correction,
    act_sinks,
    image_centric,
    sink_dimensions,
    span_sinks,
    var_correction,
    var_redistribute,
)
from attnzoo.kernels.sdpa import sdpa_with_lse
from attnzoo.reference import softmax_weights
from attnzoo.testing import rel_err


def qkv(n=40, h=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(d, dtype=torch.float64)
    u[0] = 1.0
    q = torch.randn(1, h, n, d, generator=g, dtype=torch.float64) + 3 * u  # queries share a direction u
    k = torch.randn(1, h, n, d, generator=g, dtype=torch.float64)
    k[:, :, 7] = 4 * u  # key 7 lies along u: a hidden sink
    v = torch.randn(1, h, n, d, generator=g, dtype=torch.float64)
    return q, k, v


def official_act(A, sinks_idx, beta):
    """The official atten_process_eval update of one head (N, N), written out from its source."""
    A = A.clone()
    copied = A.clone()
    available = A[:, sinks_idx].sum(dim=1, keepdim=True) * (1 - beta)
    A[:, sinks_idx] *= beta
    copied[1:, sinks_idx] = 0
    ratios = copied / copied.sum(dim=1, keepdim=True)
    A = A + available * ratios
    A[0, 0] = 1
    return A


def test_act_matches_the_official_update_and_keeps_rows():
    q, k, _ = qkv()
    A = softmax_weights(q, k, causal=True)  # (1, 3, N, N)
    sinks = act_sinks(A.sum(2)[0, 0], nq=40, threshold=0.05)
    assert bool(sinks[7]) and not bool(sinks[0])
    idx = torch.nonzero(sinks).flatten()
    got = act_calibrate(A[:, :1], sinks, 0.4)[0, 0]
    assert torch.allclose(got, official_act(A[0, 0], idx, 0.4), atol=1e-14)
    assert torch.allclose(got.sum(-1), torch.ones(40, dtype=torch.float64))
    assert torch.all(got.triu(1) == 0)
    moved = (A[0, 0][:, idx] - got[:, idx]).sum(-1)
    assert torch.allclose(moved, 0.6 * A[0, 0][:, idx].sum(-1))


def test_act_identities():
    q, k, _ = qkv()
    A = softmax_weights(q, k, causal=True)
    none = torch.zeros(40, dtype=torch.bool)
    assert torch.equal(act_calibrate(A, none, 0.4), A)
    some = torch.zeros(40, dtype=torch.bool)
    some[[3, 7]] = True
    assert torch.allclose(act_calibrate(A, some, 1.0), A, atol=1e-15)


def test_act_sink_detection_mean_over_seeing_queries():
    sums = torch.tensor([10.0, 2.0, 0.9, 0.5])  # N = 4 causal: key j is seen by 4 - j queries
    assert act_sinks(sums, nq=4, threshold=0.46).tolist() == [False, True, False, True]  # means 2.5, .67, .45, .5
    assert act_sinks(sums, nq=4, threshold=0.46, exclude_first=False)[0]


def test_act_streamed_equals_dense():
    q, k, v = qkv(n=64)
    out, lse = sdpa_with_lse(q, k, v, causal=True, scale=8 ** -0.5)
    A = softmax_weights(q, k, causal=True)
    sinks = act_sinks(A.sum(2)[0, 1], nq=64, threshold=0.05)
    dense = torch.matmul(act_calibrate(A, sinks, 0.4), v)
    stream = act_correction(out, q, k, v, sinks, lse=lse, scale=8 ** -0.5, beta=0.4)
    assert rel_err(stream, dense) < 1e-10


def test_var_oracles():
    q, k, v = qkv(n=30)
    A = softmax_weights(q, k, causal=True)
    span = torch.zeros(30, dtype=torch.bool)
    span[5:15] = True
    sinks = torch.zeros(30, dtype=torch.bool)
    sinks[[7, 9]] = True
    rows = torch.arange(30) >= 15
    heads = torch.tensor([True, False, True])
    W = var_redistribute(A, span, sinks, rows=rows, heads=heads, p=0.6)
    assert torch.allclose(W.sum(-1), A.sum(-1))
    assert torch.equal(W[:, 1], A[:, 1])  # not image-centric
    assert torch.equal(W[:, :, :15], A[:, :, :15])  # rows before / inside the span
    assert torch.allclose((A - W)[..., [7, 9]].sum(-1)[:, 0, 15:], 0.6 * A[:, 0, 15:][..., [7, 9]].sum(-1))
    assert torch.equal(W[..., ~span], A[..., ~span])  # nothing leaves or enters outside the span
    assert torch.equal(var_redistribute(A, span, sinks, rows=rows, heads=heads, p=0.0), A)
    # streamed: rows after the span, the image-centric heads
    out, lse = sdpa_with_lse(q, k, v, causal=True, scale=8 ** -0.5)
    r = torch.nonzero(rows).flatten()
    stream = var_correction(out[:, :, r], q[:, :, r], k, v, span, sinks, lse=lse[:, :, r], scale=8 ** -0.5,
                            causal=False, p=0.6)
    dense = torch.matmul(var_redistribute(A, span, sinks, rows=rows, heads=torch.ones(3, dtype=torch.bool),
                                          p=0.6), v)[:, :, r]
    assert rel_err(stream, dense) < 1e-10


def test_var_selection():
    h = torch.randn(6, 1024, dtype=torch.float64) * 0.1  # RMS of a row ~ 0.1: |h| / RMS can reach ~30
    h[0, 5] = 50.0  # the first token's massive activation
    h[3, 5] = -40.0
    dims = sink_dimensions(h[0])
    assert dims.tolist() == [5]
    span = torch.tensor([False, True, True, True, True, False])
    assert span_sinks(h, dims, span).tolist() == [False, False, False, True, False, False]
    w = torch.tensor([[[0.1, 0.1, 0.8]], [[0.45, 0.45, 0.1]]], dtype=torch.float64)  # (H, R, M)
    assert image_centric(w, torch.tensor([False, False, True]), rho=0.5).tolist() == [False, True]


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        act_calibrate(torch.ones(1, 1, 2, 2), torch.zeros(2, dtype=torch.bool), 1.5)
    with pytest.raises(ValueError, match="threshold"):
        act_sinks(torch.ones(3), nq=3, threshold=-1.0)
