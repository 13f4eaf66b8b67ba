"""MODA (P017) against the official eager LlamaAttention written out (per-row boolean selection, phi = identity +
1e-6, normalised Gram of the text keys/values, pfuser_v(res + ratio * aligned)) under a causal host mask; zero ratio
and identity fuser are plain attention; duplex also moves the text keys."""

import torch

import attnzoo
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup(**kw):
    torch.manual_seed(0)
    m = attnzoo.build("moda", 16, 4, kv_heads=2, **kw).double()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    vflag = torch.zeros(2, 9, dtype=torch.bool)
    vflag[0, 2:6] = True
    vflag[1, 1:4] = True
    return m, x, vflag


def _official(m, x, vflag):
    B, N, _ = x.shape
    q = m.q_proj(x).view(B, N, 4, 4).transpose(1, 2)
    k = m.k_proj(x).view(B, N, 2, 4).transpose(1, 2).repeat_interleave(2, 1)  # repeat_kv
    v = m.v_proj(x).view(B, N, 2, 4).transpose(1, 2).repeat_interleave(2, 1)
    k, v = k.transpose(1, 2).clone(), v.transpose(1, 2)  # (B, N, H, hd)
    tflag = ~vflag
    for i in range(B):
        key_v, key_t = k[i][vflag[i]].unsqueeze(0), k[i][tflag[i]].unsqueeze(0)
        value_t = v[i][tflag[i]].unsqueeze(0).permute(0, 2, 1, 3)
        res_v = key_v
        key_v = key_v.permute(0, 2, 1, 3) + 1e-6
        key_t = key_t.permute(0, 2, 1, 3) + 1e-6
        key_v, key_t = key_v / key_v.norm(dim=-1, keepdim=True), key_t / key_t.norm(dim=-1, keepdim=True)
        gram_t = key_t.transpose(-2, -1) @ value_t
        gram_t = gram_t / gram_t.norm(dim=-1, keepdim=True)
        aligned_v = (key_v @ gram_t).permute(0, 2, 1, 3)
        k[i][vflag[i]] = m.align_v.fuser(res_v + m.align_v.ratio * aligned_v)[0]
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    out = softmax_attention(q, k, v, causal=True)
    return m.o_proj(out.transpose(1, 2).reshape(B, N, 16))


def test_equals_the_official_attention_with_a_causal_host_mask():
    m, x, vflag = _setup()
    with torch.no_grad():
        m.align_v.ratio.normal_()
        m.align_v.fuser.weight.add_(0.3 * torch.randn(4, 4, dtype=F64))
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None]
    assert_close(m(x, visual_mask=vflag, attn_mask=causal), _official(m, x, vflag), F64, "MODA vs official")


def test_identity_alignment_is_plain_attention_and_alignment_is_what_differs():
    m, x, vflag = _setup()
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None]
    plain = _official(m, x, torch.zeros_like(vflag))  # no visual token: nothing aligned
    assert_close(m(x, visual_mask=vflag, attn_mask=causal), plain, F64, "ratio 0, fuser I")
    with torch.no_grad():
        m.align_v.ratio.fill_(0.7)
    assert (m(x, visual_mask=vflag, attn_mask=causal) - plain).abs().max() > 1e-4
    d, x2, _ = _setup(duplex=True)
    with torch.no_grad():
        d.align_t.ratio.fill_(0.7)
    one_way = d(x2, visual_mask=vflag, attn_mask=causal)
    with torch.no_grad():
        d.align_t.ratio.zero_()
    assert (d(x2, visual_mask=vflag, attn_mask=causal) - one_way).abs().max() > 1e-4  # text keys moved too
