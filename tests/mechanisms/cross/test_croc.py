"""Croc (P092) oracles: equals exact softmax under the hand-written mixed mask (reference and fast, GQA, padding,
per-row spans, decoding offsets); visual_start=0 is prefix-LM; text rows are causal rows; the span is truly
bidirectional; decode (prompt prefilled whole, then causal) == the full forward; a step cutting the span raises;
gradcheck; a planted leak is caught by the mask-aware causality check."""

import math

import pytest
import torch

import attnzoo
from attnzoo import masks, registry, testing
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

MECH = "croc"


def qkv(B=2, Hq=4, Hk=2, Nq=12, Nk=12, D=8, seed=0, grad=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
                 for h, n in ((Hq, Nq), (Hk, Nk), (Hk, Nk)))


def hand_mask(nq, nk, s, e):
    """M[i, j] = both visual or j <= p, with query i at p = i + nk - nq, written as loops."""
    m = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        p = i + nk - nq
        for j in range(nk):
            m[i, j] = (s <= p < e and s <= j < e) or j <= p
    return m


@pytest.mark.parametrize("nq,nk,s,e", [(12, 12, 3, 8), (12, 12, 0, 5), (5, 12, 3, 9), (1, 12, 0, 12), (7, 7, 6, 7)])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_equals_softmax_under_the_hand_written_mask(nq, nk, s, e, backend):
    q, k, v = qkv(Nq=nq, Nk=nk)
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[1, [2, nk - 2]] = False
    want = softmax_attention(q, k, v, key_padding_mask=kpm, attn_mask=hand_mask(nq, nk, s, e))
    got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, key_padding_mask=kpm, visual_start=s,
                            visual_end=e, backend=backend)
    assert_close(got, want, torch.float64, f"croc {backend} nq={nq} nk={nk} span=[{s},{e})")


def test_per_row_spans_equal_each_row_alone():
    q, k, v = qkv(B=3, Nq=10, Nk=10)
    s, e = torch.tensor([0, 2, 5]), torch.tensor([4, 2, 10])
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=s, visual_end=e, backend=backend)
        for b in range(3):
            one = softmax_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1],
                                    attn_mask=hand_mask(10, 10, int(s[b]), int(e[b])))
            assert_close(got[b : b + 1], one, torch.float64, f"croc per-row span, row {b} ({backend})")


def test_visual_start_zero_is_prefix_lm_and_text_rows_are_causal_rows():
    q, k, v = qkv()
    got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=0, visual_end=5)
    assert_close(got, softmax_attention(q, k, v, attn_mask=masks.materialize(masks.prefix_lm(5), 1, 1, 12, 12)),
                 torch.float64, "croc(0, 5) vs prefix-LM")
    got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=4, visual_end=9)
    causal = softmax_attention(q, k, v, causal=True)
    text = [0, 1, 2, 3, 9, 10, 11]
    assert (got[:, :, text] - causal[:, :, text]).abs().max().item() < 1e-12
    assert (got[:, :, 4:9] - causal[:, :, 4:9]).abs().max().item() > 1e-3  # the span is not causal


def test_span_is_bidirectional_and_nothing_else_leaks():
    q, k, v = qkv()
    base = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=3, visual_end=8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7] += 2.0  # the last visual token
    v2[:, :, 7] += 2.0
    pert = attnzoo.attention(q, k2, v2, mechanism=MECH, causal=True, visual_start=3, visual_end=8)
    diff = (pert - base).abs().amax(dim=(0, 1, 3))  # per query row
    assert (diff[3:7] > 1e-6).all()  # earlier visual tokens see it
    assert (diff[:3] < 1e-14).all()  # text before the image does not


