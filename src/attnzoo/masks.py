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

Modality masks (multimodal decoders: a prompt of text and image tokens in one sequence) take the positions of
their spans as ints, or as 1-D integer tensors (B,) when every batch row has its own layout (left padding, images
of different sizes): :func:`croc` (bidirectional within the visual span, causal elsewhere), :func:`ee_mllm`
(visual tokens see only themselves, text causal over everything), :func:`aki` (image tokens also see the later
prompt), :func:`prefix_lm`, and per-token ids: :func:`modality_blocks`, :func:`multimodal` (modality types and
packed documents). Positions are absolute: with ``offset = Nk - Nq`` query ``i`` sits at position ``i + offset``
and key ``j`` at ``j``.

Three forms of every predicate: dense (:func:`materialize`), FlexAttention (:func:`block_mask`) and Hugging Face.
A predicate *is* a transformers mask function (same signature, index-based tensor ops), so it can be passed as
``or_mask_function``/``and_mask_function``; :func:`hf_mask` builds the explicit 4-D ``attention_mask`` a
transformers model takes, with the 2-D padding mask folded in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import check_int, check_key_padding_mask, check_pair

Predicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Bound = int | torch.Tensor
"""A span boundary: one position for every batch row (int) or one per row (1-D integer tensor (B,))."""

