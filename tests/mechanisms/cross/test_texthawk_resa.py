"""TextHawk ReSA (P091): the output is the resampler's queries concatenated in groups; without query proposals the
queries are the learned latents; multi-level cross-attention runs each layer over its routed level (a reference
cross-attention per level); the proposal pooling ignores padding."""

import pytest
import torch
import torch.nn.functional as F

from attnzoo.mechanisms.cross.texthawk_resa import ReSampleReArrange, masked_group_mean
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_rearrangement_concatenates_consecutive_queries():
    torch.manual_seed(0)
    m = ReSampleReArrange(8, 2, num_queries=6, rearrange=3, query_proposal=False).double()
    x = torch.randn(2, 10, 8, generator=_g(1), dtype=F64)
    y = m(x)
    z = m.resampler(x)  # (B, 6, 8) the resampled queries
    assert y.shape == (2, 2, 24)
    assert torch.equal(y[:, 1, 8:16], z[:, 4])  # output token 1 = [q3; q4; q5]


def test_multi_level_cross_attention_routes_levels_to_layers():
    torch.manual_seed(0)
    levels = {"deep": 8, "shallow": 6}
    m = ReSampleReArrange(8, 2, num_queries=4, rearrange=2, levels=levels, routing=("deep", "shallow", "deep"),
                          query_proposal=False).double()
    g = _g(2)
    x = {"deep": torch.randn(2, 7, 8, generator=g, dtype=F64), "shallow": torch.randn(2, 9, 6, generator=g, dtype=F64)}
    z = m.resampler.latents.unsqueeze(0).expand(2, -1, -1)
    for layer, level in zip(m.resampler.layers, ("deep", "shallow", "deep")):
        z = layer(z, x[level])  # one reference cross-attention per routed level
    assert_close(m(x), z.reshape(2, 2, 16), F64, "routed levels")
    x2 = {**x, "shallow": x["shallow"] + torch.randn(2, 9, 6, generator=g, dtype=F64)}  # (LN removes shifts)
    assert (m(x2) - m(x)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="levels, routing"):
        ReSampleReArrange(8, 2, levels=levels)


def test_query_proposals_pool_the_features_without_padding():
    x = torch.randn(2, 10, 5, generator=_g(3), dtype=F64)
    assert_close(masked_group_mean(x, 4), F.adaptive_avg_pool1d(x.transpose(1, 2), 4).transpose(1, 2), F64, "pool")
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    x2 = x.clone()
    x2[:, 7:] += 9
    assert_close(masked_group_mean(x2, 4, mask), masked_group_mean(x, 4, mask), F64, "padding ignored")
    torch.manual_seed(0)
    m = ReSampleReArrange(5, 1, num_queries=4, rearrange=2).double()
    assert_close(m(x2, key_padding_mask=mask), m(x, key_padding_mask=mask), F64, "whole module ignores padding")
    off = ReSampleReArrange(5, 1, num_queries=4, rearrange=2, query_proposal=False).double()
    off.resampler.load_state_dict(m.resampler.state_dict())
    assert (off(x) - m(x)).abs().max() > 1e-4  # the proposals change the queries
