"""Select/merge oracles: keep ratio 1 is the identity, kept tokens stay in original order, top-k equals an explicit
reference, merged sizes sum to N and unmerge inverts, every original token lands in exactly one kept/merged token;
the random and pooling baselines at the same budget."""

import itertools

import pytest
import torch

from attnzoo.reduce import select as S
from attnzoo.reduce.tome import bipartite_soft_matching, proportional_attention, tome_merge
from attnzoo.reference import softmax_attention


def _x(B=2, N=13, C=5, seed=0, dtype=torch.float64):
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _lands_once(assignment, m, allow_drop):
    """Each original token is in exactly one output slot (or dropped, -1, for pruning); every slot is used."""
    a = assignment
    assert a.dtype == torch.long and bool(((a >= 0) | (allow_drop & (a == -1))).all())
    for row in a:
        used = row[row >= 0]
        assert set(used.tolist()) == set(range(m))


@pytest.mark.parametrize("n", [1, 7, 64, 65])
def test_keep_ratio_one_is_identity(n):
    x = _x(N=n)
    scores = torch.randn(2, n, dtype=torch.float64)
    red = S.prune(x, scores, 1.0)
    assert torch.equal(red.tokens, x) and torch.equal(red.index, torch.arange(n).expand(2, n))
    assert torch.equal(red.assignment, torch.arange(n).expand(2, n))
    pooled = S.pool_tokens(x, 1.0)
    torch.testing.assert_close(pooled.tokens, x, rtol=0, atol=0)
    rnd = S.random_indices(2, n, 1.0)
    assert torch.equal(rnd, torch.arange(n).expand(2, n))
    assert torch.equal(tome_merge(x, 0).tokens, x)


def test_topk_equals_explicit_reference_in_original_order_with_ties():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (3, 40), generator=g).double()  # many ties
    for k in (1, 7, 20, 40):
        got = S.topk_indices(scores, k)
        for b in range(3):
            # explicit reference: rank by (-score, index), take k, return sorted by position
            ranked = sorted(range(40), key=lambda i: (-scores[b, i].item(), i))[:k]
            assert got[b].tolist() == sorted(ranked)
        assert bool((got[:, 1:] > got[:, :-1]).all())


def test_keep_count_budgets():
    assert S.keep_count(64, 0.25) == 16 and S.keep_count(64, 0.05) == 4 and S.keep_count(10, 0.05) == 1
    assert S.keep_count(7, 3) == 3
    for bad in (0.0, 1.5, -1, 0, 8, True):
        with pytest.raises((ValueError, TypeError), match="keep"):
            S.keep_count(7, bad)


def test_prune_lands_each_token_once_and_unmerge_restores_kept():
    x = _x(N=20)
    red = S.prune(x, torch.randn(2, 20, dtype=torch.float64), 0.25)
    assert red.kept == 5
    _lands_once(red.assignment, 5, allow_drop=True)
    back = S.unmerge(red.tokens, red.assignment)
    kept = red.assignment >= 0
    assert torch.equal(back[kept], x[kept]) and bool((back[~kept] == 0).all())


@pytest.mark.parametrize("n,r", [(13, 4), (16, 8), (7, 3), (2, 1)])
def test_tome_sizes_sum_to_n_unmerge_inverts_and_order_is_kept(n, r):
    x = _x(N=n, seed=n)
    red = tome_merge(x, r)
    assert red.kept == n - r
    torch.testing.assert_close(red.sizes.sum(1), torch.full((2,), float(n), dtype=torch.float64))
    _lands_once(red.assignment, n - r, allow_drop=False)
    # slots numbered by each group's first original token: first occurrences are increasing
    for row in red.assignment:
        firsts = [row.tolist().index(s) for s in range(n - r)]
        assert firsts == sorted(firsts)
    # merge(unmerge(y)) == y always; unmerge(merge(x)) == x on groups of equal tokens
    y = torch.randn(2, n - r, 5, dtype=torch.float64)
    torch.testing.assert_close(S.merge_tokens(S.unmerge(y, red.assignment), red.assignment, n - r).tokens, y)
    dup = S.unmerge(y, red.assignment)  # groups of equal tokens
    torch.testing.assert_close(S.unmerge(S.merge_tokens(dup, red.assignment, n - r).tokens, red.assignment), dup)


