"""S2-Attention oracles: the block pattern against DKernel's formula written out by hand, the union of heads
covers every causal block, vert_stride = 1 / local window >= N is dense causal attention, the block-sparse
kernel == dense masked reference (outputs, gradients, GQA, dense heads, padding, cross lengths), gradcheck,
no N x N intermediate, and decoding == causal forward with a cache that keeps only the visible blocks."""

import math

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.local.s2_attention import S2Cache, s2_fast, s2_mask
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

MECH = "s2_attention"
BASE = dict(num_dense_heads=0, head_sliding_step=None, head_sliding_offset=0, homo_head=False)


def qkv(B, Hq, Hk, Nq, Nk, D=8, Dv=None, seed=0, grad=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    return tuple(torch.randn(B, h, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
                 for h, n, d in ((Hq, Nq, D), (Hk, Nk, D), (Hk, Nk, Dv)))


def dkernel_block_mask(heads, blocks, L, V, step, offset=0, dense=0):
    """DKernel's get_sparse_attn_mask, written as loops."""
    m = torch.zeros(heads, blocks, blocks, dtype=torch.bool)
    for h in range(heads):
        for qb in range(blocks):
            for kb in range(qb + 1):
                m[h, qb, kb] = h >= heads - dense or qb - kb < L or (kb + h * step + offset) % V == 0
    return m


@pytest.mark.parametrize("heads,L,V,offset,dense", [(4, 2, 4, 0, 0), (2, 1, 8, 3, 0), (8, 3, 4, 1, 2)])
def test_block_pattern_is_dkernels(heads, L, V, offset, dense):
    b, blocks = 3, 9
    n = b * blocks - 2  # a partial last block
    got = s2_mask(heads, heads, n, n, block_size=b, local_blocks=L, vert_stride=V, num_dense_heads=dense,
                  head_sliding_step=None, head_sliding_offset=offset, homo_head=False)[0]
    blk = dkernel_block_mask(heads, blocks, L, V, max(1, V // heads), offset, dense)
    want = torch.kron(blk.to(torch.int8), torch.ones(b, b, dtype=torch.int8)).bool()[:, :n, :n]
    want &= torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(got, want)


def test_hand_computed_heads_shard_the_context():
    # 4 heads, vertical stride 4, step 1, one local block: head h keeps the old blocks kb with (kb + h) % 4 == 0
    m = s2_mask(4, 4, 16, 16, block_size=2, local_blocks=1, vert_stride=4, **BASE)[0]
    last = m[:, 15]  # query 15 (block 7)
    assert torch.nonzero(last[0]).flatten().tolist() == [0, 1, 8, 9, 14, 15]  # blocks 0, 4 + own block 7
    assert torch.nonzero(last[1]).flatten().tolist() == [6, 7, 14, 15]  # block 3 + own
    assert torch.nonzero(last[2]).flatten().tolist() == [4, 5, 12, 13, 14, 15]  # blocks 2, 6 + own
    assert torch.nonzero(last[3]).flatten().tolist() == [2, 3, 10, 11, 14, 15]  # blocks 1, 5 + own
    # GQA: the pattern belongs to the key/value head; its query heads share it
    g = s2_mask(4, 2, 16, 16, block_size=2, local_blocks=1, vert_stride=4, **BASE)[0]
    assert torch.equal(g[0], g[1]) and torch.equal(g[2], g[3]) and not torch.equal(g[0], g[2])


def test_union_of_heads_covers_every_causal_key():
    for heads, V in ((8, 8), (8, 4), (16, 8)):
        m = s2_mask(heads, heads, 100, 100, block_size=4, local_blocks=2, vert_stride=V, **BASE)[0]
        assert torch.equal(m.any(dim=0), torch.ones(100, 100, dtype=torch.bool).tril()), (heads, V)


@pytest.mark.parametrize("opts", [dict(vert_stride=1, local_blocks=1, block_size=4),
                                  dict(vert_stride=8, local_blocks=9, block_size=4),
                                  dict(vert_stride=4, local_blocks=1, block_size=4, num_dense_heads=2)])
def test_dense_limits(opts):
    q, k, v = qkv(2, 4, 2, 33, 33)
    want = softmax_attention(q, k, v, causal=True)
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, backend=backend, **opts)
        assert_close(got, want, torch.float64, f"dense limit {opts} ({backend})")


CASES = [
    # n, Hq, Hk, block, L, V, extra options
    (1, 2, 1, 4, 1, 2, {}),
    (7, 4, 2, 2, 1, 2, {}),
    (63, 4, 4, 4, 2, 4, {}),
    (65, 6, 3, 4, 3, 3, {"num_dense_heads": 1}),
    (65, 4, 2, 8, 1, 4, {"homo_head": True, "head_sliding_offset": 2}),
    (130, 8, 4, 16, 2, 2, {"head_sliding_step": 3}),
]


@pytest.mark.parametrize("n,hq,hk,b,L,V,extra", CASES)
def test_fast_matches_reference(n, hq, hk, b, L, V, extra):
    q, k, v = qkv(2, hq, hk, n, n, Dv=5, grad=True, seed=n + b)
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.3
    opts = dict(mechanism=MECH, causal=True, block_size=b, local_blocks=L, vert_stride=V, key_padding_mask=kpm,
                **extra)
    ref = attnzoo.attention(q, k, v, backend="reference", **opts)
    got = attnzoo.attention(q, k, v, backend="fast", **opts)
    assert_close(got, ref, torch.float64, "output")
    g = torch.randn_like(ref)
    for a, c, name in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), "qkv"):
        assert_close(a, c, torch.float64, f"grad {name}")


@pytest.mark.parametrize("nq,nk", [(1, 37), (5, 37), (13, 40), (37, 20)])
def test_causal_cross_matches_reference(nq, nk):
    q, k, v = qkv(1, 4, 2, nq, nk, grad=True, seed=nq)
    opts = dict(mechanism=MECH, causal=True, block_size=4, local_blocks=2, vert_stride=3)
    ref = attnzoo.attention(q, k, v, backend="reference", **opts)
    got = attnzoo.attention(q, k, v, backend="fast", **opts)
    assert_close(got, ref, torch.float64, f"Nq={nq} Nk={nk}")
    g = torch.randn_like(ref)
    for a, c, name in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), "qkv"):
        assert_close(a, c, torch.float64, f"grad {name}")


