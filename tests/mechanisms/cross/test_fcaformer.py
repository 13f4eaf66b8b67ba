"""FcaFormer (P071): the attention part of the official FcaBlock (inner_depth > 0), written out below from
hkzhang-git/FcaFormer without its relative-position bias, on copied weights; with the cross tokens masked it is the
block's self-attention; the cross-token bias and the joint softmax are the distinctive terms; TokenMerge shapes."""

import pytest
import torch

from attnzoo.mechanisms.cross.fcaformer import ForwardCrossAttention, TokenMerge
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def official_attention(m: ForwardCrossAttention, x, s):
    """FcaBlock.forward's token mixer for inner_depth > 0 (relative-position bias omitted), before the residual."""
    B, N, C = x.shape
    h = m.heads
    s = s * m.s_scale_factors
    N_S = s.shape[1]
    x, s = m.norm1(x), m.s_norm(s)
    qkv_x = m.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    qkv_s = m.qkv(s).reshape(B, N_S, 3, h, C // h).permute(2, 0, 3, 1, 4)
    q_x, k_x, v_x = qkv_x[0], qkv_x[1], qkv_x[2]
    k_s, v_s = qkv_s[1], qkv_s[2]
    q_x = q_x * (C // h) ** -0.5
    attn_x = q_x @ k_x.transpose(-2, -1)
    attn_s = q_x @ k_s.transpose(-2, -1) + m.s_token_bias.unsqueeze(2)  # official shape (1, heads, 1, N_S)
    attn = torch.cat((attn_x, attn_s), dim=-1).softmax(dim=-1)
    v = torch.cat((v_x, v_s), dim=-2)
    return m.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def _module(**kw):
    torch.manual_seed(0)
    m = ForwardCrossAttention(16, 4, cross_tokens=6, **kw).double()
    with torch.no_grad():  # the official init is ones / zeros: move them so they matter
        m.s_scale_factors.uniform_(0.5, 2.0)
        m.s_token_bias.normal_(std=0.5)
        for ln in (m.norm1, m.s_norm):
            ln.weight.normal_(1.0, 0.2)
            ln.bias.normal_(0.0, 0.2)
    return m


def test_parity_with_the_official_fcablock_attention():
    m = _module()
    g = _g(1)
    x = torch.randn(2, 10, 16, generator=g, dtype=F64)
    s = torch.randn(2, 6, 16, generator=g, dtype=F64)
    assert_close(m(x, s), official_attention(m, x, s), F64, "official FcaBlock attention")


def test_cross_tokens_masked_is_self_attention_and_the_bias_matters():
    m = _module()
    g = _g(2)
    x = torch.randn(2, 10, 16, generator=g, dtype=F64)
    s = torch.randn(2, 6, 16, generator=g, dtype=F64)
    masked = m(x, s, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    q, k, v = (m._split(t) for t in m.qkv(m.norm1(x)).chunk(3, dim=-1))
    sa = m.proj(torch.softmax(q @ k.transpose(-2, -1) * m.scale, -1).matmul(v).transpose(1, 2).reshape(2, 10, 16))
    assert_close(masked, sa, F64, "cross tokens masked -> self-attention")
    y, mass = m(x, s, return_source_mass=True)
    assert (y - sa).abs().max() > 1e-4 and (mass["cross"] > 0.01).all()
    assert_close(mass["self"] + mass["cross"], torch.ones_like(mass["self"]), F64, "mass")
    with torch.no_grad():
        m.s_token_bias.fill_(-1e4)  # a very negative bias removes the cross tokens
    assert_close(m(x, s), sa, F64, "bias -> -inf")


def test_token_merge_and_validation():
    tm = TokenMerge(8)
    assert tm(torch.randn(2, 14, 14, 8)).shape == (2, 16, 8)
    m = ForwardCrossAttention(16, 4, cross_tokens=6)
    with pytest.raises(ValueError, match="context: forward cross attention needs"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"context: expected \(B, cross_tokens, dim\)"):
        m(torch.randn(2, 5, 16), torch.randn(2, 7, 16))
    with pytest.raises(ValueError, match="unknown part"):
        m(torch.randn(2, 5, 16), torch.randn(2, 6, 16), key_padding_mask={"pair": torch.ones(2, 6, dtype=bool)})
