"""Oracles for HyperAttention (CATALOG P041): exact limits, fast == reference, an explicit-loop estimator,
and a Monte-Carlo check that the error falls as the sample size grows."""

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.sparse.hyperattention import lsh_hash, plan
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close, rel_err

SMALL = {"min_seq_len": 6, "lsh_num_projs": 3}


def _qkv(B, Hq, Hk, nq, nk, d=6, dv=5, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hk, nk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hk, nk, dv, generator=g, dtype=torch.float64).to(dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _mask(B, n, seed=3):
    m = torch.rand(B, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    m[:, 0] = True
    return m


def _run(q, k, v, backend, causal=False, kpm=None, **opts):
    return attnzoo.attention(q, k, v, mechanism="hyperattention", causal=causal, key_padding_mask=kpm,
                             backend=backend, **{**SMALL, **opts})


CASES = [  # (Hq, Hk, nq, nk, causal)
    (2, 2, 65, 65, False), (4, 2, 33, 33, False), (2, 1, 7, 63, False), (4, 2, 33, 20, False),
    (4, 2, 63, 63, True), (2, 1, 7, 7, True), (2, 2, 1, 1, True),
]


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("Hq,Hk,nq,nk,causal", CASES)
def test_one_block_covering_all_keys_is_exact(backend, Hq, Hk, nq, nk, causal):
    q, k, v = _qkv(2, Hq, Hk, nq, nk)
    kpm = _mask(2, nk)
    want = softmax_attention(q, k, v, causal=causal, key_padding_mask=kpm)
    got = _run(q, k, v, backend, causal, kpm, block_size=nk, sample_size=5)
    assert_close(got, want, torch.float64, f"block_size >= Nk ({backend})")


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("Hq,Hk,nq,nk,causal", CASES)
def test_sampling_every_key_is_exact(backend, Hq, Hk, nq, nk, causal):
    q, k, v = _qkv(2, Hq, Hk, nq, nk, seed=1)
    kpm = _mask(2, nk, seed=4)
    want = softmax_attention(q, k, v, causal=causal, key_padding_mask=kpm)
    got = _run(q, k, v, backend, causal, kpm, block_size=4, sample_size=nk)
    assert_close(got, want, torch.float64, f"sample_size >= Nk ({backend})")


@pytest.mark.parametrize("causal", [False, True])
def test_below_min_seq_len_is_exact(causal):
    q, k, v = _qkv(1, 2, 2, 40, 40)
    want = softmax_attention(q, k, v, causal=causal)
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism="hyperattention", causal=causal, backend=backend,
                                block_size=4, sample_size=3, min_seq_len=40 if causal else 41)
        assert_close(got, want, torch.float64, f"below min_seq_len ({backend})")


def test_approximation_is_not_exact_in_general():
    q, k, v = _qkv(1, 2, 2, 64, 64)
    err = rel_err(_run(q, k, v, "fast", block_size=8, sample_size=8), softmax_attention(q, k, v))
    assert err > 1e-3


@pytest.mark.parametrize("Hq,Hk,nq,nk,causal", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_fast_equals_reference_outputs_and_gradients(Hq, Hk, nq, nk, causal, masked):
    q, k, v = _qkv(2, Hq, Hk, nq, nk, seed=2, grad=True)
    kpm = _mask(2, nk, seed=5) if masked else None
    opts = {"block_size": 5, "sample_size": 7, "seed": 11}
    ref = _run(q, k, v, "reference", causal, kpm, **opts)
    fast = _run(q, k, v, "fast", causal, kpm, **opts)
    assert_close(fast, ref, torch.float64, "fast vs reference")
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b, torch.float64, f"gradient of {name}")


def test_fast_float32_matches_reference():
    q, k, v = _qkv(1, 2, 2, 65, 65, dtype=torch.float32)
    for causal in (False, True):
        ref = _run(q, k, v, "reference", causal, block_size=8, sample_size=9)
        fast = _run(q, k, v, "fast", causal, block_size=8, sample_size=9)
        assert_close(fast, ref, torch.float32, f"float32 causal={causal}")


def test_estimator_written_as_an_explicit_loop():
    """out_i = (sum_{j in own block} e^s v_j + w sum_t [j_t not in own block] e^s v_{j_t}) / (same with 1)."""
    q, k, v = _qkv(1, 2, 1, 13, 13, d=4, dv=3, seed=7)
    opts = {"block_size": 3, "sample_size": 5, "lsh_num_projs": 2, "seed": 4}
    p = plan(q, k, None, node=1, **opts)
    scale = 0.5
    out = torch.zeros(1, 2, 13, 3, dtype=torch.float64)
    w = 13 / 5
    for h in range(2):
        q_rank = {int(i): r for r, i in enumerate(p.q_order[0, h])}
        k_rank = {int(j): r for r, j in enumerate(p.k_order[0, 0])}
        for i in range(13):
            blk = q_rank[i] // 3  # sorted blocks of block_size = 3, for queries and keys alike
            num = torch.zeros(3, dtype=torch.float64)
            den = torch.zeros((), dtype=torch.float64)
            for j in range(13):
                if k_rank[j] // 3 == blk:
                    e = torch.exp(scale * q[0, h, i] @ k[0, 0, j])
                    num, den = num + e * v[0, 0, j], den + e
            for pos in p.samples[0, h].tolist():
                j = int(p.k_order[0, 0, pos])
                if pos // 3 != blk:
                    e = torch.exp(scale * q[0, h, i] @ k[0, 0, j])
                    num, den = num + w * e * v[0, 0, j], den + w * e
            out[0, h, i] = num / den
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism="hyperattention", scale=scale, backend=backend, min_seq_len=2,
                                **opts)
        assert_close(got, out, torch.float64, f"explicit estimator loop ({backend})")


