"""Token importance without an n x n attention matrix: the attention row of selected queries (the [CLS] token, the
last text token), recomputed from q, K and the log-sum-exp.

Fused kernels (SDPA, FlashAttention) do not return attention weights, which is why the official code of [CLS]-
and text-attention pruning (FasterVLM P057, VTC-CLS P085, FastV-style pruning, LSceneLLM P083) forces a layer back
to eager attention. But row ``i`` of softmax(Q K^T * scale) is ``exp(q_i . k_j * scale - lse_i)``: with the
row's log-sum-exp (which a flash-style forward computes anyway; ``attnzoo.kernels.sdpa.sdpa_with_lse`` returns it)
the row costs one (R, N) product for R selected queries: memory O(n) per query, at any length, under any kernel.
Without a given LSE it is computed here from the same scores (still O(n) per query).

- :func:`attention_row` -- rows of softmax attention under causal / key-padding / any ``attnzoo.masks`` predicate.
- :func:`attention_received` -- mean attention each key receives over all queries (mean-pool importance), in
  query chunks: O(chunk * n) memory, never (n, n).
- :func:`mechanism_attention_row` -- the row of a registered mechanism: every dense exact one (family ``core``)
  and every one exposing its selected pattern through the registry's ``mask`` field (sliding window,
  neighbourhood, sink window...). Others raise: their attention is not a masked softmax row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import registry
from ..errors import check_int, check_key_padding_mask, check_scale, check_tensor
from ..masks import Predicate


def _rows_tensor(rows: Sequence[int] | torch.Tensor, r: int, nq: int, device) -> torch.Tensor:
    idx = torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() != r:
        raise ValueError(f"rows: expected {r} query indices (one per row of q_rows), got {idx.numel()}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= nq):
        raise ValueError(f"rows: expected query indices in [0, {nq}), got {idx.tolist()}")
    return idx


def attention_row(
    q_rows: torch.Tensor, k: torch.Tensor, *, rows: Sequence[int] | torch.Tensor, nq: int | None = None,
    scale: float | None = None, causal: bool = False, key_padding_mask: torch.Tensor | None = None,
    lse: torch.Tensor | None = None, predicate: Predicate | None = None,
) -> torch.Tensor:
    """Attention probabilities of selected query rows, without the (Nq, Nk) matrix.

    Args:
        q_rows: (B, Hq, R, D) the selected queries (already projected, e.g. with RoPE applied).
        k: (B, Hk, Nk, D) all keys, Hq % Hk == 0 (query head h reads key head h // (Hq // Hk)).
        rows: the R query positions among ``nq`` queries (for causal alignment and predicates).
        nq: total number of queries (default Nk: self-attention); causal is bottom-right aligned:
            query i sees key j iff j <= i + Nk - nq.
        key_padding_mask: bool (B, Nk), True = attend.
        lse: (B, Hq, R) log-sum-exp of each selected row from a fused forward (e.g. ``sdpa_with_lse``);
            computed here when None.
        predicate: an ``attnzoo.masks`` predicate (b, h, q_idx, kv_idx) -> bool, True = attend.

    Returns:
        (B, Hq, R, Nk) probabilities in the promoted dtype of q (float32 at least); rows sum to 1, zeros on
        masked keys, all zeros on a row that sees no key.
    """
    check_tensor("q_rows", q_rows, ndim=4)
    check_tensor("k", k, ndim=4)
    B, Hq, R, D = q_rows.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k: expected (B, Hk, Nk, D) = ({B}, Hk, Nk, {D}), got {tuple(k.shape)}")
    Hk, Nk = k.shape[1], k.shape[2]
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"q_rows, k: query heads must be a multiple of key heads, got Hq={Hq}, Hk={Hk}")
    nq = Nk if nq is None else check_int("nq", nq, low=1)
    idx = _rows_tensor(rows, R, nq, q_rows.device)
    check_key_padding_mask(key_padding_mask, B, Nk, device=q_rows.device)
    check_scale(scale)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = torch.promote_types(q_rows.dtype, torch.float32)
    g = Hq // Hk
    # Query head h reads key head h // g: group the g query heads of a key head instead of repeating K.
    qg = q_rows.to(acc).reshape(B, Hk, g * R, D)  # (B, Hk, g*R, D)
    scores = torch.matmul(qg, k.to(acc).transpose(-2, -1)).reshape(B, Hq, R, Nk) * scale  # (B, Hq, R, Nk)
    allowed = None
    if causal:
        kv = torch.arange(Nk, device=q_rows.device)
        allowed = (kv.view(1, Nk) <= idx.view(R, 1) + (Nk - nq)).view(1, 1, R, Nk)  # (1, 1, R, Nk)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(B, 1, 1, Nk)  # (B, 1, 1, Nk)
        allowed = kpm if allowed is None else allowed & kpm
    if predicate is not None:
        b = torch.arange(B, device=q_rows.device).view(B, 1, 1, 1)
        h = torch.arange(Hq, device=q_rows.device).view(1, Hq, 1, 1)
        pm = predicate(b, h, idx.view(1, 1, R, 1), torch.arange(Nk, device=q_rows.device).view(1, 1, 1, Nk))
        allowed = pm if allowed is None else allowed & pm  # (B|1, Hq|1, R, Nk)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, R); -inf on rows that see nothing
    else:
        check_tensor("lse", lse, ndim=3)
        if tuple(lse.shape) != (B, Hq, R):
            raise ValueError(f"lse: expected (B, Hq, R) = ({B}, {Hq}, {R}), got {tuple(lse.shape)}")
    lse = lse.to(acc)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1)  # (B, Hq, R, 1)
    return torch.exp(scores - safe)  # (B, Hq, R, Nk); exp(-inf) = 0 on masked keys


def attention_received(
    q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, causal: bool = False,
    key_padding_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None, chunk: int = 256,
) -> torch.Tensor:
    """Mean attention each key receives, averaged over the (unmasked) queries: (B, Hq, Nk).

    The column means of softmax(Q K^T * scale) computed ``chunk`` query rows at a time (O(chunk * Nk) memory).
    ``query_mask`` (bool (B, Nq), True = count this query) excludes padding queries from the mean.
    """
    check_tensor("q", q, ndim=4)
    check_int("chunk", chunk, low=1)
    B, Hq, Nq, _ = q.shape
    if query_mask is not None:
        check_key_padding_mask(query_mask, B, Nq, name="query_mask", device=q.device)
    total = None
    for s in range(0, Nq, chunk):
        e = min(Nq, s + chunk)
        p = attention_row(q[:, :, s:e], k, rows=torch.arange(s, e), nq=Nq, scale=scale, causal=causal,
                          key_padding_mask=key_padding_mask)  # (B, Hq, c, Nk)
        if query_mask is not None:
            p = p * query_mask[:, s:e].view(B, 1, e - s, 1).to(p.dtype)
        part = p.sum(dim=2)  # (B, Hq, Nk)
        total = part if total is None else total + part
    count = torch.full((B, 1, 1), float(Nq), dtype=total.dtype, device=q.device) if query_mask is None else \
        query_mask.sum(dim=1).clamp_min(1).to(total.dtype).view(B, 1, 1)
    return total / count


def row_predicate(mechanism: str, nq: int, nk: int, *, causal: bool, heads: int | None = None,
                  kv_heads: int | None = None, **options) -> Predicate | None:
    """The mask predicate under which ``mechanism``'s attention is a softmax row (None: dense softmax), or an
    error when the mechanism is not a masked softmax (linear, pooled, routed without an exposed mask).
    ``heads``/``kv_heads``: the call's head counts, read by per-head patterns (MoA, S2-Attention, SinkLoRA)."""
    mech = registry.get(mechanism)
    if mech.kind != "sequence" or not mech.functional:
        raise ValueError(f"mechanism: {mechanism!r} is not a functional sequence mechanism (kind {mech.kind!r})")
    opts = mech.resolve_options(options)
    if mech.mask is not None:
        return mech.mask(nq, nk, causal=causal, heads=heads, kv_heads=kv_heads, **opts)
    if mech.exact and mech.family == "core":
        return None
    reason = ("is exact only within a sparse pattern it does not expose (its registry record has no `mask`)"
              if mech.exact else "is not a masked softmax (not exact and no `mask` in its registry record)")
    raise ValueError(f"mechanism: {mechanism!r} {reason}; its attention row cannot be recomputed from q, K and "
                     "the log-sum-exp")


def mechanism_attention_row(
    mechanism: str, q: torch.Tensor, k: torch.Tensor, *, rows: Sequence[int] | torch.Tensor, causal: bool = False,
    key_padding_mask: torch.Tensor | None = None, scale: float | None = None, lse: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """(B, Hq, R, Nk): the attention row of queries ``rows`` of q (B, Hq, Nq, D) under ``mechanism``."""
    check_tensor("q", q, ndim=4)
    nq, nk = q.shape[2], k.shape[2]
    pred = row_predicate(mechanism, nq, nk, causal=causal, heads=q.shape[1], kv_heads=k.shape[1], **options)
    idx = _rows_tensor(rows, torch.as_tensor(rows).numel(), nq, q.device)
    # a declared mask already holds the mechanism's causality (Croc/AKI: bidirectional spans inside a causal mask)
    return attention_row(q[:, :, idx], k, rows=idx, nq=nq, scale=scale, causal=causal and pred is None,
                         key_padding_mask=key_padding_mask, lse=lse, predicate=pred)
