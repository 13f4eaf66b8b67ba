"""VideoLights BiCMF (P107) against the official BiCMFLayer.forward_post written out with torch nn.MultiheadAttention
(copied weights), positions on queries and keys only, the official f + f residual, and each direction's term."""

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _mha_like(attn):
    return attn.to_multihead_attention()


def _official(m, video, text, pv, pt, text_pad, video_pad):
    """video_lights/transformer.py BiCMFLayer.forward_post (batch-first, dropout 0); *_pad: True = padding."""
    ca1, ca2, ca3 = (_mha_like(a) for a in (m.cross_attn_1, m.cross_attn_2, m.cross_attn_3))
    v_out = ca1(video + pv, text + pt, text, key_padding_mask=text_pad)[0]
    v_out = m.norm1(video + m.linear1(v_out))
    t_out = ca2(text + pt, video + pv, video, key_padding_mask=video_pad)[0]
    t_out = text + m.linear2(t_out)
    c_out = ca3(v_out, t_out, t_out, key_padding_mask=text_pad)[0]
    c_out = m.norm3(v_out + m.linear3(c_out))
    v = m.ff.fc2(F.relu(m.ff.fc1(c_out)))
    return m.norm4(v + v)


def _setup(**kw):
    torch.manual_seed(0)
    m = attnzoo.build("videolights", 16, 4, ffn=20, **kw).double()
    g = torch.Generator().manual_seed(3)
    video, text = torch.randn(2, 7, 16, generator=g, dtype=F64), torch.randn(2, 5, 16, generator=g, dtype=F64)
    pv, pt = torch.randn_like(video), torch.randn_like(text)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    video_mask = torch.tensor([[True] * 7, [True] * 6 + [False]])
    return m, video, text, pv, pt, text_mask, video_mask


def test_equals_the_official_layer_written_out():
    m, video, text, pv, pt, tm, vm = _setup()
    got = m(video, text, key_padding_mask=tm, video_mask=vm, video_pos=pv, text_pos=pt)
    want = _official(m, video, text, pv, pt, ~tm, ~vm)
    assert_close(got[0], want[0], F64, "BiCMF row 0")
    assert_close(got[1, :6], want[1, :6], F64, "BiCMF row 1, real clips")


def test_positions_directions_and_residual_are_what_the_parity_sees():
    m, video, text, pv, pt, tm, vm = _setup()
    want = _official(m, video, text, pv, pt, ~tm, ~vm)
    kw = dict(key_padding_mask=tm, video_mask=vm)
    assert (m(video, text, **kw)[0] - want[0]).abs().max() > 1e-4  # positions matter
    std, *_ = _setup(ffn_residual="standard")
    assert (std(video, text, video_pos=pv, text_pos=pt, **kw)[0] - want[0]).abs().max() > 1e-4
    m.cross_attn_2.forward = lambda x, c, **k: torch.zeros_like(x)  # no text -> video direction
    assert (m(video, text, video_pos=pv, text_pos=pt, **kw)[0] - want[0]).abs().max() > 1e-4
