"""VLANet's cascaded cross-modal attention (P105): each step is torch's nn.MultiheadAttention in a post-norm residual
(copied weights), in the order video -> words, words -> updated video, joint self-attention; dropping a step breaks
it."""

import torch
from torch import nn

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    cca = attnzoo.build("vlanet", 16, 4).double()
    mhas = [nn.MultiheadAttention(16, 4, batch_first=True).double() for _ in range(3)]
    for sub, mha in zip((cca.video_to_query, cca.query_to_video, cca.joint), mhas):
        sub.attn.load_multihead_attention(mha)
    g = torch.Generator().manual_seed(5)
    return cca, mhas, torch.randn(2, 6, 16, generator=g, dtype=F64), torch.randn(2, 4, 16, generator=g, dtype=F64)


def _written_out(cca, mhas, v, w):
    v1 = cca.video_to_query.norm(v + mhas[0](v, w, w, need_weights=False)[0])
    w1 = cca.query_to_video.norm(w + mhas[1](w, v1, v1, need_weights=False)[0])
    both = torch.cat([v1, w1], 1)
    out = cca.joint.norm(both + mhas[2](both, both, both, need_weights=False)[0])
    return out[:, :6], out[:, 6:]


def test_equals_the_cascade_written_out_and_each_step_counts():
    cca, mhas, v, w = _setup()
    want_v, want_w = _written_out(cca, mhas, v, w)
    got_v, got_w = cca(v, w, return_words=True)
    assert_close(got_v, want_v, F64, "video")
    assert_close(got_w, want_w, F64, "words")
    cca.query_to_video.attn.forward = lambda x, c, **kw: torch.zeros_like(x)  # drop query -> video
    assert (cca(v, w) - want_v).abs().max() > 1e-3
