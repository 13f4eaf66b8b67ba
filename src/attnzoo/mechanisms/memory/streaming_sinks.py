"""Attention sinks + sliding window (StreamingLLM).

Paper: "Efficient Streaming Language Models with Attention Sinks", Xiao et al., arXiv 2309.17453.
Official code: https://github.com/mit-han-lab/streaming-llm
Each query attends to the first ``sinks`` tokens of the sequence (the attention sinks) and to the last
``window`` tokens (its own included); decoding keeps a cache of ``sinks + window - 1`` keys, whatever the
length. Position re-indexing inside the cache (the paper's rolling RoPE positions) belongs to the model
adapter (``attnzoo.hf``), not to this function, which scores the keys it is given.
Defaults follow the official ``run_streaming_llama.py`` (start_size 4, recent_size 2000).
"""

from __future__ import annotations

from ...errors import check_step
from ...kernels.local import local_attention
from ...kernels.sdpa import sdpa
from ...masks import and_masks, materialize, or_masks, sliding_window
from ...masks import causal as causal_mask
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from ...state import SinkWindowCache
from ..local.sliding_window import _SMALL


def sink_window_predicate(nq: int, nk: int, *, causal: bool, window: int, sinks: int, heads=None, kv_heads=None):
    """Mask predicate (b, h, q_idx, kv_idx) -> bool: the window (bottom-right aligned) or a sink key."""
    offset = nk - nq

    def sink(b, h, q_idx, kv_idx):
        return kv_idx < sinks

    if causal:
        sink = and_masks(sink, causal_mask(offset))
    return or_masks(sliding_window(window, causal=causal, offset=offset), sink)


def sink_window_mask(nq: int, nk: int, window: int, sinks: int, causal: bool, device=None):
    """(1, 1, Nq, Nk) bool: the window (bottom-right aligned) or one of the first ``sinks`` keys."""
    pred = sink_window_predicate(nq, nk, causal=causal, window=window, sinks=sinks)
    return materialize(pred, 1, 1, nq, nk, device=device)


def sink_window_reference(q, k, v, *, causal, key_padding_mask, scale, window, sinks):
    """Softmax attention with the sinks + window mask materialized densely."""
    mask = sink_window_mask(q.shape[2], k.shape[2], window, sinks, causal, device=q.device)  # (1, 1, Nq, Nk)
    return softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=mask,
                             scale=scale)


def sink_window_fast(q, k, v, *, causal, key_padding_mask, scale, window, sinks):
    """Blocked local attention with the sink keys prepended to every tile (O(N (sinks + window)));
    a window covering every key is plain softmax attention, and small problems (decoding steps) are one
    masked fused SDPA call."""
    nq, nk = q.shape[2], k.shape[2]
    if window >= nq + nk:
        return sdpa(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if nq * nk <= _SMALL:
        mask = sink_window_mask(nq, nk, window, sinks, causal, device=q.device)  # (1, 1, Nq, Nk)
        return sdpa(q, k, v, key_padding_mask=key_padding_mask, attn_mask=mask, scale=scale)
    return local_attention(q, k, v, window=window, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                           sinks=sinks)


def init_sink_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device, window, sinks):
    return SinkWindowCache(batch, kv_heads, head_dim, value_dim, window=window, sinks=sinks, dtype=dtype,
                           device=device)


def sink_window_step(q, k, v, state: SinkWindowCache, *, scale, window, sinks, key_padding_mask=None):
    """Append T tokens; attend to sinks + window inside the cache; evict what no later query sees."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=SinkWindowCache)
    keys, values, mask = state.append(k, v, key_padding_mask)  # (B, Hk, <= sinks + window - 1 + T, D)
    out = sink_window_fast(q, keys, values, causal=True, key_padding_mask=mask, scale=scale, window=window,
                           sinks=min(sinks, state.seq_len))
    state.evict()
    return out


SINK_WINDOW = register(Mechanism(
    name="sink_window",
    aliases=("streaming_llm", "attention_sinks"),
    family="memory",
    title="Efficient Streaming Language Models with Attention Sinks",
    arxiv="2309.17453",
    code="https://github.com/mit-han-lab/streaming-llm",
    summary="Softmax attention over the first `sinks` tokens plus a sliding window; bounded decode cache.",
    patterns=("noncausal_self", "causal_self", "causal_cross"),
    exact=False,
    state="sink_window",
    complexity="time O(N (s + w) d), memory O(N d); decode state O(s + w)",
    reference=sink_window_reference,
    fast=sink_window_fast,
    step=sink_window_step,
    init_state=init_sink_cache,
    mask=sink_window_predicate,
    options=(
        Option("window", 2000, int, low=1, doc="recent keys per causal window (including the query's own)"),
        Option("sinks", 4, int, low=0, doc="leading tokens every query attends to"),
    ),
    test_options={"window": 3, "sinks": 2},
    test_sizes={"n": 9, "nq": 5, "nk": 11},
    notes="window >= N reduces to dense causal attention; sinks = 0 is sliding_window.",
))
