"""Video-CCAM (P076): the causal cross-attention mask is block lower-triangular; group t is invariant to frames > t;
T = 1 is plain cross-attention; the projector equals a written-out dense-masked reference; frames appended while
decoding give the full run's groups."""

import pytest
import torch

from attnzoo import ContextCache
from attnzoo.cross import position_visibility
from attnzoo.mechanisms.cross.video_ccam import VideoCCAMProjector, ccam_query_positions
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _proj(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_queries", 8)
    kw.setdefault("context_dim", 12)
    return VideoCCAMProjector(16, 4, **kw).double()


def _frames(B=2, T=4, nf=3, seed=1):
    return torch.randn(B, T, nf, 12, generator=_g(seed), dtype=F64)


def test_the_mask_is_block_lower_triangular():
    qpos = ccam_query_positions(8, 4)
    assert qpos.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    kv = torch.arange(4).repeat_interleave(3)
    mask = position_visibility(qpos, kv)[0, 0]
    assert torch.equal(mask, torch.kron(torch.tril(torch.ones(4, 4, dtype=torch.bool)),
                                        torch.ones(2, 3, dtype=torch.bool)))
    assert ccam_query_positions(3, 4).tolist() == [1, 2, 3]  # uneven groups: the last query sees every frame
    assert ccam_query_positions(5, 1).tolist() == [0] * 5


def test_equals_a_dense_masked_reference():
    m = _proj(ff_mult=0)
    x = _frames()
    B, T, nf, C = x.shape
    tokens = x.reshape(B, T * nf, C)
    layer = m.resampler.layers[0]
    z = m.resampler.latents.unsqueeze(0).expand(B, -1, -1)
    a = layer.attn

    def heads(t):
        return t.view(B, -1, 4, 4).transpose(1, 2)

    q = heads(a.q_proj(layer.norm_q(z)))
    c = layer.norm_c(tokens)
    mask = position_visibility(ccam_query_positions(8, T), torch.arange(T).repeat_interleave(nf))
    o = softmax_attention(q, heads(a.k_proj["layer0"](c)), heads(a.v_proj["layer0"](c)), attn_mask=mask)
    want = z + a.o_proj(o.transpose(1, 2).reshape(B, 8, 16))
    assert_close(m(x), want, F64, "dense-masked reference")
    unmasked = _proj(ff_mult=0, causal=False)
    assert (unmasked(x) - m(x))[:, :6].abs().max() > 1e-4  # early groups differ without the mask
    assert_close(unmasked(x)[:, 6:], m(x)[:, 6:], F64, "the last group sees every frame either way")


def test_group_t_is_invariant_to_later_frames():
    m = _proj()
    x = _frames()
    base = m(x)
    for t in range(3):
        x2 = x.clone()
        x2[:, t + 1:] += 3 * torch.randn_like(x2[:, t + 1:])
        out = m(x2)
        rows = ccam_query_positions(8, 4) <= t
        assert (out[:, rows] - base[:, rows]).abs().max() < 1e-12
        assert (out[:, ~rows] - base[:, ~rows]).abs().max() > 1e-4


def test_one_frame_is_plain_cross_attention_pooling():
    x = _frames(T=1, nf=5)
    assert_close(_proj()(x), _proj(causal=False)(x), F64, "T = 1")


def test_layouts_agree_and_padding_is_honoured():
    m = _proj()
    x = _frames()
    flat = x.reshape(2, 12, 12)
    pos = torch.arange(4).repeat_interleave(3)
    assert_close(m(flat, context_pos=pos), m(x), F64, "(B, T, n_f, C) vs tokens + frame ids")
    mask = torch.ones(2, 4, 3, dtype=torch.bool)
    mask[0, :, 2] = False
    x2 = x.clone()
    x2[0, :, 2] += 7
    assert_close(m(x2, key_padding_mask=mask), m(x, key_padding_mask=mask), F64, "padded tokens ignored")


def test_frames_appended_while_decoding_give_the_full_run():
    m = _proj(depth=2)
    x = _frames(T=5)
    full = m(x)
    state = ContextCache()
    outs = []
    for t in range(5):
        out, state = m(x[:, t : t + 1], num_frames=5, state=state)
        outs.append(out)
    assert [o.shape[1] for o in outs] == [(ccam_query_positions(8, 5) == t).sum().item() for t in range(5)]
    assert_close(torch.cat(outs, 1), full, F64, "frame-append decode")
    with pytest.raises(ValueError, match="already returned"):
        m(x[:, :1], context_pos=torch.zeros(3, dtype=torch.long), num_frames=5, state=state)
    with pytest.raises(ValueError, match="num_frames: this state decodes a video of 5 frames"):
        m(x[:, :1], num_frames=6, state=state)
    with pytest.raises(ValueError, match="num_frames: frame-by-frame decoding needs"):
        m(x[:, :1], state=ContextCache())


def test_validation():
    m = _proj()
    with pytest.raises(ValueError, match="context_pos: the causal projector needs"):
        m(torch.randn(2, 12, 12, dtype=F64))
    with pytest.raises(ValueError, match="context_pos: frames must be < num_frames=2"):
        m(torch.randn(2, 3, 12, dtype=F64), context_pos=torch.tensor([0, 1, 2]), num_frames=2)
    with pytest.raises(ValueError, match=r"x: expected \(B, T, N, 12\)"):
        m(torch.randn(2, 3, 4, 16, dtype=F64))
