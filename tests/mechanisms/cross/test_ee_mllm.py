"""EE-MLLM (P049) oracles: equals exact softmax under [[I, 0], [1, causal]] (reference and fast, GQA, padding,
per-row spans, offsets); a visual output is exactly its own value and is unaffected by other visual tokens; text
rows equal causal attention; a padded visual key gives zeros; decoding with any prefill split == forward."""

import math

import pytest
import torch

import attnzoo
from attnzoo.reference import repeat_kv, softmax_attention
from attnzoo.testing import assert_close

MECH = "ee_mllm"


def qkv(B=2, Hq=4, Hk=2, Nq=12, Nk=12, D=8, Dv=6, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, d, generator=g, dtype=torch.float64).requires_grad_(grad)
                 for h, n, d in ((Hq, Nq, D), (Hk, Nk, D), (Hk, Nk, Dv)))


def hand_mask(nq, nk, s, e):
    """[[I, 0], [1, causal]]: visual rows see only themselves; other rows are causal (loops)."""
    m = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        p = i + nk - nq
        for j in range(nk):
            m[i, j] = (j == p) if s <= p < e else j <= p
    return m


@pytest.mark.parametrize("nq,nk,s,e", [(12, 12, 0, 6), (12, 12, 3, 8), (5, 12, 2, 9), (1, 12, 11, 12), (6, 6, 2, 2)])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_equals_softmax_under_the_composite_mask(nq, nk, s, e, backend):
    q, k, v = qkv(Nq=nq, Nk=nk)
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[1, [0, nk - 3]] = False
    want = softmax_attention(q, k, v, key_padding_mask=kpm, attn_mask=hand_mask(nq, nk, s, e))
    got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, key_padding_mask=kpm, visual_start=s,
                            visual_end=e, backend=backend)
    assert_close(got, want, torch.float64, f"ee_mllm {backend} nq={nq} nk={nk} span=[{s},{e})")


def test_visual_outputs_are_own_values_and_ignore_other_visual_tokens():
    q, k, v = qkv()
    got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, visual_start=0, visual_end=6, backend="fast")
    assert torch.equal(got[:, :, :6], repeat_kv(v, 2)[:, :, :6])  # bit for bit: the aligner W_o W_v x
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2] += 3.0
    v2[:, :, 2] += 3.0
    pert = attnzoo.attention(q, k2, v2, mechanism=MECH, causal=True, visual_start=0, visual_end=6)
    other_visual = [0, 1, 3, 4, 5]
    assert (pert[:, :, other_visual] - got[:, :, other_visual]).abs().max().item() == 0
    assert (pert[:, :, 6:] - got[:, :, 6:]).abs().amin(dim=(0, 1, 3)).min().item() > 0  # text reads the image
    causal = softmax_attention(q, k, v, causal=True)
    assert (got[:, :, 6:] - causal[:, :, 6:]).abs().max().item() < 1e-12  # text rows are causal rows


def test_padded_visual_key_gives_zeros_and_per_row_spans():
    q, k, v = qkv(B=3)
    kpm = torch.ones(3, 12, dtype=torch.bool)
    kpm[0, 4] = False
    s, e = torch.tensor([2, 0, 7]), torch.tensor([6, 0, 12])
    for backend in ("reference", "fast"):
        got = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, key_padding_mask=kpm, visual_start=s,
                                visual_end=e, backend=backend)
        assert got[0, :, 4].abs().max().item() == 0
        for b in range(3):
            one = softmax_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], key_padding_mask=kpm[b : b + 1],
                                    attn_mask=hand_mask(12, 12, int(s[b]), int(e[b])))
            assert_close(got[b : b + 1], one, torch.float64, f"ee_mllm per-row span, row {b} ({backend})")


def test_fast_gradients_match_reference():
    q, k, v = qkv(Nq=9, Nk=11, grad=True)
    kw = dict(mechanism=MECH, causal=True, visual_start=3, visual_end=7)
    ref = attnzoo.attention(q, k, v, backend="reference", **kw)
    fast = attnzoo.attention(q, k, v, backend="fast", **kw)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert (a - b).abs().max().item() < 1e-12


@pytest.mark.parametrize("prefill", [1, 3, 5, 9])
def test_decode_with_any_prefill_split_equals_forward(prefill):
    q, k, v = qkv(Nq=12, Nk=12)
    mech = attnzoo.get(MECH)
    opts = dict(visual_start=torch.tensor([1, 4]), visual_end=torch.tensor([6, 9]))
    full = attnzoo.attention(q, k, v, mechanism=MECH, causal=True, **opts)
    state = mech.init_state(batch=2, kv_heads=2, head_dim=8, value_dim=6, dtype=q.dtype, device=q.device)
    scale = 1 / math.sqrt(8)
    outs = [mech.step(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], state, scale=scale, **opts)]
    for t in range(prefill, 12):
        sl = slice(t, t + 1)
        outs.append(mech.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, scale=scale, **opts))
    assert_close(torch.cat(outs, 2), full, torch.float64, f"ee_mllm decode (prefill {prefill}) vs forward")
