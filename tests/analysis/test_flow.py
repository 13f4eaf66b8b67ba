"""P113 attention flow: the CATALOG oracles -- rollout of identity attention is I, flow rows sum to 1, uniform head
weights without regularisation are standard attention rollout (written out) -- and the mean-max head weights."""

import pytest
import torch

from attnzoo.analysis.flow import aggregate_heads, attention_flow, head_weights, patch_heatmap


def stochastic(h, n, seed, causal=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(h, n, n, generator=g, dtype=torch.float64)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1)


def test_identity_attention_rolls_out_to_identity():
    eye = torch.eye(6, dtype=torch.float64)
    layers = [eye.expand(3, 6, 6)] * 4
    assert torch.allclose(attention_flow(layers), eye)
    assert torch.allclose(attention_flow(layers, causal=True), eye)


@pytest.mark.parametrize("causal", [False, True])
def test_flow_rows_sum_to_one(causal):
    layers = [stochastic(4, 9, s, causal) for s in range(5)]
    f = attention_flow(layers, causal=causal)
    assert torch.allclose(f.sum(-1), torch.ones(9, dtype=torch.float64))
    if causal:
        assert torch.all(f.triu(1) == 0)


def test_uniform_heads_without_regularisation_is_rollout():
    layers = [stochastic(4, 7, s) for s in range(3)]
    want = torch.eye(7, dtype=torch.float64)
    for a in layers:  # Abnar & Zuidema: 0.5 A + 0.5 I, multiplied from the first layer
        want = (0.5 * a.mean(0) + 0.5 * torch.eye(7, dtype=torch.float64)) @ want
    assert torch.allclose(attention_flow(layers, heads="uniform", regularize=False), want)
    # bidirectional: the regularisation changes nothing
    assert torch.allclose(attention_flow(layers, heads="uniform"), want)


def test_mean_max_head_weights():
    peaked = torch.eye(4, dtype=torch.float64)
    flat = torch.full((4, 4), 0.25, dtype=torch.float64)
    w = head_weights(torch.stack([peaked, flat]))
    assert w.tolist() == [1.0, 0.25]
    agg = aggregate_heads(torch.stack([peaked, flat]))
    assert torch.allclose(agg, (peaked + 0.25 * flat) / 1.25)
    assert torch.allclose(agg.sum(-1), torch.ones(4, dtype=torch.float64))


def test_patch_heatmap():
    row = torch.tensor([0.5, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    m = patch_heatmap(row, (2, 2))
    assert m.shape == (2, 2) and m.min() == 0 and m.max() == 1
    with pytest.raises(ValueError, match="row"):
        patch_heatmap(row, (3, 3))
