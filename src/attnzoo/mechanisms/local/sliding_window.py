"""Sliding-window (local) attention, as in Longformer and Mistral.

Paper: "Longformer: The Long-Document Transformer", Beltagy et al., arXiv 2004.05150 (sliding window);
Mistral 7B, arXiv 2310.06825 (causal window + rolling cache). Official code:
https://github.com/allenai/longformer
Each query attends only to keys within ``window`` positions: causal ``p - window < j <= p`` (exactly
``window`` keys including itself), non-causal ``|p - j| < window``. O(N * window) time and memory.
"""

from __future__ import annotations

from ...errors import check_step
from ...kernels.local import local_attention
from ...kernels.sdpa import sdpa
from ...masks import materialize, sliding_window
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from ...state import SlidingWindowCache


def sliding_window_predicate(nq: int, nk: int, *, causal: bool, window: int, heads=None, kv_heads=None):
    """The window as a mask predicate (b, h, q_idx, kv_idx) -> bool, bottom-right aligned."""
    return sliding_window(window, causal=causal, offset=nk - nq)


# Below this many (query x key) pairs the fast form is a masked fused SDPA call: the dense mask is small
# and one call beats the blocked kernel's bookkeeping (e.g. one decoding step against a window cache).
_SMALL = 1 << 16


def sliding_window_mask(nq: int, nk: int, window: int, causal: bool, device=None):
    """Dense (1, 1, Nq, Nk) bool mask of the window, bottom-right aligned (query i at i + Nk - Nq)."""
    return materialize(sliding_window_predicate(nq, nk, causal=causal, window=window), 1, 1, nq, nk, device=device)


def sliding_window_reference(q, k, v, *, causal, key_padding_mask, scale, window):
    """Exact softmax attention with the window mask materialized densely: O(Nq * Nk) memory."""
    mask = sliding_window_mask(q.shape[2], k.shape[2], window, causal, device=q.device)  # (1, 1, Nq, Nk)
    return softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=mask,
                             scale=scale)


def sliding_window_fast(q, k, v, *, causal, key_padding_mask, scale, window):
    """Blocked local attention (current + neighbouring key blocks), hand-written backward; a window that
    covers every key is plain (fused) softmax attention."""
    nq, nk = q.shape[2], k.shape[2]
    if window >= nq + nk:  # the window covers every key
        return sdpa(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if nq * nk <= _SMALL:  # decoding steps and short sequences: one fused call beats the blocked kernel
        mask = sliding_window_mask(nq, nk, window, causal, device=q.device)  # (1, 1, Nq, Nk)
        return sdpa(q, k, v, key_padding_mask=key_padding_mask, attn_mask=mask, scale=scale)
    return local_attention(q, k, v, window=window, causal=causal, scale=scale, key_padding_mask=key_padding_mask)


def init_window_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device, window):
    return SlidingWindowCache(batch, kv_heads, head_dim, value_dim, window=window, dtype=dtype, device=device)


def sliding_window_step(q, k, v, state: SlidingWindowCache, *, scale, window, key_padding_mask=None):
    """Append T new tokens to the bounded cache, attend causally within the window, evict old keys."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=SlidingWindowCache)
    keys, values, mask = state.append(k, v, key_padding_mask)  # (B, Hk, <= window - 1 + T, D)
    out = sliding_window_fast(q, keys, values, causal=True, key_padding_mask=mask, scale=scale, window=window)
    state.evict()
    return out


SLIDING_WINDOW = register(Mechanism(
    name="sliding_window",
    aliases=("local", "swa", "longformer_window"),
    family="local",
    title="Longformer: The Long-Document Transformer",
    arxiv="2004.05150",
    code="https://github.com/allenai/longformer",
    summary="Softmax attention restricted to a band of `window` keys (causal: the last `window` keys).",
    patterns=("noncausal_self", "causal_self", "causal_cross"),
    exact=True,
    state="window",
    complexity="time O(N w d), memory O(N d); decode state O(w)",
    reference=sliding_window_reference,
    fast=sliding_window_fast,
    step=sliding_window_step,
    init_state=init_window_cache,
    mask=sliding_window_predicate,
    options=(Option("window", 256, int, low=1, doc="keys per causal window (including the query's own)"),),
    permutation_equivariant=False,
    test_options={"window": 3},
    notes="exact softmax attention within the window; causal_cross is decoding / chunked prefill "
          "(bottom-right aligned); window >= Nq + Nk reduces to dense softmax.",
))
