"""Every error path of the public surface names the argument, what it got and what it expected."""

import pytest
import torch

import attnzoo
from attnzoo import masks
from attnzoo.errors import OptionError, UnknownMechanismError, UnsupportedPatternError
from attnzoo.state import KVCache, SlidingWindowCache


def qkv(B=2, Hq=4, Hk=2, Nq=5, Nk=5, D=8, Dv=8, dtype=torch.float32):
    q = torch.randn(B, Hq, Nq, D, dtype=dtype)
    return q, torch.randn(B, Hk, Nk, D, dtype=dtype), torch.randn(B, Hk, Nk, Dv, dtype=dtype)


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor, got shape \(4, 5, 8\)"):
        attnzoo.attention(q[0], k, v)


def test_mismatched_batch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k, v: batch size must match q's 2"):
        attnzoo.attention(q, k[:1], v[:1])


def test_mismatched_head_dim():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k: head dim must equal q's 8"):
        attnzoo.attention(q, k[..., :4], v)


def test_mismatched_value_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"v: expected \(B, Hk, Nk, Dv\)"):
        attnzoo.attention(q, k, v[:, :1])


def test_heads_not_divisible():
    q, k, v = qkv(Hq=4, Hk=3)
    with pytest.raises(ValueError, match="got Hq=4, Hk=3"):
        attnzoo.attention(q, k, v)


def test_non_floating_inputs():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q: expected a floating-point tensor, got dtype torch.int64"):
        attnzoo.attention(q.long(), k, v)


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="dtypes must match"):
        attnzoo.attention(q.double(), k, v)


def test_mask_wrong_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype torch.bool"):
        attnzoo.attention(q, k, v, key_padding_mask=torch.ones(2, 5))


def test_mask_wrong_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(B, Nk\) = \(2, 5\), got \(2, 4\)"):
        attnzoo.attention(q, k, v, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(5,\)"):
        attnzoo.attention(q, k, v, key_padding_mask=torch.ones(5, dtype=torch.bool))


def test_attn_mask_wrong_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask: expected shape"):
        attnzoo.softmax_attention(q, k, v, attn_mask=torch.ones(4, 5, dtype=torch.bool))


def test_unsupported_pattern():
    q, k, v = qkv(Nq=3, Nk=5)
    with pytest.raises(UnsupportedPatternError, match="does not support pattern 'noncausal_cross'"):
        attnzoo.attention(q, k, v, mechanism="sliding_window", window=2)


def test_option_out_of_range():
    q, k, v = qkv()
    with pytest.raises(OptionError, match=r"window \(option of mechanism 'sliding_window'\): expected int >= 1, got 0"):
        attnzoo.attention(q, k, v, mechanism="sliding_window", window=0)
    with pytest.raises(OptionError, match="got True"):
        attnzoo.attention(q, k, v, mechanism="sliding_window", window=True)
    with pytest.raises(OptionError, match="got 2.5"):
        attnzoo.attention(q, k, v, mechanism="sliding_window", window=2.5)


def test_unknown_option_suggests():
    q, k, v = qkv()
    with pytest.raises(OptionError, match="Did you mean 'window'"):
        attnzoo.attention(q, k, v, mechanism="sliding_window", windw=3)


def test_unknown_mechanism_suggests():
    with pytest.raises(UnknownMechanismError, match="Did you mean 'sliding_window'"):
        attnzoo.get("sliding_windw")
    with pytest.raises(KeyError):
        attnzoo.get("nonexistent_mechanism_xyz")


def test_bad_backend_and_causal_and_scale():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend: expected one of"):
        attnzoo.attention(q, k, v, backend="cuda")
    with pytest.raises(TypeError, match="causal: expected a bool, got 1"):
        attnzoo.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="scale: expected a finite positive float"):
        attnzoo.attention(q, k, v, scale=-1.0)


def test_fast_backend_unavailable_is_explicit(monkeypatch):
    from attnzoo.mechanisms.core.softmax import softmax_reference
    from attnzoo.registry import Mechanism, register, unregister
    register(Mechanism(name="_no_fast", family="core", title="t", arxiv="-", code="-", summary="-",
                       patterns=attnzoo.PATTERNS, exact=True, complexity="-", reference=softmax_reference))
    try:
        q, k, v = qkv()
        with pytest.raises(ValueError, match="backend: 'fast' is not available for mechanism '_no_fast'"):
            attnzoo.attention(q, k, v, mechanism="_no_fast", backend="fast")
    finally:
        unregister("_no_fast")


def test_layer_errors():
    with pytest.raises(ValueError, match="kv_heads: heads \\(8\\) must be a multiple of kv_heads, got kv_heads=3"):
        attnzoo.build("softmax", 64, 8, kv_heads=3)
    with pytest.raises(ValueError, match="heads: dim \\(60\\) must be divisible by heads"):
        attnzoo.build("softmax", 60, 8)
    layer = attnzoo.build("softmax", 32, 4)
    with pytest.raises(ValueError, match=r"x: expected \(B, N, 32\), got shape \(2, 5, 16\)"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="state: decoding needs a causal layer"):
        layer(torch.randn(2, 5, 32), state=KVCache(2, 4, 8))
    with pytest.raises(UnsupportedPatternError):
        attnzoo.build("sliding_window", 32, 4, window=2)(torch.randn(2, 5, 32), torch.randn(2, 3, 32))


def test_mask_predicate_errors():
    with pytest.raises(ValueError, match="window: expected an int >= 1, got 0"):
        masks.sliding_window(0)
    with pytest.raises(ValueError, match="kernel_size: kernel_size \\* dilation = 12 must be <= length 10"):
        masks.neighborhood_1d(10, 3, dilation=4)
    with pytest.raises(ValueError, match="and_masks: expected at least one predicate"):
        masks.and_masks()


def test_state_errors():
    cache = KVCache(2, 2, 8)
    with pytest.raises(ValueError, match=r"k: expected \(B, Hk, T, D\) = \(2, 2, 3, 8\) for this cache"):
        cache.append(torch.randn(2, 3, 3, 8), torch.randn(2, 2, 3, 8))
    with pytest.raises(TypeError, match="expected dtype torch.float32 for this cache"):
        cache.append(torch.randn(2, 2, 3, 8, dtype=torch.float64), torch.randn(2, 2, 3, 8, dtype=torch.float64))
    cache.append(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    with pytest.raises(ValueError, match="length: cannot crop to 5 tokens, the state holds 3"):
        cache.crop(5)
    with pytest.raises(ValueError, match=r"index: batch indices must lie in \[0, 2\)"):
        cache.reorder(torch.tensor([0, 2]))
    win = SlidingWindowCache(1, 1, 4, window=3)
    for _ in range(6):
        win.append(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
        win.evict()
    with pytest.raises(ValueError, match="build it with extra >= 2"):
        win.crop(4)
