"""Oracles of `based` (Taylor linear attention) and `based_layer` (BASED's mixers)."""

import dataclasses
import math

import pytest
import torch

import attnzoo
from attnzoo import testing
from attnzoo.mechanisms.linear.based import BASED_LAYER, taylor_features
from attnzoo.mechanisms.linear.linear_attention import recurrent_linear_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def qkv(n, hq=2, hk=1, d=16, dv=8, b=2, seed=0):
    return rand(b, hq, n, d, seed=seed), rand(b, hk, n, d, seed=seed + 1), rand(b, hk, n, dv, seed=seed + 2)


@pytest.mark.parametrize("packed", [False, True])
def test_taylor_identity(packed):
    """phi(q).phi(k) == 1 + q.k/sqrt(d') + (q.k)^2/(2 d') exactly, d' = 16."""
    q, k = rand(50, 16, seed=1), rand(50, 16, seed=2)
    s = 1 / math.sqrt(16)
    got = (taylor_features(q, s, packed=packed) * taylor_features(k, s, packed=packed)).sum(-1)
    dot = (q * k).sum(-1)
    want = 1 + dot / math.sqrt(16) + dot**2 / (2 * 16)
    assert (got - want).abs().max() < 1e-12 * want.abs().max()
    assert taylor_features(q, s, packed=packed).shape[-1] == (153 if packed else 273)


def test_official_feature_map():
    """The paper's map is the official TaylorExp: [1, x / d'^(1/4), vec(x x^T) / (sqrt(2) sqrt(d'))]."""
    x = rand(3, 16, seed=4)
    want = torch.cat([torch.ones(3, 1, dtype=F64), x / 16 ** 0.25,
                      (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2) / 4], -1)
    assert_close(taylor_features(x, 1 / math.sqrt(16), packed=False), want, F64, "TaylorExp")


@pytest.mark.parametrize("n", [1, 7, 65])
def test_chunked_equals_recurrent_equals_quadratic(n):
    q, k, v = qkv(n, hq=4, hk=2, d=4, dv=3)  # d' = 4 keeps the explicit loop cheap; d' = 16 is tested above
    ref = attnzoo.attention(q, k, v, mechanism="based", causal=True, backend="reference")
    s = 1 / math.sqrt(4)
    rec, _, _ = recurrent_linear_attention(taylor_features(q, s, packed=False), taylor_features(k, s, packed=False),
                                           v, normalize=True, eps=1e-12)
    assert_close(rec, ref, F64, "recurrent (full map) vs quadratic (Taylor polynomial)")
    for chunk in (1, 3, 16, 64):
        fast = attnzoo.attention(q, k, v, mechanism="based", causal=True, chunk=chunk, backend="fast")
        assert_close(fast, ref, F64, f"chunked (chunk {chunk}, packed map) vs quadratic")


def test_official_quadratic_implementation():
    """BASED's parallel_implementation='quadratic': tril(phi(q) phi(k)^T) v / (phi(q) . cumsum phi(k) + eps)."""
    q, k, v = qkv(12, hq=1)
    s = 1 / math.sqrt(16)
    fq, fk = taylor_features(q, s, packed=False), taylor_features(k, s, packed=False)
    y = torch.tril(fq @ fk.transpose(-1, -2)) @ v
    z = 1 / ((fq * fk.cumsum(2)).sum(-1) + 1e-12)
    out = attnzoo.attention(q, k, v, mechanism="based", causal=True)
    assert_close(out, y * z.unsqueeze(-1), F64, "based vs official quadratic form")


def test_noncausal_is_the_global_summary():
    q, k, v = qkv(5, hk=2)
    s = 1 / math.sqrt(16)
    fq, fk = taylor_features(q, s), taylor_features(k, s)
    num = fq @ (fk.transpose(-1, -2) @ v)
    den = fq @ fk.sum(2, keepdim=True).transpose(-1, -2)
    out = attnzoo.attention(q, k, v, mechanism="based", causal=False, backend="fast")
    assert_close(out, num / (den + 1e-12), F64, "global summary")


