"""IP-Adapter (P069): scale 0 is the text-only layer bit for bit; two separate softmaxes (not one joint); several
adapters, images per adapter, per-image scales and region masks; parity with diffusers' IPAdapterAttnProcessor2_0
on copied weights."""

import pytest
import torch

from attnzoo import ContextCache, CrossAttention, build
from attnzoo.mechanisms.cross.ip_adapter import IPAdapterAttention
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _layer(dtype=F64, **kw):
    torch.manual_seed(0)
    kw.setdefault("context_dims", {"text": 12, "image": 10})
    return IPAdapterAttention(16, 4, **kw).to(dtype)


def _inputs(B=2, N=9, dtype=F64, seed=1):
    g = _g(seed)
    x = torch.randn(B, N, 16, generator=g, dtype=F64).to(dtype)
    ctx = {"text": torch.randn(B, 7, 12, generator=g, dtype=F64).to(dtype),
           "image": torch.randn(B, 4, 10, generator=g, dtype=F64).to(dtype)}
    return x, ctx


def _softmax_path(m, x, name, c):
    """softmax(Q K_s^T / sqrt(d)) V_s written out for one source, before the output projection: (B, N, H * hd)."""
    B, N, _ = x.shape
    H, hd = m.attn.heads, m.attn.head_dim
    q = m.attn.q_proj(x).view(B, N, H, hd).transpose(1, 2)
    k = m.attn.k_proj[name](c).view(B, -1, H, hd).transpose(1, 2)
    v = m.attn.v_proj[name](c).view(B, -1, H, hd).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-2, -1) / hd ** 0.5, dim=-1)
    return (p @ v).transpose(1, 2).reshape(B, N, H * hd)


def test_scale_zero_is_the_text_only_layer_bit_for_bit():
    m = _layer(torch.float32, scale=0.0)
    x, ctx = _inputs(dtype=torch.float32)
    with_image = m(x, ctx)
    assert torch.equal(with_image, m(x, {"text": ctx["text"]}))
    text_only = CrossAttention(16, 4, context_dim=12, out_bias=True)
    with torch.no_grad():
        text_only.q_proj.weight.copy_(m.attn.q_proj.weight)
        text_only.k_proj["context"].weight.copy_(m.attn.k_proj["text"].weight)
        text_only.v_proj["context"].weight.copy_(m.attn.v_proj["text"].weight)
        text_only.o_proj.load_state_dict(m.attn.o_proj.state_dict())
    assert torch.equal(with_image, text_only(x, ctx["text"]))
    m.set_scale(0.5)
    assert (m(x, ctx) - with_image).abs().max() > 1e-3


def test_equals_two_separate_softmaxes_and_differs_from_one_joint_softmax():
    m = _layer(scale=0.6)
    x, ctx = _inputs()
    want = m.attn.o_proj(_softmax_path(m, x, "text", ctx["text"]) + 0.6 * _softmax_path(m, x, "image", ctx["image"]))
    assert_close(m(x, ctx), want, F64, "two softmaxes")
    joint = CrossAttention(16, 4, context_dims={"text": 12, "image": 10}, mode="joint", out_bias=True,
                           scales={"image": 0.6}).double()
    joint.load_state_dict(m.attn.state_dict())
    assert (joint(x, ctx) - want).abs().max() > 1e-3


def test_init_from_text_makes_the_image_path_a_copy_of_the_text_path():
    m = _layer(context_dims={"text": 12, "image": 12}, scale=0.5)
    m.init_image_from_text()
    g = _g(2)
    x = torch.randn(2, 5, 16, generator=g, dtype=F64)
    c = torch.randn(2, 7, 12, generator=g, dtype=F64)
    want = m.attn.o_proj(1.5 * _softmax_path(m, x, "text", c))
    assert_close(m(x, {"text": c, "image": c}), want, F64, "image path initialised from the text path")
    with pytest.raises(ValueError, match="cannot start from W_k"):
        _layer().init_image_from_text()


def test_several_adapters_images_scales_and_region_masks():
    torch.manual_seed(0)
    m = IPAdapterAttention(16, 4, context_dims={"text": 12, "image": 10, "face": 10},
                           scale={"image": 0.6, "face": 0.3}).double()
    g = _g(3)
    B, N = 2, 9
    x = torch.randn(B, N, 16, generator=g, dtype=F64)
    text = torch.randn(B, 7, 12, generator=g, dtype=F64)
    image = torch.randn(B, 4, 10, generator=g, dtype=F64)
    faces = torch.randn(B, 2, 3, 10, generator=g, dtype=F64)  # 2 face images sharing the face adapter
    region = torch.rand(B, 2, N, generator=g) > 0.5
    weight = torch.rand(B, N, generator=g, dtype=F64)
    got = m(x, {"text": text, "image": image, "face": faces}, scales={"face": [0.3, 0.9]},
            region_masks={"face": region, "image": weight})
    inner = (_softmax_path(m, x, "text", text) + 0.6 * weight[..., None] * _softmax_path(m, x, "image", image)
             + 0.3 * region[:, 0, :, None].to(F64) * _softmax_path(m, x, "face", faces[:, 0])
             + 0.9 * region[:, 1, :, None].to(F64) * _softmax_path(m, x, "face", faces[:, 1]))
    assert_close(got, m.attn.o_proj(inner), F64, "adapters, images, scales, regions")
    # a query outside every region and with zero weight sees the text alone
    region[:, :, 0] = False
    weight[:, 0] = 0
    got = m(x, {"text": text, "image": image, "face": faces}, region_masks={"face": region, "image": weight})
    assert_close(got[:, 0], m.attn.o_proj(_softmax_path(m, x, "text", text))[:, 0], F64, "outside the regions")


