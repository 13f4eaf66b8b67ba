"""AKI modality-mutual attention: image tokens of a decoder may also attend to the prompt that follows them.

Paper: "Seeing is Understanding: Unlocking Causal Attention into Modality-Mutual Attention for Multimodal LLMs",
Wang et al., arXiv 2503.02597. Official code: https://github.com/sony/aki (codes/open_flamingo/src/vlm.py,
``_make_modality_mutual_mask``). CATALOG P086.
Sequence [text; image; prompt; answer]: the causal mask plus one block, image rows ``[visual_start, visual_end)``
x prompt columns ``[visual_end, prompt_end)``, so the image tokens read the question that comes after them.
Image tokens stay causal among themselves; the prompt and the generated tokens stay causal.

Choices: as the official code, the block spans from the end of the image to the end of the question (its
``text_end_idx``, the position of the assistant token) and nothing else changes; spans are ints or (B,) tensors.
Decoding: a KV cache; the region [visual_start, prompt_end) is prefilled in one step (a step that cuts it raises:
the image tokens need the whole question), then the answer is decoded causally.
Fast form: fused SDPA on row ranges, causal outside the image and, for the image rows only, over keys
[0, prompt_end) with their (image x prompt_end) mask; per-row spans: fused SDPA with the dense bool mask.

Example:
    >>> import torch, attnzoo
    >>> q = k = v = torch.randn(1, 4, 10, 8)                 # [BOS, 3 image tokens, 2 prompt tokens, text]
    >>> out = attnzoo.attention(q, k, v, mechanism="aki", causal=True, visual_start=1, visual_end=4, prompt_end=6)
    >>> out.shape
    torch.Size([1, 4, 10, 8])
"""

from __future__ import annotations

import torch

from ... import masks
from ...kernels.sdpa import sdpa
from ...registry import Mechanism, Option, register
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
)


def aki_predicate(nq: int, nk: int, *, causal: bool, visual_start, visual_end, prompt_end, heads=None, kv_heads=None):
    """The modality-mutual mask as a predicate (b, h, q_idx, kv_idx) -> bool, bottom-right aligned."""
    require_causal("aki", causal)
    return masks.aki(visual_start, visual_end, prompt_end, offset=nk - nq)


def _pred(bounds):
    return lambda offset: masks.aki(bounds["visual_start"], bounds["visual_end"], bounds["prompt_end"],
                                    offset=offset)


def aki_reference(q, k, v, *, causal, key_padding_mask, scale, visual_start, visual_end, prompt_end):
    """Exact softmax attention with the modality-mutual mask materialized: O(Nq * Nk) memory."""
    require_causal("aki", causal)
    bounds = spans(q, visual_start=visual_start, visual_end=visual_end, prompt_end=prompt_end)
    return masked_reference(_pred(bounds), q, k, v, bounds, key_padding_mask=key_padding_mask, scale=scale)


def aki_fast(q, k, v, *, causal, key_padding_mask, scale, visual_start, visual_end, prompt_end):
    """Causal fused SDPA outside the image rows; image rows over keys [0, prompt_end) with their small mask."""
    require_causal("aki", causal)
    bounds = spans(q, visual_start=visual_start, visual_end=visual_end, prompt_end=prompt_end)
    if per_row(bounds):
        return masked_fused(_pred(bounds), q, k, v, bounds, key_padding_mask=key_padding_mask, scale=scale)
    nq, nk = q.shape[2], k.shape[2]
    off = nk - nq
    r0, r1 = span_rows(visual_start, visual_end, off, nq)
    ke = min(prompt_end, nk)
    if r0 == r1 or ke <= visual_end:  # no image query, or no prompt key to add: plain causal attention
        return sdpa(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale)
    parts = []
    if r0 > 0:
        parts.append(causal_rows(q, k, v, key_padding_mask, scale, 0, r0, off))  # (B, Hq, r0, Dv)
    pos = (torch.arange(r0, r1, device=q.device) + off).view(-1, 1)  # (n_img, 1)
    j = torch.arange(ke, device=q.device).view(1, -1)  # (1, ke)
    block = ((j <= pos) | (j >= visual_end)).view(1, 1, r1 - r0, ke)  # (1, 1, n_img, ke): causal | prompt
    ks, vs, kpm = keys_upto(k, v, key_padding_mask, ke)
    parts.append(sdpa(q[:, :, r0:r1], ks, vs, key_padding_mask=kpm, attn_mask=block, scale=scale))
    if r1 < nq:
        parts.append(causal_rows(q, k, v, key_padding_mask, scale, r1, nq, off))  # (B, Hq, nq - r1, Dv)
    return torch.cat(parts, dim=2)  # (B, Hq, Nq, Dv)


def aki_step(q, k, v, state, *, scale, key_padding_mask=None, visual_start, visual_end, prompt_end):
    """Prefill (image and question in one step) or decode T tokens on the KV cache."""
    return modality_step("aki", aki_fast, {"image + prompt region": ("visual_start", "prompt_end")}, q, k, v,
                         state, scale=scale, key_padding_mask=key_padding_mask, visual_start=visual_start,
                         visual_end=visual_end, prompt_end=prompt_end)


def _case_options(*, n, side, heads, causal):
    """Text, an image of a quarter of the sequence, then a question of an eighth."""
    return {"visual_start": n // 8, "visual_end": n // 8 + n // 4, "prompt_end": n // 4 + n // 4}


AKI = register(Mechanism(
    name="aki",
    aliases=("modality_mutual_attention", "mma"),
    family="cross",
    catalog="P086",
    title="Seeing is Understanding: Unlocking Causal Attention into Modality-Mutual Attention for Multimodal LLMs",
    arxiv="2503.02597",
    code="https://github.com/sony/aki",
    summary="Causal decoder mask where image tokens also attend to the later prompt (exact softmax).",
    patterns=("causal_self", "causal_cross"),
    exact=True,
    state="kv",
    complexity="time O(N^2 d), memory O(N d + n_img * prompt_end); decode state O(N) (KV cache)",
    reference=aki_reference,
    fast=aki_fast,
    step=aki_step,
    init_state=init_kv_cache,
    mask=aki_predicate,
    options=(
        *VISUAL_SPAN_OPTIONS,
        Option("prompt_end", 0, (int, torch.Tensor), doc="one past the last prompt position the image sees"),
    ),
    test_options={"visual_start": 1, "visual_end": 4, "prompt_end": 6},
    test_sizes={"n": 13, "nq": 10, "nk": 13},
    case_options=_case_options,
    decode_prefill=lambda *, visual_start, prompt_end, **_: prefill_through(visual_start, prompt_end),
    notes="image and prompt must be prefilled in one decode step; no image or no prompt is plain causal attention.",
))
