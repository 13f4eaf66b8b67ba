"""RelationNet++ BVR (P063) against the official multi_head_attention_forward with relative weights written out
(its PositionalEncodingSineLearned evaluated at the offsets, 1x1 conv, log-scale), the CATALOG limits (no G: plain
cross-attention over the sampled keys; top-k covering every key: the unsampled result) and G's effect."""

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _official_pe(m, rel):
    """positional_encoding.py PositionalEncodingSine.preprocess_embedding + the learned 1x1 conv + log scale."""
    E = m.embedding_dim
    feat_range = torch.arange(0, E // 4, dtype=F64)
    dim_mat = torch.pow(1.0 * 1000, (4.0 / E) * feat_range)
    div = (1.0 * rel.unsqueeze(-1)) / dim_mat
    emb = torch.cat((torch.sin(div), torch.cos(div)), dim=-1).view(*rel.shape[:-1], E)
    conv = F.conv2d(emb.permute(0, 3, 1, 2), m.position_proj.weight[:, :, None, None], m.position_proj.bias)
    return torch.log(conv.clamp(min=1e-6))  # (B, heads, N, K)


def _setup(**kw):
    torch.manual_seed(0)
    m = attnzoo.build("relationnet_bvr", 16, 4, embedding_dim=8, top_k=6, **kw).double()
    g = torch.Generator().manual_seed(1)
    feats, keys = torch.randn(2, 5, 16, generator=g, dtype=F64), torch.randn(2, 9, 16, generator=g, dtype=F64)
    pos, kpos = torch.rand(2, 5, 2, generator=g, dtype=F64) * 20, torch.rand(2, 9, 2, generator=g, dtype=F64) * 20
    return m, feats, keys, pos, kpos


def _mha(m):
    return m.attn.to_multihead_attention()


def test_equals_the_official_relative_attention_written_out():
    m, feats, keys, pos, kpos = _setup()
    with torch.no_grad():
        m.position_proj.bias.fill_(0.5)  # keep G mostly above the log clamp so the term is visible
    rel = kpos[:, None] - pos[:, :, None]  # key minus query
    G = _official_pe(m, rel)  # (B, H, N, K)
    q = (m.attn.q_proj(feats) * 0.5).view(2, 5, 4, 4).transpose(1, 2)  # q * head_dim^-0.5
    k, v = m.attn.project(m.attn.names[0], keys)
    w = torch.softmax(q @ k.transpose(-2, -1) + G, dim=-1)
    want = F.relu(feats + m.attn.o_proj((w @ v).transpose(1, 2).reshape(2, 5, 16)))
    m.top_k = 9
    got = m(feats, keys, q_pos=pos, context_pos=kpos)
    assert_close(got, want, F64, "BVR vs official")
    m.relative_bias = lambda *a: torch.zeros(2, 4, 5, 9, dtype=F64)  # remove G
    assert (m(feats, keys, q_pos=pos, context_pos=kpos) - want).abs().max() > 1e-4


def test_appearance_only_is_plain_cross_attention_over_the_sampled_keys():
    m, feats, keys, _, _ = _setup(relative_position=False)
    mha = _mha(m)
    scores = torch.rand(2, 9, generator=torch.Generator().manual_seed(3), dtype=F64)
    idx = scores.topk(6, dim=1).indices
    sampled = keys.gather(1, idx.unsqueeze(-1).expand(-1, -1, 16))
    want = F.relu(feats + mha(feats, sampled, sampled, need_weights=False)[0])
    assert_close(m(feats, keys, context_scores=scores), want, F64, "top-6 keys")
    m.top_k = 9
    full = F.relu(feats + mha(feats, keys, keys, need_weights=False)[0])
    assert_close(m(feats, keys, context_scores=scores), full, F64, "top-k = every key")
    assert (want - full).abs().max() > 1e-4  # the sampling is what differs