__all__ = [
    "Predicate", "Bound", "causal", "sliding_window", "dilated_window", "block_local", "prefix_lm", "document",
    "neighborhood_1d", "key_padding", "span", "croc", "ee_mllm", "aki", "modality_blocks", "blocks_from_modalities",
    "multimodal", "check_bounds", "and_masks", "or_masks", "materialize", "block_mask", "hf_mask",
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


# -- modality masks ----------------------------------------------------------------------------------------
def _bound(name: str, value: object) -> Bound:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise ValueError(f"{name}: expected an int or a 1-D integer tensor (B,) of positions, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        if value.numel() and int(value.min()) < 0:
            raise ValueError(f"{name}: positions must be >= 0, got min {int(value.min())}")
        return value
    return check_int(name, value, low=0)


def check_bounds(batch: int | None = None, **bounds: object) -> dict[str, Bound]:
    """Validate span boundaries given in order (``start=..., end=...``): each an int >= 0 or a 1-D integer tensor
    (B,) with B == ``batch`` (when given); each boundary <= the next one, row by row. Returns them unchanged."""
    out: dict[str, Bound] = {}
    for name, value in bounds.items():
        b = _bound(name, value)
        if isinstance(b, torch.Tensor) and batch is not None and b.shape[0] != batch:
            raise ValueError(f"{name}: expected one position per batch row, shape ({batch},), got {tuple(b.shape)}")
        out[name] = b
    names = list(out)
    for lo, hi in zip(names, names[1:]):
        a, b = out[lo], out[hi]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            raise ValueError(f"{lo}, {hi}: one position per batch row each, got shapes {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        bad = torch.as_tensor(a) > torch.as_tensor(b)
        if bool(bad.any()):
            raise ValueError(f"{lo}, {hi}: expected {lo} <= {hi} (a span [{lo}, {hi})), got {lo}={a!r}, {hi}={b!r}")
    return out


def _at(bound: Bound, b: torch.Tensor):
    """The boundary of batch row(s) ``b``: the int itself, or the tensor indexed by ``b``."""
    return bound[b] if isinstance(bound, torch.Tensor) else bound


def _inside(pos: torch.Tensor, start: Bound, end: Bound, b: torch.Tensor) -> torch.Tensor:
    return (pos >= _at(start, b)) & (pos < _at(end, b))


def span(start: Bound, end: Bound, *, offset: int = 0) -> Predicate:
    """Bidirectional block: query and key both in ``[start, end)`` (query ``i`` at position ``i + offset``)."""
    bounds = check_bounds(start=start, end=end)
    start, end = bounds["start"], bounds["end"]
    offset = check_int("offset", offset, low=None)

    def span_mask(b, h, q_idx, kv_idx):
        return _inside(q_idx + offset, start, end, b) & _inside(kv_idx, start, end, b)

    return span_mask


def croc(visual_start: Bound, visual_end: Bound, *, offset: int = 0) -> Predicate:
    """Croc's mixed attention (arXiv 2410.14332): bidirectional among the visual tokens ``[visual_start,
    visual_end)``, causal everywhere else. ``croc(0, P)`` is ``prefix_lm(P)``."""
    check_bounds(visual_start=visual_start, visual_end=visual_end)
    return or_masks(causal(offset), span(visual_start, visual_end, offset=offset))


def ee_mllm(visual_start: Bound, visual_end: Bound, *, offset: int = 0) -> Predicate:
    """EE-MLLM's composite attention (arXiv 2408.11795): a visual token in ``[visual_start, visual_end)`` sees only
    itself (no visual-visual attention); every other token is causal over all earlier tokens, visual included."""
    bounds = check_bounds(visual_start=visual_start, visual_end=visual_end)
    start, end = bounds["visual_start"], bounds["visual_end"]
    offset = check_int("offset", offset, low=None)

    def ee_mllm_mask(b, h, q_idx, kv_idx):
        p = q_idx + offset
        visual = _inside(p, start, end, b)
        return (visual & (kv_idx == p)) | (~visual & (kv_idx <= p))

    return ee_mllm_mask


def aki(visual_start: Bound, visual_end: Bound, prompt_end: Bound, *, offset: int = 0) -> Predicate:
    """AKI's modality-mutual attention (arXiv 2503.02597): causal, and an image token in ``[visual_start,
    visual_end)`` also sees the prompt tokens after the image, ``[visual_end, prompt_end)``."""
    bounds = check_bounds(visual_start=visual_start, visual_end=visual_end, prompt_end=prompt_end)
    start, end, pend = bounds["visual_start"], bounds["visual_end"], bounds["prompt_end"]
    offset = check_int("offset", offset, low=None)
    base = causal(offset)

    def aki_mask(b, h, q_idx, kv_idx):
        extra = _inside(q_idx + offset, start, end, b) & _inside(kv_idx, end, pend, b)
        return base(b, h, q_idx, kv_idx) | extra

    return aki_mask


def _ids(name: str, ids: object) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        got = type(ids).__name__
        if isinstance(ids, torch.Tensor):
            got = f"a {ids.dtype} tensor of shape {tuple(ids.shape)}"
        raise ValueError(f"{name}: expected an integer tensor (B, N) with one id per position, got {got}")
    return ids


def modality_blocks(block_ids: torch.Tensor, *, offset: int = 0) -> Predicate:
    """Causal, plus bidirectional attention inside each block: ``block_ids`` (B, N) gives every position a block
    id, ``-1`` for tokens that stay causal (text); two positions with the same id >= 0 see each other (every image
    of a multi-image prompt is its own block). Transformers' ``block_sequence_ids`` overlay, as a predicate."""
    block_ids = _ids("block_ids", block_ids)
    offset = check_int("offset", offset, low=None)
    base = causal(offset)

    def modality_blocks_mask(b, h, q_idx, kv_idx):
        qb = block_ids[b, q_idx + offset]
        return base(b, h, q_idx, kv_idx) | ((qb == block_ids[b, kv_idx]) & (qb >= 0))

    return modality_blocks_mask


def blocks_from_modalities(modality_ids: torch.Tensor, *, bidirectional: tuple[int, ...] = (1,),
                           document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Block ids (B, N) for :func:`modality_blocks` from per-token modality types (B, N) (e.g. 0 = text,
    1 = image): every contiguous run of a modality listed in ``bidirectional`` (not crossing a document boundary
    when ``document_ids`` (B, N) are given) is one block; every other token gets ``-1``."""
    modality_ids = _ids("modality_ids", modality_ids)
    if document_ids is not None:
        document_ids = _ids("document_ids", document_ids)
        if document_ids.shape != modality_ids.shape:
            raise ValueError(f"document_ids: expected the shape of modality_ids {tuple(modality_ids.shape)}, got "
                             f"{tuple(document_ids.shape)}")
    bi = torch.isin(modality_ids, torch.tensor(list(bidirectional), dtype=modality_ids.dtype,
                                               device=modality_ids.device))  # (B, N)
    new_run = bi.clone()
    new_run[:, 1:] = bi[:, 1:] & ~(bi[:, :-1] & (modality_ids[:, 1:] == modality_ids[:, :-1]))
    if document_ids is not None:
        new_run[:, 1:] |= bi[:, 1:] & (document_ids[:, 1:] != document_ids[:, :-1])
    run = torch.cumsum(new_run.long(), dim=1) - 1  # (B, N)
    return torch.where(bi, run, torch.full_like(run, -1))


def multimodal(modality_ids: torch.Tensor, *, document_ids: torch.Tensor | None = None,
               bidirectional: tuple[int, ...] = (1,), offset: int = 0) -> Predicate:
    """Per-token modality types (and packed documents): causal, bidirectional inside every contiguous run of a
    ``bidirectional`` modality (Croc for every image of the prompt), and, with ``document_ids`` (B, N), no
    attention across documents. ``modality_ids``/``document_ids`` cover every position, keys included."""
    blocks = blocks_from_modalities(modality_ids, bidirectional=bidirectional, document_ids=document_ids)
    pred = modality_blocks(blocks, offset=offset)
    if document_ids is None:
        return pred
    offset = check_int("offset", offset, low=None)

    def same_document(b, h, q_idx, kv_idx):
        return document_ids[b, q_idx + offset] == document_ids[b, kv_idx]

    return and_masks(pred, same_document)


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


def hf_mask(pred: Predicate, batch: int, nq: int, nk: int, *, attention_mask: torch.Tensor | None = None,
            dtype: torch.dtype = torch.bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The explicit 4-D ``attention_mask`` (batch, 1, nq, nk) a transformers model takes, from ``pred`` and an
    optional 2-D padding mask ``attention_mask`` (batch, nk) of 1/True = token (transformers' convention).

    ``dtype=torch.bool`` (True = attend) suits ``sdpa`` and attnzoo; a float dtype gives the additive form of
    ``eager`` attention (0 where attending, the dtype's most negative value elsewhere).
    """
    m = materialize(pred, batch, 1, nq, nk, device=device)  # (B, 1, Nq, Nk)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, nk):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask: expected a 2-D padding mask ({batch}, {nk}), got {got}")
        m = m & attention_mask.to(device=m.device, dtype=torch.bool).view(batch, 1, 1, nk)
    if dtype == torch.bool:
        return m
    if not dtype.is_floating_point:
        raise TypeError(f"dtype: expected torch.bool or a floating dtype, got {dtype}")
    zero = torch.zeros((), dtype=dtype, device=m.device)
    return torch.where(m, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=m.device))
