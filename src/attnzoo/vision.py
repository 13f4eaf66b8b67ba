"""Swap the self-attention of a pretrained ViT (transformers ``Dinov2Model`` and kin) for an attnzoo mechanism.

    from attnzoo.vision import replace_attention, restore_attention
    model = replace_attention(model, "neighborhood_2d", kernel_size=7)   # in place; returns the model
    out = model(pixel_values)                                           # every layer: 7 x 7 neighbourhoods
    restore_attention(model)                                            # back to the original attention modules

The model keeps its own q/k/v/o projections, norms, MLPs and weights: only the pattern of who attends to whom
changes, so a training-free comparison (patch-feature cosine to the original) measures what the pattern costs.

Token layout. A DINOv2 sequence is ``[CLS, registers..., patches]``: ``prefix = 1 + config.num_register_tokens``
tokens, then the ``h x w`` patch grid in row-major order (``h = H_img // patch``, ``w = W_img // patch``, read from
the ``pixel_values`` of each forward by a pre-hook on ``model.embeddings``). The patch tokens are the grid the
mechanism's pattern is defined on. The CLS/register tokens are handled explicitly:
- ``prefix="global"`` (default): CLS/register queries attend to every token, and every patch query attends to the
  CLS/register keys in addition to its grid pattern, in one softmax. A pattern that covers the grid (a neighbourhood
  of the grid's size, one window) then gives back the original model exactly.
- ``prefix="separate"``: CLS/register queries attend to every token; patch queries attend only to patch keys under
  the pattern (the mechanism alone on the grid).

Mechanisms (``mechanism`` and its options):
- ``"softmax"``: the exact attention (the adapter's fidelity check: outputs equal the original model).
- grid patterns, each the mask of the mechanism's own geometry helpers on the patch grid (any grid size):
  ``"neighborhood_2d"`` (``kernel_size`` 7, ``dilation`` 1; NATTEN's windows shifted inwards at borders),
  ``"halonet"`` (``block`` 8, ``halo`` 3), ``"criss_cross"`` (row and column), ``"biformer"`` (``n_win`` regions per
  side, ``topk`` routed regions; routing from the region means of q and k of all heads, per image),
  ``"crossformer_lsda"`` (``mode`` "sda"/"lda", ``group_size`` 7, ``interval``), ``"maniqa_sstb"`` (Swin windows:
  ``window_size`` 7, ``shift`` 0), ``"emov2_i2rmb"`` (``window_size`` 7, ``attention`` "hybrid" = window + spanning
  attention summed, "window" or "spanning"). Grids a window/region count does not divide use the padded geometry of
  :mod:`attnzoo.kernels.window` (padded positions never attend or are attended).
  These run as exact softmax attention under the pattern's boolean mask (one dense SDPA call over the N tokens,
  O(N^2) like the model's own attention): the measurement is of the pattern, not of the mechanism's speed (its
  module in ``attnzoo.build`` is the efficient form, with its own parameters).
- any functional sequence mechanism of the registry with a non-causal self pattern (``"sliding_window"``,
  ``"linear"``, ``"agent"``...): ``attnzoo.attention`` over the whole token sequence (CLS first), its fast form.
The model's ``attention_mask`` (rarely used with ViTs) is combined with the pattern, never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .errors import check_choice, check_int, check_pair
from .functional import attention
from .kernels.window import window_layout
from .masks import materialize, neighborhood_2d

__all__ = ["GRID_PATTERNS", "replace_attention", "restore_attention", "pattern_mask", "PatternAttention"]

PREFIX_MODES = ("global", "separate")
GRID_PATTERNS = ("neighborhood_2d", "halonet", "criss_cross", "biformer", "crossformer_lsda", "maniqa_sstb",
                 "emov2_i2rmb")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "neighborhood_2d": {"kernel_size": 7, "dilation": 1},
    "halonet": {"block": 8, "halo": 3},
    "criss_cross": {},
    "biformer": {"n_win": 4, "topk": 4},
    "crossformer_lsda": {"mode": "sda", "group_size": 7, "interval": None},
    "maniqa_sstb": {"window_size": 7, "shift": 0},
    "emov2_i2rmb": {"window_size": 7, "attention": "hybrid"},
}


def _same(ids: torch.Tensor) -> torch.Tensor:
    return ids.view(-1, 1) == ids.view(1, -1)


def _pattern_options(mechanism: str, options: dict[str, Any]) -> dict[str, Any]:
    check_choice("mechanism", mechanism, GRID_PATTERNS)
    unknown = set(options) - set(_DEFAULTS[mechanism])
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: not an option of the {mechanism!r} pattern; expected some of "
                         f"{sorted(_DEFAULTS[mechanism])}")
    return {**_DEFAULTS[mechanism], **options}


def _window_mask(height: int, width: int, window: int, shift: int, strided: bool, device) -> torch.Tensor:
    window, shift = check_pair("window", window), check_pair("shift", shift, low=0)
    hp, wp, group, valid, _ = window_layout(height, width, window, shift, strided, str(device))
    real = valid.nonzero().squeeze(1)  # padded-grid indices of the real tokens, row-major
    return _same(group[real])  # (HW, HW)


def pattern_mask(mechanism: str, height: int, width: int, *, q: torch.Tensor | None = None,
                 k: torch.Tensor | None = None, device=None, **options: Any) -> list[torch.Tensor]:
    """The boolean masks (True = attend) of a grid pattern over the ``height x width`` patch tokens (row-major):
    a list of (B or 1, HW, HW) masks whose attention outputs are summed (two for EMOv2's hybrid attention, else one).
    ``q``, ``k`` (B, heads, HW, d) are needed by content-routed patterns (BiFormer)."""
    o = _pattern_options(mechanism, options)
    device = torch.device(device) if device is not None else (q.device if q is not None else torch.device("cpu"))
    n = height * width
    if mechanism == "neighborhood_2d":
        return [materialize(neighborhood_2d(height, width, o["kernel_size"], o["dilation"]), 1, 1, n, n,
                            device=device)[:, 0]]
    if mechanism == "criss_cross":
        from .mechanisms.local.criss_cross import criss_cross_mask

        return [materialize(criss_cross_mask(height, width), 1, 1, n, n, device=device)[:, 0]]
    if mechanism == "halonet":
        from .mechanisms.local.halonet import halo_mask

        block, halo = check_int("block", o["block"]), check_int("halo", o["halo"], low=0)
        wp = width + 2 * halo
        r = torch.arange(height, device=device).repeat_interleave(width)
        c = torch.arange(width, device=device).repeat(height)
        keys = (r + halo) * wp + (c + halo)  # the real keys' indices on the halo-padded grid
        full = materialize(halo_mask(height, width, block, halo), 1, 1, n, (height + 2 * halo) * wp, device=device)
        return [full[:, 0][:, :, keys]]
    if mechanism in ("maniqa_sstb", "emov2_i2rmb"):
        if mechanism == "maniqa_sstb":
            return [_window_mask(height, width, o["window_size"], o["shift"], False, device).unsqueeze(0)]
        kinds = {"hybrid": (False, True), "window": (False,), "spanning": (True,)}
        check_choice("attention", o["attention"], tuple(kinds))
        return [_window_mask(height, width, o["window_size"], 0, s, device).unsqueeze(0) for s in kinds[o["attention"]]]
    if mechanism == "crossformer_lsda":
        from .mechanisms.local.crossformer_lsda import group_ids_and_coords, lsda_geometry

        check_choice("mode", o["mode"], ("sda", "lda"))
        Gh, Gw, Ih, Iw = lsda_geometry(height, width, o["mode"], o["group_size"], o["interval"])
        gid, _, _ = group_ids_and_coords(height, width, o["mode"], Gh, Gw, Ih, Iw, device=device)
        return [_same(gid).unsqueeze(0)]
    # biformer: routed regions from the region means of q and k (all heads), per image
    from .mechanisms.sparse.biformer import route_regions, routed_mask

    S, topk = check_int("n_win", o["n_win"]), check_int("topk", o["topk"])
    if q is None or k is None:
        raise ValueError("q, k: the biformer pattern routes regions by content; pass the patch queries and keys")
    if height % S or width % S:
        raise ValueError(f"n_win: the {height}x{width} patch grid must be divisible into {S}x{S} regions, got "
                         f"n_win={S}")
    if topk > S * S:
        raise ValueError(f"topk: {topk} routed regions requested but the grid has only {S * S}")
    B, h, _, d = q.shape
    region = lambda t: t.transpose(1, 2).reshape(B, S, height // S, S, width // S, h * d).mean(dim=(2, 4))
    r_idx = route_regions(region(q).reshape(B, S * S, h * d), region(k).reshape(B, S * S, h * d), topk,
                          (h * d) ** -0.5)  # (B, S2, topk)
    return [routed_mask(r_idx, height, width, S)[:, 0]]


class _GridContext:
    """The patch grid (h, w) of the forward in progress, set by a pre-hook on the model's embeddings."""

    def __init__(self, patch: tuple[int, int], prefix: int) -> None:
        self.patch, self.prefix, self.grid = patch, prefix, None

    def hook(self, module, args, kwargs):
        pixel_values = args[0] if args else kwargs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4:
            self.grid = (pixel_values.shape[-2] // self.patch[0], pixel_values.shape[-1] // self.patch[1])


class PatternAttention(nn.Module):
    """Replacement of one DINOv2 attention module: the original q/k/v/o projections, a new attention pattern.

    ``forward(hidden_states, attention_mask=None, **kwargs) -> (out, None)`` as ``Dinov2Attention``.
    """

    def __init__(self, original: nn.Module, mechanism: str, context: _GridContext, *, prefix: str,
                 options: dict[str, Any]) -> None:
        super().__init__()
        self.original, self.mechanism, self.context = original, mechanism, context
        self.prefix_mode, self.options = prefix, dict(options)
        self.heads, self.head_dim = original.num_attention_heads, original.head_dim
        self.scaling = original.scaling

    def extra_repr(self) -> str:
        return f"mechanism={self.mechanism!r}, prefix={self.prefix_mode!r}, options={self.options}"

    def _grid_attention(self, q, k, v, attention_mask):
        B, h, N, d = q.shape
        P = self.context.prefix
        if self.context.grid is None:
            raise RuntimeError("the patch grid is unknown: call the model with pixel_values (the embeddings hook "
                               "reads their height and width)")
        gh, gw = self.context.grid
        if N != P + gh * gw:
            raise ValueError(f"hidden_states: expected {P} CLS/register tokens + {gh}x{gw} patches = "
                             f"{P + gh * gw} tokens, got {N}")
        masks = pattern_mask(self.mechanism, gh, gw, q=q[:, :, P:], k=k[:, :, P:], device=q.device, **self.options)
        out = 0
        for i, m in enumerate(masks):  # m (B or 1, HW, HW)
            full = torch.ones(m.shape[0], N, N, dtype=torch.bool, device=q.device)  # (B|1, N, N)
            full[:, P:, P:] = m
            if self.prefix_mode == "separate":
                full[:, P:, :P] = False
            bias = torch.zeros(full.shape, dtype=q.dtype, device=q.device).masked_fill_(~full, float("-inf"))
            bias = bias.unsqueeze(1)  # (B|1, 1, N, N)
            if attention_mask is not None:
                bias = bias + (attention_mask if attention_mask.dtype != torch.bool else
                               torch.zeros_like(attention_mask, dtype=q.dtype).masked_fill(~attention_mask,
                                                                                           float("-inf")))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)  # (B, h, N, d)
            if i and P:  # summed attentions (hybrid): the CLS/register rows attend globally once
                o = torch.cat([torch.zeros_like(o[:, :, :P]), o[:, :, P:]], dim=2)
            out = out + o
        return out

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        a = self.original
        B, N, _ = hidden_states.shape
        shape = (B, N, self.heads, self.head_dim)
        q = a.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, h, N, d)
        k = a.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = a.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.mechanism == "softmax":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling)
        elif self.mechanism in GRID_PATTERNS:
            out = self._grid_attention(q, k, v, attention_mask)
        else:
            if attention_mask is not None:
                raise ValueError(f"attention_mask: the sequence mechanism {self.mechanism!r} takes no dense "
                                 "attention mask here; it is not dropped silently")
            out = attention(q, k, v, mechanism=self.mechanism, causal=False, scale=self.scaling, **self.options)
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)
        return a.o_proj(out), None


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every DINOv2-style attention module (q/k/v/o projections)."""
    found = []
    for parent in model.modules():
        if isinstance(parent, PatternAttention):
            continue  # an adapter's `original`
        for name, child in parent.named_children():
            if all(hasattr(child, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "num_attention_heads",
                                               "head_dim", "scaling")) and not isinstance(child, PatternAttention):
                found.append((parent, name, child))
    return found


def replace_attention(model: nn.Module, mechanism: str, *, prefix: str = "global",
                      layers: Iterable[int] | None = None, **options: Any) -> nn.Module:
    """Replace, in place, the self-attention of a transformers DINOv2 model by ``mechanism`` (see the module doc).

    Args:
        model: ``Dinov2Model``, ``Dinov2WithRegistersModel`` or a model holding one (classification, backbone);
            its attention modules must have ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (transformers >= 5).
        mechanism: "softmax", a grid pattern of :data:`GRID_PATTERNS`, or a functional sequence mechanism.
        prefix: "global" (CLS/register tokens attend and are attended globally) or "separate".
        layers: indices (in model order) of the attention modules to replace; None = all.
        **options: the mechanism's options.

    Returns:
        the model (modified in place; an earlier replacement is undone first). :func:`restore_attention` undoes it.
    """
    check_choice("prefix", prefix, PREFIX_MODES)
    if not isinstance(mechanism, str):
        raise TypeError(f"mechanism: expected a mechanism name (str), got {type(mechanism).__name__}")
    if mechanism in GRID_PATTERNS:
        _pattern_options(mechanism, options)  # option names now; values are checked on the first forward's grid
    elif mechanism != "softmax":
        mech = registry.get(mechanism)
        if not mech.functional or "noncausal_self" not in mech.patterns:
            raise ValueError(f"mechanism: {mechanism!r} is a {mech.kind} mechanism with its own parameters (or no "
                             f"non-causal self pattern); replace_attention takes 'softmax', a grid pattern of "
                             f"{list(GRID_PATTERNS)} or a functional non-causal sequence mechanism")
        mech.resolve_options(options)
    elif options:
        raise ValueError(f"{sorted(options)[0]}: 'softmax' takes no options")
    embeddings = getattr(model, "embeddings", None) or getattr(getattr(model, "dinov2", None), "embeddings", None)
    patch = getattr(getattr(embeddings, "patch_embeddings", None), "patch_size", None)
    if embeddings is None or patch is None:
        raise ValueError("model: expected a transformers DINOv2 model (an `embeddings.patch_embeddings` with a "
                         f"patch_size), got {type(model).__name__}")
    restore_attention(model)
    config = getattr(model, "config", None)
    prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    targets = _attention_modules(model)
    if not targets:
        raise ValueError(f"model: no DINOv2 attention module (q_proj/k_proj/v_proj/o_proj) in {type(model).__name__}")
    if layers is not None:
        idx = sorted(set(layers))
        bad = [i for i in idx if not 0 <= i < len(targets)]
        if bad:
            raise ValueError(f"layers: expected indices in [0, {len(targets) - 1}], got {bad}")
        targets = [targets[i] for i in idx]
    context = _GridContext(tuple(check_pair("patch_size", patch)), prefix_tokens)
    handle = embeddings.register_forward_pre_hook(context.hook, with_kwargs=True)
    for parent, name, attn in targets:
        setattr(parent, name, PatternAttention(attn, mechanism, context, prefix=prefix, options=options))
    hooks = getattr(model, "_attnzoo_vision_hooks", [])
    model._attnzoo_vision_hooks = [*hooks, handle]
    return model


def restore_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`replace_attention`: the original attention modules back, the embeddings hook removed."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PatternAttention):
                setattr(parent, name, child.original)
    for handle in getattr(model, "_attnzoo_vision_hooks", []):
        handle.remove()
    model._attnzoo_vision_hooks = []
    return model
