"""Exact scaled dot-product (softmax) attention, with multi-query and grouped-query heads.

Paper: "Attention Is All You Need", Vaswani et al., arXiv 1706.03762; grouped-query attention from
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", Ainslie et al.,
arXiv 2305.13245. Official code: https://github.com/tensorflow/tensor2tensor
Computes softmax(q k^T / sqrt(d)) v per head; Hk < Hq key/value heads are shared by groups of
Hq / Hk query heads (Hk = 1 is multi-query attention). The dense baseline of every benchmark.
"""

from __future__ import annotations

import torch

from ...errors import check_step
from ...kernels.sdpa import sdpa
from ...masks import causal as causal_mask
from ...reference import softmax_attention
from ...registry import PATTERNS, Mechanism, register
from ...state import KVCache


def softmax_reference(q, k, v, *, causal, key_padding_mask, scale):
    """Explicit matmul + softmax (:func:`attnzoo.reference.softmax_attention`)."""
    return softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def softmax_fast(q, k, v, *, causal, key_padding_mask, scale):
    """PyTorch's fused SDPA (FlashAttention-style CPU kernel), zeros on rows with no visible key."""
    return sdpa(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def init_kv_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device):
    return KVCache(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)


def softmax_step(q, k, v, state: KVCache, *, scale, key_padding_mask=None):
    """Append the T new keys/values, attend the T new queries to the whole cache (bottom-right causal).

    q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, Dv) -> (B, Hq, T, Dv).
    """
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=KVCache)
    keys, values, mask = state.append(k, v, key_padding_mask)  # (B, Hk, L, D), (B, Hk, L, Dv), (B, L)
    return softmax_fast(q, keys, values, causal=True, key_padding_mask=mask, scale=scale)


def softmax_mask(nq: int, nk: int, *, causal: bool, heads=None, kv_heads=None):
    """Every key (non-causal) or the bottom-right causal triangle."""
    if causal:
        return causal_mask(nk - nq)

    def full(b, h, q_idx, kv_idx):
        return torch.ones_like(q_idx + kv_idx, dtype=torch.bool)

    return full


SOFTMAX = register(Mechanism(
    name="softmax",
    aliases=("sdpa", "mha", "gqa", "mqa", "dense"),
    family="core",
    catalog="",
    title="Attention Is All You Need",
    arxiv="1706.03762",
    code="https://github.com/tensorflow/tensor2tensor",
    summary="Exact softmax attention softmax(QK^T/sqrt(d))V; GQA/MQA through fewer key/value heads.",
    patterns=PATTERNS,
    exact=True,
    state="kv",
    complexity="time O(Nq Nk d), memory O(Nq + Nk) fused (O(Nq Nk) reference)",
    reference=softmax_reference,
    fast=softmax_fast,
    step=softmax_step,
    init_state=init_kv_cache,
    mask=softmax_mask,
    permutation_equivariant=True,
))
