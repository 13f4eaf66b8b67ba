"""ContextCache and the CrossAttention layer: a fixed context projected once, decoding against it equals the full
run, beam-search reorder, frame append (causal cross by position), crop, and the layer's validation."""

import pytest
import torch

from attnzoo import ContextCache, CrossAttention, cross_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _kv(B=3, H=2, M=6, D=4, seed=0):
    g = _g(seed)
    return torch.randn(B, H, M, D, generator=g, dtype=F64), torch.randn(B, H, M, D, generator=g, dtype=F64)


def _layer(**kw):
    torch.manual_seed(0)
    return CrossAttention(16, 4, context_dims={"text": 12, "image": 10}, **kw).double()


def _ctx(B=3, seed=1):
    g = _g(seed)
    return {"text": torch.randn(B, 7, 12, generator=g, dtype=F64),
            "image": torch.randn(B, 5, 10, generator=g, dtype=F64)}


def test_cache_holds_sources_and_attend_equals_cross_attention():
    k, v = _kv()
    k2, v2 = _kv(M=4, seed=1)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 3:] = False
    c = ContextCache()
    c.set("a", k, v, key_padding_mask=mask)
    c.set("b", k2, v2)
    assert c.names == ("a", "b") and c.batch == 3 and c.length("a") == 6 and "b" in c
    q = torch.randn(3, 4, 5, 4, generator=_g(2), dtype=F64)
    want = cross_attention(q, {"a": (k, v), "b": (k2, v2)}, masks={"a": mask}, mode="joint")
    assert_close(c.attend(q, mode="joint"), want, F64, "attend")
    with pytest.raises(ValueError, match="already cached"):
        c.set("a", k, v)
    with pytest.raises(TypeError, match="masks: ContextCache.attend uses the cached"):
        c.attend(q, masks={})
    with pytest.raises(KeyError, match="'c' is not in this ContextCache"):
        c.keys("c")
    assert c.nbytes() >= (k.numel() + v.numel() + k2.numel() + v2.numel()) * 8


def test_reorder_selects_rows_of_every_source_and_positions():
    k, v = _kv()
    c = ContextCache()
    pos = torch.arange(18).view(3, 6)
    c.set("a", k, v, positions=pos)
    c.set("b", *_kv(M=2, seed=3))
    idx = torch.tensor([2, 2, 0])
    c.reorder(idx)
    assert torch.equal(c.keys("a"), k[idx]) and torch.equal(c.values("a"), v[idx])
    assert torch.equal(c.positions("a"), pos[idx])
    with pytest.raises(ValueError, match="index"):
        c.reorder(torch.tensor([3]))


def test_append_keeps_positions_sorted_and_crop_undoes_it():
    k, v = _kv(M=4)
    c = ContextCache()
    c.append("frames", k, v, positions=torch.tensor([0, 0, 1, 1]))
    k2, v2 = _kv(M=2, seed=4)
    c.append("frames", k2, v2, positions=torch.tensor([2, 2]))
    assert c.length("frames") == 6 and c.positions("frames").tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(c.keys("frames"), torch.cat([k, k2], 2))
    with pytest.raises(ValueError, match="must not come before its last position"):
        c.append("frames", k2, v2, positions=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="has positions"):
        c.append("frames", k2, v2)
    c.crop(4, source="frames")
    assert c.length("frames") == 4 and c.positions("frames").tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="length: expected an int in"):
        c.crop(5, source="frames")
    c.seq_len = 7
    c.crop(3)
    assert c.seq_len == 3 and c.length("frames") == 4


def test_layer_decode_with_cache_equals_full_run_and_never_projects_again():
    m = _layer()
    x = torch.randn(3, 9, 16, generator=_g(5), dtype=F64)
    ctx = _ctx()
    mask = {"text": torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] * 7])}
    full = m(x, ctx, key_padding_mask=mask)
    cache = m.context_cache(ctx, key_padding_mask=mask)
    calls = []
    for lin in [*m.k_proj.values(), *m.v_proj.values()]:
        lin.register_forward_hook(lambda *a: calls.append(1))
    outs = [m(x[:, :4], state=cache)[0]] + [m(x[:, t : t + 1], state=cache)[0] for t in range(4, 9)]
    assert_close(torch.cat(outs, 1), full, F64, "decode vs full")
    assert not calls, "the context projections ran again while decoding"
    # filling an empty cache through forward gives the same
    y, st = m(x, ctx, key_padding_mask=mask, state=ContextCache())
    assert_close(y, full, F64, "forward with an empty cache")
    with pytest.raises(ValueError, match="already in this ContextCache"):
        m(x, ctx, state=st)


