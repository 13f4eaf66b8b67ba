"""Neighborhood attention in 1-D (NATTEN semantics), with dilation and a causal form.

Paper: "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
Hassani, Hwu, Shi et al., arXiv 2403.04690 (neighborhood attention: arXiv 2204.07143; dilation: arXiv
2209.15001). Official code: https://github.com/SHI-Labs/NATTEN
Each query attends to exactly ``kernel_size`` keys of its dilation group (positions with the same
remainder modulo ``dilation``): a window centred on it and shifted inwards at the borders, never zero-padded.
Causal: keys ``p, p - d, ..., p - (kernel_size - 1) d`` (fewer at the start of the sequence).

Semantics follow NATTEN's own mask (``natten/backends/flex.py``, stride 1): inside a dilation group of
length ``m`` the window is ``[s, s + k)`` with ``s = clamp(i - k // 2, 0, m - k)``; an even ``k`` therefore
has one more key on the left of the centre than on the right, as in NATTEN. Non-causal neighborhood
attention needs ``kernel_size * dilation <= N`` (NATTEN's constraint) and is self-attention only. The causal
form is bottom-right aligned (query i at position ``i + Nk - Nq``), which is what decoding uses.
Padding (``key_padding_mask``): non-causal, each batch row runs on its own tokens only (NATTEN's
variable-length semantics: a right-padded batch equals each sequence alone, windows shift inwards at the
row's own last token; a row shorter than kernel_size * dilation sees its whole dilation groups) and padded
positions return zeros; causal, padded keys are dropped from the positional
window (the same thing for left or right padding, which never falls inside a window of real tokens).
Not included (NATTEN options this file does not implement): ``stride > 1`` and relative position bias.

Fast form (never builds the N x N scores): the sequence is regrouped into its dilation groups (folded into
the batch axis), and inside a group

- causal: a causal sliding window of ``kernel_size`` keys -> the blocked kernel ``kernels/local.py``;
- non-causal: the interior queries see keys ``[p - k//2, p + k - 1 - k//2]`` -- a causal window of ``k`` keys
  for a query shifted right by ``k - 1 - k//2`` -- so they run through the same blocked kernel; the
  ``k - 1`` border queries (window shifted inwards) all see the first (last) ``k`` keys and run as two small
  dense attentions.
Decoding (causal): a :class:`~attnzoo.state.SlidingWindowCache` of the last ``(k - 1) * d`` keys.
"""

from __future__ import annotations

import torch

from ...errors import check_step
from ...kernels.local import local_attention
from ...kernels.sdpa import sdpa
from ...masks import materialize
from ...masks import neighborhood_1d as neighborhood_1d_predicate
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from ...state import SlidingWindowCache


def _check_geometry(nq: int, nk: int, kernel_size: int, dilation: int, causal: bool) -> None:
    if causal:
        return
    if nq != nk:
        raise ValueError(
            f"q, k: non-causal neighborhood attention is self-attention (Nq == Nk), got Nq={nq}, Nk={nk}")
    if kernel_size * dilation > nk:
        raise ValueError(
            f"kernel_size: kernel_size * dilation = {kernel_size} * {dilation} = {kernel_size * dilation} must be "
            f"<= the sequence length {nk} for non-causal neighborhood attention (NATTEN's constraint)")


