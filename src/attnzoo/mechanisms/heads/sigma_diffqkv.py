"""Sigma's DiffQKV attention: different numbers (and dims) of key and value heads, augmented queries.

Paper: "Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models", Lin et al.,
arXiv 2501.13629. Official code: none released as a repository; the paper's appendix E gives the attention
forward (KV group sharing and the augmented-Q projection), which this file follows.
Query head i reads key head floor(i n_k / n_q) and value head floor(i n_v / n_q) with n_k < n_v <= n_q
(K compressed harder than V: Sigma-1.5B uses 32 query, 4 key and 16 value heads), so the KV cache holds
fewer K than V heads; "augmented Q" passes the queries through a SwiGLU MLP with a wider hidden size.

Confirmed from the paper (Sec. 2, 3.1, App. B.5 and E):
- Head mapping ``idx_k = floor(idx_q * n_k / n_q)``, ``idx_v = floor(idx_q * n_v / n_q)`` (Eq. 3); the K cache
  (B, n_k, L, d_k) and V cache (B, n_v, L, d_v) are separate, of different sizes (Eq. 1).
- Augmented Q (App. E code): ``q = W_down(act(W_gate q0) * W_up q0)`` with ``q0 = W_Q x`` and a hidden size
  ``aug_q_dim`` (1.5 x the model width in Sigma: 3072 for width 2048). ``act`` is the model's activation,
  SiLU (Sigma uses SwiGLU).
- A smaller key head dim d_k < d_v is made comparable to the queries "through another feed-forward layer"
  (Sec. 2): here a learned linear map ``k_up: d_k -> head_dim`` on the keys (an option, ``key_dim``; the released
  Sigma models do not compress the key dim).
- Selective V-cache fetching (App. B.2): only the values of the top-k attention scores of each query are read.

Choices where the paper is silent (all options):
- ``k_up`` is one linear map shared by all key heads, without bias; the score scale stays 1/sqrt(head_dim).
  The fast form folds it into the queries, ``q . (W k) = (W^T q) . k``, so the scores are computed in d_k.
- ``v_topk``: the kept scores are renormalised (softmax over the top-k), so each output stays a convex
  combination of values; with ``v_topk >= L`` it is exact. It is an inference approximation: the reference
  form computes it (all patterns, and decoding); the fused fast form does not apply then.
- Defaults ``value_heads = heads // 2`` and ``key_heads = max(1, heads // 8)`` (Sigma's 32:16:4 ratio);
  ``kv_heads`` (the generic argument), when given, sets both (then it is plain GQA).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import (
    check_backend,
    check_bool,
    check_heads,
    check_int,
    check_key_padding_mask,
    check_sequence_call,
)
from ...kernels.sdpa import sdpa
from ...reference import dense_mask, repeat_kv
from ...registry import PATTERNS, Mechanism, Option, register
from ._common import TokenBuffers
from ._routing import split_heads


def _topk_renormalise(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest (finite) scores of each row, -inf elsewhere (softmax then renormalises over them)."""
    if k >= scores.shape[-1]:
        return scores
    kth = scores.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def diffqkv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_up: torch.Tensor | None, causal: bool,
                      key_padding_mask: torch.Tensor | None, scale: float, v_topk: int | None = None) -> torch.Tensor:
    """DiffQKV attention written out, with the paper's GroupSharing of K and V heads.

    q (B, n_q, N, hd), k (B, n_k, M, d_k), v (B, n_v, M, d_v); ``k_up`` (hd, d_k) weight of the key up-projection
    (None when d_k == hd). Returns (B, n_q, N, d_v); rows with no visible key are zero.
    """
    B, nq, N, hd = q.shape
    nk, nv, M = k.shape[1], v.shape[1], k.shape[2]
    keys = k if k_up is None else torch.matmul(k, k_up.transpose(0, 1))  # (B, n_k, M, hd)
    keys = repeat_kv(keys, nq // nk)  # (B, n_q, M, hd): query head i reads key head i // (n_q / n_k)
    values = repeat_kv(v, nq // nv)  # (B, n_q, M, d_v): query head i reads value head i // (n_q / n_v)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), keys.to(acc).transpose(-2, -1)) * scale  # (B, n_q, N, M)
    mask = dense_mask(B, nq, N, M, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if v_topk is not None:
        scores = _topk_renormalise(scores, v_topk)  # selective V fetching: only the top-k values are read
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    w = torch.exp(scores - row_max)  # (B, n_q, N, M)
    den = w.sum(dim=-1, keepdim=True)
    probs = w / torch.where(den > 0, den, torch.ones_like(den))
    return torch.matmul(probs, values.to(acc)).to(q.dtype)  # (B, n_q, N, d_v)


def diffqkv_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_up: torch.Tensor | None, causal: bool,
                 key_padding_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Fused form: the key up-projection folded into the queries (scores in d_k), key heads shared across the
    value heads of their group at compute time (never in the cache), one fused SDPA call.

    Same shapes as :func:`diffqkv_reference` (without ``v_topk``).
    """
    nk, nv = k.shape[1], v.shape[1]
    qk = q if k_up is None else torch.matmul(q, k_up)  # (B, n_q, N, d_k) = W^T q
    if nv >= nk:
        keys, values = repeat_kv(k, nv // nk), v  # (B, n_v, M, d_k): transient, as the paper's KV group sharing
    else:
        keys, values = k, repeat_kv(v, nk // nv)
    return sdpa(qk, keys, values, causal=causal, key_padding_mask=key_padding_mask, scale=scale)  # (B, n_q, N, d_v)


def diffqkv_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, k_up: torch.Tensor | None,
                   key_padding_mask: torch.Tensor | None, scale: float, v_topk: int | None = None) -> torch.Tensor:
    """Decoding T new queries against the cache without copying K or V: queries are grouped by the key head
    they read, scores regrouped by the value head. q (B, n_q, T, hd), keys (B, n_k, L, d_k), values
    (B, n_v, L, d_v), causal bottom-right -> (B, n_q, T, d_v). Scores are (T x L) per head: for short T."""
    B, nq, T, _ = q.shape
    nk, nv, L = keys.shape[1], values.shape[1], keys.shape[2]
    qk = q if k_up is None else torch.matmul(q, k_up)  # (B, n_q, T, d_k)
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = qk.to(acc).reshape(B, nk, (nq // nk) * T, -1)  # (B, n_k, G_k T, d_k): heads i = kh G_k + r, in order
    scores = torch.matmul(qg, keys.to(acc).transpose(-2, -1)).view(B, nq, T, L) * scale  # (B, n_q, T, L)
    mask = dense_mask(B, nq, T, L, causal=True, key_padding_mask=key_padding_mask, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    if v_topk is not None:
        scores = _topk_renormalise(scores, v_topk)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    w = torch.exp(scores - row_max)
    den = w.sum(dim=-1, keepdim=True)
    probs = (w / torch.where(den > 0, den, torch.ones_like(den))).reshape(B, nv, (nq // nv) * T, L)
    out = torch.matmul(probs, values.to(acc))  # (B, n_v, G_v T, d_v)
    return out.view(B, nq, T, -1).to(q.dtype)


DECODE_MAX_T = 64
"""New tokens up to which a decode call uses :func:`diffqkv_decode` (no K/V copy); longer prefills use the fused
form on the cache (its transient K sharing is O(L) and the (T x L) scores are not built)."""


class DiffQKVAttention(nn.Module):
    """Sigma DiffQKV attention layer: ``x (B, N, dim)`` (``context (B, M, context_dim)`` for cross attention)
    -> ``(B, N, dim)``.

    Projections: W_Q (dim -> heads * head_dim) [+ augmented-Q SwiGLU], W_K (-> key_heads * key_dim),
    W_V (-> value_heads * head_dim), W_O. Decoding keeps a :class:`DiffKVCache`.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 key_heads: int | None = None, value_heads: int | None = None, key_dim: int | None = None,
                 aug_q_dim: int | None = None, v_topk: int | None = None, head_dim: int | None = None,
                 context_dim: int | None = None, bias: bool = False, backend: str = "auto") -> None:
        super().__init__()
        opts = SIGMA.resolve_options(dict(key_heads=key_heads, value_heads=value_heads, key_dim=key_dim,
                                          aug_q_dim=aug_q_dim, v_topk=v_topk))
        self.dim, self.heads, _, self.head_dim = check_heads(dim, heads, None, head_dim=head_dim)
        hd = self.head_dim
        if kv_heads is not None:
            check_int("kv_heads", kv_heads)
        nv = opts["value_heads"] if opts["value_heads"] is not None else (kv_heads or max(1, heads // 2))
        nk = opts["key_heads"] if opts["key_heads"] is not None else (kv_heads or max(1, heads // 8))
        for name, n in (("value_heads", nv), ("key_heads", nk)):
            if heads % n:
                raise ValueError(f"{name}: heads ({heads}) must be a multiple of {name}, got {name}={n}")
        self.key_heads, self.value_heads = nk, nv
        self.key_dim = hd if opts["key_dim"] is None else opts["key_dim"]
        self.aug_q_dim, self.v_topk = opts["aug_q_dim"], opts["v_topk"]
        check_bool("causal", causal)
        check_backend(backend)
        self.causal, self.backend = causal, backend
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        self.scale = 1.0 / math.sqrt(hd)
        self.q_proj = nn.Linear(dim, heads * hd, bias=bias)
        self.k_proj = nn.Linear(self.context_dim, nk * self.key_dim, bias=bias)
        self.v_proj = nn.Linear(self.context_dim, nv * hd, bias=bias)
        self.o_proj = nn.Linear(heads * hd, dim, bias=bias)
        self.k_up = nn.Linear(self.key_dim, hd, bias=False) if self.key_dim != hd else None
        if self.aug_q_dim:
            self.q_gate = nn.Linear(heads * hd, self.aug_q_dim, bias=False)
            self.q_up = nn.Linear(heads * hd, self.aug_q_dim, bias=False)
            self.q_down = nn.Linear(self.aug_q_dim, heads * hd, bias=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, key_heads={self.key_heads}, value_heads={self.value_heads}, "
                f"head_dim={self.head_dim}, key_dim={self.key_dim}, aug_q_dim={self.aug_q_dim}, "
                f"v_topk={self.v_topk}, causal={self.causal}")

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> (B, heads, N, head_dim), through the augmented-Q SwiGLU when enabled."""
        q = self.q_proj(x)  # (B, N, heads * hd)
        if self.aug_q_dim:
            q = self.q_down(F.silu(self.q_gate(q)) * self.q_up(q))  # (B, N, heads * hd)
        return split_heads(q, self.heads, self.head_dim)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> DiffKVCache:
        """An empty DiffQKV cache: keys (B, key_heads, L, key_dim), values (B, value_heads, L, head_dim)."""
        if not self.causal:
            raise ValueError("causal: decoding needs a causal layer; build it with causal=True")
        check_int("batch_size", batch_size)
        w = self.q_proj.weight
        return DiffKVCache(batch_size, self.key_heads, self.key_dim, self.value_heads, self.head_dim,
                           dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state: DiffKVCache | None = None):
        """x (B, N, dim), context (B, M, context_dim) or None, key_padding_mask (B, M or N) bool (True = attend).

        Returns (B, N, dim), or ``(out, state)`` with a decode state.
        """
        src = check_sequence_call(self, x, context, key_padding_mask=key_padding_mask, state=state,
                                  state_type=DiffKVCache, mech=SIGMA)
        if self.backend == "fast" and self.v_topk is not None:
            raise ValueError("backend: 'fast' does not apply with v_topk (selective V fetching is computed by the "
                             "reference form); use backend='auto' or 'reference'")
        B, N, _ = x.shape
        q = self.queries(x)  # (B, n_q, N, hd)
        k = split_heads(self.k_proj(src), self.key_heads, self.key_dim)  # (B, n_k, M, d_k)
        v = split_heads(self.v_proj(src), self.value_heads, self.head_dim)  # (B, n_v, M, hd)
        kpm = key_padding_mask
        w_up = None if self.k_up is None else self.k_up.weight  # (hd, d_k)
        fused = self.backend != "reference" and self.v_topk is None
        if state is not None:
            k, v, kpm = state.append(k, v, key_padding_mask)  # the cache keeps n_k < n_v heads
            if N <= DECODE_MAX_T:
                out = diffqkv_decode(q, k, v, k_up=w_up, key_padding_mask=kpm, scale=self.scale, v_topk=self.v_topk)
            elif fused:
                out = diffqkv_fast(q, k, v, k_up=w_up, causal=True, key_padding_mask=kpm, scale=self.scale)
            else:
                out = diffqkv_reference(q, k, v, k_up=w_up, causal=True, key_padding_mask=kpm, scale=self.scale,
                                        v_topk=self.v_topk)
        elif fused:
            out = diffqkv_fast(q, k, v, k_up=w_up, causal=self.causal, key_padding_mask=kpm, scale=self.scale)
        else:
            out = diffqkv_reference(q, k, v, k_up=w_up, causal=self.causal, key_padding_mask=kpm, scale=self.scale,
                                    v_topk=self.v_topk)
        y = self.o_proj(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))  # (B, N, dim)
        return (y, state) if state is not None else y


def _sigma_module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    return DiffQKVAttention(dim, heads, kv_heads=kv_heads, causal=causal, **options)


class DiffKVCache(TokenBuffers):
    """Sigma's DiffQKV cache: keys (B, key_heads, L, key_dim), values (B, value_heads, L, value_dim).

    With the paper's configuration (key_heads < value_heads, key_dim <= value_dim) the key part of the cache
    is smaller than the value part, unlike a GQA cache where both are equal. ``nbytes()`` reports the
    allocated storage.
    """

    def __init__(self, batch: int, key_heads: int, key_dim: int, value_heads: int, value_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(batch, [(key_heads, key_dim), (value_heads, value_dim)], dtype=dtype, device=device,
                         names=["k", "v"])
        self.key_heads, self.key_dim, self.value_heads, self.value_dim = key_heads, key_dim, value_heads, value_dim

    @property
    def keys(self) -> torch.Tensor:
        return self.buffer(0)  # (B, n_k, L, d_k)

    @property
    def values(self) -> torch.Tensor:
        return self.buffer(1)  # (B, n_v, L, d_v)

    def append(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append T tokens, k (B, n_k, T, d_k), v (B, n_v, T, d_v); return (keys, values, mask) of the cache."""
        if k.dim() == 4 and v.dim() == 4 and k.shape[2] != v.shape[2]:
            raise ValueError(f"k, v: expected the same number of new tokens, got {k.shape[2]} and {v.shape[2]}")
        T = k.shape[2] if k.dim() == 4 else 0
        check_key_padding_mask(key_padding_mask, self.batch, T, device=self.device)
        keys = self.write(0, k)
        values = self.write(1, v)
        self.advance(T, key_padding_mask)
        return keys, values, self.mask


SIGMA = register(Mechanism(
    name="sigma_diffqkv",
    aliases=("diffqkv", "sigma"),
    family="heads",
    kind="sequence",
    catalog="P116",
    title="Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models",
    arxiv="2501.13629",
    code="(none released; attention code in the paper's appendix E)",
    summary="Fewer key heads than value heads (and optionally a smaller key dim), augmented-Q SwiGLU; "
            "the KV cache holds n_k key heads and n_v value heads.",
    patterns=PATTERNS,
    exact=False,
    state="diff_kv",
    complexity="time O(N M n_q d); KV cache O(M (n_k d_k + n_v d_v)) instead of O(2 M n_kv d)",
    module=_sigma_module,
    fast=diffqkv_fast,
    options=(
        Option("key_heads", None, int, low=1, allow_none=True, doc="key heads n_k (None: max(1, heads // 8))"),
        Option("value_heads", None, int, low=1, allow_none=True, doc="value heads n_v (None: heads // 2)"),
        Option("key_dim", None, int, low=1, allow_none=True,
               doc="key head dim d_k (None: head_dim); smaller adds a learned k_up to head_dim"),
        Option("aug_q_dim", None, int, low=1, allow_none=True,
               doc="hidden size of the augmented-Q SwiGLU (None: off; Sigma uses 1.5 x dim)"),
        Option("v_topk", None, int, low=1, allow_none=True,
               doc="selective V fetching: attend only the top-k scores of each query (None: all, exact)"),
    ),
    test_options={"key_heads": 1, "value_heads": 2, "key_dim": 2, "aug_q_dim": 24},
    notes="key_heads = value_heads = kv_heads with key_dim = head_dim and no aug_q_dim is GQA (MHA when equal to "
          "heads). v_topk is an inference approximation (exact when >= the number of keys).",
))