def test_layer_beam_reorder_then_decode_equals_reordered_full_run():
    m = _layer(mode="joint")
    x = torch.randn(3, 4, 16, generator=_g(6), dtype=F64)
    ctx = _ctx()
    cache = m.context_cache(ctx)
    idx = torch.tensor([1, 1, 2])
    cache.reorder(idx)
    got = m(x, state=cache)[0]
    want = m(x, {n: c[idx] for n, c in ctx.items()})
    assert_close(got, want, F64, "reordered")


def test_layer_causal_by_position_with_frames_appended():
    torch.manual_seed(0)
    m = CrossAttention(16, 4, context_dim=10, causal=True).double()
    g = _g(7)
    frames = torch.randn(2, 12, 10, generator=g, dtype=F64)
    fpos = torch.arange(12) // 4  # 3 frames of 4 tokens
    x = torch.randn(2, 6, 16, generator=g, dtype=F64)
    qpos = torch.tensor([0, 0, 1, 1, 2, 2])
    full = m(x, frames, q_pos=qpos, context_pos=fpos)
    cache = ContextCache()
    outs = []
    for t in range(3):
        sl = slice(4 * t, 4 * t + 4)
        m.extend_context(cache, frames[:, sl], context_pos=fpos[sl])
        outs.append(m(x[:, 2 * t : 2 * t + 2], q_pos=qpos[2 * t : 2 * t + 2], state=cache)[0])
    assert_close(torch.cat(outs, 1), full, F64, "frame-append decode")
    with pytest.raises(ValueError, match="q_pos: this layer is causal by position"):
        m(x, frames)


def test_layer_validation():
    m = _layer()
    x = torch.randn(3, 4, 16, dtype=F64)
    ctx = _ctx()
    with pytest.raises(ValueError, match="context: unknown source 'imgae'"):
        m(x, {"imgae": ctx["image"]})
    with pytest.raises(TypeError, match="context: this layer has several sources"):
        m(x, ctx["text"])
    with pytest.raises(ValueError, match=r"context\['text'\]: expected \(B, N, 12\)"):
        m(x, {"text": ctx["image"]})
    with pytest.raises(TypeError, match=r"context\['text'\]: expected dtype torch.float64"):
        m(x, {"text": ctx["text"].float()})
    with pytest.raises(ValueError, match="key_padding_mask: given for source 'image'"):
        m(x, {"text": ctx["text"]}, key_padding_mask={"image": torch.ones(3, 5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="context: cross-attention needs a context"):
        m(x)
    with pytest.raises(ValueError, match="q_pos, context_pos: positions are for causal layers"):
        m(x, ctx, q_pos=torch.zeros(4))
    with pytest.raises(TypeError, match="state: expected an attnzoo ContextCache"):
        m(x, ctx, state={})
    with pytest.raises(ValueError, match="holds none of this layer's sources"):
        m(x, state=ContextCache())
    with pytest.raises(ValueError, match="context_dims, context_dim: give one"):
        CrossAttention(16, 4, context_dims={"a": 3}, context_dim=3)
    with pytest.raises(ValueError, match="mode: expected one of"):
        CrossAttention(16, 4, mode="both")


def test_source_mass_through_the_layer_sums_to_one_in_joint_mode():
    m = _layer(mode="joint")
    x = torch.randn(3, 4, 16, generator=_g(8), dtype=F64)
    y, mass = m(x, _ctx(), return_source_mass=True)
    assert y.shape == (3, 4, 16) and mass["text"].shape == (3, 4, 4)
    assert ((mass["text"] + mass["image"]) - 1).abs().max() < 1e-12
