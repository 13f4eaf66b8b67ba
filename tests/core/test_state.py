"""Decode states: append/crop/reorder, bounded memory, and decoding == causal forward through them."""

import pytest
import torch

import attnzoo
from attnzoo.state import KVCache, SinkWindowCache, SlidingWindowCache
from attnzoo.testing import assert_close


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_kv_cache_append_grow_crop_reorder():
    c = KVCache(3, 2, 4, 5, dtype=torch.float64)
    k, v = rand(3, 2, 40, 4), rand(3, 2, 40, 5, seed=1)
    for t in range(0, 40, 7):  # uneven chunks force several regrowths
        c.append(k[:, :, t : t + 7], v[:, :, t : t + 7])
    assert c.seq_len == 40 and torch.equal(c.keys, k) and torch.equal(c.values, v)
    c.crop(25)
    assert c.seq_len == 25 and torch.equal(c.keys, k[:, :, :25])
    c.append(k[:, :, 25:27], v[:, :, 25:27])
    assert torch.equal(c.keys, k[:, :, :27])
    idx = torch.tensor([2, 0, 0])
    c.reorder(idx)
    assert torch.equal(c.keys, k[idx, :, :27]) and c.batch == 3
    assert c.nbytes() >= c.keys.numel() * 8 + c.values.numel() * 8


def test_kv_cache_padding_mask_is_stored():
    c = KVCache(2, 1, 4, dtype=torch.float64)
    c.append(rand(2, 1, 3, 4), rand(2, 1, 3, 4))
    m = torch.tensor([[True, False], [True, True]])
    c.append(rand(2, 1, 2, 4), rand(2, 1, 2, 4), key_padding_mask=m)
    assert c.mask.tolist() == [[True, True, True, True, False], [True] * 5]


def test_sliding_window_cache_is_bounded():
    w = 5
    c = SlidingWindowCache(1, 2, 4, window=w, dtype=torch.float64)
    for t in range(100):
        c.append(rand(1, 2, 1, 4, seed=t), rand(1, 2, 1, 4, seed=t + 1000))
        c.evict()
    assert c.length == w - 1 and c.seq_len == 100 and c.start == 96
    assert c.nbytes() < 4 * 2 * 4 * 8 * 2 * 4  # a few window's worth, independent of 100 tokens


@pytest.mark.parametrize("mechanism,options,state_cls", [
    ("softmax", {}, KVCache),
    ("sliding_window", {"window": 4}, SlidingWindowCache),
    ("sink_window", {"window": 4, "sinks": 2}, SinkWindowCache),
])
@pytest.mark.parametrize("prefill", [1, 6, 13])
def test_layer_decoding_equals_causal_forward(mechanism, options, state_cls, prefill):
    torch.manual_seed(0)
    layer = attnzoo.build(mechanism, 32, 4, kv_heads=2, causal=True, **options).double()
    x = rand(2, 20, 32)
    full = layer(x)
    state = layer.init_state(2)
    assert isinstance(state, state_cls)
    out, state = layer(x[:, :prefill], state=state)
    outs = [out]
    t = prefill
    while t < 20:  # single tokens, then a 3-token chunk (chunked prefill / speculative block)
        n = 1 if t < 15 else 3
        out, state = layer(x[:, t : t + n], state=state)
        outs.append(out)
        t += n
    assert_close(torch.cat(outs, 1)[:, :20], full, torch.float64, f"{mechanism} decoding")


def test_crop_then_redecode_matches():
    """Speculative-decoding rollback: crop two tokens, decode different ones, equals a fresh run."""
    torch.manual_seed(0)
    layer = attnzoo.build("sliding_window", 16, 2, causal=True, window=4).double()
    x, alt = rand(1, 12, 16), rand(1, 2, 16, seed=5)
    state = attnzoo.get("sliding_window").init_state(batch=1, kv_heads=2, head_dim=8, value_dim=8,
                                                     dtype=torch.float64, device="cpu", window=4)
    state.extra = 2
    _, state = layer(x, state=state)
    state.crop(10)
    out, state = layer(alt, state=state)
    fresh = layer(torch.cat([x[:, :10], alt], 1))
    assert_close(out, fresh[:, 10:], torch.float64, "crop + redecode")


def test_beam_reorder_matches_reordered_batch():
    torch.manual_seed(0)
    layer = attnzoo.build("softmax", 16, 2, causal=True).double()
    x = rand(3, 9, 16)
    state = layer.init_state(3)
    _, state = layer(x[:, :8], state=state)
    idx = torch.tensor([1, 1, 2])
    state.reorder(idx)
    out, _ = layer(x[idx, 8:9], state=state)
    assert_close(out, layer(x[idx])[:, 8:9], torch.float64, "reorder")


@pytest.mark.parametrize("sinks", [None, 0, 3])
def test_window_caches_slide_without_copying_the_window_and_keep_position_order(sinks):
    """Appends of 1-3 tokens with padding, evictions, a crop and a reorder: the stored keys, values and mask are
    always [sinks | last window - 1 + extra tokens] in position order (a list model), the buffer stays within
    the bound plus its slack, and between two moves to the front the window's storage is not reallocated."""
    w, extra, B = 30, 2, 2
    kw = dict(window=w, extra=extra, dtype=torch.float64)
    c = SlidingWindowCache(B, 2, 4, **kw) if sinks is None else SinkWindowCache(B, 2, 4, sinks=sinks, **kw)
    S = sinks or 0
    ks, vs, ms = [], [], []
    g = torch.Generator().manual_seed(0)
    storages = set()
    for t in range(60):
        T = 1 + t % 3
        k, v = torch.randn(B, 2, T, 4, generator=g, dtype=torch.float64), torch.randn(B, 2, T, 4, generator=g,
                                                                                      dtype=torch.float64)
        m = torch.rand(B, T, generator=g) > 0.2 if t > 10 else None
        c.append(k, v, key_padding_mask=m)
        c.evict()
        ks += list(k.unbind(2))
        vs += list(v.unbind(2))
        ms += list((m if m is not None else torch.ones(B, T, dtype=torch.bool)).unbind(1))
        keep = list(range(min(S, len(ks)))) + list(range(max(min(S, len(ks)), len(ks) - (w - 1 + extra)), len(ks)))
        assert torch.equal(c.keys, torch.stack([ks[i] for i in keep], 2))
        assert torch.equal(c.values, torch.stack([vs[i] for i in keep], 2))
        if c.mask is not None:
            assert torch.equal(c.mask, torch.stack([ms[i] for i in keep], 1))
        assert c._k.shape[2] <= S + w - 1 + extra + max(4, (S + w - 1 + extra) // 4) + 3
        storages.add(c._k.untyped_storage().data_ptr())
    assert len(storages) < 25  # a new buffer only when the run moves to the front (every ~8 slots), not per append
    c.crop(c.seq_len - 2)
    c.reorder(torch.tensor([1, 0]))
    keep = list(range(S)) + list(range(len(ks) - (w - 1 + extra), len(ks) - 2))
    assert torch.equal(c.keys, torch.stack([ks[i] for i in keep], 2)[[1, 0]])