def test_layer_linear_mixer_is_the_official_layer():
    torch.manual_seed(0)
    m = attnzoo.build("based_layer", 32, 2, causal=True, chunk=5).double()
    x = rand(2, 13, 32, seed=5)
    q = m.proj_q(x).view(2, 13, 2, 16).transpose(1, 2)
    k = m.proj_k(x).view(2, 13, 2, 16).transpose(1, 2)
    v = m.proj_v(x).view(2, 13, 2, 16).transpose(1, 2)
    s = 1 / math.sqrt(16)
    fq, fk = taylor_features(q, s, packed=False), taylor_features(k, s, packed=False)
    y = torch.tril(fq @ fk.transpose(-1, -2)) @ v / ((fq * fk.cumsum(2)).sum(-1, keepdim=True) + 1e-12)
    want = m.out_proj(y.transpose(1, 2).reshape(2, 13, 32))
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), want, F64, f"based_layer linear mixer ({backend}) vs official LinearAttention")


def test_layer_conv_mixer_is_base_conv():
    torch.manual_seed(0)
    m = attnzoo.build("based_layer", 8, 2, causal=True, mixer="conv", kernel_size=3, expand=4).double()
    x = rand(1, 6, 8, seed=6)
    u1, u2 = m.in_proj(x).split(16, dim=-1)
    w = m.conv.weight[:, 0]  # (16, 3): y_t = sum_i w_i u1_(t - 2 + i)
    pad = torch.cat([torch.zeros(1, 2, 16, dtype=F64), u1], 1)
    y = torch.stack([(pad[:, t:t + 3] * w.T).sum(1) for t in range(6)], 1)
    assert_close(m(x), m.out_proj(torch.nn.functional.silu(y) * u2), F64, "BaseConv by hand")


def test_window_mixer_covering_the_sequence_is_causal_softmax():
    torch.manual_seed(0)
    m = attnzoo.build("based_layer", 16, 4, causal=True, mixer="window", window=64).double()
    dense = attnzoo.build("softmax", 16, 4, causal=True).double()
    dense.load_state_dict(m.attn.state_dict())
    x = rand(2, 20, 16, seed=7)
    assert_close(m(x), dense(x), F64, "window >= N vs causal softmax")


@pytest.mark.parametrize("mixer", ["conv", "window"])
def test_conformance_of_the_other_mixers(mixer):
    mech = dataclasses.replace(BASED_LAYER, test_options={"mixer": mixer, "window": 3, "chunk": 3})
    failures = testing.run_all(mech)
    assert not failures, failures


def test_decode_state_size_is_constant():
    torch.manual_seed(0)
    m = attnzoo.build("based_layer", 32, 2, causal=True).double().eval()
    x = rand(1, 30, 32, seed=8)
    state = m.init_state(1)
    out, _ = m(x[:, :20], state=state)
    size = state.state_nbytes()
    outs = [out] + [m(x[:, t:t + 1], state=state)[0] for t in range(20, 30)]
    assert state.state_nbytes() == size == 2 * 153 * (16 + 1) * 8  # (1 + 16 + 136) x (16 + 1) per head
    assert_close(torch.cat(outs, 1), m(x), F64, "decode vs forward")


def test_taylor_kernel_in_pieces_with_mask_and_prefix(monkeypatch):
    """The fast path's Taylor kernel across several pieces (8 tokens each here), with GQA, a key mask and
    a causal-cross prefix (initial state): outputs and gradients equal the reference's."""
    from attnzoo.kernels import chunked

    monkeypatch.setattr(chunked, "PIECE_TOKENS", 8)
    q, k, v = rand(2, 4, 19, 4, seed=1), rand(2, 2, 23, 4, seed=2), rand(2, 2, 23, 3, seed=3)
    mask = torch.rand(2, 23, generator=torch.Generator().manual_seed(4)) > 0.3
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    outs = [attnzoo.attention(q, k, v, mechanism="based", causal=True, key_padding_mask=mask, chunk=3, backend=b)
            for b in ("reference", "fast")]
    assert_close(outs[1], outs[0], F64, "fast vs reference")
    g = rand(*outs[0].shape, seed=5)
    ga = torch.autograd.grad(outs[0], (q, k, v), g)
    gb = torch.autograd.grad(outs[1], (q, k, v), g)
    for name, a, b in zip("qkv", gb, ga):
        assert_close(a, b, F64, f"gradient of {name}")


def test_kernel_taylor_map_matches_the_feature_map():
    from attnzoo.mechanisms.linear.based import taylor_map, taylor_map_backward

    x, g = rand(3, 5, 16, seed=6), rand(3, 5, 153, seed=7)
    assert_close(taylor_map(x, 0.3), taylor_features(x, 0.3), F64, "row-wise vs gathered packing")
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad((taylor_features(xr, 0.3) * g).sum(), xr)
    assert_close(taylor_map_backward(x, g, 0.3), want, F64, "hand-written backward of the map")
