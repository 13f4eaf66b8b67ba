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


def _loop_oracle(q, k, v, scale, block_size, top_k=None, mask=None):
    """The grouped softmax written per query and head with Python loops over the block structure (scores
    from one matmul; selection, grouping and both softmaxes by hand)."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    period = block_size + 1
    S = (q @ k.repeat_interleave(Hq // Hk, 1).transpose(-1, -2) * scale).tolist()
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
                    lms = sorted(lms, key=lambda bb: -s[bb * period + block_size])[:top_k]  # stable: ties -> early
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


def test_ties_go_to_earlier_blocks_on_every_path():
    """Identical landmark keys (a single layer without positions): all paths retrieve the same blocks."""
    q, k, v = _qkv(nq=18, nk=18)
    k[:, :, 3::4] = k[:, :, 3:4]  # every landmark key equal to the first one
    kw = dict(scale=0.5, block_size=3, top_k=2)
    want = _loop_oracle(q, k, v, 0.5, 3, 2)
    ref = landmark_reference(q, k, v, causal=True, key_padding_mask=None, **kw)
    assert_close(ref, want, F64, "reference with ties")
    assert_close(landmark_fast(q, k, v, causal=True, key_padding_mask=None, **kw), want, F64, "fast with ties")
    st = init_landmark_cache(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", block_size=3,
                             top_k=2)
    outs = [landmark_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, **kw) for t in range(18)]
    assert_close(torch.cat(outs, 2), want, F64, "decode with ties")


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


def test_module_inserts_landmarks_and_decodes():
    torch.manual_seed(0)
    layer = LandmarkAttention(12, 4, kv_heads=2, block_size=3, top_k=1).double()
    x = torch.randn(2, 14, 12, dtype=F64)
    full = layer(x)
    assert full.shape == (2, 14, 12)
    st = layer.init_state(2)
    outs = [layer(x[:, :5], state=st)[0]]
    for t in range(5, 14):
        outs.append(layer(x[:, t:t + 1], state=st)[0])
    assert_close(torch.cat(outs, 1), full, F64, "module decode")
    assert st.seq_len == 14 + 14 // 3 and layer.regular_length(st) == 14
    # the interleaved sequence really has the learned landmark at every 4th position
    x_ext, pos, _ = layer._interleave(x, 0, None)
    assert x_ext.shape[1] == 18 and torch.equal(x_ext[:, 3], layer.landmark.detach().expand(2, 12))
    # fast and reference backends agree, including parameter gradients (landmark embedding included)
    grads = {}
    for backend in ("reference", "fast"):
        layer.backend = backend
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads[backend] = [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(grads["fast"], grads["reference"]):
        assert_close(a, b, F64, "module gradient")
    assert grads["fast"][0].abs().sum() > 0  # the landmark embedding is learned


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