def test_tome_merges_the_most_similar_pair_and_protects_cls():
    x = torch.eye(6, dtype=torch.float64).unsqueeze(0)  # orthogonal tokens
    x[0, 2] = x[0, 3] * 2  # token 2 (set A) is parallel to token 3 (set B)
    a, m = bipartite_soft_matching(x, 1)
    assert m == 5 and a[0, 2] == a[0, 3] and len(set(a[0].tolist())) == 5
    x[0, 0] = x[0, 1]  # [CLS] equal to token 1, but protected
    a, _ = bipartite_soft_matching(x, 1, protected=1)
    assert a[0, 0] != a[0, 1] and a[0, 2] == a[0, 3]


def test_sizes_track_through_repeated_merges():
    x = _x(N=16)
    red1 = tome_merge(x, 5)
    red2 = tome_merge(red1.tokens, 4, sizes=red1.sizes)
    torch.testing.assert_close(red2.sizes.sum(1), torch.full((2,), 16.0, dtype=torch.float64))
    total = S.compose(red1.assignment, red2.assignment)
    _lands_once(total, 7, allow_drop=False)
    # the twice-merged tokens equal a single merge of x with the composed assignment (size-weighted means)
    torch.testing.assert_close(S.merge_tokens(x, total, 7).tokens, red2.tokens)


def test_proportional_attention_over_merged_duplicates_is_lossless():
    g = torch.Generator().manual_seed(3)
    B, H, N, D = 2, 3, 6, 4
    k0 = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    v0 = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    q = torch.randn(B, H, 5, D, generator=g, dtype=torch.float64)
    reps = torch.tensor([1, 3, 2, 1, 4, 2])  # token j duplicated reps[j] times
    k, v = k0.repeat_interleave(reps, dim=2), v0.repeat_interleave(reps, dim=2)
    full = softmax_attention(q, k, v)
    merged = proportional_attention(q, k0, v0, reps.double().expand(B, N))
    assert (merged - full).norm() / full.norm() < 1e-12


def test_pool_assignment_partitions_1d_and_2d():
    a, m = S.pool_assignment(10, 4)
    assert m == 4 and a.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    a, m = S.pool_assignment(36, 0.25, grid=(6, 6))  # budget 9 -> 3 x 3 cells of 2 x 2
    assert m == 9
    grid = a.view(6, 6)
    assert grid[0, 0] == grid[1, 1] == 0 and grid[0, 2] == 1 and grid[5, 5] == 8
    for n, keep, grid in [(256, 0.1, (16, 16)), (256, 0.05, (16, 16)), (12, 5, (3, 4))]:
        a, m = S.pool_assignment(n, keep, grid=grid)
        assert m <= S.keep_count(n, keep)
        assert sorted(set(a.tolist())) == list(range(m))
    x = _x(N=36)
    red = S.pool_tokens(x, 0.25, grid=(6, 6))
    torch.testing.assert_close(red.tokens[:, 0], x[:, [0, 1, 6, 7]].mean(1))


def test_random_indices_are_uniform_and_sorted():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(2000):
        idx = S.random_indices(1, 10, 3, generator=g)
        assert bool((idx[:, 1:] > idx[:, :-1]).all())
        counts[idx[0]] += 1
    assert (counts / 2000 - 0.3).abs().max() < 0.05


@pytest.mark.parametrize("bad,match", [
    (lambda x: S.select_tokens(x, torch.tensor([[3, 1]] * 2)), "strictly increasing"),
    (lambda x: S.select_tokens(x, torch.tensor([[0, 99]] * 2)), "positions in"),
    (lambda x: S.select_tokens(x, torch.tensor([[0.0, 1.0]] * 2)), "long tensor"),
    (lambda x: S.merge_tokens(x, torch.zeros(2, 13, dtype=torch.long), 2), "at least one token"),
    (lambda x: S.prune(x[0], torch.zeros(13), 0.5), "3-D"),
])
def test_bad_inputs_raise_naming_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad(_x())


def test_exhaustive_small_topk_matches_brute_force():
    scores = torch.tensor([[0.3, 0.1, 0.3, 0.5, 0.0]])
    for k in range(1, 6):
        best = max(itertools.combinations(range(5), k),
                   key=lambda c: (sum(scores[0, list(c)].tolist()), [-i for i in c]))
        assert S.topk_indices(scores, k)[0].tolist() == sorted(best)
