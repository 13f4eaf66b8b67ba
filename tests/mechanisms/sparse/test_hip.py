"""Oracles for HiP attention, hierarchically pruned attention (CATALOG P103)."""

import math

import pytest
import torch

import attnzoo
from attnzoo import testing
from attnzoo.mechanisms.sparse.hip import hip_select
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

OPTS = {"topk": 6, "block_size_q": 4, "block_size_k": 2, "sliding_window": 3, "sinks": 2, "query_stride": 2}


def _qkv(B, Hq, Hk, nq, nk, d=6, dv=4, seed=0, grad=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hk, nk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hk, nk, dv, generator=g, dtype=torch.float64).to(dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _mask(B, n, seed=2):
    m = torch.rand(B, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    m[:, 0] = True
    return m


SHAPES = [(2, 2, 1, 1, True), (4, 2, 63, 63, True), (2, 1, 65, 65, False), (2, 2, 7, 30, True), (2, 2, 7, 7, False)]


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("Hq,Hk,nq,nk,causal", SHAPES)
def test_topk_covering_every_key_is_exact(backend, Hq, Hk, nq, nk, causal):
    q, k, v = _qkv(2, Hq, Hk, nq, nk)
    kpm = _mask(2, nk)
    want = softmax_attention(q, k, v, causal=causal, key_padding_mask=kpm)
    got = attnzoo.attention(q, k, v, mechanism="hip", causal=causal, key_padding_mask=kpm, backend=backend,
                            **{**OPTS, "topk": nk, "sinks": 0, "sliding_window": 0})
    assert_close(got, want, torch.float64, f"hip topk >= Nk ({backend})")


FAST = [(4, 2, 63, 63, True, "minmax"), (2, 2, 65, 65, False, "exact"), (2, 1, 9, 70, True, "minmax"),
        (2, 2, 64, 64, True, "exact")]


@pytest.mark.parametrize("Hq,Hk,nq,nk,causal,rep", FAST)
@pytest.mark.parametrize("masked", [False, True])
def test_fast_equals_reference_outputs_and_gradients(Hq, Hk, nq, nk, causal, rep, masked):
    q, k, v = _qkv(2, Hq, Hk, nq, nk, seed=3, grad=True)
    kpm = _mask(2, nk, seed=4) if masked else None
    kw = dict(mechanism="hip", causal=causal, key_padding_mask=kpm, representative=rep, **OPTS)
    ref = attnzoo.attention(q, k, v, backend="reference", **kw)
    fast = attnzoo.attention(q, k, v, backend="fast", **kw)
    assert_close(fast, ref, torch.float64, "fast vs reference")
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b, torch.float64, f"gradient of {name}")


def test_fast_float32_and_gradcheck_with_query_blocks():
    q, k, v = _qkv(1, 2, 1, 40, 40, dtype=torch.float32)
    ref = attnzoo.attention(q, k, v, mechanism="hip", causal=True, backend="reference", **OPTS)
    fast = attnzoo.attention(q, k, v, mechanism="hip", causal=True, backend="fast", **OPTS)
    assert_close(fast, ref, torch.float32, "float32")
    q, k, v = (t[:, :, :13].double().detach().requires_grad_(True) for t in (q, k, v))
    fn = lambda q, k, v: attnzoo.attention(q, k, v, mechanism="hip", causal=True, backend="fast",
                                           **{**OPTS, "topk": 2, "sliding_window": 2})
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def _tree_search_by_hand(q_rows, keys, n_blk, kb, bk):
    """The official v1.1 iteration written with Python lists for one query block and head."""
    starts = [int(n_blk * i / kb) for i in range(kb)]
    sizes = [int(n_blk * (i + 1) / kb) - int(n_blk * i / kb) for i in range(kb)]
    group = n_blk / kb
    while group > 1:
        cand = []
        for s, z in zip(starts, sizes):
            cand += [(s, z // 2), (s + z // 2, z - z // 2)]
        scored = []
        for c, (s, z) in enumerate(cand):
            if z < 1:
                sc = -math.inf
            else:  # official min/max summary of the representative (first) key block of the half
                block = keys[s * bk:(s + 1) * bk]
                kmin, kmax = block.min(dim=0).values, block.max(dim=0).values
                sc = max(max(float(q @ kmin), float(q @ kmax)) for q in q_rows)
            scored.append((-sc, c))
        keep = [c for _, c in sorted(scored)[:kb]]
        starts, sizes = [cand[c][0] for c in keep], [cand[c][1] for c in keep]
        group /= 2
    return sorted(starts)


def test_tree_search_matches_a_hand_written_iteration():
    q, k, _ = _qkv(1, 1, 1, 44, 44, seed=5)
    bq, bk, topk, sw, stride = 4, 2, 6, 3, 2
    p = hip_select(q, k, None, causal=True, topk=topk, block_size_q=bq, block_size_k=bk, sliding_window=sw,
                   sinks=0, query_stride=stride)
    kb = 3
    checked = 0
    for h in range(1):
        for b in range(44 // bq):
            end = (b + 1) * bq
            search_end = max(0, min(end - sw, b * bq)) // bk * bk
            n_blk = -(-search_end // bk)
            if n_blk <= kb:
                continue
            rows = q[0, h, b * bq:end][stride - 1::stride]
            want = _tree_search_by_hand(rows, k[0, h, :search_end], n_blk, kb, bk)
            assert p.blocks[0, h, b].tolist() == want, (h, b)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_monotone_keys_find_the_true_top_k_blocks(direction):
    n, d, bk, topk = 64, 4, 4, 12
    pos = torch.arange(n, dtype=torch.float64) / n
    k = torch.zeros(1, 1, n, d, dtype=torch.float64)
    k[0, 0, :, 0] = direction * pos  # q . k_j is monotone in j
    q = torch.zeros(1, 1, n, d, dtype=torch.float64)
    q[0, 0, :, 0] = 1.0
    p = hip_select(q, k, None, causal=True, topk=topk, block_size_q=1, block_size_k=bk, sliding_window=0,
                   sinks=0, query_stride=1)
    for i in range(20, n):
        search_end = i // bk * bk  # block of one query at position i; whole key blocks before i
        n_blk = -(-search_end // bk)
        block_max = [max(direction * j / n for j in range(b * bk, min((b + 1) * bk, search_end)))
                     for b in range(n_blk)]
        true_top = sorted(sorted(range(n_blk), key=lambda b: (-block_max[b], b))[:topk // bk])
        assert p.blocks[0, 0, i].tolist() == true_top, i


def test_sparse_when_topk_small():
    q, k, v = _qkv(1, 2, 2, 64, 64)
    out = attnzoo.attention(q, k, v, mechanism="hip", causal=True, **OPTS)
    assert (out - softmax_attention(q, k, v, causal=True)).abs().max() > 1e-3


def test_query_blocks_read_no_later_keys():
    q, k, v = _qkv(1, 2, 2, 40, 40, seed=6)
    base = attnzoo.attention(q, k, v, mechanism="hip", causal=True, **OPTS)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 23:] += 2.0
    v2[:, :, 23:] -= 1.0
    out = attnzoo.attention(q, k2, v2, mechanism="hip", causal=True, **OPTS)
    assert (base[:, :, :23] - out[:, :, :23]).abs().max() < 1e-12


def test_single_query_blocks_are_prefix_invariant_larger_blocks_are_not():
    mech = attnzoo.get("hip")
    assert mech.test_options["block_size_q"] == 1 and not mech.prefix_invariant
    for pattern in ("causal_self", "causal_cross"):
        testing.check_prefix_invariance(mech, pattern)  # the conformance check, with block_size_q = 1
    q, k, v = _qkv(1, 2, 2, 40, 40, seed=9)
    base = attnzoo.attention(q, k, v, mechanism="hip", causal=True, **OPTS)  # block_size_q = 4
    q2 = q.clone()
    q2[:, :, 21:24] *= -3.0  # later queries of the block holding query 20
    moved = attnzoo.attention(q2, k, v, mechanism="hip", causal=True, **OPTS)
    assert (base[:, :, 20] - moved[:, :, 20]).abs().max() > 1e-6


def test_decode_token_by_token_equals_forward_with_single_query_blocks():
    q, k, v = _qkv(2, 4, 2, 40, 40, seed=7)
    opts = {**OPTS, "block_size_q": 1, "refresh_interval": 1}
    mech = attnzoo.get("hip")
    full = attnzoo.attention(q, k, v, mechanism="hip", causal=True, **opts)
    o = mech.resolve_options(opts)
    state = mech.init_state(batch=2, kv_heads=2, head_dim=6, value_dim=4, dtype=q.dtype, device=q.device, **o)
    outs, t = [], 0
    for size in (25, 1, 1, 6, 1, 7):
        sl = slice(t, t + size)
        outs.append(mech.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, scale=1 / math.sqrt(6), **o))
        t += size
    assert_close(torch.cat(outs, 2), full, torch.float64, "chunked prefill + decode vs causal forward")


def test_official_defaults_and_errors():
    o = attnzoo.get("hip").resolve_options({})
    assert (o["topk"], o["block_size_q"], o["block_size_k"], o["sliding_window"], o["sinks"], o["query_stride"],
            o["representative"], o["refresh_interval"]) == (512, 32, 8, 128, 4, 2, "minmax", 8)
    q, k, v = _qkv(1, 2, 2, 3, 9)
    with pytest.raises(ValueError, match="noncausal_cross"):
        attnzoo.attention(q, k, v, mechanism="hip")
    with pytest.raises(ValueError, match="block_size_k"):
        attnzoo.attention(q, k, v, mechanism="hip", causal=True, block_size_k=0)


@pytest.mark.parametrize("causal", [True, False])
def test_default_topk_beyond_the_sequence_is_exact(causal):
    """Regression: the defaults (topk 512) on 256 tokens left selection slots past the last key block, which
    the gather indexed out of range; topk >= the searchable keys is exact attention."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 256, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 256, 16, generator=g, dtype=torch.float64) for _ in range(2))
    got = attnzoo.attention(q, k, v, mechanism="hip", causal=causal)
    want = softmax_attention(q, k, v, causal=causal)
    assert (got - want).abs().max().item() < 1e-12


def test_hip_cache_block_summaries_equal_recomputed_ones_after_crop_and_reorder():
    """HipCache keeps the min/max representatives of every complete key block as blocks complete; they equal
    the min/max over the cached keys (padded keys left out), also after crop and reorder."""
    from attnzoo.mechanisms.sparse.hip import HipCache

    bk = 3
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, 2, 40, 5, generator=g, dtype=torch.float64)
    m = torch.rand(2, 40, generator=g) > 0.3
    st = HipCache(2, 2, 5, 5, block_size_k=bk, dtype=torch.float64)

    def check():
        keys, mask = st.keys, st.mask
        n = keys.shape[2] // bk
        assert st.n_rep == n
        kk = keys[:, :, : n * bk].reshape(2, 2, n, bk, 5)
        ok = mask[:, : n * bk].reshape(2, 1, n, bk, 1)
        kmin = torch.where(ok, kk, torch.inf).amin(3)
        kmax = torch.where(ok, kk, -torch.inf).amax(3)
        any_ok = ok.any(3).expand(2, 2, n, 1)
        rep, rep_ok, _ = st.summaries()
        assert torch.equal(rep_ok[:, :, :n], any_ok.expand(2, 2, n, 2))
        for j, want in enumerate((kmin, kmax)):
            assert torch.equal(torch.where(any_ok, rep[:, :, :n, j], 0), torch.where(any_ok, want, 0))

    t = 0
    for size in (7, 1, 1, 1, 5, 2, 1):
        st.append(k[:, :, t: t + size], k[:, :, t: t + size], m[:, t: t + size])
        t += size
        check()
    st.crop(10)
    check()
    st.append(k[:, :, 30:35], k[:, :, 30:35], m[:, 30:35])
    check()
    st.reorder(torch.tensor([1, 1]))
    check()
    keys, values = st.whole_blocks()
    assert keys.shape[2] % bk == 0 and torch.isfinite(keys).all() and torch.isfinite(values).all()


@pytest.mark.parametrize("masked", [False, True])
def test_decode_with_default_query_blocks_searches_for_the_one_new_query(masked):
    """A one-token step with block_size_q > 1 (the defaults' 32) is the forward of that one query over the
    cache: the step's cached summaries and whole-block views give the same output as hip_fast."""
    from attnzoo.mechanisms.sparse.hip import hip_fast

    opts = {**OPTS, "block_size_q": 8, "topk": 4, "sliding_window": 2, "refresh_interval": 1}
    mech = attnzoo.get("hip")
    o = mech.resolve_options(opts)
    q, k, v = _qkv(2, 4, 2, 60, 60, seed=11)
    mask = _mask(2, 60) if masked else None
    state = mech.init_state(batch=2, kv_heads=2, head_dim=6, value_dim=4, dtype=q.dtype, device=q.device, **o)
    mech.step(q[:, :, :41], k[:, :, :41], v[:, :, :41], state, scale=0.3,
              key_padding_mask=None if mask is None else mask[:, :41], **o)
    for t in range(41, 60):
        got = mech.step(q[:, :, t: t + 1], k[:, :, t: t + 1], v[:, :, t: t + 1], state, scale=0.3,
                        key_padding_mask=None if mask is None else mask[:, t: t + 1], **o)
        want = hip_fast(q[:, :, t: t + 1], k[:, :, : t + 1], v[:, :, : t + 1], causal=True, scale=0.3,
                        key_padding_mask=None if mask is None else mask[:, : t + 1], **o)
        assert_close(got, want, torch.float64, f"step {t}")


# -- mask re-use across decode steps (refresh_interval) -------------------------------------------------------------

REUSE = {**OPTS, "block_size_q": 4, "topk": 4, "sliding_window": 3}  # kb = 2 selected blocks of bk = 2 keys


def _state(mech, o, B=2, Hk=2, dtype=torch.float64):
    return mech.init_state(batch=B, kv_heads=Hk, head_dim=6, value_dim=4, dtype=dtype, device="cpu", **o)


def _one_query_search_end(pos, sw, bk):
    """Search end of a one-query block at key position ``pos`` (the decode geometry): whole key blocks ending
    ``sw`` keys before the query (and before the query itself)."""
    return max(0, min(pos + 1 - sw, pos)) // bk * bk


def _reused_reference(q, k, v, mask, t, r, o, scale):
    """Query ``t`` attending, by a dense masked softmax over keys 0..t, to exactly: the first ``sinks`` keys, the
    key blocks the tree search selected for query ``r`` (the last refresh, r <= t) over keys 0..r, and the local
    window of query ``t``, [search end of t, t]."""
    B, Hq = q.shape[:2]
    bk, sw, S = o["block_size_k"], o["sliding_window"], o["sinks"]
    p = hip_select(q[:, :, r: r + 1], k[:, :, : r + 1], None if mask is None else mask[:, : r + 1], causal=True,
                   topk=o["topk"], block_size_q=o["block_size_q"], block_size_k=bk, sliding_window=sw, sinks=S,
                   query_stride=o["query_stride"], representative=o["representative"])
    lo = _one_query_search_end(t, sw, bk)
    m = torch.zeros(B, Hq, 1, t + 1, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for blk, ok in zip(p.blocks[b, h, 0].tolist(), p.valid[b, h, 0].tolist()):
                if ok:
                    assert (blk + 1) * bk <= lo  # a kept block lies before the window of every later query
                    m[b, h, 0, blk * bk: (blk + 1) * bk] = True
    m[..., :S] = True
    m[..., lo: t + 1] = True
    if mask is not None:
        m &= mask[:, : t + 1].view(B, 1, 1, t + 1)
    return softmax_attention(q[:, :, t: t + 1], k[:, :, : t + 1], v[:, :, : t + 1], attn_mask=m, scale=scale)


def test_refresh_interval_one_searches_every_token_and_keeps_nothing():
    from attnzoo.mechanisms.sparse.hip import hip_fast

    mech = attnzoo.get("hip")
    o = mech.resolve_options({**REUSE, "refresh_interval": 1})
    q, k, v = _qkv(2, 4, 2, 50, 50, seed=12)
    state = _state(mech, o)
    mech.step(q[:, :, :30], k[:, :, :30], v[:, :, :30], state, scale=0.4, **o)
    for t in range(30, 50):
        got = mech.step(q[:, :, t: t + 1], k[:, :, t: t + 1], v[:, :, t: t + 1], state, scale=0.4, **o)
        want = hip_fast(q[:, :, t: t + 1], k[:, :, : t + 1], v[:, :, : t + 1], causal=True, scale=0.4,
                        key_padding_mask=None, **o)
        assert_close(got, want, torch.float64, f"interval 1, step {t}")
        assert state.selection() is None and state.mask_age == 0


@pytest.mark.parametrize("interval", [2, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_steps_between_refreshes_attend_the_kept_blocks_sinks_and_their_own_window(interval, masked):
    """Each one-token step equals the dense masked softmax over (blocks selected at the last refresh | sinks |
    its own local window); refreshes happen at the first one-token step after the prefill and then every
    ``interval`` steps, and the kept selection changes only then."""
    mech = attnzoo.get("hip")
    o = mech.resolve_options({**REUSE, "refresh_interval": interval})
    B, n, P = 2, 72, 30
    q, k, v = _qkv(B, 4, 2, n, n, seed=13)
    mask = _mask(B, n, seed=5) if masked else None
    state = _state(mech, o, B)
    mech.step(q[:, :, :P], k[:, :, :P], v[:, :, :P], state, scale=0.4,
              key_padding_mask=None if mask is None else mask[:, :P], **o)
    assert state.selection() is None  # a multi-token step keeps nothing: the next step refreshes
    stale, kept, kept_copy = 0, None, None
    for t in range(P, n):
        got = mech.step(q[:, :, t: t + 1], k[:, :, t: t + 1], v[:, :, t: t + 1], state, scale=0.4,
                        key_padding_mask=None if mask is None else mask[:, t: t + 1], **o)
        r = P + (t - P) // interval * interval  # the last refresh
        assert state.mask_age == t - r + 1, t
        blocks, valid = state.selection()
        if t == r:  # a search ran for this query: its selection is kept
            sel = hip_select(q[:, :, t: t + 1], k[:, :, : t + 1], None if mask is None else mask[:, : t + 1],
                             causal=True, topk=o["topk"], block_size_q=o["block_size_q"],
                             block_size_k=o["block_size_k"], sliding_window=o["sliding_window"], sinks=o["sinks"],
                             query_stride=o["query_stride"], representative=o["representative"])
            assert torch.equal(blocks, sel.blocks[:, :, 0]) and torch.equal(valid, sel.valid[:, :, 0]), t
        else:  # unchanged since the refresh
            assert blocks is kept[0] and valid is kept[1] and torch.equal(blocks, kept_copy), t
        kept, kept_copy = (blocks, valid), blocks.clone()
        want = _reused_reference(q, k, v, mask, t, r, o, 0.4)
        assert_close(got, want, torch.float64, f"interval {interval}, step {t} (refresh at {r})")
        fresh = _reused_reference(q, k, v, mask, t, t, o, 0.4)  # what searching at this step would give
        stale += int((want - fresh).abs().max() > 1e-6)
    assert stale >= 5  # the re-used selection differs from a fresh search at many steps: the oracle can fail


def test_a_multi_token_step_between_refreshes_searches_and_the_next_token_refreshes():
    from attnzoo.mechanisms.sparse.hip import hip_fast

    mech = attnzoo.get("hip")
    o = mech.resolve_options({**REUSE, "refresh_interval": 4})
    q, k, v = _qkv(2, 4, 2, 60, 60, seed=14)
    state = _state(mech, o)
    step = lambda a, b: mech.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, scale=0.4, **o)  # noqa: E731
    step(0, 30)
    for t in range(30, 36):  # refreshes at 30 and 34
        step(t, t + 1)
    assert state.mask_age == 2
    got = step(36, 40)  # a chunk: the forward of its queries over the cache, as with interval 1
    want = hip_fast(q[:, :, 36:40], k[:, :, :40], v[:, :, :40], causal=True, scale=0.4, key_padding_mask=None, **o)
    assert_close(got, want, torch.float64, "chunk between refreshes")
    assert state.selection() is None and state.mask_age == 0
    for t in range(40, 47):  # refreshes at 40 and 44
        got = step(t, t + 1)
        r = 40 + (t - 40) // 4 * 4
        assert state.mask_age == t - r + 1
        assert_close(got, _reused_reference(q, k, v, None, t, r, o, 0.4), torch.float64, f"step {t}")


def test_reorder_permutes_the_kept_selection_with_the_batch():
    """Reordering mid-interval (after a refresh and one re-using step) and decoding on == decoding the reordered
    batch from the start: the kept blocks follow their rows (beam search duplicates a row)."""
    mech = attnzoo.get("hip")
    o = mech.resolve_options({**REUSE, "refresh_interval": 4})
    q, k, v = _qkv(3, 4, 2, 50, 50, seed=15)
    mask = _mask(3, 50, seed=6)
    idx = torch.tensor([2, 0, 0])

    def run(state, qq, kk, vv, mm, a, b):
        return mech.step(qq[:, :, a:b], kk[:, :, a:b], vv[:, :, a:b], state, scale=0.4, key_padding_mask=mm[:, a:b],
                         **o)

    state = _state(mech, o, 3)
    run(state, q, k, v, mask, 0, 30)
    for t in (30, 31):
        run(state, q, k, v, mask, t, t + 1)
    before = state.selection()[0].clone()
    state.reorder(idx)
    assert torch.equal(state.selection()[0], before[idx]) and state.mask_age == 2
    qr, kr, vr, mr = q[idx], k[idx], v[idx], mask[idx]
    ref = _state(mech, o, 3)
    run(ref, qr, kr, vr, mr, 0, 30)
    for t in (30, 31):
        run(ref, qr, kr, vr, mr, t, t + 1)
    for t in range(32, 42):  # two re-using steps, a refresh at 34, ...
        got = run(state, qr, kr, vr, mr, t, t + 1)
        want = run(ref, qr, kr, vr, mr, t, t + 1)
        assert_close(got, want, torch.float64, f"after reorder, step {t}")
        assert state.mask_age == ref.mask_age and torch.equal(state.selection()[0], ref.selection()[0])
        r = 30 + (t - 30) // 4 * 4
        assert_close(got, _reused_reference(qr, kr, vr, mr, t, r, o, 0.4), torch.float64, f"reference, step {t}")


def test_crop_discards_the_kept_selection_and_the_next_step_refreshes():
    from attnzoo.mechanisms.sparse.hip import hip_fast

    mech = attnzoo.get("hip")
    o = mech.resolve_options({**REUSE, "refresh_interval": 4})
    q, k, v = _qkv(2, 4, 2, 50, 50, seed=16)
    q2, k2, v2 = _qkv(2, 4, 2, 50, 50, seed=17)  # another continuation after the crop
    state = _state(mech, o)
    mech.step(q[:, :, :30], k[:, :, :30], v[:, :, :30], state, scale=0.4, **o)
    for t in range(30, 33):
        mech.step(q[:, :, t: t + 1], k[:, :, t: t + 1], v[:, :, t: t + 1], state, scale=0.4, **o)
    assert state.mask_age == 3
    state.crop(31)
    assert state.selection() is None and state.mask_age == 0
    kk, vv = torch.cat([k[:, :, :31], k2[:, :, 31:]], 2), torch.cat([v[:, :, :31], v2[:, :, 31:]], 2)
    for t in range(31, 40):  # refreshes at 31 and 35
        got = mech.step(q2[:, :, t: t + 1], k2[:, :, t: t + 1], v2[:, :, t: t + 1], state, scale=0.4, **o)
        r = 31 + (t - 31) // 4 * 4
        assert state.mask_age == t - r + 1
        if t == 31:
            want = hip_fast(q2[:, :, 31:32], kk[:, :, :32], vv[:, :, :32], causal=True, scale=0.4,
                            key_padding_mask=None, **o)
            assert_close(got, want, torch.float64, "first step after the crop: a fresh search")
        assert_close(got, _reused_reference(q2, kk, vv, None, t, r, o, 0.4), torch.float64, f"step {t}")


def test_refresh_interval_reaches_the_module_step():
    mech = attnzoo.get("hip")
    layer = attnzoo.build("hip", 24, 4, causal=True, **{**REUSE, "refresh_interval": 3}).double().eval()
    x = torch.randn(1, 40, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    state = layer.init_state(1)
    with torch.no_grad():
        _, state = layer(x[:, :30], state=state)
        ages = []
        for t in range(30, 37):
            _, state = layer(x[:, t: t + 1], state=state)
            ages.append(state.mask_age)
    assert ages == [1, 2, 3, 1, 2, 3, 1]
    assert mech.resolve_options({})["refresh_interval"] == 8


def test_bad_refresh_interval_is_refused():
    from attnzoo.errors import OptionError
    from attnzoo.state import KVCache

    mech = attnzoo.get("hip")
    for bad in (0, -2, True, 1.5, "8"):
        with pytest.raises((OptionError, TypeError), match="refresh_interval"):
            mech.resolve_options({"refresh_interval": bad})
    with pytest.raises(ValueError, match="refresh_interval"):
        attnzoo.build("hip", 24, 4, causal=True, refresh_interval=0)
    o = mech.resolve_options(REUSE)
    q, k, v = _qkv(2, 4, 2, 1, 1)
    for bad, err in ((0, ValueError), (True, TypeError), (2.0, TypeError)):
        state = _state(mech, o)
        with pytest.raises(err, match="refresh_interval"):
            mech.step(q, k, v, state, scale=0.4, **{**o, "refresh_interval": bad})
        assert state.seq_len == 0  # refused before anything was appended
    plain = KVCache(2, 2, 6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="refresh_interval.*HipCache"):
        mech.step(q, k, v, plain, scale=0.4, **o)
    assert plain.seq_len == 0
    other = _state(mech, {**o, "block_size_k": 4})
    with pytest.raises(ValueError, match="refresh_interval.*block_size_k=4"):
        mech.step(q, k, v, other, scale=0.4, **o)
    out = mech.step(q, k, v, plain, scale=0.4, **{**o, "refresh_interval": 1})  # interval 1: any KV cache
    assert out.shape == (2, 4, 1, 4)
