"""Oracles for LongHeads (P050)."""

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.memory.longheads import (
    LongHeadsState,
    _selection,
    chunk_summaries,
    init_longheads_state,
    longheads_fast,
    longheads_reference,
    longheads_step,
)
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _qkv(B=2, Hq=4, Hk=2, n=25, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, D, generator=g, dtype=F64) for h in (Hq, Hk, Hk))


def _summary_loop(q, k, v, scale, w, mask=None):
    """Chunk key of every complete chunk, per batch row and query head, with explicit loops."""
    B, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, N // w, D, dtype=F64)
    for b in range(B):
        for h in range(Hq):
            for c in range(N // w):
                toks = [j for j in range(c * w, (c + 1) * w) if mask is None or mask[b, j]]
                if not toks:
                    continue
                outs = []
                for i in toks:  # bidirectional attention inside the chunk
                    a = torch.softmax(torch.stack([q[b, h, i] @ k[b, h // G, j] * scale for j in toks]), 0)
                    outs.append(sum(aj * v[b, h // G, j] for aj, j in zip(a, toks)))
                c_v = sum(outs) / len(outs)
                a = torch.softmax(torch.stack([c_v @ k[b, h // G, j] * scale for j in toks]), 0)
                out[b, h, c] = sum(aj * k[b, h // G, j] for aj, j in zip(a, toks))
    return out


def test_chunk_key_formula():
    q, k, v = _qkv(n=12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 4] = mask[1, 9] = False
    for m in (None, mask):
        got, valid = chunk_summaries(q, k, v, m, 0.5, 3)
        assert_close(got, _summary_loop(q, k, v, 0.5, 3, m), F64, f"chunk keys mask={m is not None}")
        assert bool(valid.all())


def _loop_oracle(q, k, v, scale, w, A, mask=None):
    """Selection and attention per query and head with explicit loops."""
    B, Hq, N, _ = q.shape
    G = Hq // k.shape[1]
    ck = _summary_loop(q, k, v, scale, w, mask)
    out = torch.zeros(B, Hq, N, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(Hq):
            for p in range(N):
                c = p // w
                if c + 1 <= A:
                    chosen = list(range(c + 1))
                else:
                    cands = [j for j in range(1, c - 1)
                             if mask is None or any(mask[b, i] for i in range(j * w, (j + 1) * w))]
                    cands.sort(key=lambda j: -float(q[b, h, p] @ ck[b, h, j]))  # stable: ties -> earlier
                    chosen = [0, c - 1, c] + cands[: A - 3]
                keys = [j for cc in chosen for j in range(cc * w, min((cc + 1) * w, p + 1))
                        if mask is None or mask[b, j]]
                a = torch.softmax(torch.stack([q[b, h, p] @ k[b, h // G, j] * scale for j in keys]), 0)
                out[b, h, p] = sum(aj * v[b, h // G, j] for aj, j in zip(a, keys))
    return out


@pytest.mark.parametrize("w,A", [(3, 3), (2, 4), (4, 5)])
def test_matches_explicit_loop(w, A):
    q, k, v = _qkv(n=22)
    mask = torch.rand(2, 22, generator=torch.Generator().manual_seed(1)) > 0.25
    mask[:, 0] = True
    for m in (None, mask):
        want = _loop_oracle(q, k, v, 0.5, w, A, m)
        for fn in (longheads_reference, longheads_fast):
            got = fn(q, k, v, causal=True, key_padding_mask=m, scale=0.5, chunk_size=w, max_chunks=A)
            assert_close(got, want, F64, f"{fn.__name__} w={w} A={A} mask={m is not None}")


@pytest.mark.parametrize("w,A", [(5, 5), (3, 9), (30, 3), (1, 25)])
def test_all_chunks_selected_is_exact_causal_attention(w, A):
    q, k, v = _qkv()
    want = softmax_attention(q, k, v, causal=True, scale=0.5)
    for fn in (longheads_reference, longheads_fast):
        assert_close(fn(q, k, v, causal=True, key_padding_mask=None, scale=0.5, chunk_size=w, max_chunks=A), want, F64,
                     fn.__name__)


def test_heads_select_independently():
    q, k, v = _qkv(n=40, Hq=4, Hk=4)
    sel = _selection(q, k, v, None, 0.5, 2, 4)  # (B, Hq, N, A)
    last = sel[0, :, -1].sort(-1).values  # the chunks each head's last query picked
    assert any(not torch.equal(last[0], last[h]) for h in range(1, 4))
    full = softmax_attention(q, k, v, causal=True, scale=0.5)
    got = longheads_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.5, chunk_size=2, max_chunks=4)
    assert (got[:, :, -1] - full[:, :, -1]).abs().max() > 1e-4  # an approximation once N > A w


def test_fast_gradients_gradcheck_and_tiles(monkeypatch):
    import attnzoo.mechanisms.memory.longheads as lh

    q, k, v = (t.requires_grad_(True) for t in _qkv(n=17))
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, 6] = mask[1, 13] = False
    kw = dict(causal=True, key_padding_mask=mask, scale=0.5, chunk_size=2, max_chunks=4)
    g = torch.randn(2, 4, 17, 4, dtype=F64)
    ref = torch.autograd.grad(longheads_reference(q, k, v, **kw), (q, k, v), g)
    monkeypatch.setattr(lh, "rows_per_tile", lambda cost: 3)  # several tiles
    fast = torch.autograd.grad(longheads_fast(q, k, v, **kw), (q, k, v), g)
    for a, b in zip(fast, ref):
        assert_close(a, b, F64, "gradient")
    small = tuple(t[:1, :, :9].detach().requires_grad_(True) for t in (q, k, v))
    fn = lambda q, k, v: longheads_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.5, chunk_size=2,
                                        max_chunks=3)
    assert torch.autograd.gradcheck(fn, small, fast_mode=True)


def test_decode_equals_parallel_crop_and_reorder():
    q, k, v = _qkv(n=30)
    kw = dict(scale=0.5, chunk_size=3, max_chunks=4)
    full = longheads_reference(q, k, v, causal=True, key_padding_mask=None, **kw)
    st = init_longheads_state(batch=2, kv_heads=2, head_dim=4, value_dim=4, dtype=F64, device="cpu", chunk_size=3,
                              max_chunks=4)
    outs = [longheads_step(q[:, :, :8], k[:, :, :8], v[:, :, :8], st, **kw)]
    outs += [longheads_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, **kw) for t in range(8, 30)]
    assert_close(torch.cat(outs, 2), full, F64, "decode")
    assert st.summaries.length == 10 and st._q.shape[2] == 0  # nothing pending after a completed chunk
    st = LongHeadsState(2, 2, 4, 4, chunk_size=3, extra=5, dtype=F64)
    longheads_step(q[:, :, :20], k[:, :, :20], v[:, :, :20], st, **kw)
    st.crop(17)  # back into chunk 5 (positions 15..17), already summarised: recomputed when it completes
    outs = [longheads_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, **kw) for t in range(17, 30)]
    assert_close(torch.cat(outs, 2), full[:, :, 17:], F64, "after crop")
    with pytest.raises(ValueError, match="extra"):
        st.crop(3)
    st.reorder(torch.tensor([1, 0]))
    st2 = init_longheads_state(batch=2, kv_heads=2, head_dim=4, value_dim=4, dtype=F64, device="cpu", chunk_size=3,
                               max_chunks=4)
    longheads_step(q[:, :, :20], k[:, :, :20], v[:, :, :20], st2, **kw)
    st2.reorder(torch.tensor([1, 0]))
    out = longheads_step(q[[1, 0], :, 20:], k[[1, 0], :, 20:], v[[1, 0], :, 20:], st2, **kw)
    assert_close(out, full[[1, 0], :, 20:], F64, "after reorder")


def test_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="value dim"):
        attnzoo.attention(q, k, v[..., :3], mechanism="longheads", causal=True)
    with pytest.raises(ValueError):
        attnzoo.attention(q, k, v, mechanism="longheads", causal=True, max_chunks=2)


def test_decode_before_the_first_chunk_is_complete():
    """Regression: a prefill shorter than one chunk (no summary yet) then decoding past the chunk boundary."""
    m = attnzoo.get("longheads")
    o = m.resolve_options({"chunk_size": 8, "max_chunks": 3})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 4, generator=g, dtype=torch.float64) for _ in range(3))
    st = m.init_state(batch=1, kv_heads=2, head_dim=4, value_dim=4, dtype=torch.float64, device="cpu", **o)
    outs = [m.step(q[:, :, :5], k[:, :, :5], v[:, :, :5], st, scale=0.5, **o)]
    outs += [m.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, scale=0.5, **o) for t in range(5, 40)]
    want = attnzoo.attention(q, k, v, mechanism="longheads", causal=True, scale=0.5, **o)
    assert (torch.cat(outs, 2) - want).abs().max().item() < 1e-12


def test_decode_with_key_padding_equals_parallel():
    """The decode gather (one index_select of key rows from the cache) keeps the key-padding mask of the
    gathered chunks and of the own chunk."""
    q, k, v = _qkv(n=30, seed=4)
    m = torch.rand(2, 30, generator=torch.Generator().manual_seed(3)) > 0.3
    m[:, 0] = True
    kw = dict(scale=0.5, chunk_size=3, max_chunks=4)
    full = longheads_reference(q, k, v, causal=True, key_padding_mask=m, **kw)
    st = init_longheads_state(batch=2, kv_heads=2, head_dim=4, value_dim=4, dtype=F64, device="cpu", chunk_size=3,
                              max_chunks=4)
    outs = [longheads_step(q[:, :, :8], k[:, :, :8], v[:, :, :8], st, key_padding_mask=m[:, :8], **kw)]
    outs += [longheads_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, key_padding_mask=m[:, t:t + 1],
                            **kw) for t in range(8, 30)]
    got = torch.cat(outs, 2)
    rows = m.view(2, 1, 30, 1)
    assert_close(got * rows, full * rows, F64, "decode with key padding")
