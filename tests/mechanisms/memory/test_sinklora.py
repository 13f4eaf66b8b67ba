"""Oracles for SinkLoRA's SF-Attn (P088)."""

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.mechanisms.memory.sinklora import (
    init_sinklora_cache,
    sinklora_fast,
    sinklora_reference,
    sinklora_step,
)
from attnzoo.reference import softmax_attention
from attnzoo.state import SinkWindowCache
from attnzoo.testing import assert_close

F64 = torch.float64


def _qkv(B=2, Hq=4, Hk=2, nq=19, nk=19, D=5, Dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, nq, D, generator=g, dtype=F64), torch.randn(B, Hk, nk, D, generator=g, dtype=F64),
            torch.randn(B, Hk, nk, Dv, generator=g, dtype=F64))


def _loop_oracle(q, k, v, scale, G, sinks, shift, mask=None):
    """Per query and head: the keys of its group (groups cut explicitly) plus the sinks, one softmax."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=F64)
    for h in range(Hq):
        off = G // 2 if shift and h >= Hq // 2 else 0
        groups = {}
        for j in range(Nk):
            groups.setdefault((j + off) // G, []).append(j)
        for b in range(B):
            for i in range(Nq):
                p = i + Nk - Nq
                keys = sorted(set(j for j in groups[(p + off) // G] if j <= p) | set(range(min(sinks, p + 1))))
                keys = [j for j in keys if mask is None or mask[b, j]]
                if keys:
                    kh = h // (Hq // k.shape[1])
                    w = torch.softmax(torch.stack([q[b, h, i] @ k[b, kh, j] * scale for j in keys]), 0)
                    out[b, h, i] = sum(wj * v[b, kh, j] for wj, j in zip(w, keys))
    return out


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("nq", [19, 6, 1])
def test_matches_explicit_loop(shift, nq):
    q, k, v = _qkv(nq=nq)
    mask = torch.rand(2, 19, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[0, 1] = False  # a padded sink
    for m in (None, mask):
        want = _loop_oracle(q, k, v, 0.4, 4, 3, shift, m)
        for fn in (sinklora_reference, sinklora_fast):
            got = fn(q, k, v, causal=True, key_padding_mask=m, scale=0.4, group_size=4, sinks=3, shift=shift)
            assert_close(got, want, F64, f"{fn.__name__} shift={shift} mask={m is not None}")


@pytest.mark.parametrize("sinks", [0, 4])
def test_one_group_is_dense_causal_attention(sinks):
    q, k, v = _qkv()
    want = softmax_attention(q, k, v, causal=True, scale=0.4)
    for fn in (sinklora_reference, sinklora_fast):
        assert_close(fn(q, k, v, causal=True, key_padding_mask=None, scale=0.4, group_size=19, sinks=sinks,
                        shift=False), want, F64, fn.__name__)


def test_every_token_sees_sinks_and_its_group_only():
    """Zero queries give uniform weights: the output is the mean of exactly the visible values."""
    q, k, v = _qkv(nq=23, nk=23)
    vals = torch.arange(23, dtype=F64).view(1, 1, 23, 1).expand(2, 2, 23, 1).contiguous()
    out = sinklora_fast(torch.zeros_like(q), k, vals, causal=True, key_padding_mask=None, scale=1.0, group_size=5,
                        sinks=2, shift=False)
    for p in range(23):
        seen = sorted(set(range(5 * (p // 5), p + 1)) | set(range(min(2, p + 1))))
        assert abs(out[0, 0, p, 0].item() - sum(seen) / len(seen)) < 1e-12


def test_shifted_heads_are_the_unshifted_groups_of_a_shifted_sequence():
    """S2-Attn's shift (shift=True, second half of the heads) == unshifted groups over the sequence moved
    right by G/2 (G/2 padded keys prepended): the shift/unshift round trip."""
    q, k, v = _qkv(Hq=2, Hk=2, nq=17, nk=17)
    G = 6
    shifted = sinklora_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.4, group_size=G, sinks=0,
                            shift=True)[:, 1:]
    pad = lambda t: F.pad(t[:, 1:], (0, 0, G // 2, 0))
    mask = torch.ones(2, 17 + G // 2, dtype=torch.bool)
    mask[:, : G // 2] = False
    moved = sinklora_fast(pad(q), pad(k), pad(v), causal=True, key_padding_mask=mask, scale=0.4, group_size=G,
                          sinks=0, shift=False)[:, :, G // 2:]
    assert_close(shifted, moved, F64, "shifted heads")
    unshifted = sinklora_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.4, group_size=G, sinks=0,
                              shift=False)
    assert (unshifted[:, 1:] - shifted).abs().max() > 1e-3 and torch.allclose(unshifted[:, :1], sinklora_fast(
        q, k, v, causal=True, key_padding_mask=None, scale=0.4, group_size=G, sinks=0, shift=True)[:, :1])


@pytest.mark.parametrize("shift", [False, True])
def test_fast_gradients_and_gradcheck(shift):
    q, k, v = (t.requires_grad_(True) for t in _qkv(nq=11, nk=14))
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, 0] = mask[0, 9] = False
    kw = dict(causal=True, key_padding_mask=mask, scale=0.4, group_size=4, sinks=2, shift=shift)
    g = torch.randn(2, 4, 11, 3, dtype=F64)
    for a, b in zip(torch.autograd.grad(sinklora_fast(q, k, v, **kw), (q, k, v), g),
                    torch.autograd.grad(sinklora_reference(q, k, v, **kw), (q, k, v), g)):
        assert_close(a, b, F64, "gradient")
    small = tuple(t[:1, :, -7:].detach().requires_grad_(True) for t in (q, k, v))
    fn = lambda q, k, v: sinklora_fast(q, k, v, causal=True, key_padding_mask=None, scale=0.4, group_size=3,
                                       sinks=1, shift=shift)
    assert torch.autograd.gradcheck(fn, small, fast_mode=True)


@pytest.mark.parametrize("shift", [False, True])
def test_decode_crop_reorder_and_bounded_cache(shift):
    q, k, v = _qkv(nq=30, nk=30)
    kw = dict(scale=0.4, group_size=5, sinks=2, shift=shift)
    full = sinklora_reference(q, k, v, causal=True, key_padding_mask=None, **kw)
    st = init_sinklora_cache(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", group_size=5,
                             sinks=2, shift=shift)
    outs = [sinklora_step(q[:, :, :7], k[:, :, :7], v[:, :, :7], st, **kw)]
    for t in range(7, 30):
        outs.append(sinklora_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, **kw))
        assert st.length <= 2 + 5 - 1  # sinks + group_size - 1 keys, whatever the length
    assert_close(torch.cat(outs, 2), full, F64, "decode")
    st = SinkWindowCache(2, 2, 5, 3, window=5, sinks=2, extra=3, dtype=F64)
    sinklora_step(q[:, :, :20], k[:, :, :20], v[:, :, :20], st, **kw)
    st.crop(17)
    out = torch.cat([sinklora_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st, **kw)
                     for t in range(17, 30)], 2)
    assert_close(out, full[:, :, 17:], F64, "after crop")
    st = init_sinklora_cache(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", group_size=5,
                             sinks=2, shift=shift)
    sinklora_step(q[:, :, :12], k[:, :, :12], v[:, :, :12], st, **kw)
    st.reorder(torch.tensor([1, 0]))
    out = sinklora_step(q[[1, 0], :, 12:], k[[1, 0], :, 12:], v[[1, 0], :, 12:], st, **kw)
    assert_close(out, full[[1, 0], :, 12:], F64, "after reorder")


def test_layer_with_projections_decodes():
    torch.manual_seed(0)
    layer = attnzoo.build("sinklora", 12, 4, kv_heads=2, causal=True, group_size=4, sinks=2).double()
    x = torch.randn(2, 15, 12, dtype=F64)
    full = layer(x)
    st = layer.init_state(2)
    outs = [layer(x[:, :6], state=st)[0]] + [layer(x[:, t:t + 1], state=st)[0] for t in range(6, 15)]
    assert_close(torch.cat(outs, 1), full, F64, "layer decode")
    with pytest.raises(ValueError, match="group_size"):
        sinklora_step(*(torch.zeros(2, h, 1, 3, dtype=F64) for h in (4, 2, 2)), st, scale=1.0, group_size=5, sinks=2,
                      shift=False)