def test_context_cache_serves_every_denoising_step():
    m = _layer(scale=0.7)
    x, ctx = _inputs()
    cache = ContextCache()
    first, cache = m(x, ctx, state=cache)
    assert_close(first, m(x, ctx), F64, "filling step")
    x2 = torch.randn_like(x)
    assert_close(m(x2, state=cache)[0], m(x2, ctx), F64, "a later step from the cache")
    assert_close(m(x2, state=cache, scales={"image": 0.2})[0], m(x2, ctx, scales={"image": 0.2}), F64, "scale")


def test_build_and_validation():
    m = build("ip_adapter", 16, 4, context_dims={"text": 12, "image": 10}, scale=0.5)
    assert isinstance(m, IPAdapterAttention)
    x, ctx = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="the text source 'text' is missing"):
        m(x, {"image": ctx["image"]})
    with pytest.raises(ValueError, match="context: unknown source 'img'"):
        m(x, {"text": ctx["text"], "img": ctx["image"]})
    with pytest.raises(ValueError, match="region masks belong to image prompts"):
        m(x, ctx, region_masks={"text": torch.ones(2, 9, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"scales\['image'\]: a list of scales needs one per image"):
        m(x, ctx, scales={"image": [0.1, 0.2]})
    with pytest.raises(ValueError, match="causal: IP-Adapter's cross-attention is non-causal"):
        build("ip_adapter", 16, 4, causal=True)
    with pytest.raises(ValueError, match="at least one image-prompt source"):
        IPAdapterAttention(16, 4, context_dims={"text": 12})
    with pytest.raises(ValueError, match="scale: unknown adapter 'face'"):
        IPAdapterAttention(16, 4, scale={"face": 0.2})


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers (the maintained implementation), on copied weights
# ---------------------------------------------------------------------------------------------------------
def _diffusers():
    try:
        from diffusers.image_processor import IPAdapterMaskProcessor
        from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
    except Exception as e:  # pragma: no cover - the test environment has diffusers
        pytest.skip(f"diffusers cannot be imported here: {type(e).__name__}: {e}")
    return Attention, IPAdapterAttnProcessor2_0, IPAdapterMaskProcessor


def test_parity_with_diffusers_ip_adapter_processor_two_adapters_images_masks():
    Attention, Processor, MaskProcessor = _diffusers()
    torch.manual_seed(0)
    dim, heads, hd, cdim, B, side = 32, 4, 8, 24, 2, 8
    ref = Attention(query_dim=dim, cross_attention_dim=cdim, heads=heads, dim_head=hd).double().eval()
    proc = Processor(hidden_size=dim, cross_attention_dim=cdim, num_tokens=(4, 4), scale=[0.6, 0.3]).double()
    ours = IPAdapterAttention(dim, heads, context_dims={"text": cdim, "image": cdim, "face": cdim},
                              scale={"image": 0.6, "face": 0.3}).double()
    with torch.no_grad():
        ours.attn.q_proj.weight.copy_(ref.to_q.weight)
        ours.attn.k_proj["text"].weight.copy_(ref.to_k.weight)
        ours.attn.v_proj["text"].weight.copy_(ref.to_v.weight)
        for i, name in enumerate(("image", "face")):
            ours.attn.k_proj[name].weight.copy_(proc.to_k_ip[i].weight)
            ours.attn.v_proj[name].weight.copy_(proc.to_v_ip[i].weight)
        ours.attn.o_proj.load_state_dict(ref.to_out[0].state_dict())
    g = _g(4)
    x = torch.randn(B, side * side, dim, generator=g, dtype=F64)
    text = torch.randn(B, 7, cdim, generator=g, dtype=F64)
    image = torch.randn(B, 1, 4, cdim, generator=g, dtype=F64)
    faces = torch.randn(B, 2, 4, cdim, generator=g, dtype=F64)
    with torch.no_grad():
        # without masks: one image per adapter, (B, tokens, C)
        want = proc(ref, x, encoder_hidden_states=(text, [image[:, 0], faces[:, 0]]))
        got = ours(x, {"text": text, "image": image[:, 0], "face": faces[:, 0]})
        assert_close(got, want, F64, "diffusers parity (no masks)")
        # with masks: images per adapter, a scale per image, masks downsampled bicubically to the latent grid
        proc.scale = [0.6, [0.3, 0.8]]  # a scale per face image
        masks = [torch.zeros(1, 1, 32, 32, dtype=F64), torch.zeros(1, 2, 32, 32, dtype=F64)]
        masks[0][..., 3:21, 5:27] = 1  # edges off the 4-pixel grid: bicubic downsampling blurs them
        masks[1][:, 0, :13] = 1
        masks[1][:, 1, 13:] = 1
        want = proc(ref, x, encoder_hidden_states=(text, [image, faces]), ip_adapter_masks=masks)
        weights = {name: torch.stack([MaskProcessor.downsample(mk[:, i], B, side * side, hd * heads)[..., 0]
                                      for i in range(mk.shape[1])], dim=1)
                   for name, mk in zip(("image", "face"), masks)}  # (B, P, N) float weights, diffusers' own
        got = ours(x, {"text": text, "image": image, "face": faces}, scales={"face": [0.3, 0.8]},
                   region_masks=weights)
        assert_close(got, want, F64, "diffusers parity (images, per-image scales, masks)")
        assert (weights["face"] - weights["face"].round()).abs().max() > 1e-3  # the weights are not binary
