"""Oracles for RCMHA (P007)."""

import math

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.dense.rcmha import RelativeConvolutionalMHA
from attnzoo.testing import assert_close

F64 = torch.float64


def _x(b=2, n=7, dim=16, seed=0):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rcmha(seed=0, **kw):
    torch.manual_seed(seed)
    m = RelativeConvolutionalMHA(16, 4, **kw).double()
    with torch.no_grad():
        m.u.normal_()
        m.v.normal_()
    return m


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("conv_input", ["projections", "embeddings"])
def test_identity_kernel_zero_relative_terms_is_mha(causal, conv_input):
    m = _rcmha(causal=causal, conv_input=conv_input, kernel_size=3)
    with torch.no_grad():
        m.conv_weight.zero_()
        m.conv_weight[:, 2 if causal else 1] = 1.0  # delta at the current token
        m.r_proj.weight.zero_()
        m.u.zero_()
        m.v.zero_()
    ref = attnzoo.build("softmax", 16, 4, causal=causal).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k.endswith("_proj.weight") and "r_" not in k})
    x = _x(n=9)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[0, 4] = False
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), ref(x), F64, f"MHA limit ({backend})")
        assert_close(m(x, key_padding_mask=kpm)[kpm], ref(x, key_padding_mask=kpm)[kpm], F64, "with padding")


def test_relative_term_is_shift_invariant_and_forms_agree():
    m = _rcmha()
    q = torch.randn(2, 4, 6, 4, dtype=F64)
    p = torch.arange(6)
    ref = m.relative_term_reference(q, p, p)
    assert_close(m.relative_term_fast(q, p, p), ref, F64, "fast vs reference")
    assert_close(m.relative_term_reference(q, p + 40, p + 40), ref, F64, "shifted by 40", tol=1e-9)
    assert (m.relative_term_reference(q, p + 2, p) - ref).abs().max() > 1e-3


def test_explicit_loop():
    """Causal conv by hand, Transformer-XL score by hand with the sinusoid written out, softmax, W_O."""
    m = _rcmha(seed=1, causal=True, kernel_size=2)
    D, H, d, N = 16, 4, 4, 4
    x = _x(b=1, n=N, seed=2)[0]
    proj = torch.cat([x @ m.q_proj.weight.T, x @ m.k_proj.weight.T, x @ m.v_proj.weight.T], -1)  # (N, 48)
    conv = torch.stack([sum(m.conv_weight[:, s] * proj[t - 1 + s] for s in range(2) if t - 1 + s >= 0)
                        for t in range(N)])
    q, k, v = conv[:, :16], conv[:, 16:32], conv[:, 32:]

    def r(p):  # sinusoid of signed distance p: [sin(p w_i)] + [cos(p w_i)], w_i = 10000^(-2i/D)
        w = [10000 ** (-2 * i / D) for i in range(D // 2)]
        return torch.tensor([math.sin(p * wi) for wi in w] + [math.cos(p * wi) for wi in w], dtype=F64)

    heads_out = torch.zeros(N, H * d, dtype=F64)
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        for i in range(N):
            scores = []
            for j in range(i + 1):
                pos = m.r_proj.weight[sl] @ r(i - j)
                scores.append(((q[i, sl] + m.u[h]) @ k[j, sl] + (q[i, sl] + m.v[h]) @ pos) / math.sqrt(d))
            p = torch.softmax(torch.stack(scores), 0)
            heads_out[i, sl] = sum(p[j] * v[j, sl] for j in range(i + 1))
    want = (heads_out @ m.o_proj.weight.T).unsqueeze(0)
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x.unsqueeze(0)), want, F64, backend)


@pytest.mark.parametrize("conv_input", ["projections", "embeddings"])
def test_decode_with_padding(conv_input):
    m = _rcmha(seed=3, causal=True, kernel_size=4, conv_input=conv_input).eval()
    x = _x(n=10)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[0, 2] = kpm[1, 8] = False
    full = m(x, key_padding_mask=kpm)
    st = m.init_state(2)
    outs = [m(x[:, :3], key_padding_mask=kpm[:, :3], state=st)[0]]
    outs += [m(x[:, t : t + 1], key_padding_mask=kpm[:, t : t + 1], state=st)[0] for t in range(3, 10)]
    assert_close(torch.cat(outs, 1)[kpm], full[kpm], F64, "decode")
    assert st.history.shape[1] == 3


def test_padded_token_reaches_no_neighbour():
    m = _rcmha(seed=4, kernel_size=3)  # non-causal "same" convolution sees both neighbours
    x = _x()
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[:, 3] = False
    x2 = x.clone()
    x2[:, 3] += 10.0
    assert_close(m(x2, key_padding_mask=kpm)[kpm], m(x, key_padding_mask=kpm)[kpm], F64, "padding")


def test_errors():
    with pytest.raises(ValueError, match="context"):
        _rcmha()(_x(), _x())
    with pytest.raises(ValueError, match="kv_heads"):
        RelativeConvolutionalMHA(16, 4, kv_heads=2)
    with pytest.raises(ValueError, match="conv_input"):
        RelativeConvolutionalMHA(16, 4, conv_input="values")
