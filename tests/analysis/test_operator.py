"""The effective operator of every registered mechanism: operator @ v == the reference (and the fast form), float64,
with and without key padding; operator == reference(q, k, one-hot values) where it does not depend on v; records
without one say why. Iterates the registry, so mechanisms added later are covered (or must state a reason)."""

import math

import pytest
import torch

import attnzoo
from attnzoo import masks
from attnzoo.analysis.operator import (
    OperatorUnavailable,
    apply_operator,
    check_grid_operator,
    check_operator,
    effective_operator,
    operator_exception,
    operator_source,
    source_operators,
)
from attnzoo.reference import softmax_weights
from attnzoo.testing import rel_err

MECHS = attnzoo.list_mechanisms()
CASES = [pytest.param(m, p, id=f"{m.name}-{p}") for m in MECHS if operator_source(m) and m.kind == "sequence"
         for p in m.patterns]


@pytest.mark.parametrize("mech,pattern", CASES)
def test_operator_times_v_is_the_output(mech, pattern):
    res = check_operator(mech, pattern)
    assert res["rel_err"] <= 1e-10


@pytest.mark.parametrize("mech", [m for m in MECHS if operator_source(m) and m.kind != "sequence"],
                         ids=lambda m: m.name)
def test_grid_operator(mech):
    assert check_grid_operator(mech)["rel_err"] <= 1e-10


@pytest.mark.parametrize("mech", [m for m in MECHS if not operator_source(m)], ids=lambda m: m.name)
def test_records_without_an_operator_say_why(mech):
    reason = operator_exception(mech)
    assert isinstance(reason, str) and len(reason) > 20
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(OperatorUnavailable, match=mech.name):
        effective_operator(mech.name, x, x, x)


def test_every_functional_sequence_mechanism_has_an_operator():
    missing = [m.name for m in MECHS if m.functional and operator_source(m) is None]
    assert not missing, f"functional mechanisms without an effective operator: {missing}"


def _qkv(b=1, hq=4, hk=2, nq=11, nk=11, d=6, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64),
            torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64),
            torch.randn(b, hk, nk, dv, generator=g, dtype=torch.float64))


def test_sliding_window_operator_is_the_banded_softmax():
    q, k, v = _qkv()
    w = effective_operator("sliding_window", q, k, v, causal=True, window=3)
    band = masks.materialize(masks.sliding_window(3, causal=True), 1, 1, 11, 11)[0, 0]
    assert torch.all(w[..., ~band] == 0)
    assert torch.allclose(w.sum(-1), torch.ones(1, 4, 11, dtype=torch.float64))
    # hand-computed row 5 of head 1 (key head 0): softmax over keys 3..5
    s = (q[0, 1, 5] @ k[0, 0, 3:6].T) / math.sqrt(6)
    assert torch.allclose(w[0, 1, 5, 3:6], torch.softmax(s, -1), atol=1e-14)


def test_lightning_operator_entries_are_decayed_scores():
    q, k, v = _qkv(hq=2, hk=2)
    lam = [0.9, 0.5]
    w = effective_operator("lightning", q, k, v, causal=True, decay=lam, scale=0.3)
    for h in range(2):
        for i, j in ((7, 2), (4, 4), (10, 0)):
            want = 0.3 * float(q[0, h, i] @ k[0, h, j]) * lam[h] ** (i - j)
            assert abs(float(w[0, h, i, j]) - want) < 1e-12
    assert torch.all(w.triu(1) == 0)


def test_linear_operator_rows_sum_to_one():
    q, k, v = _qkv()
    w = effective_operator("linear", q, k, v, causal=True, eps=0.0)
    assert torch.all(w >= 0) and torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_agent_operator_is_stochastic_with_rank_at_most_agents():
    q, k, v = _qkv(nq=12, nk=12)
    w = effective_operator("agent", q, k, v, agents=3)
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert int(torch.linalg.matrix_rank(w[0, 0])) <= 3