def test_fast_form_matches_reference_gradients_and_gradcheck():
    q, k, v = qkv(Nq=9, Nk=11, grad=True)
    kw = dict(mechanism=MECH, causal=True, visual_start=3, visual_end=7)
    ref = attnzoo.attention(q, k, v, backend="reference", **kw)
    fast = attnzoo.attention(q, k, v, backend="fast", **kw)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b, torch.float64, "croc fast vs reference gradient")
    small = [t[:1, :2, :5].detach().requires_grad_(True) for t in qkv(Hq=2, Hk=1, Nq=5, Nk=5)]
    fn = lambda q, k, v: attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=1, visual_end=4,
                                           backend="fast")
    assert torch.autograd.gradcheck(fn, small, fast_mode=True)


def test_decode_prefill_whole_prompt_then_causal_equals_forward():
    q, k, v = qkv(Nq=14, Nk=14)
    s, e = torch.tensor([2, 4]), torch.tensor([7, 6])
    mech = attnzoo.get(MECH)
    full = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=s, visual_end=e)
    state = mech.init_state(batch=2, kv_heads=2, head_dim=8, value_dim=8, dtype=q.dtype, device=q.device)
    scale = 1 / math.sqrt(8)
    outs = [mech.step(q[:, :, :8], k[:, :, :8], v[:, :, :8], state, scale=scale, visual_start=s, visual_end=e)]
    for t in range(8, 14):
        sl = slice(t, t + 1)
        outs.append(mech.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, scale=scale, visual_start=s,
                              visual_end=e))
    assert_close(torch.cat(outs, 2), full, torch.float64, "croc decode vs forward")
    assert state.seq_len == 14


def test_a_step_cutting_the_visual_span_raises():
    q, k, v = qkv(Nq=10, Nk=10)
    mech = attnzoo.get(MECH)
    state = mech.init_state(batch=2, kv_heads=2, head_dim=8, value_dim=8, dtype=q.dtype, device=q.device)
    with pytest.raises(ValueError, match="cut the visual span"):
        mech.step(q[:, :, :4], k[:, :, :4], v[:, :, :4], state, scale=0.3, visual_start=2, visual_end=6)
    assert state.seq_len == 0  # nothing appended
    mech.step(q[:, :, :2], k[:, :, :2], v[:, :, :2], state, scale=0.3, visual_start=2, visual_end=6)  # before: ok
    mech.step(q[:, :, 2:6], k[:, :, 2:6], v[:, :, 2:6], state, scale=0.3, visual_start=2, visual_end=6)  # whole: ok
    with pytest.raises(ValueError, match="visual_start: expected an int >= 0"):
        mech.step(q[:, :, 6:7], k[:, :, 6:7], v[:, :, 6:7], state, scale=0.3, visual_start=-1, visual_end=6)


def test_option_and_pattern_errors():
    q, k, v = qkv()
    with pytest.raises(attnzoo.UnsupportedPatternError):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=False, visual_start=1, visual_end=3)
    with pytest.raises(ValueError, match="visual_start, visual_end"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=5, visual_end=3)
    with pytest.raises(ValueError, match="one position per batch row"):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=torch.tensor([1]), visual_end=3)
    with pytest.raises(attnzoo.OptionError):
        attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=1.5, visual_end=3)


def test_planted_leak_is_caught_by_the_mask_aware_causality_check():
    """Text rows before the span that also see the span (a bug): the declared mask says they may not."""
    rec = attnzoo.get(MECH)

    def leaky(q, k, v, *, causal, key_padding_mask, scale, visual_start, visual_end):
        nq, nk = q.shape[2], k.shape[2]
        m = masks.materialize(masks.croc(visual_start, visual_end, offset=nk - nq), 1, 1, nq, nk)
        m = m | masks.materialize(masks.span(0, visual_end, offset=nk - nq), 1, 1, nq, nk)
        return softmax_attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=m, scale=scale)

    bad = registry.Mechanism(**{**{f: getattr(rec, f) for f in rec.__dataclass_fields__}, "name": "croc_leaky",
                                "aliases": (), "reference": leaky, "fast": None, "step": None, "init_state": None})
    registry.register(bad)
    try:
        with pytest.raises(AssertionError, match="future leak"):
            testing.check_causality(bad, "causal_self")
    finally:
        registry.unregister("croc_leaky")
