"""TCPA (P047) against the official forward_attn written out (explicit softmax over [tokens; prompts], masked after the
softmax without renormalisation), the renormalised variant, the VPT-deep limit, and the assignment's effect."""

import torch

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _official(m, x):
    """models/VFPT_TCPA.py forward_attn + models/TCPA.py get_mask_TDVP, batch-first, prompts after the tokens."""
    B, T, dim = x.shape
    L, H = m.len_prompts, m.heads
    prompts = torch.cat([m.prompts_cls.reshape(-1, dim), m.prompts_image.reshape(-1, dim)])
    h = m.norm1(torch.cat([x, prompts.expand(B, -1, -1)], 1))
    q, k, v = (t.view(B, -1, H, dim // H).transpose(1, 2) for t in m.qkv(h).chunk(3, -1))
    attn = (q @ k.transpose(-2, -1) * (dim // H) ** -0.5).softmax(-1)[:, :, :T]  # token rows only
    cls_sim = torch.nn.functional.normalize(x[:, 0], dim=-1) @ torch.nn.functional.normalize(m.keys_cls, dim=-1).t()
    img_sim = torch.nn.functional.normalize(x[:, 1:], dim=-1) @ torch.nn.functional.normalize(m.keys_image, dim=-1).t()
    Pc = m.pool_size_cls * L
    mask = torch.ones(B, T, T + prompts.shape[0], dtype=F64)
    mask[:, 0, T + Pc:] = 0
    mask[:, 1:, T:T + Pc] = 0
    tmp = torch.zeros(B, m.pool_size_cls, dtype=F64).scatter(1, cls_sim.topk(m.topk_cls, 1).indices, 1)
    mask[:, 0, T:T + Pc] = tmp.repeat_interleave(L, 1)
    tmp = torch.zeros(B, T - 1, m.pool_size_image, dtype=F64).scatter(2, img_sim.topk(m.topk_image, 2).indices, 1)
    mask[:, 1:, T + Pc:] = tmp.repeat_interleave(L, 2)
    out = (attn * mask[:, None]) @ v
    return m.proj(out.transpose(1, 2).reshape(B, T, dim)), mask


def _setup(**kw):
    torch.manual_seed(0)
    m = attnzoo.build("tcpa", 16, 4, pool_size_cls=4, pool_size_image=5, topk_cls=2, topk_image=3, len_prompts=2,
                      **kw).double()
    return m, torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1), dtype=F64)


def test_equals_the_official_post_softmax_mask():
    m, x = _setup()
    want, _ = _official(m, x)
    assert_close(m(x), want, F64, "TCPA vs official")
    assert m.aux_loss is not None and 0 <= float(m.aux_loss.detach()) <= 2


def test_renormalised_variant_is_the_masked_softmax_and_differs_from_the_official():
    m, x = _setup()
    off = m(x)
    m.renormalize = True
    _, mask = _official(m, x)
    B, T, dim = x.shape
    prompts = torch.cat([m.prompts_cls.reshape(-1, dim), m.prompts_image.reshape(-1, dim)])
    h = m.norm1(torch.cat([x, prompts.expand(B, -1, -1)], 1))
    q, k, v = (t.view(B, -1, 4, 4).transpose(1, 2) for t in m.qkv(h).chunk(3, -1))
    s = (q[:, :, :T] @ k.transpose(-2, -1) * 0.5).masked_fill(mask[:, None] == 0, float("-inf"))
    want = m.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, dim))
    assert_close(m(x), want, F64, "renormalised")
    assert (m(x) - off).abs().max() > 1e-4  # the official drop of the unassigned mass is a different layer


def test_every_prompt_assigned_is_vpt_deep_and_unassigned_prompts_do_not_reach_a_token():
    m, x = _setup(renormalize=True)
    m.topk_cls, m.topk_image = 4, 5
    B, T, dim = x.shape
    prompts = torch.cat([m.prompts_cls.reshape(-1, dim), m.prompts_image.reshape(-1, dim)])
    h = m.norm1(torch.cat([x, prompts.expand(B, -1, -1)], 1))
    q, k, v = (t.view(B, -1, 4, 4).transpose(1, 2) for t in m.qkv(h).chunk(3, -1))
    s = q[:, :, :T] @ k.transpose(-2, -1) * 0.5
    s[:, :, 0, T + 8:] = float("-inf")  # CLS never sees image prompts, patches never CLS prompts
    s[:, :, 1:, T:T + 8] = float("-inf")
    want = m.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, dim))
    assert_close(m(x), want, F64, "all assigned")
    m2, x2 = _setup()
    base = m2(x2)
    _, mask = _official(m2, x2)
    unassigned_image = [j for j in range(5) if not mask[0, 1, 6 + 8 + 2 * j]]  # prompts patch 1 of row 0 lacks
    with torch.no_grad():
        m2.prompts_image[unassigned_image[0]] += torch.randn(2, 16, dtype=F64)  # key in the normaliser, value dropped
    moved = m2(x2)
    assert (moved[0, 1] - base[0, 1]).abs().max() > 1e-6  # official: the normaliser still sees it
    m2.renormalize = True
    b2 = m2(x2)
    with torch.no_grad():
        m2.prompts_image[unassigned_image[0]] += torch.randn(2, 16, dtype=F64)
    assert_close(m2(x2)[0, 1], b2[0, 1], F64, "renormalised: an unassigned prompt changes nothing")
