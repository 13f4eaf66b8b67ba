"""Croc mixed attention: bidirectional among the visual tokens, causal for the text.

Paper: "Croc: Pretraining Large Multimodal Models with Cross-Modal Comprehension", Xie et al., arXiv 2410.14332.
Official code: https://github.com/deepglint/Croc (croc/model/language_model/croc_llama.py). CATALOG P092.
Softmax attention in a multimodal decoder under M_ij = 1 if tokens i and j are both visual, else [j <= i]: the
visual span ``[visual_start, visual_end)`` is one bidirectional block, every other row is causal.

Choices: the official code builds its mask as a prefix-LM whose prefix is everything before the first supervised
token (BOS and the image tokens in its pretraining template); the paper describes the visual tokens. We take the
paper's span; ``visual_start=0`` gives the official prefix (``croc(0, P) == prefix_lm(P)``). Spans are ints or
(B,) tensors (one layout per batch row). Decoding: the state is a KV cache; the multimodal prompt is prefilled with
the structured mask (a step that cuts the visual span raises), then text is decoded causally.
Fast form: three fused SDPA calls on row ranges (causal before the span, the span over keys [0, visual_end),
causal after), never an (Nq, Nk) mask; per-row spans use fused SDPA with the dense bool mask.

Example:
    >>> import torch, attnzoo
    >>> q = k = v = torch.randn(1, 4, 10, 8)                 # [BOS, 3 visual tokens, text]
    >>> out = attnzoo.attention(q, k, v, mechanism="croc", causal=True, visual_start=1, visual_end=4)
    >>> torch.allclose(out[:, :, 4:], attnzoo.attention(q, k, v, causal=True)[:, :, 4:])  # text rows: causal
    True
"""

from __future__ import annotations

import torch

from ... import masks
from ...kernels.sdpa import sdpa
from ...registry import Mechanism, register
from ._modality import (
    VISUAL_SPAN_OPTIONS,
    causal_rows,
    init_kv_cache,
    keys_upto,
    masked_fused,
    masked_reference,
    modality_step,
    per_row,
    prefill_through,
    require_causal,
    span_rows,
    spans,
    visual_span_case,
)


def croc_predicate(nq: int, nk: int, *, causal: bool, visual_start, visual_end, heads=None, kv_heads=None):
    """The mixed-attention mask as a predicate (b, h, q_idx, kv_idx) -> bool, bottom-right aligned."""
    require_causal("croc", causal)
    return masks.croc(visual_start, visual_end, offset=nk - nq)


def _pred(bounds):
    return lambda offset: masks.croc(bounds["visual_start"], bounds["visual_end"], offset=offset)


def croc_reference(q, k, v, *, causal, key_padding_mask, scale, visual_start, visual_end):
    """Exact softmax attention with the mixed mask materialized: O(Nq * Nk) memory."""
    require_causal("croc", causal)
    bounds = spans(q, visual_start=visual_start, visual_end=visual_end)
    return masked_reference(_pred(bounds), q, k, v, bounds, key_padding_mask=key_padding_mask, scale=scale)


def croc_fast(q, k, v, *, causal, key_padding_mask, scale, visual_start, visual_end):
    """Fused SDPA on the three row ranges (no dense mask); per-row spans: fused SDPA with the dense mask."""
    require_causal("croc", causal)
    bounds = spans(q, visual_start=visual_start, visual_end=visual_end)
    if per_row(bounds):
        return masked_fused(_pred(bounds), q, k, v, bounds, key_padding_mask=key_padding_mask, scale=scale)
    nq, nk = q.shape[2], k.shape[2]
    off = nk - nq
    r0, r1 = span_rows(visual_start, visual_end, off, nq)
    if r0 == r1:  # no query inside the visual span: plain causal attention
        return sdpa(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale)
    parts = []
    if r0 > 0:
        parts.append(causal_rows(q, k, v, key_padding_mask, scale, 0, r0, off))  # (B, Hq, r0, Dv)
    ks, vs, kpm = keys_upto(k, v, key_padding_mask, min(visual_end, nk))
    parts.append(sdpa(q[:, :, r0:r1], ks, vs, causal=False, key_padding_mask=kpm, scale=scale))  # the span
    if r1 < nq:
        parts.append(causal_rows(q, k, v, key_padding_mask, scale, r1, nq, off))  # (B, Hq, nq - r1, Dv)
    return torch.cat(parts, dim=2)  # (B, Hq, Nq, Dv)


def croc_step(q, k, v, state, *, scale, key_padding_mask=None, visual_start, visual_end):
    """Prefill (the whole visual span in one step) or decode T tokens on the KV cache."""
    return modality_step("croc", croc_fast, {"visual span": ("visual_start", "visual_end")}, q, k, v, state,
                         scale=scale, key_padding_mask=key_padding_mask, visual_start=visual_start,
                         visual_end=visual_end)


CROC = register(Mechanism(
    name="croc",
    aliases=("croc_mixed_attention",),
    family="cross",
    catalog="P092",
    title="Croc: Pretraining Large Multimodal Models with Cross-Modal Comprehension",
    arxiv="2410.14332",
    code="https://github.com/deepglint/Croc",
    summary="Multimodal decoder mask: bidirectional among the visual tokens, causal for the text (exact softmax).",
    patterns=("causal_self", "causal_cross"),
    exact=True,
    state="kv",
    complexity="time O(N^2 d), memory O(N d) (three fused calls); decode state O(N) (KV cache)",
    reference=croc_reference,
    fast=croc_fast,
    step=croc_step,
    init_state=init_kv_cache,
    mask=croc_predicate,
    options=VISUAL_SPAN_OPTIONS,
    test_options={"visual_start": 1, "visual_end": 4},
    test_sizes={"n": 13, "nq": 10, "nk": 13},
    case_options=visual_span_case,
    decode_prefill=lambda *, visual_start, visual_end, **_: prefill_through(visual_start, visual_end),
    notes="the visual span must be prefilled in one decode step; visual_start=0 is prefix-LM (the official "
          "code's prefix = everything before the first supervised token); an empty span is causal attention.",
))