def neighborhood_1d_mask_predicate(nq: int, nk: int, kernel_size: int, dilation: int = 1, causal: bool = False,
                                   strict: bool = True):
    """Predicate ``(b, h, q_idx, kv_idx) -> bool`` of 1-D neighborhood attention for Nq queries over Nk keys.

    Causal is bottom-right aligned (query i at position i + Nk - Nq); non-causal needs Nq == Nk. With
    ``strict=False`` (a padded row shorter than kernel_size * dilation) every dilation group is shorter than
    the kernel, so each query sees its whole group -- what NATTEN's window rule gives for such a group."""
    if strict:
        _check_geometry(nq, nk, kernel_size, dilation, causal)
    if not causal and kernel_size * dilation > nk:
        def whole_dilation_group(b, h, q_idx, kv_idx):
            return torch.remainder(q_idx - kv_idx, dilation) == 0

        return whole_dilation_group
    base = neighborhood_1d_predicate(nk, kernel_size, dilation=dilation, causal=causal)
    offset = nk - nq
    if offset == 0:
        return base

    def neighborhood_1d_shifted(b, h, q_idx, kv_idx):
        return base(b, h, q_idx + offset, kv_idx)

    return neighborhood_1d_shifted


def neighborhood_1d_registry_mask(nq: int, nk: int, *, causal: bool, kernel_size: int, dilation: int, heads=None,
                                  kv_heads=None):
    """The registry's static-mask predicate (no padding: with padding, non-causal rows run on their own tokens)."""
    return neighborhood_1d_mask_predicate(nq, nk, kernel_size, dilation, causal)


def neighborhood_1d_mask(nq: int, nk: int, kernel_size: int, dilation: int = 1, causal: bool = False,
                         device=None, strict: bool = True) -> torch.Tensor:
    """Dense (1, 1, Nq, Nk) bool mask, True = attend."""
    pred = neighborhood_1d_mask_predicate(nq, nk, kernel_size, dilation, causal, strict)
    return materialize(pred, 1, 1, nq, nk, device=device)


def _per_sequence(fn, q, k, v, key_padding_mask, **kw):
    """Non-causal with padding: every batch row runs on its own tokens only (NATTEN's variable-length
    semantics), so the borders -- where windows shift inwards -- are the row's own first and last tokens.
    Padded positions return zeros."""
    B, H, n, _ = q.shape
    rows = []
    for b in range(B):
        idx = torch.nonzero(key_padding_mask[b]).flatten()  # (m_b,) positions of the row's tokens
        out = q.new_zeros(1, H, n, v.shape[3])
        if idx.numel():  # a row shorter than kernel_size * dilation: each query sees its whole dilation group
            sel = lambda x: x[b : b + 1].index_select(2, idx)  # noqa: E731, B023
            out = out.index_copy(2, idx, fn(sel(q), sel(k), sel(v), False, None, strict=False, **kw))
        rows.append(out)
    return torch.cat(rows, dim=0)  # (B, H, N, Dv)


def _reference(q, k, v, causal, key_padding_mask, *, scale, kernel_size, dilation, strict=True):
    if key_padding_mask is not None and not causal:
        return _per_sequence(_reference, q, k, v, key_padding_mask, scale=scale, kernel_size=kernel_size,
                             dilation=dilation)
    mask = neighborhood_1d_mask(q.shape[2], k.shape[2], kernel_size, dilation, causal, device=q.device,
                                strict=strict)  # (1, 1, Nq, Nk)
    return softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=mask, scale=scale)


def neighborhood_1d_reference(q, k, v, *, causal, key_padding_mask, scale, kernel_size, dilation):
    """Exact softmax attention with the neighborhood mask materialized densely: O(Nq * Nk) memory."""
    return _reference(q, k, v, causal, key_padding_mask, scale=scale, kernel_size=kernel_size, dilation=dilation)