def _sorted_ranks(h):
    """P(i): the place of row i when the rows are sorted by bucket, ties in index order (Python's stable sort)."""
    order = sorted(range(len(h)), key=lambda i: h[i])
    return {i: r for r, i in enumerate(order)}


def _sortlsh_mask(q, k, b, qbs, r, seed):
    """The paper's sortLSH mask (Definition 1), per batch row and query head, written with loops:
    M_ij = 1 iff query i's sorted rank lies in query block floor(P_Q(i) / qbs) and key j's in key block
    floor(P_K(j) / b) with the same index. qbs = b in self attention; in cross attention the official
    ceil(Nq / b) * b / n_blocks (exact here). Returns bool (B, Hq, Nq, Nk)."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    hq, hk = lsh_hash(q, r, seed).tolist(), lsh_hash(k, r, seed).tolist()  # buckets (Gray-code test above)
    M = torch.zeros(B, Hq, Nq, Nk, dtype=torch.bool)
    for bi in range(B):
        for h in range(Hq):
            pq, pk = _sorted_ranks(hq[bi][h]), _sorted_ranks(hk[bi][h // (Hq // Hk)])
            for i in range(Nq):
                for j in range(Nk):
                    M[bi, h, i, j] = pq[i] // qbs == pk[j] // b
    return M


def _masked_softmax_attention(q, k, v, M, scale):
    Hq, Hk = q.shape[1], k.shape[1]
    s = q @ k.repeat_interleave(Hq // Hk, 1).transpose(-1, -2) * scale
    return torch.softmax(s.masked_fill(~M, float("-inf")), -1) @ v.repeat_interleave(Hq // Hk, 1)


@pytest.mark.parametrize("Hq,Hk,nq,nk,b", [(1, 1, 20, 20, 8), (4, 2, 33, 33, 8), (2, 1, 9, 12, 4), (2, 2, 30, 16, 4)])
def test_sortlsh_blocks_are_the_papers_when_n_is_not_a_multiple_of_the_block(Hq, Hk, nq, nk, b):
    """Sampling off: the output is exactly the paper's block-diagonal attention in sorted order, with sorted
    query blocks of block_size lined up with the key blocks (N = 20, b = 8: query ranks 0-7, 8-15, 16-19
    meet key ranks 0-7, 8-15, 16-19). Failed before (1.08 off at N = 20, b = 8): the sorted queries were
    cut into equal blocks of ceil(N / n_blocks) = 7."""
    q, k, v = _qkv(2, Hq, Hk, nq, nk, seed=3)
    nblocks = -(-nk // b)
    qbs = b if nq == nk else -(-nq // b) * b // nblocks
    assert nq == nk or (-(-nq // b) * b) % nblocks == 0  # cross cases where the official code runs
    want = _masked_softmax_attention(q, k, v, _sortlsh_mask(q, k, b, qbs, 3, 5), 0.4)
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism="hyperattention", scale=0.4, backend=backend, block_size=b,
                                sample_size=0, lsh_num_projs=3, min_seq_len=2, seed=5)
        assert_close(got, want, torch.float64, f"sortLSH blocks ({backend})")


def test_causal_recursion_uses_aligned_blocks():
    """N = 24, b = 8, leaves of 6 (exact causal): the recursion written out as one mask, top-level
    off-diagonal (12 queries x 12 keys, not a multiple of 8) by the paper's sortLSH mask, the next level's
    6 x 6 off-diagonals as one block (b >= 6). Failed before: that 12 x 12 block used query blocks of 6."""
    q, k, v = _qkv(1, 2, 2, 24, 24, seed=8)

    def mask(qq, kk, causal):
        n = qq.shape[2]
        if causal and n <= 6:
            return torch.ones(n, n, dtype=torch.bool).tril().expand(1, 2, n, n)
        if not causal:  # 12 x 12 with b = 8, or 6 x 6 (one block of 6: every key)
            return _sortlsh_mask(qq, kk, min(8, n), min(8, n), 3, 0)
        h = n // 2
        M = torch.zeros(1, 2, n, n, dtype=torch.bool)
        M[..., :h, :h] = mask(qq[:, :, :h], kk[:, :, :h], True)
        M[..., h:, h:] = mask(qq[:, :, h:], kk[:, :, h:], True)
        M[..., h:, :h] = mask(qq[:, :, h:], kk[:, :, :h], False)
        return M

    want = _masked_softmax_attention(q, k, v, mask(q, k, True), 0.5)
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism="hyperattention", causal=True, scale=0.5, backend=backend,
                                block_size=8, sample_size=0, lsh_num_projs=3, min_seq_len=6)
        assert_close(got, want, torch.float64, f"causal recursion ({backend})")


def test_default_block_size_at_n_4100():
    """The defaults (b = 256, 7 projections) at N = 4100, sampling off: 17 key blocks, the last of 4 keys,
    and the 4 queries of the last sorted ranks with them (before: 46% of queries met a key block not holding
    their rank, and the last 228 shared the block of 4 keys). Written out block by block in sorted order."""
    q, k, v = _qkv(1, 1, 1, 4100, 4100, d=16, dv=4, seed=2)
    got = attnzoo.attention(q, k, v, mechanism="hyperattention", backend="fast", sample_size=0)
    qo = torch.sort(lsh_hash(q, 7, 0)[0, 0], stable=True).indices
    ko = torch.sort(lsh_hash(k, 7, 0)[0, 0], stable=True).indices
    want = torch.empty(4100, 4, dtype=torch.float64)
    for s in range(0, 4100, 256):
        qi, kj = qo[s : s + 256], ko[s : s + 256]
        want[qi] = torch.softmax(q[0, 0, qi] @ k[0, 0, kj].T / 4.0, -1) @ v[0, 0, kj]
    assert_close(got[0, 0], want, torch.float64, "defaults at N = 4100")


def test_error_falls_as_sample_size_grows():
    """Monte-Carlo (fixed seeds): the mean relative error over 4 seeds decreases with m (random scores are
    diffuse, the hard case for HyperAttention, so the errors themselves are large)."""
    q, k, v = _qkv(1, 2, 2, 256, 256, d=16, dv=8, seed=9)
    q, k = q * 1.5, k * 1.5  # a little peakier than N(0,1) scores
    exact = softmax_attention(q, k, v)
    errs = []
    for m in (8, 32, 128, 240):
        e = [rel_err(_run(q, k, v, "fast", block_size=16, sample_size=m, seed=s), exact) for s in range(4)]
        errs.append(sum(e) / len(e))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.5 * errs[0], errs
    no_residual = rel_err(_run(q, k, v, "fast", block_size=16, sample_size=0), exact)
    assert errs[-1] < no_residual


def test_lsh_buckets_are_gray_code_ordered():
    # bucket of sign pattern b is the b-th entry of the reflected Gray sequence 0,1,3,2,6,7,5,4
    gray = [0, 1, 3, 2, 6, 7, 5, 4]
    torch.manual_seed(0)
    x = torch.randn(200, 5, dtype=torch.float64)
    h = lsh_hash(x, 3, seed=2)
    proj = torch.randn(5, 3, generator=torch.Generator().manual_seed(2 * 1_000_003 % (2 ** 63)),
                       dtype=torch.float64)
    bits = (x @ proj > 0).long()
    b = bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2]
    assert h.tolist() == [gray[i] for i in b.tolist()]


def test_causal_reads_no_later_keys_but_depends_on_later_queries():
    """The documented limitation behind prefix_invariant=False."""
    q, k, v = _qkv(1, 2, 2, 32, 32, seed=6)
    opts = {"block_size": 4, "sample_size": 5}
    base = _run(q, k, v, "fast", True, **opts)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 3.0
    v2[:, :, 20:] -= 2.0
    assert (base[:, :, :20] - _run(q, k2, v2, "fast", True, **opts)[:, :, :20]).abs().max() < 1e-12
    q2 = q.clone()
    q2[:, :, 20:] = torch.randn_like(q2[:, :, 20:])
    assert (base[:, :, :20] - _run(q2, k, v, "fast", True, **opts)[:, :, :20]).abs().max() > 1e-6
    assert not attnzoo.get("hyperattention").prefix_invariant


def test_causal_cross_raises():
    q, k, v = _qkv(1, 2, 2, 3, 9)
    with pytest.raises(ValueError, match="causal_cross"):
        attnzoo.attention(q, k, v, mechanism="hyperattention", causal=True)


def test_official_defaults():
    opts = attnzoo.get("hyperattention").resolve_options({})
    assert (opts["lsh_num_projs"], opts["block_size"], opts["sample_size"], opts["min_seq_len"]) == (7, 256, 256, 4096)


def test_hf_layout_views_with_block_multiple_lengths():
    """Regression: q/k/v as (B, N, H, D).transpose(1, 2) views (Hugging Face's layout) whose exact leaves
    need no padding (N a multiple of the row block) used to fail in a .view of the exact leaf."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 512, h, 16, generator=g, dtype=torch.float64) for h in (6, 2, 2))
    opts = dict(block_size=32, sample_size=32, min_seq_len=256, lsh_num_projs=3)  # causal leaves: 2 row blocks
    views = [t.transpose(1, 2) for t in (q, k, v)]
    dense = [t.contiguous() for t in views]
    for causal in (True, False):
        got = attnzoo.attention(*views, mechanism="hyperattention", causal=causal, **opts)
        want = attnzoo.attention(*dense, mechanism="hyperattention", causal=causal, **opts)
        assert torch.equal(got, want)
