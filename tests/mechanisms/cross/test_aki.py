"""AKI (P086) oracles: equals exact softmax under the official mask (lower triangle + image x prompt block;
reference and fast, GQA, padding, per-row spans, offsets); no prompt or no image is causal attention; image outputs
change with the prompt but never with generated tokens; decode (image + prompt prefilled whole) == forward; a step
cutting the region raises."""

import math

import pytest
import torch

import attnzoo
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

MECH = "aki"


def qkv(B=2, Hq=4, Hk=2, Nq=14, Nk=14, D=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, D, generator=g, dtype=torch.float64).requires_grad_(grad)
                 for h, n in ((Hq, Nq), (Hk, Nk), (Hk, Nk)))


def official_mask(nk, vs, ve, pe):
    """AKI's construction (vlm.py _make_modality_mutual_mask): tril, then mask[vs:ve, ve:pe] = 1."""
    m = torch.tril(torch.ones(nk, nk, dtype=torch.bool))
    m[vs:ve, ve:pe] = True
    return m


@pytest.mark.parametrize("nq,vs,ve,pe", [(14, 2, 6, 10), (14, 0, 5, 14), (6, 3, 9, 12), (1, 2, 6, 10), (9, 2, 7, 9)])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_equals_softmax_under_the_official_mask(nq, vs, ve, pe, backend):
    q, k, v = qkv(Nq=nq)
    kpm = torch.ones(2, 14, dtype=torch.bool)
    kpm[1, [1, 7, 12]] = False
    want = softmax_attention(q, k, v, key_padding_mask=kpm, attn_mask=official_mask(14, vs, ve, pe)[14 - nq :])
    got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, key_padding_mask=kpm, visual_start=vs,
                            visual_end=ve, prompt_end=pe, backend=backend)
    assert_close(got, want, torch.float64, f"aki {backend} nq={nq} [{vs},{ve},{pe})")


def test_no_prompt_or_no_image_is_causal_attention():
    q, k, v = qkv()
    causal = softmax_attention(q, k, v, causal=True)
    for vs, ve, pe in ((2, 6, 6), (4, 4, 10), (0, 0, 0)):
        for backend in ("reference", "fast"):
            got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=vs, visual_end=ve,
                                    prompt_end=pe, backend=backend)
            assert_close(got, causal, torch.float64, f"aki [{vs},{ve},{pe}) {backend} vs causal")


def test_image_sees_the_prompt_but_never_the_answer():
    q, k, v = qkv()
    kw = dict(mechanism=MECH, causal=True, visual_start=1, visual_end=5, prompt_end=9)
    base = attnzoo.attention(q, k, v, **kw)
    for pos, image_changes in ((7, True), (10, False)):  # a prompt token; a generated token
        k2, v2 = k.clone(), v.clone()
        k2[:, :, pos] += 2.0
        v2[:, :, pos] += 2.0
        d = (attnzoo.attention(q, k2, v2, **kw) - base)[:, :, 1:5].abs().amin(dim=(0, 1, 3))
        assert bool((d > 1e-6).all()) if image_changes else d.max().item() == 0


def test_per_row_spans_and_gradients():
    q, k, v = qkv(B=3, grad=True)
    vs, ve, pe = torch.tensor([0, 3, 5]), torch.tensor([4, 3, 9]), torch.tensor([7, 8, 14])
    kw = dict(mechanism=MECH, causal=True, visual_start=vs, visual_end=ve, prompt_end=pe)
    got = attnzoo.attention(q, k, v, backend="fast", **kw)
    for b in range(3):
        one = softmax_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1],
                                attn_mask=official_mask(14, int(vs[b]), int(ve[b]), int(pe[b])))
        assert_close(got[b : b + 1], one, torch.float64, f"aki per-row span, row {b}")
    q, k, v = qkv(Nq=10, grad=True)
    kw = dict(mechanism=MECH, causal=True, visual_start=2, visual_end=7, prompt_end=11)
    ref, fast = attnzoo.attention(q, k, v, backend="reference", **kw), attnzoo.attention(q, k, v, backend="fast", **kw)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b, torch.float64, "aki fast vs reference gradient")


def test_decode_prefill_then_causal_equals_forward_and_cut_raises():
    q, k, v = qkv()
    mech = attnzoo.get(MECH)
    opts = dict(visual_start=2, visual_end=5, prompt_end=8)
    full = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, **opts)
    scale = 1 / math.sqrt(8)
    state = mech.init_state(batch=2, kv_heads=2, head_dim=8, value_dim=8, dtype=q.dtype, device=q.device)
    outs = [mech.step(q[:, :, :2], k[:, :, :2], v[:, :, :2], state, scale=scale, **opts),  # text before: ok
            mech.step(q[:, :, 2:8], k[:, :, 2:8], v[:, :, 2:8], state, scale=scale, **opts)]  # image + prompt whole
    for t in range(8, 14):
        sl = slice(t, t + 1)
        outs.append(mech.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, scale=scale, **opts))
    assert_close(torch.cat(outs, 2), full, torch.float64, "aki decode vs forward")
    state = mech.init_state(batch=2, kv_heads=2, head_dim=8, value_dim=8, dtype=q.dtype, device=q.device)
    with pytest.raises(ValueError, match="cut the image \\+ prompt region"):
        mech.step(q[:, :, :6], k[:, :, :6], v[:, :, :6], state, scale=scale, **opts)  # image, half the prompt