# ---------------------------------------------------------------------------------------------------------
# Fast form
# ---------------------------------------------------------------------------------------------------------
def _na_group(q, k, v, kpm, kernel_size: int, causal: bool, scale: float) -> torch.Tensor:
    """Neighborhood attention without dilation on (B', H, M, D) tensors (one dilation group per batch row)."""
    nk = k.shape[2]
    if causal:
        if kernel_size >= nk:  # the window reaches the first key for every query: plain causal attention
            return sdpa(q, k, v, causal=True, key_padding_mask=kpm, scale=scale)
        return local_attention(q, k, v, window=kernel_size, causal=True, scale=scale, key_padding_mask=kpm)
    m = nk
    if kernel_size >= m:  # every window is the whole group (a padded row can be shorter than the kernel)
        return sdpa(q, k, v, causal=False, key_padding_mask=kpm, scale=scale)
    left = kernel_size // 2
    right = kernel_size - 1 - left
    parts = []
    if left:  # queries 0..left-1: window shifted inwards to keys [0, k)
        parts.append(sdpa(q[:, :, :left], k[:, :, :kernel_size], v[:, :, :kernel_size], causal=False,
                          key_padding_mask=None if kpm is None else kpm[:, :kernel_size], scale=scale))
    # interior queries p in [left, m - right): keys [p - left, p + right] = a causal window of k keys ending at
    # p + right; giving local_attention the m - left - right interior queries puts query p at key position
    # p + right (bottom-right alignment, offset left + right).
    parts.append(local_attention(q[:, :, left : m - right], k, v, window=kernel_size, causal=True, scale=scale,
                                 key_padding_mask=kpm))
    if right:  # queries m-right..m-1: keys [m - k, m)
        parts.append(sdpa(q[:, :, m - right :], k[:, :, m - kernel_size :], v[:, :, m - kernel_size :], causal=False,
                          key_padding_mask=None if kpm is None else kpm[:, m - kernel_size :], scale=scale))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # (B', H, M, Dv)


def _dilation_classes(nq: int, nk: int, dilation: int) -> list[tuple[list[int], int, int]]:
    """Dilation groups sharing (queries, keys) counts: [(residues, nq_r, nk_r)], bottom-right aligned.

    Residue r holds keys r, r + d, ... and the queries at positions (i + Nk - Nq) = r mod d; the queries of a
    group are the last ones of its keys (positions are suffixes), so each group is again bottom-right aligned."""
    off = nk - nq
    classes: dict[tuple[int, int], list[int]] = {}
    for r in range(dilation):
        nk_r = len(range(r, nk, dilation))
        nq_r = len(range((r - off) % dilation, nq, dilation))
        if nk_r or nq_r:
            classes.setdefault((nq_r, nk_r), []).append(r)
    return [(rs, a, b) for (a, b), rs in classes.items()]


