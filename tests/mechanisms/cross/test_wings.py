"""Wings (P101): the CATALOG oracle (zero-initialised learners = the base layer exactly), the whole layer against the
official wings_layer_forward written out with explicit attention weights (WingsAttention's identity + low-rank
projections, ReweightLinear's router on the summed main-attention rows, the rotary embedding of the learners' q/k),
the single-learner path, and the causal textual learner.

Distinctive terms: the learners and the router. Verified by hand: replacing the router weights by a constant 1/2
(``weights = torch.full_like(weights, 0.5)`` in ``WingsLayer._main``) fails ``test_equals_the_official_layer`` with
rel err 1.1e-3 (of the whole output, which the residual h dominates; the tolerance is 1e-10);
``test_removing_the_router_changes_the_output`` does the same ablation in place; dropping the rotation of the learners'
q/k (``rope_theta``) fails the RoPE parity test with rel err 1.0e-2."""

import math

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64
B, N, D, H = 2, 7, 16, 4


def _layer(**kw):
    torch.manual_seed(0)
    return attnzoo.build("wings", D, H, rank=3, router_positions=12, **kw).double()


def _trained(layer):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # give the zero-initialised factors values, as after training
        for name, p in layer.named_parameters():
            if name.endswith("up.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
    return layer


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=F64)
    return x, {"image": torch.randn(B, 5, D, generator=g, dtype=F64), "text": torch.randn(B, 6, D, generator=g,
                                                                                          dtype=F64)}


def _softmax_attention(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    a = s.softmax(-1)
    return a @ v, a


def _split(t):
    return t.view(t.shape[0], t.shape[1], H, D // H).transpose(1, 2)


def _merge(t):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], D)


def _official_learner(lr, source, h, f):
    """WingsAttention.forward: query + q_proj(query), key + k_proj(key), value + v_proj(value); o_proj low-rank."""
    q = _split(h + lr.q_proj.up(lr.q_proj.down(h)))
    k = _split(f + lr.k_proj[source].up(lr.k_proj[source].down(f)))
    v = _split(f + lr.v_proj[source].up(lr.v_proj[source].down(f)))
    out, _ = _softmax_attention(q, k, v)
    return lr.o_proj.up(lr.o_proj.down(_merge(out)))


def _official_main(layer, x):
    a = layer.attn
    hn = F.rms_norm(x, (D,), layer.norm.weight, 1e-6)
    q, k, v = _split(a.q_proj(hn)), _split(a.k_proj["context"](hn)), _split(a.v_proj["context"](hn))
    out, attn = _softmax_attention(q, k, v, torch.ones(N, N, dtype=torch.bool).tril())
    h = x + a.o_proj(_merge(out))
    r = F.silu(F.linear(attn.sum(1), layer.router.weight[:, :N], layer.router.bias)).softmax(-1)  # ReweightLinear
    return h, r


def test_zero_initialised_learners_are_the_base_layer():
    layer = _layer()
    x, ctx = _inputs()
    h, _ = _official_main(layer, x)
    assert_close(layer.main(x), h, F64, "main attention vs explicit causal attention")
    assert torch.equal(layer(x, ctx), layer.main(x))
    assert torch.equal(layer(x, {"image": ctx["image"]}), layer.main(x))


def test_equals_the_official_layer():
    layer = _trained(_layer())
    x, ctx = _inputs()
    h, r = _official_main(layer, x)
    vis = _official_learner(layer.visual, "image", h, ctx["image"])
    txt = _official_learner(layer.textual, "text", h, ctx["text"])
    want = h + r[..., :1] * vis + r[..., 1:] * txt
    got = layer(x, ctx)
    assert_close(got, want, F64, "Wings layer vs official (single sum)")
    assert (vis.abs().max() > 1e-3) and (txt.abs().max() > 1e-3)
    assert_close(layer(x, {"image": ctx["image"]}), h + vis, F64, "image learner alone: no router")


def test_removing_the_router_changes_the_output():
    layer = _trained(_layer())
    x, ctx = _inputs()
    h, r = _official_main(layer, x)
    assert (r - 0.5).abs().max() > 1e-3  # the router is not trivially uniform here
    vis = _official_learner(layer.visual, "image", h, ctx["image"])
    txt = _official_learner(layer.textual, "text", h, ctx["text"])
    layer.router.weight.data.zero_()
    layer.router.bias.data.zero_()  # a constant router: weights 1/2
    assert_close(layer(x, ctx), h + 0.5 * (vis + txt), F64, "constant router")
    assert (layer(x, ctx) - (h + r[..., :1] * vis + r[..., 1:] * txt)).abs().max() > 1e-4


