"""SSG-QA-Net's SIM (P055) against the official TextToSceneAttentionLayer written out from its source (copied
weights): scene nodes query the projected text, scores over sqrt(width), post-norm residuals, then scene self-attention;
the width scale and the text term both change the result."""

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _official_mha(values, keys, queries, attn, heads, emb_dim):
    """models/VisualBert_ssgqa.py MultiHeadAttention.forward, with the weights of an attnzoo CrossAttention."""
    bs = queries.shape[0]
    name = attn.names[0]
    v = F.linear(values, attn.v_proj[name].weight).reshape(bs, -1, heads, emb_dim // heads)
    k = F.linear(keys, attn.k_proj[name].weight).reshape(bs, -1, heads, emb_dim // heads)
    q = F.linear(queries, attn.q_proj.weight).reshape(bs, -1, heads, emb_dim // heads)
    energy = torch.einsum("bqhd,bkhd->bhqk", q, k)
    a = torch.softmax(energy / emb_dim ** 0.5, dim=3)
    out = torch.einsum("bhql,blhd->bqhd", a, v).reshape(bs, -1, emb_dim)
    return F.linear(out, attn.o_proj.weight, attn.o_proj.bias)


def _official(sim, scene, text, heads):
    dim = scene.shape[-1]
    for layer in sim.layers:
        tp = layer.text_projection(text)
        att = _official_mha(tp, tp, scene, layer.cross.attn, heads, dim)
        att = layer.cross.norm(att + scene)
        sa = _official_mha(att, att, att, layer.self.attn, heads, dim)
        scene = layer.self.norm(sa + att)
    return scene


def _setup(**kw):
    torch.manual_seed(0)
    sim = attnzoo.build("ssg_qa", 18, 3, context_dim=20, **kw).double()
    g = torch.Generator().manual_seed(1)
    return sim, torch.randn(2, 6, 18, generator=g, dtype=F64), torch.randn(2, 9, 20, generator=g, dtype=F64)


def test_equals_the_official_layers_written_out():
    sim, scene, text = _setup()
    assert_close(sim(scene, text), _official(sim, scene, text, 3), F64, "SIM vs official")


def test_width_scale_and_text_term_are_what_the_parity_sees():
    sim, scene, text = _setup()
    want = _official(sim, scene, text, 3)
    head_scaled, _, _ = _setup(scale="head")
    assert (head_scaled(scene, text) - want).abs().max() > 1e-3  # 1/sqrt(head_dim) is another layer
    other_text = torch.randn_like(text)
    assert (sim(scene, other_text) - want).abs().max() > 1e-3  # the scene really reads the question
    for layer in sim.layers:  # ablate the scene -> text attention: parity breaks
        layer.cross.attn.forward = lambda x, c, **kw: torch.zeros_like(x)
    assert (sim(scene, text) - want).abs().max() > 1e-3


def test_masked_question_tokens_change_nothing():
    sim, scene, text = _setup()
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 5:] = False
    base = sim(scene, text, key_padding_mask=kpm)
    text2 = text.clone()
    text2[1, 5:] += 10
    assert_close(sim(scene, text2, key_padding_mask=kpm), base, F64, "masked tokens")
