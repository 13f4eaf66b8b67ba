"""What the modality-mask mechanisms (Croc P092, EE-MLLM P049, AKI P086) share: span checks, the dense-mask
reference, the fused masked path for per-row spans, the row ranges of a span, and their decode step (a KV cache
whose prefill must hold each bidirectional region whole)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import UnsupportedPatternError, check_step
from ...kernels.sdpa import sdpa
from ...masks import Bound, Predicate, check_bounds, materialize
from ...reference import softmax_attention
from ...registry import Option
from ...state import KVCache


def spans(q: torch.Tensor, **bounds: object) -> dict[str, Bound]:
    """Validated span boundaries for a batch of ``q`` (ints, or (B,) integer tensors moved to q's device)."""
    out = check_bounds(q.shape[0], **bounds)
    return {k: v.to(q.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def per_row(bounds: dict[str, Bound]) -> bool:
    """True when some boundary differs per batch row (a (B,) tensor)."""
    return any(isinstance(b, torch.Tensor) for b in bounds.values())


def require_causal(name: str, causal: bool) -> None:
    if not causal:
        raise UnsupportedPatternError(
            f"mechanism {name!r}: a modality mask of a causal decoder; causal=False is not one of its patterns")


def dense_modality_mask(pred_at: Callable[[int], Predicate], q: torch.Tensor, k: torch.Tensor,
                        bounds: dict[str, Bound]) -> torch.Tensor:
    """(B or 1, 1, Nq, Nk) bool mask of the predicate ``pred_at(offset)``, bottom-right aligned."""
    nq, nk = q.shape[2], k.shape[2]
    rows = q.shape[0] if per_row(bounds) else 1
    return materialize(pred_at(nk - nq), rows, 1, nq, nk, device=q.device)


def masked_reference(pred_at, q, k, v, bounds, *, key_padding_mask, scale) -> torch.Tensor:
    """Exact softmax attention under the dense modality mask (explicit matmul + softmax)."""
    mask = dense_modality_mask(pred_at, q, k, bounds)  # (B|1, 1, Nq, Nk)
    return softmax_attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=mask, scale=scale)


def masked_fused(pred_at, q, k, v, bounds, *, key_padding_mask, scale) -> torch.Tensor:
    """Fused SDPA under the dense modality mask: the path for per-row spans."""
    mask = dense_modality_mask(pred_at, q, k, bounds)  # (B|1, 1, Nq, Nk)
    return sdpa(q, k, v, key_padding_mask=key_padding_mask, attn_mask=mask, scale=scale)


def span_rows(start: int, end: int, offset: int, nq: int) -> tuple[int, int]:
    """The query rows [r0, r1) whose positions (row + offset) lie in [start, end); r0 == r1 when none do."""
    r0 = min(max(start - offset, 0), nq)
    r1 = min(max(end - offset, 0), nq)
    return r0, max(r0, r1)


def rows_inside(q: torch.Tensor, start: Bound, end: Bound, offset: int) -> torch.Tensor:
    """(B, Nq) bool: whether each query row's position (row + offset) lies in [start, end) of its batch row."""
    B, nq = q.shape[0], q.shape[2]
    pos = (torch.arange(nq, device=q.device) + offset).view(1, nq)  # (1, Nq)
    s, e = (torch.as_tensor(x, device=q.device).view(-1, 1) for x in (start, end))  # (B or 1, 1)
    return ((pos >= s) & (pos < e)).expand(B, nq)


def keys_upto(k, v, key_padding_mask, n: int):
    """The first ``n`` keys, values and padding columns."""
    return k[:, :, :n], v[:, :, :n], None if key_padding_mask is None else key_padding_mask[:, :n]


def causal_rows(q, k, v, key_padding_mask, scale, r0: int, r1: int, offset: int) -> torch.Tensor:
    """Plain causal attention of query rows [r0, r1) (positions row + offset), on the keys they can see."""
    ks, vs, kpm = keys_upto(k, v, key_padding_mask, r1 + offset)
    return sdpa(q[:, :, r0:r1], ks, vs, causal=True, key_padding_mask=kpm, scale=scale)


def guard_prefill(mechanism: str, region: str, start: Bound, end: Bound, pos0: int, pos1: int) -> None:
    """A decode step holding positions [pos0, pos1) must hold the bidirectional region [start, end) whole or not
    touch it: tokens of the region see each other, which token-by-token decoding cannot give."""
    s, e = torch.as_tensor(start), torch.as_tensor(end)
    bad = (s < e) & (pos0 < e) & (pos1 > s) & ~((pos0 <= s) & (pos1 >= e))
    if bool(bad.any()):
        raise ValueError(
            f"mechanism {mechanism!r}: this decode step holds positions {pos0}..{pos1 - 1}, which cut the {region} "
            f"[{start!r}, {end!r}) whose tokens see each other; prefill the whole multimodal prompt (at least up to "
            "the end of that region) in one step, then decode token by token")


def prefill_through(start: Bound, end: Bound) -> int:
    """The record's ``decode_prefill``: a decode from position 0 must take positions [0, end) in its first step so
    that it holds the bidirectional region [start, end) whole (0 when the region is empty in every batch row)."""
    s, e = torch.broadcast_tensors(torch.as_tensor(start), torch.as_tensor(end))
    live = e[s < e]
    return int(live.max()) if live.numel() else 0


def init_kv_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device, **options):
    """The decode state of a modality mask: a plain KV cache (the options only shape the mask)."""
    return KVCache(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)


def modality_step(mechanism: str, fast, regions: dict[str, tuple[str, str]], q, k, v, state: KVCache, *, scale,
                  key_padding_mask=None, **options) -> torch.Tensor:
    """Append the T new tokens to the KV cache and attend under the modality mask at their absolute positions.

    ``regions`` names the bidirectional regions, {description: (start option, end option)}, that a step must hold
    whole (:func:`guard_prefill`). q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, Dv) -> (B, Hq, T, Dv).
    """
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=KVCache)
    bounds = spans(q, **options)
    pos0, pos1 = state.seq_len, state.seq_len + q.shape[2]
    for region, (a, b) in regions.items():
        guard_prefill(mechanism, region, bounds[a], bounds[b], pos0, pos1)
    keys, values, mask = state.append(k, v, key_padding_mask)  # (B, Hk, L, D), (B, Hk, L, Dv), (B, L)
    return fast(q, keys, values, causal=True, key_padding_mask=mask, scale=scale, **options)


VISUAL_SPAN_OPTIONS = (
    Option("visual_start", 0, (int, torch.Tensor), doc="first visual position (int, or (B,) per batch row)"),
    Option("visual_end", 0, (int, torch.Tensor), doc="one past the last visual position (int or (B,))"),
)
"""The visual span every modality mask takes (Croc, EE-MLLM, AKI)."""


def visual_span_case(*, n, side, heads, causal):
    """The bench's case: a prompt with text before and after a visual span of a quarter of the sequence."""
    return {"visual_start": n // 8, "visual_end": n // 8 + n // 4}
