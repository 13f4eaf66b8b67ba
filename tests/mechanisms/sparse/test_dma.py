"""Oracles for DMA, trainable dynamic mask sparse attention (CATALOG P016)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import testing
from attnzoo.mechanisms.sparse.dma import (
    dma_attention_fast,
    dma_attention_reference,
    keep_mask_dense,
    value_norm_score,
)
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def _qkv(B, Hq, Hk, nq, nk, d=5, dv=4, seed=0, grad=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hk, nk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hk, nk, dv, generator=g, dtype=torch.float64).to(dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _mask(B, n, seed=2):
    m = torch.rand(B, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    m[:, 0] = True
    return m


SHAPES = [(2, 2, 1, 1, True), (2, 1, 7, 7, True), (4, 2, 65, 65, True), (2, 2, 63, 63, False), (4, 2, 5, 70, True)]


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("Hq,Hk,nq,nk,causal", SHAPES)
def test_window_covering_all_keys_and_no_bias_is_exact(backend, Hq, Hk, nq, nk, causal):
    q, k, v = _qkv(2, Hq, Hk, nq, nk)
    kpm = _mask(2, nk)
    want = softmax_attention(q, k, v, causal=causal, key_padding_mask=kpm)
    got = attnzoo.attention(q, k, v, mechanism="dma", causal=causal, key_padding_mask=kpm, backend=backend,
                            window=nk)
    assert_close(got, want, torch.float64, f"dma window >= Nk ({backend})")


FAST_CASES = [  # Hq, Hk, nq, nk, causal, window
    (2, 2, 150, 150, True, 20), (4, 2, 150, 150, True, 100), (2, 1, 40, 170, True, 30),
    (4, 2, 65, 65, False, 9), (2, 2, 7, 7, True, 3),
]


@pytest.mark.parametrize("Hq,Hk,nq,nk,causal,window", FAST_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_fast_equals_reference_outputs_and_gradients(Hq, Hk, nq, nk, causal, window, masked):
    q, k, v = _qkv(2, Hq, Hk, nq, nk, seed=3, grad=True)
    kpm = _mask(2, nk, seed=4) if masked else None
    kw = dict(mechanism="dma", causal=causal, key_padding_mask=kpm, window=window, bias_scale=0.7)
    ref = attnzoo.attention(q, k, v, backend="reference", **kw)
    fast = attnzoo.attention(q, k, v, backend="fast", **kw)
    assert_close(fast, ref, torch.float64, "fast vs reference")
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b, torch.float64, f"gradient of {name}")


def test_ties_are_broken_by_position_in_both_forms():
    q, k, _ = _qkv(1, 2, 2, 130, 130, seed=5)
    v = torch.randint(-1, 2, (1, 2, 130, 3)).double()  # many equal norms
    score = value_norm_score(v)
    bias = 0.3 * score
    ref = dma_attention_reference(q, k, v, score, bias, causal=True, key_padding_mask=None, scale=0.5, window=17)
    fast = dma_attention_fast(q, k, v, score, bias, causal=True, key_padding_mask=None, scale=0.5, window=17)
    assert_close(fast, ref, torch.float64, "ties")


def test_kept_set_is_top_w_of_the_score_by_explicit_loop():
    g = torch.Generator().manual_seed(6)
    B, Hk, n, w = 2, 2, 12, 4
    score = torch.randint(0, 5, (B, Hk, n), generator=g).double()  # ties on purpose
    kpm = _mask(B, n, seed=7)
    keep = keep_mask_dense(score, n, causal=True, key_padding_mask=kpm, window=w)
    for b in range(B):
        for h in range(Hk):
            for i in range(n):
                visible = [j for j in range(i + 1) if kpm[b, j]]
                best = sorted(visible, key=lambda j: (-float(score[b, h, j]), j))[:w]
                assert keep[b, h, i].nonzero().flatten().tolist() == sorted(best)
                assert int(keep[b, h, i].sum()) == min(w, len(visible))


def test_noncausal_every_query_keeps_the_same_top_w():
    score = torch.tensor([[[0.1, 3.0, 2.0, 3.0, -1.0, 0.5]]])
    keep = keep_mask_dense(score, 4, causal=False, key_padding_mask=None, window=3)
    assert keep.shape == (1, 1, 4, 6)
    assert (keep == torch.tensor([False, True, True, True, False, False])).all()


def test_sparse_when_window_small():
    q, k, v = _qkv(1, 2, 2, 40, 40)
    out = attnzoo.attention(q, k, v, mechanism="dma", causal=True, window=5)
    assert (out - softmax_attention(q, k, v, causal=True)).abs().max() > 1e-3


def test_step_with_chunked_prefill_equals_forward():
    q, k, v = _qkv(2, 4, 2, 90, 90, seed=8)
    mech = attnzoo.get("dma")
    full = attnzoo.attention(q, k, v, mechanism="dma", causal=True, window=11, bias_scale=0.2)
    opts = mech.resolve_options({"window": 11, "bias_scale": 0.2})
    state = mech.init_state(batch=2, kv_heads=2, head_dim=5, value_dim=4, dtype=q.dtype, device=q.device, **opts)
    outs, t = [], 0
    for size in (70, 1, 5, 1, 13):
        sl = slice(t, t + size)
        outs.append(mech.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, scale=1 / math.sqrt(5), **opts))
        t += size
    assert_close(torch.cat(outs, 2), full, torch.float64, "prefill 70 + chunks vs causal forward")


# ---- the trainable module ---------------------------------------------------------------------------------
def _module_record():
    """The dma record seen through its module only, so the conformance checks exercise the layer."""
    mech = attnzoo.get("dma")
    return dataclasses.replace(mech, reference=None, step=None, init_state=None, patterns=("noncausal_self",
                               "causal_self"), test_options={"window": 3}, test_sizes={"n": 9, "dim": 16})


def _module_cases():
    mech = _module_record()
    return [pytest.param(name, p, fn, id=f"{name}-{p}") for name, p, fn in testing.cases(mech)]


@pytest.mark.parametrize("name,pattern,check", _module_cases())
def test_module_conformance(name, pattern, check):
    mech = _module_record()
    check(mech) if pattern is None else check(mech, pattern)


def test_module_bias_matches_official_formula_and_receives_gradients():
    torch.manual_seed(0)
    layer = attnzoo.build("dma", 16, 4, kv_heads=2, causal=True, window=3).double()
    with torch.no_grad():
        layer.A.copy_(torch.tensor([0.5, -1.5]))
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    v = layer.v_proj(x).view(2, 9, 2, 4).transpose(1, 2)
    dt = v.transpose(1, 2).reshape(2, 9, 8) @ layer.dt_proj.weight.T  # (B, N, Hk)
    want = layer.A.view(1, 2, 1) * F.softplus(dt).transpose(1, 2)
    assert_close(layer.dynamic_bias(v), want, torch.float64, "A * softplus(V W_dt)")
    layer.bias_form = "exp"
    assert_close(layer.dynamic_bias(v), want.exp(), torch.float64, "exp form")
    layer.bias_form = "linear"
    layer(x).square().sum().backward()
    assert layer.A.grad.abs().sum() > 0 and layer.dt_proj.weight.grad.abs().sum() > 0


def test_module_default_init_follows_official():
    layer = attnzoo.build("dma", 16, 4, causal=True)
    assert torch.equal(layer.A, torch.zeros(4)) and layer.dt_proj.weight.shape == (4, 16)
    assert layer.window == 2048


def test_errors():
    q, k, v = _qkv(1, 2, 2, 6, 6)
    with pytest.raises(ValueError, match="bias_form"):
        attnzoo.attention(q, k, v, mechanism="dma", bias_form="exp")
    with pytest.raises(ValueError, match="bias_scale"):
        attnzoo.build("dma", 8, 2, bias_scale=1.0)
    layer = attnzoo.build("dma", 8, 2)
    with pytest.raises(ValueError, match="context"):
        layer(torch.randn(1, 4, 8), torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="causal"):
        layer.init_state(1)
    with pytest.raises(ValueError, match="window"):
        attnzoo.attention(q, k, v, mechanism="dma", window=0)
