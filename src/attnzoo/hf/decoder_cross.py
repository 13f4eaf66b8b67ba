"""``swap_cross_attention``: the decoder cross-attention of encoder-decoder models (Whisper, Bart-style) on an attnzoo
mechanism over the encoder output, whose keys/values are projected once into a ContextCache."""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import registry
from ..functional import attention
from .adapter import (
    DenseMask,
    HFIntegrationError,
    HFMask,
    expected_mask_rows,
    require_transformers,
    rows_to_verify,
    same_mask,
)

# ----------------------------------------------------------------------------------------------------------
# Decoder cross-attention of encoder-decoder models (Whisper, Bart-style): an attnzoo mechanism over the encoder
# output, whose keys/values are projected once into a ContextCache
# ----------------------------------------------------------------------------------------------------------
ENCODER_SOURCE = "encoder"


@functools.cache
def _context_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ContextCacheLayer(DynamicLayer):
        """A transformers cross-attention cache layer holding an attnzoo ``ContextCache``: the encoder output's keys
        and values, projected once; beam reorders and batch selections are applied to it."""

        is_sliding = False

        def __init__(self, context) -> None:
            super().__init__()
            self.context = context
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            raise HFIntegrationError("this cross-attention cache layer holds an attnzoo ContextCache; the swapped "
                                     "cross-attention reads it, nothing appends keys to it")

        def get_seq_length(self) -> int:
            return self.context.length(ENCODER_SOURCE)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.context.length(ENCODER_SOURCE), 0

        def reorder_cache(self, beam_idx) -> None:
            self.context.reorder(beam_idx)

        def batch_select_indices(self, indices) -> None:
            self.context.reorder(indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            b = self.context.batch or 0
            self.context.reorder(torch.arange(b).repeat_interleave(repeats))

        def crop(self, tokens_to_remove: int) -> None:  # the context does not depend on the decoded tokens
            pass

        def reset(self) -> None:
            raise HFIntegrationError("this cache holds attnzoo context caches; start a new cache instead of reset()")

    return ContextCacheLayer


def _encoder_padding(mask, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The key-padding mask of a cross-attention mask (None, an HFMask or a 4-D tensor), refusing any structure
    other than padding (cross-attention masks of these models are padding only)."""
    if mask is None:
        return None
    mask = DenseMask.of(mask, q, k) if isinstance(mask, torch.Tensor) else mask
    if not isinstance(mask, (HFMask, DenseMask)):
        raise HFIntegrationError(f"attention_mask: expected None, a 4-D mask or the attnzoo mask object for "
                                 f"cross-attention, got {type(mask).__name__}")
    kpm = mask.key_padding_mask
    rows = rows_to_verify(mask)
    if not same_mask(mask.dense(rows), expected_mask_rows(mask, rows, False, None)):
        raise HFIntegrationError("attention_mask: this cross-attention mask has more structure than key padding; "
                                 "attnzoo will not drop it")
    return kpm


class SwappedCrossAttention(torch.nn.Module):
    """Wraps a decoder cross-attention module (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``num_heads``,
    ``head_dim``, ``scaling``: Whisper, Bart and kin) so that attention over the encoder output runs an attnzoo
    mechanism. The encoder's keys/values are projected once per encoder output into an attnzoo ``ContextCache``
    kept in the model's cross-attention cache (``EncoderDecoderCache``), and read at every decoding step; without a
    cache (training, one-shot forwards) they are projected for the call."""

    def __init__(self, original: torch.nn.Module, mechanism: str, options: dict[str, Any]) -> None:
        super().__init__()
        self.original = original
        self.mech = registry.get(mechanism)
        self.options = dict(options)
        self.mech.resolve_options(self.options)
        self.layer_idx = getattr(original, "layer_idx", None)

    def _project(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.original
        shape = (states.shape[0], states.shape[1], -1, o.head_dim)
        k = o.k_proj(states).view(shape).transpose(1, 2)  # (B, Hk, M, D)
        v = o.v_proj(states).view(shape).transpose(1, 2)  # (B, Hk, M, D)
        return k, v

    def _context(self, key_value_states, cache, kpm_of):
        from transformers.cache_utils import EncoderDecoderCache

        from ..cross import ContextCache

        if not isinstance(cache, EncoderDecoderCache):
            if key_value_states is None:
                raise HFIntegrationError("key_value_states: cross-attention needs the encoder output or a cache")
            ctx = ContextCache()
            k, v = self._project(key_value_states)
            ctx.set(ENCODER_SOURCE, k, v, key_padding_mask=kpm_of(k))
            return ctx
        layer_cls = _context_layer_class()
        layers = cache.cross_attention_cache.layers
        while len(layers) <= self.layer_idx:
            layers.append(layer_cls.__base__())
        layer = layers[self.layer_idx]
        if not isinstance(layer, layer_cls):
            if key_value_states is None:
                raise HFIntegrationError(f"cache: layer {self.layer_idx} has no cached context and no encoder output")
            ctx = ContextCache()
            k, v = self._project(key_value_states)  # once per encoder output: every later step reads the cache
            ctx.set(ENCODER_SOURCE, k, v, key_padding_mask=kpm_of(k))
            layers[self.layer_idx] = layer_cls(ctx)
            cache.is_updated[self.layer_idx] = True
            return ctx
        return layer.context

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        o = self.original
        B, T = hidden_states.shape[:2]
        # the module's own order: project, scale the queries, then attend with scale 1 (Whisper keeps this order)
        q = (o.q_proj(hidden_states) * o.scaling).view(B, T, -1, o.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        ctx = self._context(key_value_states, cache, lambda k: _encoder_padding(attention_mask, q, k))
        if ctx.batch != B:
            raise HFIntegrationError(f"cache: its context holds batch {ctx.batch}, the queries batch {B}")
        out = attention(q, ctx.keys(ENCODER_SOURCE), ctx.values(ENCODER_SOURCE), mechanism=self.mech.name,
                        causal=False, key_padding_mask=ctx.mask(ENCODER_SOURCE), scale=1.0,
                        **self.options)  # (B, Hq, T, D)
        ctx.seq_len += T
        out = o.out_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)
        return out, None


def swap_cross_attention(model, mechanism: str = "softmax", **options: Any) -> int:
    """Run ``mechanism`` in every decoder cross-attention (``encoder_attn``) of a transformers encoder-decoder,
    against an attnzoo ``ContextCache`` of the encoder's keys/values (projected once per encoder output, kept in the
    model's ``EncoderDecoderCache``, reordered with beams). ``mechanism`` must be functional and support
    ``noncausal_cross``; ``softmax`` reproduces the model. Returns the number of swapped layers."""
    require_transformers()
    mech = registry.get(mechanism)
    if not mech.functional or "noncausal_cross" not in mech.patterns:
        raise HFIntegrationError(f"mechanism {mech.name!r}: cross-attention needs a functional mechanism with the "
                                 f"noncausal_cross pattern (it has {list(mech.patterns)})")
    mech.resolve_options(options)
    found = [(parent, child) for parent in model.modules()
             for name, child in parent.named_children() if name == "encoder_attn"]
    if not found:
        raise HFIntegrationError(f"model: found no decoder cross-attention (encoder_attn) in {type(model).__name__}")
    for parent, child in found:
        original = child.original if isinstance(child, SwappedCrossAttention) else child
        for attr in ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scaling", "layer_idx"):
            if not hasattr(original, attr):
                raise HFIntegrationError(f"model: {type(original).__name__} has no {attr}; swap_cross_attention "
                                         "expects Whisper/Bart-style attention modules")
        parent.encoder_attn = SwappedCrossAttention(original, mech.name, options)
    return len(found)
