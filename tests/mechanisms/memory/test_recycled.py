"""Oracles for Recycled Attention (P102)."""

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.memory.recycled import (
    RecycledState,
    init_recycled_state,
    recycled_fast,
    recycled_reference,
    recycled_step,
)
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _qkv(B=2, Hq=4, Hk=2, n=26, D=5, Dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, n, D, generator=g, dtype=F64), torch.randn(B, Hk, n, D, generator=g, dtype=F64),
            torch.randn(B, Hk, n, Dv, generator=g, dtype=F64))


def _loop_oracle(q, k, v, scale, S, K, start, agg="sum", mask=None):
    """Walk the positions in order like a decoder: full steps record per KV head the top-K keys of their
    aggregated attention probabilities (an empty set if the full step's query is padding); recycled steps
    attend to that set plus the keys since."""
    B, Hq, N, _ = q.shape
    Hk = k.shape[1]
    G = Hq // Hk
    out = torch.zeros(B, Hq, N, v.shape[-1], dtype=F64)
    a = max(start - 1, 0)
    for b in range(B):
        ok = [mask is None or bool(mask[b, j]) for j in range(N)]
        sets, anchor = None, None
        for p in range(N):
            full = p <= a or (p - a) % S == 0
            allowed = [j for j in range(p + 1) if ok[j]]
            if full:
                sets, anchor = [], p
                for hk in range(Hk):
                    if not ok[p]:  # a padded query records an empty set
                        sets.append(set())
                        continue
                    probs = []
                    for h in range(hk * G, (hk + 1) * G):
                        probs.append(torch.softmax(torch.stack([q[b, h, p] @ k[b, hk, j] * scale for j in allowed]), 0))
                    score = torch.stack(probs).sum(0) if agg == "sum" else torch.stack(probs).amax(0)
                    order = sorted(range(len(allowed)), key=lambda i, score=score: -float(score[i]))
                    sets.append({allowed[i] for i in order[:K]})
            for h in range(Hq):
                keys = allowed if full else sorted(sets[h // G] | {j for j in allowed if j > anchor})
                if not keys:  # no visible key: zeros, as in the reference
                    continue
                w = torch.softmax(torch.stack([q[b, h, p] @ k[b, h // G, j] * scale for j in keys]), 0)
                out[b, h, p] = sum(wj * v[b, h // G, j] for wj, j in zip(w, keys))
    return out


@pytest.mark.parametrize("S,K,start,agg", [(3, 2, 0, "sum"), (4, 3, 6, "max"), (5, 1, 1, "sum")])
def test_matches_explicit_loop(S, K, start, agg):
    q, k, v = _qkv(n=17)
    mask = torch.rand(2, 17, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[:, 0] = True
    for m in (None, mask):
        want = _loop_oracle(q, k, v, 0.5, S, K, start, agg, m)
        for fn in (recycled_reference, recycled_fast):
            kw = dict(tile=4) if fn is recycled_fast else {}
            got = fn(q, k, v, causal=True, key_padding_mask=m, scale=0.5, stride=S, top_k=K, start=start,
                     aggregate=agg, **kw)
            assert_close(got, want, F64, f"{fn.__name__} S={S} K={K} start={start} mask={m is not None}")


@pytest.mark.parametrize("S,K,start", [(1, 2, 0), (7, 26, 0), (5, 2, 26)])
def test_exact_limits(S, K, start):
    """stride 1 (every step full), top_k >= context, or a prefill covering everything: full attention."""
    q, k, v = _qkv()
    want = softmax_attention(q, k, v, causal=True, scale=0.5)
    for fn in (recycled_reference, recycled_fast):
        got = fn(q, k, v, causal=True, key_padding_mask=None, scale=0.5, stride=S, top_k=K, start=start,
                 aggregate="sum")
        assert_close(got, want, F64, fn.__name__)
    approx = recycled_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.5, stride=5, top_k=2, start=3,
                           aggregate="sum")
    assert (approx - want).abs().max() > 1e-3


def test_recycled_set_is_the_top_k_of_the_full_step():
    q, k, v = _qkv(n=20)
    st = init_recycled_state(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", stride=4, top_k=3,
                             start=10, aggregate="sum")
    recycled_step(q[:, :, :10], k[:, :, :10], v[:, :, :10], st, scale=0.5, stride=4, top_k=3, start=10,
                  aggregate="sum")
    f, idx, ok = st.current()
    assert f == 9 and bool(ok.all())
    s = torch.softmax((q[:, :, 9:10] @ k.repeat_interleave(2, 1)[:, :, :10].transpose(-1, -2)) * 0.5, -1)
    agg = s.view(2, 2, 2, 10).sum(2)  # (B, Hk, 10): summed over each KV head's two query heads
    want = agg.topk(3, -1).indices.sort(-1).values
    assert torch.equal(idx.sort(-1).values, want)


def test_fast_gradients_and_gradcheck():
    q, k, v = (t.requires_grad_(True) for t in _qkv(n=15))
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, 3] = mask[1, 8] = False
    kw = dict(causal=True, key_padding_mask=mask, scale=0.5, stride=3, top_k=2, start=4, aggregate="sum")
    g = torch.randn(2, 4, 15, 3, dtype=F64)
    for a, b in zip(torch.autograd.grad(recycled_fast(q, k, v, tile=4, **kw), (q, k, v), g),
                    torch.autograd.grad(recycled_reference(q, k, v, **kw), (q, k, v), g)):
        assert_close(a, b, F64, "gradient")
    small = tuple(t[:1, :, :8].detach().requires_grad_(True) for t in (q, k, v))
    fn = lambda q, k, v: recycled_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.5, stride=3, top_k=2,
                                       start=2, aggregate="sum")
    assert torch.autograd.gradcheck(fn, small, fast_mode=True)


def test_decode_equals_parallel_crop_and_reorder():
    q, k, v = _qkv(n=30)
    kw = dict(scale=0.5, stride=4, top_k=3, start=9, aggregate="sum")
    full = recycled_reference(q, k, v, causal=True, key_padding_mask=None, **kw)
    st = init_recycled_state(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", stride=4, top_k=3,
                             start=9, aggregate="sum")
    outs = [recycled_step(q[:, :, :6], k[:, :, :6], v[:, :, :6], st, **kw)]  # part of the prefill
    outs.append(recycled_step(q[:, :, 6:13], k[:, :, 6:13], v[:, :, 6:13], st, **kw))  # prefill end + decode
    outs += [recycled_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, **kw) for t in range(13, 30)]
    assert_close(torch.cat(outs, 2), full, F64, "decode")
    st = RecycledState(2, 2, 5, 3, stride=4, start=9, keep=2, dtype=F64)
    recycled_step(q[:, :, :23], k[:, :, :23], v[:, :, :23], st, **kw)  # full steps at 8, 12, 16, 20
    st.crop(19)  # back before the last full step: needs the set of step 16
    out = torch.cat([recycled_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, **kw)
                     for t in range(19, 30)], 2)
    assert_close(out, full[:, :, 19:], F64, "after crop")
    with pytest.raises(ValueError, match="keep"):
        st.crop(14)  # needs step 12's set, no longer held
    st = init_recycled_state(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", stride=4, top_k=3,
                             start=9, aggregate="sum")
    recycled_step(q[:, :, :14], k[:, :, :14], v[:, :, :14], st, **kw)
    st.reorder(torch.tensor([1, 0]))
    out = recycled_step(q[[1, 0], :, 14:], k[[1, 0], :, 14:], v[[1, 0], :, 14:], st, **kw)
    assert_close(out, full[[1, 0], :, 14:], F64, "after reorder")


def test_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="aggregate"):
        attnzoo.attention(q, k, v, mechanism="recycled", causal=True, aggregate="mean")
    st = init_recycled_state(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", stride=4, top_k=3,
                             start=0, aggregate="sum")
    with pytest.raises(ValueError, match="stride"):
        recycled_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], st, scale=0.5, stride=5, top_k=3, start=0,
                      aggregate="sum")


def test_decode_with_padding_equals_parallel():
    """Padded positions (including padded full steps, which record an empty set) decode as in the parallel form."""
    q, k, v = _qkv(n=24)
    mask = torch.rand(2, 24, generator=torch.Generator().manual_seed(1)) > 0.35
    mask[:, 0] = False  # left padding: the first full step (start 0) is padding
    mask[0, 8] = False  # a padded full step in the middle
    kw = dict(scale=0.5, stride=4, top_k=3, start=0, aggregate="sum")
    want = recycled_fast(q, k, v, causal=True, key_padding_mask=mask, tile=5, **kw)
    assert_close(recycled_reference(q, k, v, causal=True, key_padding_mask=mask, **kw), want, F64, "reference")
    st = init_recycled_state(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", stride=4, top_k=3,
                             start=0, aggregate="sum")
    outs = [recycled_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, key_padding_mask=mask[:, t:t + 1],
                          **kw) for t in range(24)]
    keep = mask.view(2, 1, 24, 1)
    assert_close(torch.cat(outs, 2) * keep, want * keep, F64, "decode with padding")