def test_float32_and_bfloat16():
    q, k, v = qkv(1, 8, 8, 300, 300, D=16, seed=3)
    opts = dict(mechanism=MECH, causal=True, block_size=16, local_blocks=3, vert_stride=4)
    ref = attnzoo.attention(q, k, v, backend="reference", **opts)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = attnzoo.attention(*(t.to(dtype) for t in (q, k, v)), backend="fast", **opts)
        assert got.dtype == dtype
        assert_close(got.double(), ref, dtype, str(dtype), tol)


def test_gradcheck_fast():
    q, k, v = qkv(1, 2, 1, 11, 11, D=3, grad=True, seed=5)
    kpm = torch.ones(1, 11, dtype=torch.bool)
    kpm[0, 3] = False
    fn = lambda q, k, v: s2_fast(q, k, v, causal=True, key_padding_mask=kpm, scale=0.5, block_size=2, local_blocks=1,
                                 vert_stride=2, **BASE)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_fast_path_never_builds_n_by_n():
    n = 2048  # one head: the strided part scores N x N / vert_stride keys in total, in bounded tiles
    q, k, v = qkv(1, 1, 1, n, n, D=8, dtype=torch.float32, grad=True)
    biggest = 0

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    biggest = max(biggest, t.numel())
            return out

    with Watch():
        out = s2_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.3, block_size=16, local_blocks=2,
                      vert_stride=8, **BASE)
        out.sum().backward()
    assert biggest < n * n / 4, f"largest intermediate has {biggest} elements, N*N = {n * n}"


def run_decode(q, k, v, chunks, state, opts):
    mech = attnzoo.get(MECH)
    outs, t = [], 0
    for T in chunks:
        outs.append(mech.step(q[:, :, t : t + T], k[:, :, t : t + T], v[:, :, t : t + T], state, scale=8 ** -0.5,
                              **mech.resolve_options(opts)))
        t += T
    return torch.cat(outs, dim=2)