def test_padding_masks_are_honoured():
    layer = _trained(_layer())
    x, ctx = _inputs()
    km = {"image": torch.tensor([[True] * 5, [True] * 3 + [False] * 2]),
          "text": torch.tensor([[True] * 6, [True] * 4 + [False] * 2])}
    out = layer(x, ctx, key_padding_mask=km)
    sliced = layer(x[1:], {"image": ctx["image"][1:, :3], "text": ctx["text"][1:, :4]})
    assert_close(out[1], sliced[0], F64, "masked features = sliced features")
    xm = torch.tensor([[True] * N, [True] * 5 + [False] * 2])
    moved = x.clone()
    moved[1, 5:] += 4.0
    a, b = layer(x, ctx, x_padding_mask=xm), layer(moved, ctx, x_padding_mask=xm)
    assert_close(a[1, :5], b[1, :5], F64, "padded hidden states are no keys")


def test_causal_textual_learner_sees_only_earlier_text():
    layer = _trained(_layer(causal_text=True))
    x, ctx = _inputs()
    q_pos = torch.arange(N)
    t_pos = torch.tensor([0, 1, 3, 4, 5, 6])
    base = layer(x, ctx, q_pos=q_pos, context_pos={"text": t_pos})
    moved = {**ctx, "text": ctx["text"].clone()}
    moved["text"][:, 3:] += 3.0  # text at positions >= 4
    out = layer(x, moved, q_pos=q_pos, context_pos={"text": t_pos})
    assert_close(out[:, :4], base[:, :4], F64, "queries before position 4")
    assert (out[:, 4:] - base[:, 4:]).abs().max() > 1e-6


def _official_rope(t, pos, base):
    """LlamaRotaryEmbedding + apply_rotary_pos_emb_with_position_ids (wings/utils.py): cos/sin tables indexed by the
    position ids, rotate_half = cat(-x2, x1)."""
    d = t.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=F64) / d))
    emb = torch.cat([torch.outer(torch.arange(64, dtype=F64), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos()[pos].unsqueeze(1), emb.sin()[pos].unsqueeze(1)
    x1, x2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-x2, x1], dim=-1) * sin


def _official_rope_learner(lr, source, h, f, q_pos, f_pos, base):
    q = _split(h + lr.q_proj.up(lr.q_proj.down(h)))
    k = _split(f + lr.k_proj[source].up(lr.k_proj[source].down(f)))
    v = _split(f + lr.v_proj[source].up(lr.v_proj[source].down(f)))
    out, _ = _softmax_attention(_official_rope(q, q_pos, base), _official_rope(k, f_pos, base), v)
    return lr.o_proj.up(lr.o_proj.down(_merge(out)))


def test_rope_on_the_learners_equals_the_official_rotary_embedding():
    layer = _trained(_layer(rope_theta=1e6))
    x, ctx = _inputs()
    q_pos = torch.arange(N).expand(B, N)
    pos = {"image": torch.tensor([[1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]), "text": torch.tensor([0, 6, 7, 8, 9, 10])}
    h, r = _official_main(layer, x)
    vis = _official_rope_learner(layer.visual, "image", h, ctx["image"], q_pos, pos["image"], 1e6)
    txt = _official_rope_learner(layer.textual, "text", h, ctx["text"], q_pos, pos["text"].expand(B, -1), 1e6)
    got = layer(x, ctx, q_pos=q_pos, context_pos=pos)
    assert_close(got, h + r[..., :1] * vis + r[..., 1:] * txt, F64, "Wings with RoPE vs official")
    shifted = layer(x, ctx, q_pos=q_pos + 3, context_pos={n: p + 3 for n, p in pos.items()})
    assert_close(shifted, got, F64, "RoPE is relative: shifting every position changes nothing")
    moved = {"image": pos["image"].flip(-1), "text": pos["text"]}
    assert (layer(x, ctx, q_pos=q_pos, context_pos=moved) - got).abs().max() > 1e-6  # positions are seen


def test_grouped_query_host_attention():
    torch.manual_seed(0)
    layer = _trained(attnzoo.build("wings", D, H, kv_heads=2, rank=3, router_positions=12).double())
    x, ctx = _inputs()
    a = layer.attn
    hn = F.rms_norm(x, (D,), layer.norm.weight, 1e-6)
    q = _split(a.q_proj(hn))
    k, v = (t.view(B, N, 2, D // H).transpose(1, 2).repeat_interleave(2, dim=1)
            for t in (a.k_proj["context"](hn), a.v_proj["context"](hn)))  # (B, H, N, hd): each kv head serves 2
    out, attn = _softmax_attention(q, k, v, torch.ones(N, N, dtype=torch.bool).tril())
    h = x + a.o_proj(_merge(out))
    r = F.silu(F.linear(attn.sum(1), layer.router.weight[:, :N], layer.router.bias)).softmax(-1)
    want = h + r[..., :1] * _official_learner(layer.visual, "image", h, ctx["image"]) + r[..., 1:] * _official_learner(
        layer.textual, "text", h, ctx["text"])
    assert_close(layer(x, ctx), want, F64, "GQA host attention")
