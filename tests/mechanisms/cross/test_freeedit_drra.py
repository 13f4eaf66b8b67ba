"""FreeEdit DRRA (P005): lambda = 0 is exactly the original self-attention; otherwise the sum of two separate
softmax attentions (self, reference), not one joint softmax; the reference projections can start from the self ones."""

import pytest
import torch

from attnzoo.mechanisms.cross.freeedit_drra import DecoupledReferenceAttention
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _path(m, x, name, c):
    a = m.attn
    B = x.shape[0]

    def heads(t):
        return t.view(B, -1, a.heads, a.head_dim).transpose(1, 2)

    o = softmax_attention(heads(a.q_proj(x)), heads(a.k_proj[name](c)), heads(a.v_proj[name](c)))
    return o.transpose(1, 2).reshape(B, x.shape[1], -1)


def test_lambda_zero_is_the_original_self_attention_and_otherwise_two_softmaxes():
    torch.manual_seed(0)
    m = DecoupledReferenceAttention(16, 4, context_dim=12, scale=0.0)
    g = _g(1)
    x = torch.randn(2, 9, 16, generator=g)
    ref = torch.randn(2, 5, 12, generator=g)
    self_only = m.attn(x, {"self": x})
    assert torch.equal(m(x, ref), self_only)
    m = m.double()
    m.set_scale(0.8)
    x, ref = x.double(), ref.double()
    want = m.attn.o_proj(_path(m, x, "self", x) + 0.8 * _path(m, x, "reference", ref))
    assert_close(m(x, ref), want, F64, "self + lambda reference")
    B, H, hd = 2, 4, 4
    a = m.attn

    def heads(t):
        return t.view(B, -1, H, hd).transpose(1, 2)

    q = heads(a.q_proj(x))
    k = torch.cat([heads(a.k_proj["self"](x)), heads(a.k_proj["reference"](ref))], 2)
    v = torch.cat([heads(a.v_proj["self"](x)), 0.8 * heads(a.v_proj["reference"](ref))], 2)
    joint = a.o_proj(softmax_attention(q, k, v).transpose(1, 2).reshape(B, 9, -1))
    assert (m(x, ref) - joint).abs().max() > 1e-4  # not one softmax over [self; reference]


def test_reference_projections_start_from_the_self_ones():
    torch.manual_seed(0)
    m = DecoupledReferenceAttention(16, 4, scale=0.5).double()
    m.init_reference_from_self()
    x = torch.randn(2, 6, 16, generator=_g(2), dtype=F64)
    assert_close(m(x, x), m.attn.o_proj(1.5 * _path(m, x, "self", x)), F64, "reference = self copy")
    with pytest.raises(ValueError, match="cannot start from"):
        DecoupledReferenceAttention(16, 4, context_dim=12).init_reference_from_self()
    with pytest.raises(ValueError, match="context: DRRA needs the reference features"):
        m(x)