def test_decode_equals_causal_forward_and_keeps_only_visible_blocks():
    n, b, L, V = 97, 4, 2, 4
    opts = dict(block_size=b, local_blocks=L, vert_stride=V, num_dense_heads=1)
    q, k, v = qkv(2, 6, 3, n, n, Dv=5, seed=21)
    full = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, **opts)
    state = S2Cache(2, 3, 8, 5, dtype=q.dtype, block_size=b, local_blocks=L, vert_stride=V, num_dense_heads=1)
    got = run_decode(q, k, v, (30, 1, 1, 2, 1, 5, 1, 1, 40, 1, 1, 13), state, opts)
    assert_close(got, full, torch.float64, "decode vs causal forward")
    stored = state.stored_tokens()
    blocks = math.ceil(n / b)
    bound = math.ceil(blocks / V) * b + (L + 1) * b  # strided blocks + local window
    assert stored[0] <= bound and stored[1] <= bound, (stored, bound)
    assert stored[2] == n  # the dense head keeps everything
    assert stored[0] < n / 2
    full_cache_bytes = 2 * 3 * n * (8 + 5) * 8  # a KVCache of the whole sequence
    assert 0 < state.nbytes() < full_cache_bytes


def test_decode_crop_and_reorder():
    n = 60
    opts = dict(block_size=4, local_blocks=2, vert_stride=3)
    q, k, v = qkv(3, 2, 2, n, n, seed=22)
    full = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, **opts)
    state = S2Cache(3, 2, 8, dtype=q.dtype, extra=6, **opts)
    run_decode(q[:, :, :40], k[:, :, :40], v[:, :, :40], (40,), state, opts)
    run_decode(q[:, :, 40:45], k[:, :, 40:45], v[:, :, 40:45], (1,) * 5, state, opts)
    state.crop(40)
    got = run_decode(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], (20,), state, opts)
    assert_close(got, full[:, :, 40:], torch.float64, "after crop")
    with pytest.raises(ValueError, match="extra"):
        state.crop(20)
    idx = torch.tensor([1, 1, 0])
    state.reorder(idx)
    nxt = qkv(3, 2, 2, 1, 1, seed=23)
    out = run_decode(*nxt, (1,), state, opts)
    qq, kk, vv = (torch.cat([t[idx], x], dim=2) for t, x in zip((q, k, v), nxt))
    want = attnzoo.attention(qq, kk, vv, mechanism=MECH, causal=True, **opts)[:, :, -1:]
    assert_close(out, want, torch.float64, "after reorder")


def test_errors_name_the_argument():
    q, k, v = qkv(1, 4, 2, 10, 10)
    with pytest.raises(ValueError, match="noncausal_self"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=False)
    with pytest.raises(ValueError, match="num_dense_heads"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=True, num_dense_heads=3)
    with pytest.raises(ValueError, match="num_dense_heads"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=True, num_dense_heads=1, homo_head=True)
    with pytest.raises(ValueError, match="block_size"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=True, block_size=0)


def test_cache_slots_hold_exactly_the_visible_blocks_of_each_head():
    """The in-place per-head store (one buffer for the sparse heads, eviction once per block) holds, for every
    sparse head, exactly the tokens of its strided blocks and of the local window, in position order, with
    their own keys, values and padding mask; empty slots are never attended."""
    n, b, L, V = 75, 4, 2, 3
    opts = dict(block_size=b, local_blocks=L, vert_stride=V, num_dense_heads=1)
    q, k, v = qkv(2, 6, 3, n, n, Dv=5, seed=31)
    m = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) > 0.2
    state = S2Cache(2, 3, 8, 5, dtype=q.dtype, **opts)
    mech = attnzoo.get(MECH)
    t, outs = 0, []
    for T in (9, 1, 1, 1, 17, 1, 3, 1, 1, 1, 1, 20, 1, 1, 1, 15):
        outs.append(mech.step(q[:, :, t: t + T], k[:, :, t: t + T], v[:, :, t: t + T], state, scale=0.3,
                              key_padding_mask=m[:, t: t + T], **mech.resolve_options(opts)))
        t += T
        boundary = max(0, t // b - L + 1)
        keys, values, pos, mask = state.sparse.view()
        for x in range(state.n_sparse):
            want = [p for p in range(t) if p // b >= boundary or (p // b + state.shifts[x]) % V == 0]
            nx = state.sparse.n[x]
            assert pos[x, :nx].tolist() == want
            assert (pos[x, nx:] > t).all()
            idx = torch.tensor(want)
            assert torch.equal(keys[:, x, :nx], k[:, x, idx]) and torch.equal(values[:, x, :nx], v[:, x, idx])
            assert torch.equal(mask[:, x, :nx], m[:, idx])
        assert state.dense.n == [t]
    full = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, key_padding_mask=m, scale=0.3, **opts)
    rows = m.view(2, 1, n, 1)
    assert_close(torch.cat(outs, 2) * rows, full * rows, torch.float64, "padded decode vs causal forward")
