"""OAT: an encoder over the objects of a scene and a causal decoder over the fixations so far point at the next
fixated object.

Paper: "OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction", Fang, Yu, Zhang, van der Lans, Shi,
arXiv 2407.13335 (ECCV 2024). Official code: https://github.com/HKUST-NISL/oat_eccv24 (src/model/models.py
``Seq2SeqTransformer``, ``Cross_Attention``; src/model/transformerLightning.py; CATALOG said none found). CATALOG P024.
Encoder: self-attention over the object tokens o (B, N, d) (appearance + position encoding; the search target is the
last token). Decoder: causal self-attention over the fixation tokens f (B, T, d) (the embedding of the objects fixated
so far) and cross-attention to the encoded objects. The next fixation is a pointer over the objects: for each pointer
head h, ``l^h_tj = (W_d^h dec_t) . (W_e^h enc_j) / sqrt(d_k)``, a constant 0 logit appended (the padding class),
heads mixed by a linear readout, ``p_t = softmax_j(readout([l^1_tj, l^2_tj, ...]))``.

Confirmed against the official code (CATALOG's "(?)" on the positional encoding concerns the token embedding, which
is the caller's here): encoder and decoder are torch's post-norm ``nn.TransformerEncoder/DecoderLayer`` (ReLU, no
dropout here), 4 + 4 layers, width 512, 4 heads, feed-forward 512; the pointer is ``Cross_Attention`` (CA_version 3)
with 2 heads and ``d_k = 512``, a zero column concatenated before the 1/sqrt(d_k) scaling and the readout
``nn.Linear(heads, 1)`` (so the extra logit is the readout's bias; no readout with one head). The target token, last
in the encoder input, doubles as the end-of-scanpath class; the appended column is the padding class
(``null_logit``), ignored by the loss but inside its softmax. Choices: padded objects (``key_padding_mask``) are masked
in the encoder, the decoder's cross-attention (as the official) and the pointer (-inf; the official never pads
objects); the token embeddings (CNN appearance, the learned Gaussian-similarity position table, the decoder's 1-D
sinusoidal time encoding) are inputs, not part of this module. Encoder and decoder layers are the family's
:class:`EncoderBlock` / :class:`DecoderBlock` on :class:`attnzoo.cross.CrossAttention`.

Example:
    >>> import torch, attnzoo
    >>> oat = attnzoo.build("oat", 32, 4, ffn=32, encoder_layers=1, decoder_layers=1, pointer_dim=32)
    >>> objects, fixations = torch.randn(2, 9, 32), torch.randn(2, 5, 32)   # 8 objects + the target; 5 fixations
    >>> logits = oat(fixations, objects)                  # (B, T, objects + target + padding class)
    >>> logits.shape, bool(torch.allclose(logits.softmax(-1).sum(-1), torch.ones(2, 5, dtype=torch.float32)))
    (torch.Size([2, 5, 10]), True)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...errors import check_bool, check_int, check_key_padding_mask
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import DecoderBlock, EncoderBlock, check_pair


class ObjectPointerTransformer(nn.Module):
    """``x (B, T, dim)`` fixation tokens, ``context (B, N, dim)`` object tokens (target last) -> pointer logits
    ``(B, T, N + 1)`` (``N`` without ``null_logit``): row t scores the object fixated after fixations 0..t."""

    def __init__(self, dim: int, heads: int, *, ffn: int = 512, encoder_layers: int = 4, decoder_layers: int = 4,
                 pointer_heads: int = 2, pointer_dim: int = 512, null_logit: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = self.context_dim = check_int("dim", dim)
        check_int("heads", heads)
        self.encoder = nn.ModuleList([EncoderBlock(dim, heads, ffn=ffn, eps=eps)
                                      for _ in range(check_int("encoder_layers", encoder_layers, low=0))])
        self.decoder = nn.ModuleList([DecoderBlock(dim, heads, ffn=ffn, causal=True, eps=eps)
                                      for _ in range(check_int("decoder_layers", decoder_layers))])
        self.pointer_heads = check_int("pointer_heads", pointer_heads)
        self.pointer_dim = check_int("pointer_dim", pointer_dim)
        self.null_logit = check_bool("null_logit", null_logit)
        self.decode_proj = nn.ModuleList([nn.Linear(dim, dim) for _ in range(pointer_heads)])
        self.encode_proj = nn.ModuleList([nn.Linear(dim, dim) for _ in range(pointer_heads)])
        self.readout = nn.Linear(pointer_heads, 1) if pointer_heads > 1 else None

    def encode(self, objects: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, dim) object tokens -> (B, N, dim) encoded objects."""
        for layer in self.encoder:
            objects = layer(objects, key_padding_mask=key_padding_mask)
        return objects

    def pointer(self, states: torch.Tensor, memory: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder states (B, T, dim) and encoded objects (B, N, dim) -> logits (B, T, N [+ 1])."""
        heads = []
        for dec, enc in zip(self.decode_proj, self.encode_proj):
            logits = dec(states) @ enc(memory).transpose(1, 2)  # (B, T, N)
            if self.null_logit:
                logits = torch.cat([logits, logits.new_zeros(*logits.shape[:2], 1)], dim=-1)  # padding class
            heads.append(logits / math.sqrt(self.pointer_dim))
        out = torch.stack(heads, dim=-1)  # (B, T, N [+ 1], heads)
        out = self.readout(out).squeeze(-1) if self.readout is not None else out.squeeze(-1)
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :]  # (B, 1, N)
            if self.null_logit:
                keep = torch.cat([keep, keep.new_ones(keep.shape[0], 1, 1)], dim=-1)
            out = out.masked_fill(~keep, float("-inf"))
        return out

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None,
                x_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim) fixations, context (B, N, dim) objects, key_padding_mask (B, N) bool (padded objects),
        x_padding_mask (B, T) bool (padded fixations) -> logits (B, T, N [+ 1])."""
        x, context = check_pair(self, x, context, channels=self.dim, context_channels=self.dim)
        check_key_padding_mask(key_padding_mask, x.shape[0], context.shape[1], device=x.device)
        check_key_padding_mask(x_padding_mask, x.shape[0], x.shape[1], name="x_padding_mask", device=x.device)
        memory = self.encode(context, key_padding_mask)  # (B, N, dim)
        for layer in self.decoder:
            x = layer(x, memory, key_padding_mask=key_padding_mask, x_padding_mask=x_padding_mask)  # (B, T, dim)
        return self.pointer(x, memory, key_padding_mask)


def _module(dim: int, heads: int, **options: Any):
    return ObjectPointerTransformer(dim, heads, **OAT.resolve_options(options))


OAT = register(Mechanism(
    name="oat",
    aliases=("object_level_attention_transformer",),
    family="cross",
    kind="fusion",
    catalog="P024",
    title="OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction",
    arxiv="2407.13335",
    code="https://github.com/HKUST-NISL/oat_eccv24",
    summary="Encoder over object tokens, causal decoder over fixations with cross-attention to the objects, and a "
            "multi-head pointer (bilinear logits + readout) over the objects for the next fixation.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N^2 d + T^2 d + T N d) per layer, memory O(T (T + N)) (the decoder's causal mask)",
    module=_module,
    options=(
        Option("ffn", 512, int, low=1, doc="feed-forward width (official 512)"),
        Option("encoder_layers", 4, int, low=0, doc="encoder layers (official 4)"),
        Option("decoder_layers", 4, int, low=1, doc="decoder layers (official 4)"),
        Option("pointer_heads", 2, int, low=1, doc="pointer heads mixed by a linear readout (official 2)"),
        Option("pointer_dim", 512, int, low=1, doc="d_k of the pointer's 1/sqrt(d_k) scaling (official 512)"),
        Option("null_logit", True, bool, doc="append the padding class's constant logit (official)"),
        Option("eps", 1e-5, float, low=0.0, doc="layer-norm epsilon (torch default)"),
    ),
    test_options={"ffn": 24, "encoder_layers": 1, "decoder_layers": 2, "pointer_dim": 16},
    cross=CrossSpec(query_independent=False),
    notes="equals torch nn.TransformerEncoder/DecoderLayer stacks (copied weights) and the official pointer; the "
          "logits of fixation t do not depend on later fixations; pointer probabilities sum to 1 over the objects.",
))
