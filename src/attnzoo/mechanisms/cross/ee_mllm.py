"""EE-MLLM composite attention: no attention among visual tokens; text attends causally to image and text.

Paper: "EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large Language Model", Ma et al., arXiv
2408.11795. Official code: none released. CATALOG P049.
In a decoder whose prompt holds visual tokens ``[visual_start, visual_end)``, a text token attends causally to
every earlier token (visual included) with the LLM's own weights, and a visual token attends to nothing else: its
attention output is its own value, W_o W_v x (the paper's weight-reusing aligner), i.e. the mask [[I, 0], [1, causal]].

Choices: the paper drops visual-visual self-attention and updates visual tokens with the reused value/output
weights; we read that as each visual row seeing only its own key (attention over one key returns its value), the
CATALOG's [[I, 0], [1, causal]]. A visual token whose own key is padded returns zeros (no visible key). Spans are
ints or (B,) tensors. Decoding: a KV cache; visual rows need no later token, so any prefill split works.
Fast form (the compute saving the paper claims): visual rows copy their values (no scores at all), text rows are
two fused causal SDPA calls; per-row spans: one fused causal call, visual rows then replaced by their values.

Example:
    >>> import torch, attnzoo
    >>> q = k = v = torch.randn(1, 4, 10, 8)                 # [BOS, 3 visual tokens, text]
    >>> out = attnzoo.attention(q, k, v, mechanism="ee_mllm", causal=True, visual_start=1, visual_end=4)
    >>> torch.allclose(out[:, :, 1:4], v[:, :, 1:4])         # a visual row sees only itself
    True
"""

from __future__ import annotations

import torch

from ... import masks
from ...kernels.sdpa import sdpa
from ...reference import repeat_kv
from ...registry import Mechanism, register
from ._modality import (
    VISUAL_SPAN_OPTIONS,
    causal_rows,
    init_kv_cache,
    masked_reference,
    modality_step,
    per_row,
    require_causal,
    rows_inside,
    span_rows,
    spans,
    visual_span_case,
)


def ee_mllm_predicate(nq: int, nk: int, *, causal: bool, visual_start, visual_end, heads=None, kv_heads=None):
    """The composite-attention mask as a predicate (b, h, q_idx, kv_idx) -> bool, bottom-right aligned."""
    require_causal("ee_mllm", causal)
    return masks.ee_mllm(visual_start, visual_end, offset=nk - nq)


def ee_mllm_reference(q, k, v, *, causal, key_padding_mask, scale, visual_start, visual_end):
    """Exact softmax attention with the composite mask materialized: O(Nq * Nk) memory."""
    require_causal("ee_mllm", causal)
    bounds = spans(q, visual_start=visual_start, visual_end=visual_end)
    pred_at = lambda offset: masks.ee_mllm(bounds["visual_start"], bounds["visual_end"], offset=offset)
    return masked_reference(pred_at, q, k, v, bounds, key_padding_mask=key_padding_mask, scale=scale)


def _own_values(v, key_padding_mask, groups: int, first: int, last: int) -> torch.Tensor:
    """(B, Hq, last - first, Dv): the value at each position of [first, last), per query head; zero where padded."""
    own = repeat_kv(v[:, :, first:last], groups)  # (B, Hq, n, Dv)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, first:last].view(v.shape[0], 1, last - first, 1)  # (B, 1, n, 1)
        own = torch.where(keep, own, torch.zeros((), dtype=own.dtype, device=own.device))
    return own


def ee_mllm_fast(q, k, v, *, causal, key_padding_mask, scale, visual_start, visual_end):
    """Visual rows: their own values (no scores); text rows: fused causal SDPA on the keys they see."""
    require_causal("ee_mllm", causal)
    bounds = spans(q, visual_start=visual_start, visual_end=visual_end)
    nq, nk = q.shape[2], k.shape[2]
    off, groups = nk - nq, q.shape[1] // k.shape[1]
    if per_row(bounds):
        out = sdpa(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale)  # (B, Hq, Nq, Dv)
        visual = rows_inside(q, bounds["visual_start"], bounds["visual_end"], off)  # (B, Nq)
        own = _own_values(v, key_padding_mask, groups, off, nk)  # (B, Hq, Nq, Dv)
        return torch.where(visual.view(q.shape[0], 1, nq, 1), own, out)
    r0, r1 = span_rows(visual_start, visual_end, off, nq)
    if r0 == r1:  # no visual query: plain causal attention
        return sdpa(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale)
    parts = []
    if r0 > 0:
        parts.append(causal_rows(q, k, v, key_padding_mask, scale, 0, r0, off))  # (B, Hq, r0, Dv)
    parts.append(_own_values(v, key_padding_mask, groups, r0 + off, r1 + off).to(q.dtype))  # visual rows
    if r1 < nq:
        parts.append(causal_rows(q, k, v, key_padding_mask, scale, r1, nq, off))  # (B, Hq, nq - r1, Dv)
    return torch.cat(parts, dim=2)  # (B, Hq, Nq, Dv)


def ee_mllm_step(q, k, v, state, *, scale, key_padding_mask=None, visual_start, visual_end):
    """Prefill or decode T tokens on the KV cache (visual rows see only themselves: any split works)."""
    return modality_step("ee_mllm", ee_mllm_fast, {}, q, k, v, state, scale=scale,
                         key_padding_mask=key_padding_mask, visual_start=visual_start, visual_end=visual_end)


EE_MLLM = register(Mechanism(
    name="ee_mllm",
    aliases=("composite_attention",),
    family="cross",
    catalog="P049",
    title="EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large Language Model",
    arxiv="2408.11795",
    code="",
    summary="Composite attention: visual tokens skip attention (own value), text attends causally to image + text.",
    patterns=("causal_self", "causal_cross"),
    exact=True,
    state="kv",
    complexity="time O(n_t N d + n_v d), memory O(N d); decode state O(N) (KV cache)",
    reference=ee_mllm_reference,
    fast=ee_mllm_fast,
    step=ee_mllm_step,
    init_state=init_kv_cache,
    mask=ee_mllm_predicate,
    options=VISUAL_SPAN_OPTIONS,
    test_options={"visual_start": 1, "visual_end": 4},
    test_sizes={"n": 13, "nq": 10, "nk": 13},
    case_options=visual_span_case,
    notes="exact softmax under [[I, 0], [1, causal]]: a visual row returns its own value (zeros if its key is "
          "padded); training-free on a causal LLM it is the paper's EE-MLLM-F setting.",
))