def test_memory_operators_spread_retrieved_mass_over_tokens():
    q, k, v = _qkv(nq=12, nk=12, dv=6)
    for name, opts in (("cca", {"group_size": 3, "window": 4}), ("landmark", {"block_size": 2, "top_k": 1}),
                       ("recycled", {"stride": 3, "top_k": 2, "start": 4}),
                       ("longheads", {"chunk_size": 2, "max_chunks": 4})):
        w = effective_operator(name, q, k, v, causal=True, **opts)
        assert torch.all(w.triu(1) == 0), name  # causal
        if name != "landmark":  # a landmark's own mass is not spread (it carries no value)
            assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1))), name


def test_hip_operator_is_zero_outside_its_selection():
    q, k, v = _qkv(nq=16, nk=16)
    opts = {"topk": 4, "block_size_q": 1, "block_size_k": 2, "sliding_window": 2, "sinks": 1, "query_stride": 1}
    w = effective_operator("hip", q, k, v, causal=True, **opts)
    kept = (w > 0).sum(-1)
    assert int(kept.max()) <= 1 + 4 + 2 + 1  # sinks + selected blocks + local window (+ own token)
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_dma_operator_depends_on_v_but_reproduces_its_output():
    q, k, v = _qkv(nq=10, nk=10)
    w = effective_operator("dma", q, k, v, causal=True, window=3)
    out = attnzoo.attention(q, k, v, mechanism="dma", causal=True, window=3)
    assert rel_err(apply_operator(w, v), out) < 1e-10
    v2 = v.flip(2)
    assert not torch.equal(effective_operator("dma", q, k, v2, causal=True, window=3), w)


def test_effective_operator_validates():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="window"):
        effective_operator("sliding_window", q, k, v, causal=True, window=0)
    with pytest.raises(ValueError, match="pattern"):
        effective_operator("cca", q, k, v, causal=False)
    with pytest.raises(TypeError, match="key_padding_mask"):
        effective_operator("softmax", q, k, v, key_padding_mask=torch.ones(1, 11))


def test_source_operators_separate_and_joint():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)
    keys = {"text": torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64),
            "image": torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)}
    mask = {"image": torch.rand(2, 9, generator=g) > 0.3}
    sep = source_operators(q, keys, masks=mask)
    for name in keys:
        assert torch.allclose(sep[name].sum(-1), torch.ones(2, 4, 5, dtype=torch.float64))
    assert torch.all(sep["image"][..., ~mask["image"][0]][0] == 0)
    joint = source_operators(q, keys, mode="joint", masks=mask)
    total = joint["text"].sum(-1) + joint["image"].sum(-1)
    assert torch.allclose(total, torch.ones_like(total))
    full = torch.cat([keys["text"].repeat_interleave(2, 1), keys["image"]], 2)
    kpm = torch.cat([torch.ones(2, 7, dtype=torch.bool), mask["image"]], 1)
    want = softmax_weights(q, full, key_padding_mask=kpm)
    assert torch.allclose(torch.cat([joint["text"], joint["image"]], -1), want, atol=1e-15)
    with pytest.raises(ValueError, match="masks"):
        source_operators(q, keys, masks={"audio": mask["image"]})


def test_source_operators_reproduce_attnzoo_cross_attention():
    """Once the cross family is merged: per-source weights @ v (with the source scales) == attnzoo.cross_attention,
    both modes, with masks; skipped before."""
    cross_attention = getattr(attnzoo, "cross_attention", None)
    if cross_attention is None:
        pytest.skip("attnzoo.cross_attention is not in this tree yet (branch 'cross')")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)
    src = {"text": (torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64),
                    torch.randn(2, 2, 7, 5, generator=g, dtype=torch.float64)),
           "image": (torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64),
                     torch.randn(2, 4, 9, 5, generator=g, dtype=torch.float64))}
    masks = {"image": torch.rand(2, 9, generator=g) > 0.3}
    scales = {"text": 1.0, "image": 0.7}
    for mode in ("separate", "joint"):
        w = source_operators(q, {n: kv[0] for n, kv in src.items()}, mode=mode, masks=masks)
        got = sum(scales[n] * apply_operator(w[n], src[n][1]) for n in src)
        want = cross_attention(q, src, mode=mode, masks=masks, scales=scales)
        assert rel_err(got, want) < 1e-10, mode