def _gather_groups(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) and (R, M) indices -> (B * R, H, M, D), dilation groups folded into the batch axis."""
    B, H, _, D = x.shape
    R, M = idx.shape
    g = x.index_select(2, idx.reshape(-1)).view(B, H, R, M, D)  # (B, H, R, M, D)
    return g.permute(0, 2, 1, 3, 4).reshape(B * R, H, M, D)


def neighborhood_1d_fast(q, k, v, *, causal, key_padding_mask, scale, kernel_size, dilation):
    """Blocked neighborhood attention per dilation group (see the module docstring); forward and backward
    never build the N x N matrix."""
    return _fast(q, k, v, causal, key_padding_mask, scale=scale, kernel_size=kernel_size, dilation=dilation)


def _fast(q, k, v, causal, key_padding_mask, *, scale, kernel_size, dilation, strict=True):
    B, H, nq, _ = q.shape
    nk = k.shape[2]
    if strict:
        _check_geometry(nq, nk, kernel_size, dilation, causal)
    if key_padding_mask is not None and not causal:
        return _per_sequence(_fast, q, k, v, key_padding_mask, scale=scale, kernel_size=kernel_size,
                             dilation=dilation)
    if causal and nq > nk:  # bottom-right: the first Nq - Nk queries precede every key and see nothing
        head = q.new_zeros(B, H, nq - nk, v.shape[3])
        rest = _fast(q[:, :, nq - nk :], k, v, True, key_padding_mask, scale=scale, kernel_size=kernel_size,
                     dilation=dilation)
        return torch.cat([head, rest], dim=2)
    if dilation == 1:
        return _na_group(q, k, v, key_padding_mask, kernel_size, causal, scale)
    off = nk - nq
    outs, order = [], []
    for residues, nq_r, nk_r in _dilation_classes(nq, nk, dilation):
        if nq_r == 0:
            continue
        qi = torch.stack([torch.arange((r - off) % dilation, nq, dilation) for r in residues]).to(q.device)  # (R,nq_r)
        ki = torch.stack([torch.arange(r, nk, dilation) for r in residues]).to(q.device)  # (R, nk_r)
        kpm = None
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, ki.reshape(-1)].view(B * len(residues), nk_r)  # (B*R, nk_r)
        o = _na_group(_gather_groups(q, qi), _gather_groups(k, ki), _gather_groups(v, ki), kpm, kernel_size,
                      causal, scale)  # (B*R, H, nq_r, Dv)
        o = o.view(B, len(residues), H, nq_r, -1).permute(0, 2, 1, 3, 4).reshape(B, H, len(residues) * nq_r, -1)
        outs.append(o)
        order.append(qi.reshape(-1))
    out = torch.cat(outs, dim=2)  # (B, H, Nq, Dv), queries in group order
    inverse = torch.empty(nq, dtype=torch.long, device=q.device)
    inverse[torch.cat(order)] = torch.arange(nq, device=q.device)
    return out.index_select(2, inverse)  # (B, H, Nq, Dv)


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------
def init_neighborhood_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device, kernel_size, dilation):
    """Causal decoding keeps the last (kernel_size - 1) * dilation keys: a bounded window cache."""
    return SlidingWindowCache(batch, kv_heads, head_dim, value_dim, window=(kernel_size - 1) * dilation + 1,
                              dtype=dtype, device=device)


def neighborhood_1d_step(q, k, v, state: SlidingWindowCache, *, scale, kernel_size, dilation, key_padding_mask=None):
    """Append T new tokens, attend causally to each one's dilated neighborhood inside the cache, evict.

    Dilation groups are defined by differences of positions, so they are the same inside the cache (which
    starts at an arbitrary absolute position) as in the whole sequence."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=SlidingWindowCache)
    keys, values, mask = state.append(k, v, key_padding_mask)  # (B, Hk, <= (k-1)d + T, D)
    out = neighborhood_1d_fast(q, keys, values, causal=True, key_padding_mask=mask, scale=scale,
                               kernel_size=kernel_size, dilation=dilation)
    state.evict()
    return out


NEIGHBORHOOD_1D = register(Mechanism(
    name="neighborhood_1d",
    aliases=("natten_1d", "na1d", "neighborhood_attention_1d"),
    family="local",
    catalog="P066",
    title="Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
    arxiv="2403.04690",
    code="https://github.com/SHI-Labs/NATTEN",
    summary="Each query attends to its kernel_size nearest keys in its dilation group, window shifted inwards "
            "at the borders (NATTEN); causal form sees the last kernel_size dilated keys.",
    patterns=("noncausal_self", "causal_self", "causal_cross"),
    exact=True,
    state="window",
    complexity="time O(N k d), memory O(N d); decode state O(k * dilation)",
    reference=neighborhood_1d_reference,
    fast=neighborhood_1d_fast,
    step=neighborhood_1d_step,
    init_state=init_neighborhood_cache,
    mask=neighborhood_1d_registry_mask,
    options=(
        Option("kernel_size", 7, int, low=1, doc="keys per query (the neighborhood size)"),
        Option("dilation", 1, int, low=1, doc="distance between neighbours; groups positions by remainder"),
    ),
    test_options={"kernel_size": 3, "dilation": 2},
    notes="NATTEN semantics (window shifted inwards at borders, even kernels one extra key on the left); "
          "non-causal needs Nq == Nk and kernel_size * dilation <= N; kernel_size = N, dilation 1 is dense "
          "attention; causal_cross is decoding / chunked prefill (bottom-right aligned). No stride, no RPB.",
))
