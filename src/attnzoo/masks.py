"""Named mask predicates, their composition and their materialization.

A predicate is a function ``(b, h, q_idx, kv_idx) -> bool tensor`` (True = attend) built only from
tensor operations, so the same predicate

- is materialized densely for the reference (:func:`materialize`), and
- is handed to FlexAttention as its ``mask_mod`` (:func:`block_mask`).

Causal predicates are aligned bottom-right (see ``attnzoo.registry.PATTERNS``): they take
``offset = Nk - Nq`` and treat query ``i`` as sitting at key position ``i + offset``.

Window convention (the same for every local mechanism of attnzoo): with ``window = w``, a causal
query at position ``p`` sees keys ``p - w + 1 .. p`` (exactly ``w`` keys including itself, as Mistral's
``sliding_window``); a non-causal query sees ``p - w + 1 .. p + w - 1`` (the causal window mirrored).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import check_int, check_key_padding_mask, check_pair

Predicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "Predicate", "causal", "sliding_window", "dilated_window", "block_local", "prefix_lm", "document",
    "neighborhood_1d", "key_padding", "and_masks", "or_masks", "materialize", "block_mask",
]


def causal(offset: int = 0) -> Predicate:
    """Bottom-right causal: query ``i`` sees key ``j`` iff ``j <= i + offset`` (offset = Nk - Nq)."""
    offset = check_int("offset", offset, low=None)

    def causal_mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return causal_mask


def sliding_window(window: int, *, causal: bool = True, offset: int = 0) -> Predicate:
    """Local attention: ``0 <= p - j < window`` (causal) or ``|p - j| < window`` with ``p = i + offset``."""
    window = check_int("window", window)
    offset = check_int("offset", offset, low=None)

    if causal:
        def sliding_window_causal(b, h, q_idx, kv_idx):
            d = q_idx + offset - kv_idx
            return (d >= 0) & (d < window)

        return sliding_window_causal

    def sliding_window_bidirectional(b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx
        return (d < window) & (d > -window)

    return sliding_window_bidirectional


def dilated_window(window: int, dilation: int, *, causal: bool = True, offset: int = 0) -> Predicate:
    """Dilated sliding window: keys at distances ``0, dilation, ..., (window-1)*dilation`` (mirrored if
    not causal), as in Longformer's dilated heads."""
    window = check_int("window", window)
    dilation = check_int("dilation", dilation)
    offset = check_int("offset", offset, low=None)

    def dilated_window_mask(b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx
        ok = (torch.remainder(d, dilation) == 0) & (d < window * dilation) & (d > -window * dilation)
        return ok & (d >= 0) if causal else ok

    return dilated_window_mask


def block_local(block_size: int, *, offset: int = 0) -> Predicate:
    """Chunked attention: query position ``p = i + offset`` and key ``j`` in the same block of
    ``block_size`` (combine with :func:`causal` for causal chunks)."""
    block_size = check_int("block_size", block_size)
    offset = check_int("offset", offset, low=None)

    def block_local_mask(b, h, q_idx, kv_idx):
        return torch.div(q_idx + offset, block_size, rounding_mode="floor") == torch.div(
            kv_idx, block_size, rounding_mode="floor"
        )

    return block_local_mask


def prefix_lm(prefix_length: int, *, offset: int = 0) -> Predicate:
    """Prefix-LM: every query sees the first ``prefix_length`` keys, the rest causally."""
    prefix_length = check_int("prefix_length", prefix_length, low=0)
    offset = check_int("offset", offset, low=None)

    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (kv_idx <= q_idx + offset)

    return prefix_lm_mask


def document(q_ids: torch.Tensor, kv_ids: torch.Tensor | None = None) -> Predicate:
    """Document/segment masking: query and key attend iff their ids are equal.

    q_ids (B, Nq) and kv_ids (B, Nk) integer tensors (kv_ids defaults to q_ids for self attention).
    """
    kv_ids = q_ids if kv_ids is None else kv_ids
    for name, ids in (("q_ids", q_ids), ("kv_ids", kv_ids)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name}: expected an integer tensor (B, N), got {got}")
    if q_ids.shape[0] != kv_ids.shape[0]:
        raise ValueError(f"kv_ids: batch {kv_ids.shape[0]} does not match q_ids batch {q_ids.shape[0]}")

    def document_mask(b, h, q_idx, kv_idx):
        return q_ids[b, q_idx] == kv_ids[b, kv_idx]

    return document_mask


def neighborhood_1d(length: int, kernel_size: int, *, dilation: int = 1, causal: bool = False) -> Predicate:
    """Neighborhood attention in 1-D (Hassani et al., arXiv 2204.07143; NATTEN semantics).

    Non-causal: every query sees exactly ``kernel_size`` keys of its dilation group, a window centred on
    it and shifted inwards at the borders (not zero-padded). Causal: keys ``i, i-d, ..., i-(k-1)d``.
    Self attention only (Nq == Nk == length).
    """
    length = check_int("length", length)
    kernel_size = check_int("kernel_size", kernel_size)
    dilation = check_int("dilation", dilation)
    if kernel_size * dilation > length and not causal:
        raise ValueError(
            f"kernel_size: kernel_size * dilation = {kernel_size * dilation} must be <= length {length} "
            "for non-causal neighborhood attention"
        )

    if causal:
        def neighborhood_1d_causal(b, h, q_idx, kv_idx):
            d = q_idx - kv_idx
            return (d >= 0) & (torch.remainder(d, dilation) == 0) & (d < kernel_size * dilation)

        return neighborhood_1d_causal

    def neighborhood_1d_mask(b, h, q_idx, kv_idx):
        # Work inside the dilation group of the query: positions r, r + d, r + 2d, ...
        r = torch.remainder(q_idx, dilation)
        group_len = torch.div(length - 1 - r, dilation, rounding_mode="floor") + 1
        qi = torch.div(q_idx, dilation, rounding_mode="floor")
        start = torch.clamp(qi - kernel_size // 2, min=0)
        start = torch.minimum(start, group_len - kernel_size)
        kj = torch.div(kv_idx, dilation, rounding_mode="floor")
        same_group = torch.remainder(kv_idx, dilation) == r
        return same_group & (kj >= start) & (kj < start + kernel_size)

    return neighborhood_1d_mask


def neighborhood_2d(height: int, width: int, kernel_size, dilation=1) -> Predicate:
    """Mask predicate of 2-D neighborhood attention over flattened indices ``i = row * width + col``.

    The product of NATTEN's 1-D neighborhoods (:func:`neighborhood_1d`) on rows and columns:
    every query sees exactly ``kh * kw`` keys of its dilation group, its window shifted inwards at borders.
    """
    kh, kw = check_pair("kernel_size", kernel_size)
    dh, dw = check_pair("dilation", dilation)
    rows = neighborhood_1d(height, kh, dilation=dh)
    cols = neighborhood_1d(width, kw, dilation=dw)

    def neighborhood_2d_mask(b, h, q_idx, kv_idx):
        qr, qc = torch.div(q_idx, width, rounding_mode="floor"), torch.remainder(q_idx, width)
        kr, kc = torch.div(kv_idx, width, rounding_mode="floor"), torch.remainder(kv_idx, width)
        return rows(b, h, qr, kr) & cols(b, h, qc, kc)

    return neighborhood_2d_mask


def key_padding(key_padding_mask: torch.Tensor) -> Predicate:
    """Predicate of a key-padding mask (B, Nk), True = attend."""
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dim() != 2:
        raise ValueError("key_padding_mask: expected a bool tensor (B, Nk)")
    check_key_padding_mask(key_padding_mask, key_padding_mask.shape[0], key_padding_mask.shape[1])

    def key_padding_mask_mod(b, h, q_idx, kv_idx):
        return key_padding_mask[b, kv_idx]

    return key_padding_mask_mod


def and_masks(*preds: Predicate) -> Predicate:
    """Attend where every predicate attends."""
    if not preds:
        raise ValueError("and_masks: expected at least one predicate, got none")

    def and_mask(b, h, q_idx, kv_idx):
        out = preds[0](b, h, q_idx, kv_idx)
        for p in preds[1:]:
            out = out & p(b, h, q_idx, kv_idx)
        return out

    return and_mask


def or_masks(*preds: Predicate) -> Predicate:
    """Attend where any predicate attends."""
    if not preds:
        raise ValueError("or_masks: expected at least one predicate, got none")

    def or_mask(b, h, q_idx, kv_idx):
        out = preds[0](b, h, q_idx, kv_idx)
        for p in preds[1:]:
            out = out | p(b, h, q_idx, kv_idx)
        return out

    return or_mask


def materialize(
    pred: Predicate, batch: int, heads: int, nq: int, nk: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Dense bool mask (batch, heads, nq, nk) of ``pred``. Sizes of 1 keep that axis broadcastable."""
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1)
    qi = torch.arange(nq, device=device).view(1, 1, nq, 1)
    kj = torch.arange(nk, device=device).view(1, 1, 1, nk)
    out = pred(b, h, qi, kj)
    return out.expand(batch, heads, nq, nk)


def block_mask(
    pred: Predicate, batch: int | None, heads: int | None, nq: int, nk: int, *,
    device: torch.device | str = "cpu", block_size: int = 128,
):
    """FlexAttention ``BlockMask`` of ``pred``, or None when FlexAttention is unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:  # pragma: no cover - torch < 2.5
        return None
    return create_block_mask(pred, batch, heads, nq, nk, device=device, BLOCK_SIZE=block_size)
