"""Oracles for Landmark Attention (P009)."""

import math

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.memory.landmark import (
    LandmarkAttention,
    init_landmark_cache,
    landmark_fast,
    landmark_reference,
    landmark_step,
)
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _qkv(B=2, Hq=4, Hk=2, nq=13, nk=13, D=5, Dv=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, nq, D, generator=g, dtype=F64).to(dtype)
    k = torch.randn(B, Hk, nk, D, generator=g, dtype=F64).to(dtype)
    v = torch.randn(B, Hk, nk, Dv, generator=g, dtype=F64).to(dtype)
    return q, k, v


def _dot(a, b):
    """q . k in Python floats (IEEE float64) by the selection-score rule: the products, zero-padded to a power
    of two, summed pairwise (first half + second half) until one is left."""
    p = [x * y for x, y in zip(a, b)]
    p += [0.0] * ((1 << max(0, (len(p) - 1).bit_length())) - len(p))
    while len(p) > 1:
        p = [p[i] + p[i + len(p) // 2] for i in range(len(p) // 2)]
    return p[0]


def _loop_oracle(q, k, v, scale, block_size, top_k=None, mask=None):
    """The grouped softmax written per query and head with Python loops over the block structure (scores
    from one matmul; selection, grouping and both softmaxes by hand). Blocks are ranked by the unscaled
    q . landmark key in float64 by the documented selection rule (:func:`_dot`, so exact ties are exact
    here too); Python's stable sort sends ties to the earlier block."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    period = block_size + 1
    q, k, v = q.double(), k.double(), v.double()
    S = (q @ k.repeat_interleave(Hq // Hk, 1).transpose(-1, -2) * scale).tolist()
    Q, K = q.tolist(), k.tolist()
    V = v.repeat_interleave(Hq // Hk, 1)
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=F64)
    for b in range(B):
        ok = lambda j, b=b: mask is None or bool(mask[b, j])
        for h in range(Hq):
            for i in range(Nq):
                s = S[b][h][i]
                p = i + Nk - Nq
                bq = p // period
                cur = [j for j in range(bq * period, p + 1) if j % period != block_size and ok(j)]
                lms = [bb for bb in range(bq) if ok(bb * period + block_size)]
                if top_k is not None:
                    qi, kh = Q[b][h][i], K[b][h // (Hq // Hk)]
                    lms = sorted(lms, key=lambda bb: -_dot(qi, kh[bb * period + block_size]))[:top_k]
                outer = [s[j] for j in cur] + [s[bb * period + block_size] for bb in lms]
                if not outer:
                    continue
                z = math.log(sum(math.exp(x) for x in outer))
                acc = sum(math.exp(s[j] - z) * V[b, h, j] for j in cur) if cur else 0
                for bb in lms:
                    w = math.exp(s[bb * period + block_size] - z)
                    toks = [j for j in range(bb * period, bb * period + block_size) if ok(j)]
                    if toks:
                        zi = math.log(sum(math.exp(s[j]) for j in toks))
                        acc = acc + w * sum(math.exp(s[j] - zi) * V[b, h, j] for j in toks)
                out[b, h, i] = acc
    return out


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tied_landmark_keys_select_the_same_blocks_on_every_path(dtype, monkeypatch):
    """Every landmark key identical (a single layer without positions): every score ties, and reference,
    fast (one tile and many), decode token by token and chunked prefill all retrieve the earliest blocks.
    Failed before the shared selection rule: einsum and matmul broke the ties differently."""
    import attnzoo.mechanisms.memory.landmark as lm

    N, bs, top_k = 47, 3, 2
    q, k, v = _qkv(nq=N, nk=N, dtype=dtype)
    k[:, :, bs :: bs + 1] = k[:, :, bs : bs + 1]  # every landmark key equal to the first one, bit for bit
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, 2 * (bs + 1) + bs] = False  # row 1: the landmark of block 2 cannot be retrieved
    mask[0, 5] = False
    kw = dict(scale=0.5, block_size=bs, top_k=top_k)
    want = _loop_oracle(q, k, v, 0.5, bs, top_k, mask)
    got = {"reference": landmark_reference(q, k, v, causal=True, key_padding_mask=mask, **kw),
           "fast": landmark_fast(q, k, v, causal=True, key_padding_mask=mask, **kw)}
    st = init_landmark_cache(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=dtype, device="cpu",
                             block_size=bs, top_k=top_k)
    got["step"] = torch.cat([landmark_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st,
                                           key_padding_mask=mask[:, t:t + 1], **kw) for t in range(N)], 2)
    st.crop(0)
    parts = [landmark_step(q[:, :, :17], k[:, :, :17], v[:, :, :17], st, key_padding_mask=mask[:, :17], **kw)]
    parts += [landmark_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st,
                            key_padding_mask=mask[:, t:t + 1], **kw) for t in range(17, N)]
    got["prefill + step"] = torch.cat(parts, 2)
    monkeypatch.setattr(lm, "rows_per_tile", lambda cost: 5)
    got["fast, tiles of 5 rows"] = landmark_fast(q, k, v, causal=True, key_padding_mask=mask, **kw)
    for name, out in got.items():
        assert_close(out, want.to(dtype), dtype, f"{name} with ties")


@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.parametrize("nq", [13, 4])
def test_matches_explicit_loop(top_k, nq):
    q, k, v = _qkv(Hq=2, Hk=1, nq=nq, nk=13)
    mask = torch.rand(2, 13, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[0, 7] = False  # the landmark of block 1 in row 0
    scale = 0.4
    for m in (None, mask):
        want = _loop_oracle(q, k, v, scale, 3, top_k, m)
        for fn in (landmark_reference, landmark_fast):
            got = fn(q, k, v, causal=True, key_padding_mask=m, scale=scale, block_size=3, top_k=top_k)
            assert_close(got, want, F64, f"{fn.__name__} top_k={top_k} mask={m is not None}")


@pytest.mark.parametrize("n", [1, 7, 12])
def test_one_block_is_exact_causal_attention(n):
    """block_size >= N: no landmark position exists, the grouped softmax is causal softmax."""
    q, k, v = _qkv(nq=n, nk=n)
    want = softmax_attention(q, k, v, causal=True)
    for fn in (landmark_reference, landmark_fast):
        got = fn(q, k, v, causal=True, key_padding_mask=None, scale=1 / math.sqrt(5), block_size=n, top_k=None)
        assert_close(got, want, F64, fn.__name__)


def test_top_k_all_blocks_equals_grouped_softmax():
    q, k, v = _qkv(nq=23, nk=23)
    full = landmark_reference(q, k, v, causal=True, key_padding_mask=None, scale=0.5, block_size=3, top_k=None)
    for fn in (landmark_reference, landmark_fast):
        got = fn(q, k, v, causal=True, key_padding_mask=None, scale=0.5, block_size=3, top_k=6)
        assert_close(got, full, F64, fn.__name__)
    fewer = landmark_reference(q, k, v, causal=True, key_padding_mask=None, scale=0.5, block_size=3, top_k=2)
    assert (fewer - full).abs().max() > 1e-3  # top_k < #blocks does retrieve fewer blocks


def test_rows_are_convex_combinations():
    """Weights sum to 1 per row: with all values equal to 1 every output is 1."""
    q, k, _ = _qkv(nq=17, nk=17)
    ones = torch.ones(2, 2, 17, 3, dtype=F64)
    for fn in (landmark_reference, landmark_fast):
        out = fn(q, k, ones, causal=True, key_padding_mask=None, scale=0.7, block_size=2, top_k=None)
        assert_close(out, torch.ones_like(out), F64, fn.__name__)


def test_landmark_carries_no_value_and_own_landmark_is_ignored():
    q, k, v = _qkv(nq=11, nk=11)
    base = landmark_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.5, block_size=3, top_k=None)
    v2 = v.clone()
    v2[:, :, 3::4] += 10.0  # landmark values
    assert_close(landmark_fast(q, k, v2, causal=True, key_padding_mask=None, scale=0.5, block_size=3, top_k=None),
                 base, F64, "landmark values")
    # the key of landmark 3 (block 0) matters for queries of later blocks only, not for block 0 itself
    k2 = k.clone()
    k2[:, :, 3] += 3.0
    out = landmark_fast(q, k2, v, causal=True, key_padding_mask=None, scale=0.5, block_size=3, top_k=None)
    assert (out[:, :, :4] - base[:, :, :4]).abs().max() < 1e-12
    assert (out[:, :, 4:] - base[:, :, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("top_k", [None, 2])
def test_fast_gradients_match_reference(top_k):
    q, k, v = (t.requires_grad_(True) for t in _qkv(nq=9, nk=14))
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, 5] = mask[1, 2] = mask[1, 7] = False  # a landmark (7) and regular tokens masked
    g = torch.randn(2, 4, 9, 3, dtype=F64)
    ref = landmark_reference(q, k, v, causal=True, key_padding_mask=mask, scale=0.5, block_size=3, top_k=top_k)
    fast = landmark_fast(q, k, v, causal=True, key_padding_mask=mask, scale=0.5, block_size=3, top_k=top_k)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b, F64, "gradient")
    small = [t[1:, :, :7].detach().requires_grad_(True) for t in (q, k, v)]
    small[0] = small[0][:, :, 2:].detach().requires_grad_(True)  # 5 queries, 7 keys (bottom-right)
    fn = lambda q, k, v: landmark_fast(q, k, v, causal=True, key_padding_mask=mask[1:, :7], scale=0.5, block_size=2,
                                       top_k=top_k)
    assert torch.autograd.gradcheck(fn, tuple(small), fast_mode=True)


def test_fast_tiles_agree(monkeypatch):
    """Many small tiles (forced) give the same result as one tile."""
    import attnzoo.mechanisms.memory.landmark as lm

    q, k, v = _qkv(nq=19, nk=19)
    one = landmark_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.5, block_size=2, top_k=2)
    monkeypatch.setattr(lm, "rows_per_tile", lambda cost: 3)
    many = landmark_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.5, block_size=2, top_k=2)
    assert_close(many, one, F64, "tiled")


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_decode_token_by_token_equals_parallel(top_k):
    q, k, v = _qkv(nq=21, nk=21)
    full = landmark_reference(q, k, v, causal=True, key_padding_mask=None, scale=0.5, block_size=3, top_k=top_k)
    st = init_landmark_cache(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", block_size=3,
                             top_k=top_k)
    outs = [landmark_step(q[:, :, :6], k[:, :, :6], v[:, :, :6], st, scale=0.5, block_size=3, top_k=top_k)]
    for t in range(6, 21):
        sl = slice(t, t + 1)
        outs.append(landmark_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], st, scale=0.5, block_size=3, top_k=top_k))
    assert_close(torch.cat(outs, 2), full, F64, "decode")
    assert st.seq_len == 21 and st.landmark_keys.shape[2] == 5


def test_state_chaining_crop_and_reorder():
    q, k, v = _qkv(nq=20, nk=20)
    kw = dict(scale=0.5, block_size=2, top_k=2)
    full = landmark_reference(q, k, v, causal=True, key_padding_mask=None, **kw)
    st = init_landmark_cache(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", block_size=2,
                             top_k=2)
    a = landmark_step(q[:, :, :11], k[:, :, :11], v[:, :, :11], st, **kw)
    b = landmark_step(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], st, **kw)
    assert_close(torch.cat([a, b], 2), full, F64, "two halves")
    # crop back to 11 tokens, then decode the rest again token by token
    st.crop(11)
    outs = [landmark_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, **kw) for t in range(11, 20)]
    assert_close(torch.cat(outs, 2), full[:, :, 11:], F64, "after crop")
    # reorder the batch (beam search): row 0 <- old row 1, row 1 <- old row 1
    st.crop(11)
    st.reorder(torch.tensor([1, 1]))
    idx = torch.tensor([1, 1])
    outs = [landmark_step(q[idx, :, t:t + 1], k[idx, :, t:t + 1], v[idx, :, t:t + 1], st, **kw) for t in range(11, 20)]
    assert_close(torch.cat(outs, 2), full[idx, :, 11:], F64, "after reorder")
    with pytest.raises(ValueError, match="block_size"):
        landmark_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], st, scale=0.5, block_size=3, top_k=2)


def _module_oracle(layer, x, top_k):
    """The layer written out: the learned landmark inserted after every block of the float64 input, the
    projections applied to the interleaved sequence, the loop oracle, the landmark rows dropped."""
    bs, H, Hk, hd = layer.block_size, layer.heads, layer.kv_heads, layer.head_dim
    W = {n: (getattr(layer, n).weight.double(), getattr(layer, n).bias)
         for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    proj = lambda n, t: t @ W[n][0].T + (0 if W[n][1] is None else W[n][1].double())
    rows, keep = [], []
    for t in range(x.shape[1]):
        rows.append(x[:, t].double())
        keep.append(len(rows) - 1)
        if (t + 1) % bs == 0:
            rows.append(layer.landmark.double().expand(x.shape[0], -1))
    xe = torch.stack(rows, 1)  # (B, M, dim)
    B, M, _ = xe.shape
    q = proj("q_proj", xe).view(B, M, H, hd).transpose(1, 2)
    k = proj("k_proj", xe).view(B, M, Hk, hd).transpose(1, 2)
    v = proj("v_proj", xe).view(B, M, Hk, hd).transpose(1, 2)
    k[:, :, bs :: bs + 1] = k[:, :, bs : bs + 1]  # one embedding, so one key: make the tie exact here too
    o = _loop_oracle(q, k, v, layer.scale, bs, top_k)  # (B, H, M, hd)
    o = o.transpose(1, 2).reshape(B, M, -1)[:, keep]
    return proj("o_proj", o)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_module_with_its_one_landmark_embedding_decodes_like_its_forward(dtype):
    """The layer's landmarks share one embedding, so every landmark score ties: forward (both backends),
    decode token by token and chunked decoding retrieve the same (earliest) blocks, at N >= 40 in float32
    and float64. Failed before (module decode 0.15 off): tied scores were broken by the last bit."""
    torch.manual_seed(0)
    N = 44
    layer = LandmarkAttention(12, 4, kv_heads=2, block_size=3, top_k=2, bias=True).to(dtype)
    x = torch.randn(2, N, 12, dtype=dtype)
    want = _module_oracle(layer, x, 2).to(dtype)
    got = {}
    for backend in ("reference", "fast"):
        layer.backend = backend
        got[backend] = layer(x)
    st = layer.init_state(2)
    got["decode"] = torch.cat([layer(x[:, t:t + 1], state=st)[0] for t in range(N)], 1)
    st = layer.init_state(2)
    chunks = [(0, 7), (7, 8), (8, 20), (20, 21), (21, 22), (22, N)]
    got["chunks"] = torch.cat([layer(x[:, a:b], state=st)[0] for a, b in chunks], 1)
    for name, out in got.items():
        assert_close(out, want, dtype, f"module {name}")
    assert st.seq_len == N and st.cache.seq_len == N + N // 3  # tokens; the cache holds the landmarks too
    lm_keys = st.cache.landmark_keys  # (B, Hk, 14, hd): all equal, bit for bit
    assert lm_keys.shape[2] == N // 3 and torch.equal(lm_keys, lm_keys[:, :, :1].expand_as(lm_keys))


def test_module_trains_the_landmark_and_backends_agree():
    torch.manual_seed(0)
    layer = LandmarkAttention(12, 4, kv_heads=2, block_size=3, top_k=1).double()
    x = torch.randn(2, 14, 12, dtype=F64)
    assert_close(layer(x), _module_oracle(layer, x, 1), F64, "module vs written-out layer")
    pos, total = layer.layout(0, 14)
    assert total == 18 and pos.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17]
    pos, total = layer.layout(5, 3)  # tokens 5, 6, 7 after 5 tokens: token 5 completes block 1
    assert total == 4 and pos.tolist() == [0, 2, 3]
    grads = {}
    for backend in ("reference", "fast"):
        layer.backend = backend
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads[backend] = [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(grads["fast"], grads["reference"]):
        assert_close(a, b, F64, "module gradient")
    assert grads["fast"][0].abs().sum() > 0  # the landmark embedding is learned


@pytest.mark.parametrize("top_k", [None, 1])
def test_module_state_counts_tokens_and_crops_by_tokens(top_k):
    """crop(c) then decoding the rest == the layer's forward (== a fresh decode of the prefix then the rest),
    for every c: crops inside a block drop that block's landmark, crops at a block end keep it. Failed
    before: seq_len counted landmarks (12 after 9 tokens) and crop(7) kept the wrong prefix."""
    torch.manual_seed(1)
    bs, N = 3, 13
    layer = LandmarkAttention(8, 2, block_size=bs, top_k=top_k).double()
    x = torch.randn(2, N, 8, dtype=F64)
    full = layer(x)
    for c in (7, *range(N + 1)):
        st = layer.init_state(2)
        layer(x[:, :11], state=st)
        layer(x[:, 11:], state=st)
        st.crop(c)
        fresh = layer.init_state(2)
        if c:
            layer(x[:, :c], state=fresh)
        for state in (st, fresh):
            if c < N:
                rest = torch.cat([layer(x[:, t:t + 1], state=state)[0] for t in range(c, N)], 1)
                assert_close(rest, full[:, c:], F64, f"decode after crop({c})")
            assert state.seq_len == N and state.cache.seq_len == N + N // bs
        st.crop(c)
        assert st.seq_len == c and st.cache.seq_len == c + c // bs  # c tokens and the landmarks they complete
    st = layer.init_state(2)
    layer(x[:, :9], state=st)
    assert st.seq_len == 9 and st.cache.seq_len == 12
    # beam search: reorder, then crop, then continue
    st = layer.init_state(2)
    layer(x, state=st)
    st.reorder(torch.tensor([1, 1]))
    st.crop(7)
    idx = torch.tensor([1, 1])
    rest = torch.cat([layer(x[idx, t:t + 1], state=st)[0] for t in range(7, N)], 1)
    assert_close(rest, full[idx, 7:], F64, "after reorder and crop")
    assert st.nbytes() > 0
    with pytest.raises(ValueError, match="length"):
        st.crop(N + 1)
    with pytest.raises(ValueError, match="length"):
        st.crop(-1)
    with pytest.raises(TypeError, match="state"):
        layer(x[:, :1], state=init_landmark_cache(batch=2, kv_heads=2, head_dim=4, value_dim=4, dtype=F64,
                                                  device="cpu", block_size=bs, top_k=None))
    with pytest.raises(ValueError, match="block_size"):
        layer(x[:, :1], state=LandmarkAttention(8, 2, block_size=4).double().init_state(2))
    with pytest.raises(ValueError, match="batch"):
        layer(x[:1, :1], state=layer.init_state(2))


@pytest.mark.parametrize("top_k", [None, 2])
def test_interleaved_layer_takes_the_models_landmark_tokens(top_k):
    """``interleaved=True`` (the paper's model: landmark tokens in the stream): on the sequence built by
    ``interleave`` it is the written-out layer (loop oracle on the projections of the interleaved sequence,
    every position returned); its token rows equal the default layer's output with the same weights and that
    landmark; decoding it position by position and in chunks equals its forward, and its state counts
    positions of the interleaved sequence. Landmark keys here differ per block (the landmark rows differ),
    as they do in a model's later layers."""
    torch.manual_seed(2)
    bs, N, dim = 3, 14, 8
    plain = LandmarkAttention(dim, 4, kv_heads=2, block_size=bs, top_k=top_k, bias=True).double()
    layer = LandmarkAttention(dim, 4, kv_heads=2, block_size=bs, top_k=top_k, bias=True, interleaved=True).double()
    layer.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "landmark"})
    assert layer.landmark is None
    x = torch.randn(2, N, dim, dtype=F64)
    xe, keep = layer.interleave(x, plain.landmark.detach())
    assert xe.shape == (2, N + N // bs, dim) and keep.tolist() == layer.layout(0, N)[0].tolist()
    assert torch.equal(xe[:, keep], x) and torch.equal(xe[:, bs], plain.landmark.detach().expand(2, dim))
    assert_close(layer(xe)[:, keep], plain(x), F64, "interleaved layer vs the default layer")
    xe = xe + 0.3 * torch.randn_like(xe)  # landmarks that differ per block (a later layer's landmark rows)
    B, M, _ = xe.shape
    W = {n: getattr(layer, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q = W["q_proj"](xe).view(B, M, 4, 2).transpose(1, 2)
    k = W["k_proj"](xe).view(B, M, 2, 2).transpose(1, 2)
    v = W["v_proj"](xe).view(B, M, 2, 2).transpose(1, 2)
    want = W["o_proj"](_loop_oracle(q, k, v, layer.scale, bs, top_k).transpose(1, 2).reshape(B, M, dim))
    for backend in ("reference", "fast"):
        layer.backend = backend
        assert_close(layer(xe), want, F64, f"interleaved {backend}")
    st = layer.init_state(2)
    assert_close(torch.cat([layer(xe[:, t:t + 1], state=st)[0] for t in range(M)], 1), want, F64, "decode")
    assert st.seq_len == M and st.cache.seq_len == M
    st.crop(7)
    assert st.seq_len == 7 and st.cache.seq_len == 7
    assert_close(layer(xe[:, 7:], state=st)[0], want[:, 7:], F64, "chunk after crop")
    with pytest.raises(ValueError, match="landmark_row"):
        layer.interleave(x, torch.zeros(dim + 1, dtype=F64))
    with pytest.raises(TypeError, match="interleaved"):
        LandmarkAttention(dim, 4, block_size=bs, interleaved=1)


def test_registry_and_errors():
    mech = attnzoo.get("landmark")
    assert mech.catalog == "P009" and "step" in mech.forms() and "module" in mech.forms()
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        attnzoo.attention(q, k, v, mechanism="landmark", causal=False)
    with pytest.raises(ValueError, match="block_size"):
        attnzoo.attention(q, k, v, mechanism="landmark", causal=True, block_size=0)
    with pytest.raises(ValueError, match="causal"):
        LandmarkAttention(8, 2, causal=False)
    layer = LandmarkAttention(8, 2, block_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        layer.init_state(0)
    with pytest.raises(TypeError, match="state"):  # the layer's state counts tokens, not interleaved positions
        landmark_step(q[:1, :2, :1, :4], k[:1, :2, :1, :4], v[:1, :2, :1], layer.init_state(1), scale=0.5,
                      block_size=3, top_k=None)
