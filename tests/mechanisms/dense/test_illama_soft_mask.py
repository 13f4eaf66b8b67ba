"""Oracles for the iLLaMA soft mask (P090)."""

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.mechanisms.dense.illama_soft_mask import set_soft_mask_rate, soft_mask_schedule
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _qkv(b=2, hq=4, hk=2, n=7, d=5, dv=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g, dtype=F64).to(dtype)
    k = torch.randn(b, hk, n, d, generator=g, dtype=F64).to(dtype)
    v = torch.randn(b, hk, n, dv, generator=g, dtype=F64).to(dtype)
    return q, k, v


def _run(q, k, v, backend="reference", causal=False, **kw):
    return attnzoo.attention(q, k, v, mechanism="illama_soft_mask", causal=causal, backend=backend, **kw)


@pytest.mark.parametrize("form", ["official", "mixture"])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_endpoints(form, backend):
    q, k, v = _qkv()
    bi = softmax_attention(q, k, v)
    assert_close(_run(q, k, v, backend, rate=1.0, form=form), bi, F64, "rate 1 = bidirectional")
    causal = softmax_attention(q, k, v, causal=True)
    if form == "mixture":
        assert_close(_run(q, k, v, backend, rate=0.0, form=form), causal, F64, "rate 0 = causal")
    for rate in (0.0, 0.4, 1.0):  # causal=True: exact causal softmax at every rate
        assert_close(_run(q, k, v, backend, causal=True, rate=rate, form=form), causal, F64, f"causal {rate}")


def test_official_form_transcribes_the_code_and_is_not_causal_at_rate_zero():
    """Official code: attn = softmax(qk^T * scale); attn = attn * (r + (1 - r) tril). At r = 0 the rows do
    not sum to one and an earlier output changes when a later key changes."""
    q, k, v = _qkv(hq=2, hk=2, n=6)
    scale = 5 ** -0.5
    tri = torch.ones(6, 6, dtype=F64).tril()
    for r in (0.0, 0.3, 1.0):
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) * (r + (1 - r) * tri)
        for backend in ("reference", "fast"):
            assert_close(_run(q, k, v, backend, rate=r), attn @ v, F64, f"official r={r} {backend}")
    base = _run(q, k, v, rate=0.0)
    k2 = k.clone()
    k2[:, :, 5] += 1.0
    assert (base[:, :, 0] - _run(q, k2, v, rate=0.0)[:, :, 0]).abs().max() > 1e-3  # future leak, as in the code


@pytest.mark.parametrize("form", ["official", "mixture"])
def test_class_token_row_is_bidirectional_for_every_rate(form):
    q, k, v = _qkv(n=9)
    bi = softmax_attention(q, k, v)
    for rate in (0.0, 0.25, 0.8):
        for backend in ("reference", "fast"):
            out = _run(q, k, v, backend, rate=rate, form=form)
            assert_close(out[:, :, -1], bi[:, :, -1], F64, f"last row rate={rate} {backend}")


@pytest.mark.parametrize("n,d,dv", [(1, 5, 3), (7, 3, 6), (65, 4, 4)])
@pytest.mark.parametrize("rate", [0.0, 0.35])
def test_fast_official_matches_reference_with_padding_and_gqa(n, d, dv, rate):
    q, k, v = (t.requires_grad_(True) for t in _qkv(n=n, d=d, dv=dv, seed=n))
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(5)) > 0.3
    kpm[0, 0] = False  # row 0 of batch 0 sees no earlier key: causal part empty, full part not
    kpm[1, -1] = True
    for mask in (None, kpm):
        ref = _run(q, k, v, "reference", rate=rate, key_padding_mask=mask)
        fast = _run(q, k, v, "fast", rate=rate, key_padding_mask=mask)
        assert_close(fast, ref, F64, "output")
        g = torch.randn_like(ref)
        for a, b, name in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), "qkv"):
            assert_close(a, b, F64, f"grad {name}")


def test_fast_official_float32_and_gradcheck():
    q, k, v = _qkv(dtype=torch.float32)
    assert_close(_run(q, k, v, "fast", rate=0.6), _run(q.double(), k.double(), v.double(), rate=0.6),
                 torch.float32, "float32")
    q, k, v = (t[:1, :2, :4].detach().requires_grad_(True) for t in _qkv(hk=4))
    kpm = torch.tensor([[False, True, True, True]])
    fn = lambda q, k, v: _run(q, k, v, "fast", rate=0.3, key_padding_mask=kpm)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_schedule_matches_official_scheduler():
    lin = soft_mask_schedule(epochs=4, steps_per_epoch=2, cutoff_epochs=2, schedule="linear")
    np.testing.assert_allclose(lin, [1.0, 2 / 3, 1 / 3, 0.0, 0, 0, 0, 0])
    const = soft_mask_schedule(epochs=3, steps_per_epoch=2, cutoff_epochs=1, schedule="constant")
    np.testing.assert_allclose(const, [1.0, 1.0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="cutoff_epochs"):
        soft_mask_schedule(2, 1, 3)


def test_set_rate_on_layers():
    torch.manual_seed(0)
    layer = attnzoo.build("illama_soft_mask", 16, 4, rate=1.0).double()
    x = torch.randn(2, 7, 16, dtype=F64)
    bi = attnzoo.build("softmax", 16, 4).double()
    bi.load_state_dict(layer.state_dict())
    assert_close(layer(x), bi(x), F64, "rate 1 layer")
    model = torch.nn.Sequential(layer)
    assert set_soft_mask_rate(model, 0.0) == 1
    assert layer.options["rate"] == 0.0
    assert (layer(x) - bi(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rate"):
        set_soft_mask_rate(model, 1.5)


def test_unsupported_noncausal_cross_raises():
    q = torch.randn(1, 2, 3, 4, dtype=F64)
    k = torch.randn(1, 2, 5, 4, dtype=F64)
    with pytest.raises(ValueError, match="noncausal_cross"):
        _run(q, k, k, rate=0.5)
