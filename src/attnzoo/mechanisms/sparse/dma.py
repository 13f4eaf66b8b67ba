"""DMA: trainable dynamic mask sparse attention (top-w keys by a content score computed from the values).

Paper: "Trainable Dynamic Mask Sparse Attention", Shi et al., arXiv 2508.02124. Official code:
https://github.com/SmallDoges/flash-dmattn (now flash-sparse-attention); the model using it is Doge
(``examples/modeling/modeling_doge.py``, ``flash_dmattn/integrations/...``).

Every key j of key/value head h gets one importance score from its value; each query keeps the
``window`` visible keys with the largest score (top-w, after the causal and padding masks), the others
are masked out, and the score is also added to the kept logits:

    delta[h, j] = A_h * softplus(v_j W_dt)[h]      (one score per key and kv head)
    out_i = softmax_j( q_i . k_j * scale + delta[h, j]  over j in top-w_{j visible to i}(delta) ) V

Confirmed against the official code: ``dt_proj`` maps the concatenated values of all kv heads
(kv_heads * head_dim) to kv_heads scores; ``A`` is one learnable scalar per kv head, initialised to 0;
the paper's ``exp(A * softplus(.))`` is replaced in the released model by ``A * softplus(.)`` "for numerical
stability" -- ``bias_form="linear"`` (default, as released) or ``"exp"`` (the paper's formula); the top-w
selection is on the detached bias and is not differentiable; the bias receives gradient through the kept
logits (so do ``A`` and ``W_dt``); when Nk <= window only the bias applies; default window 2048
(Doge's ``window_size``).

Choices where the official code is loose:
- causal selection is top-w among the keys *visible* to each query (the catalog formula; the official
  HF integration masks the bias with the 4-D causal mask before ``topk`` when it is given one; with no
  mask it would select among all keys, which leaks the future);
- ties in the score are broken by position (the earlier key wins), so the selection is deterministic;
- the training-free functional form (``attnzoo.attention(..., mechanism="dma")``), for pretrained models
  that have no ``W_dt``/``A``: the score of key j is the L2 norm of its value vector (a parameter-free
  content score from the values), used for the selection only; ``bias_scale`` (default 0, so the
  pretrained logits are untouched) optionally adds ``bias_scale * ||v_j||`` to the kept logits.
Decoding keeps a plain KV cache: each new query selects its top-w among all cached keys, which is
exactly what the causal forward computes, so step == forward.

Forms: ``reference`` sorts every query row's visible scores and materializes the kept mask densely;
``fast`` never builds Nq x Nk: queries go in blocks of 64; block [a, a+64) can only keep keys from the
top-w of [0, a) plus its own 64 keys (each step adds at most one key to a prefix's top-w), so that
candidate list (w + 64 keys) is gathered (:func:`attnzoo.kernels.gather.gather_attention`) and the exact
per-query keep rule (rank among candidates < w) is evaluated tile by tile: O(N (w + 64) d) time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_bool, check_heads, check_sequence_call, check_step
from ...kernels.gather import gather_attention
from ...reference import repeat_kv, softmax_attention
from ...registry import Mechanism, Option, register
from ...state import KVCache

_QUERY_BLOCK = 64


# --------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------
def _ranking_score(score: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, Hk, Nk) detached score with padded keys at -inf (they never outrank a real key)."""
    s = score.detach()
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask.view(s.shape[0], 1, -1), float("-inf"))
    return s


def keep_mask_dense(score, nq, *, causal, key_padding_mask, window) -> torch.Tensor:
    """Reference selection, (B, Hk, Nq, Nk) bool: query i keeps the ``window`` visible keys of largest
    score (ties: earlier key first). Query i sits at key position i + Nk - Nq (bottom-right)."""
    B, Hk, Nk = score.shape
    s = _ranking_score(score, key_padding_mask).unsqueeze(2).expand(B, Hk, nq, Nk)  # (B, Hk, Nq, Nk)
    visible = torch.ones(nq, Nk, dtype=torch.bool, device=score.device)
    if causal:
        visible = torch.arange(Nk, device=score.device).view(1, Nk) <= (
            torch.arange(nq, device=score.device).view(nq, 1) + (Nk - nq))
    s = s.masked_fill(~visible, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # (B, Hk, Nq, Nk)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(Nk, device=score.device).expand_as(order))
    keep = (rank < window) & visible
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.view(B, 1, 1, Nk)
    return keep


def _top_list(s: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, window: int):
    """Keep the ``window`` best of candidate lists (B, Hk, C) already in tie-break order; pad to window."""
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :window]
    s, idx, valid = s.gather(-1, order), idx.gather(-1, order), valid.gather(-1, order)
    pad = window - s.shape[-1]
    if pad > 0:
        s = F.pad(s, (0, pad), value=float("-inf"))
        idx = F.pad(idx, (0, pad), value=0)
        valid = F.pad(valid, (0, pad), value=False)
    return s, idx, valid


class _CausalCandidates:
    """Per query block [a, a + block): the candidate keys (the top-w of the keys before a, in rank order,
    then the block's own keys) and, for every candidate, the number of rows of the block that keep it.

    A candidate with ``r`` earlier candidates outranking it stays in a row's top-w until ``w - r`` of the
    block's own keys up to that row outrank it, so it is kept by a prefix of the rows. Only candidates
    with ``r > w - block`` (the last ``block`` of the earlier top-w and the block's own keys) can drop out
    inside the block; their drop row comes from a (block x 2 block) count, the others keep every row."""

    def __init__(self, score, nq, key_padding_mask, window, block):
        B, Hk, Nk = score.shape
        dev = score.device
        s = _ranking_score(score, key_padding_mask)  # (B, Hk, Nk)
        off = Nk - nq
        nb = -(-nq // block)
        a0 = max(off, 0)
        idx0 = torch.arange(a0, device=dev).expand(B, Hk, a0)
        prev = _top_list(s[:, :, :a0], idx0, torch.ones_like(idx0, dtype=torch.bool), window)
        L = window + block
        lo = max(0, window - block)  # candidates at risk of dropping out: columns lo .. L-1
        self.index = torch.empty(B, Hk, nb, L, dtype=torch.int64, device=dev)
        self.slot = torch.empty(B, Hk, nb, L, dtype=torch.bool, device=dev)
        self.keep_rows = torch.empty(B, Hk, nb, L, dtype=torch.int64, device=dev)
        prev_rank = torch.arange(window, device=dev).expand(B, Hk, window)
        rows = torch.arange(block, device=dev)
        for b in range(nb):
            a = off + b * block
            pos = a + rows
            ok = (pos >= 0) & (pos < Nk)
            pos_c = pos.clamp(0, Nk - 1)
            new_s = s[:, :, pos_c].masked_fill(~ok, float("-inf"))  # (B, Hk, block)
            new_i = pos_c.expand(B, Hk, block)
            new_v = ok.expand(B, Hk, block)
            prev_s, prev_i, prev_v = prev
            # earlier candidates outranking a new key: those with score >= its score (they come first)
            less = torch.searchsorted(prev_s.flip(-1).contiguous(), new_s.contiguous(), side="left")
            cs, ci = torch.cat([prev_s, new_s], -1), torch.cat([prev_i, new_i], -1)  # (B, Hk, L)
            base = torch.cat([prev_rank, window - less], -1)  # earlier candidates outranking each
            keep = torch.where(base < window, block, 0)  # rows keeping it if no own key outranks it
            # at-risk candidates: count the block's own keys (up to each row) that outrank them
            rs, ri, rb = cs[..., lo:].unsqueeze(-2), ci[..., lo:].unsqueeze(-2), base[..., lo:].unsqueeze(-2)
            outranks = (new_s.unsqueeze(-1) > rs) | ((new_s.unsqueeze(-1) == rs) & (new_i.unsqueeze(-1) < ri))
            outranks &= new_v.unsqueeze(-1)  # (B, Hk, block, L - lo)
            still = (rb + outranks.cumsum(dim=-2)) < window  # (B, Hk, block rows, L - lo)
            keep[..., lo:] = still.sum(dim=-2)  # monotone in the row: a prefix of the rows keeps it
            self.index[:, :, b], self.slot[:, :, b], self.keep_rows[:, :, b] = ci, torch.cat([prev_v, new_v], -1), keep
            prev = _top_list(cs, ci, torch.cat([prev_v, new_v], -1), window)
        self.window, self.block = window, block

    def pair_mask(self, groups: int):
        """fn(s, e) -> (B, Hk, g, groups*block, 1|L) bool: row t of the block keeps the candidate."""
        t = torch.arange(self.block, device=self.index.device).repeat(groups).view(1, 1, 1, -1, 1)

        def fn(s, e):
            return t < self.keep_rows[:, :, s:e].unsqueeze(3)  # (B, Hk, g, groups*block, L)

        return fn


# --------------------------------------------------------------------------------------------------------
# Attention with a given score (shared by the functional form and the module)
# --------------------------------------------------------------------------------------------------------
def dma_attention_reference(q, k, v, score, key_bias, *, causal, key_padding_mask, scale, window):
    """Dense: kept mask materialized; q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv),
    score/key_bias (B, Hk, Nk) -> (B, Hq, Nq, Dv)."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    keep = keep_mask_dense(score, Nq, causal=causal, key_padding_mask=key_padding_mask, window=window)
    keep = repeat_kv(keep, Hq // Hk)  # (B, Hq, Nq, Nk)
    bias = None
    if key_bias is not None:
        bias = repeat_kv(key_bias.unsqueeze(2), Hq // Hk).expand(B, Hq, Nq, Nk)  # (B, Hq, Nq, Nk)
        bias = bias.to(torch.promote_types(q.dtype, torch.float32))
    return softmax_attention(q, k, v, attn_mask=keep, bias=bias, scale=scale)


def dma_attention_fast(q, k, v, score, key_bias, *, causal, key_padding_mask, scale, window,
                       block: int = _QUERY_BLOCK):
    """Gathered candidates per query block (see module docstring); same signature as the reference."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = Hq // Hk
    block = min(block, Nq)
    nb = -(-Nq // block)
    qb = F.pad(q, (0, 0, 0, nb * block - Nq)).view(B, Hk, G, nb, block, D).transpose(2, 3)
    qb = qb.reshape(B, Hk, nb, G * block, D)  # (B, Hk, nb, G*block, D)
    if causal:
        cand = _CausalCandidates(score, Nq, key_padding_mask, window, block)
        pos = (Nk - Nq) + torch.arange(nb * block, device=q.device).view(nb, 1, block)
        qpos = pos.expand(nb, G, block).reshape(1, 1, nb, G * block)  # (1, 1, nb, G*block)
        out, _ = gather_attention(qb, k, v, cand.index, scale=scale, key_bias=key_bias, slot_mask=cand.slot,
                                  qpos=qpos, key_padding_mask=key_padding_mask, pair_mask=cand.pair_mask(G))
    else:
        w = min(window, Nk)
        s = _ranking_score(score, key_padding_mask)
        top = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :w]  # (B, Hk, w)
        index = top.unsqueeze(2).expand(B, Hk, nb, w)
        out, _ = gather_attention(qb, k, v, index, scale=scale, key_bias=key_bias, key_padding_mask=key_padding_mask)
    out = out.view(B, Hk, nb, G, block, -1).transpose(2, 3).reshape(B, Hq, nb * block, -1)
    return out[:, :, :Nq].to(q.dtype)


# --------------------------------------------------------------------------------------------------------
# Training-free functional form
# --------------------------------------------------------------------------------------------------------
def value_norm_score(v: torch.Tensor) -> torch.Tensor:
    """Parameter-free content score from the values: ||v_j||_2, (B, Hk, Nk) in float32 or wider."""
    return torch.linalg.vector_norm(v.to(torch.promote_types(v.dtype, torch.float32)), dim=-1)


def _functional_parts(v, bias_scale, bias_form):
    if bias_form != "linear":
        raise ValueError(f"bias_form: applies to the trainable dma module only; the functional (training-free) "
                         f"form scores keys by ||v||, got bias_form={bias_form!r}")
    score = value_norm_score(v)  # (B, Hk, Nk)
    return score, (bias_scale * score if bias_scale != 0 else None)


def dma_reference(q, k, v, *, causal, key_padding_mask, scale, window, bias_scale, bias_form):
    score, bias = _functional_parts(v, bias_scale, bias_form)
    return dma_attention_reference(q, k, v, score, bias, causal=causal, key_padding_mask=key_padding_mask,
                                   scale=scale, window=window)


def dma_fast(q, k, v, *, causal, key_padding_mask, scale, window, bias_scale, bias_form):
    score, bias = _functional_parts(v, bias_scale, bias_form)
    return dma_attention_fast(q, k, v, score, bias, causal=causal, key_padding_mask=key_padding_mask,
                              scale=scale, window=window)


def init_kv_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device, **_options):
    return KVCache(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)


def dma_step(q, k, v, state: KVCache, *, scale, window, bias_scale, bias_form, key_padding_mask=None):
    """Append T tokens to the KV cache; every new query keeps its top-w among all cached keys."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=KVCache)
    keys, values, mask = state.append(k, v, key_padding_mask)  # (B, Hk, L, D), (B, Hk, L, Dv), (B, L)
    return dma_fast(q, keys, values, causal=True, key_padding_mask=mask, scale=scale, window=window,
                    bias_scale=bias_scale, bias_form=bias_form)


# --------------------------------------------------------------------------------------------------------
# Trainable module
# --------------------------------------------------------------------------------------------------------
class DynamicMaskAttention(nn.Module):
    """DMA attention layer: q/k/v/o projections, ``dt_proj`` and ``A`` (the dynamic mask), (B, N, dim).

    ``forward(x, *, key_padding_mask=None, state=None)``; decoding: ``state = layer.init_state(batch)``,
    then ``out, state = layer(x_new, state=state)`` (causal layers only). ``backend``: "fast", "reference"
    or "auto" (= "fast"). Self attention only (a ``context`` raises).
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 backend: str = "auto", **options: Any) -> None:
        super().__init__()
        opts = DMA.resolve_options(options)
        if opts["bias_scale"] != 0:
            raise ValueError(f"bias_scale: applies to the training-free functional form only; the module learns "
                             f"A and dt_proj, got bias_scale={opts['bias_scale']!r}")
        dim, heads, kv_heads, _ = check_heads(dim, heads, kv_heads)
        check_bool("causal", causal)
        check_backend(backend)
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, dim // heads
        self.causal, self.backend = causal, backend
        self.window, self.bias_form = opts["window"], opts["bias_form"]
        self.scale = 1.0 / math.sqrt(self.head_dim)
        hd = self.head_dim
        self.q_proj = nn.Linear(dim, heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * hd, bias=False)
        self.dt_proj = nn.Linear(kv_heads * hd, kv_heads, bias=False)
        self.A = nn.Parameter(torch.zeros(kv_heads))
        self.o_proj = nn.Linear(heads * hd, dim, bias=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, causal={self.causal}, "
                f"window={self.window}, bias_form={self.bias_form!r}, backend={self.backend!r}")

    def dynamic_bias(self, v: torch.Tensor) -> torch.Tensor:
        """v (B, Hk, N, hd) -> delta (B, Hk, N): A_h * softplus(v W_dt) (or exp of it)."""
        B, Hk, N, hd = v.shape
        dt = self.dt_proj(v.transpose(1, 2).reshape(B, N, Hk * hd))  # (B, N, Hk)
        bias = self.A * F.softplus(dt)  # (B, N, Hk)
        if self.bias_form == "exp":
            bias = torch.exp(bias)
        return bias.transpose(1, 2)  # (B, Hk, N)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        if not self.causal:
            raise ValueError("causal: decoding needs a causal layer; build it with causal=True")
        w = self.q_proj.weight
        return KVCache(batch_size, self.kv_heads, self.head_dim, self.head_dim, dtype=dtype or w.dtype,
                       device=device or w.device)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state: KVCache | None = None):
        if context is not None:
            raise ValueError("context: the dma module is self attention only (its mask comes from its own values)")
        check_sequence_call(self, x, key_padding_mask=key_padding_mask, state=state, state_type=KVCache)
        check_backend(self.backend)
        B, N, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).view(B, N, self.heads, hd).transpose(1, 2)  # (B, Hq, N, hd)
        k = self.k_proj(x).view(B, N, self.kv_heads, hd).transpose(1, 2)  # (B, Hk, N, hd)
        v = self.v_proj(x).view(B, N, self.kv_heads, hd).transpose(1, 2)  # (B, Hk, N, hd)
        causal, mask = self.causal, key_padding_mask
        if state is not None:
            k, v, mask = state.append(k, v, key_padding_mask)  # the whole cache, (B, Hk, L, hd)
        bias = self.dynamic_bias(v)  # (B, Hk, L)
        fn = dma_attention_reference if self.backend == "reference" else dma_attention_fast
        out = fn(q, k, v, bias, bias, causal=causal, key_padding_mask=mask, scale=self.scale,
                 window=self.window)  # (B, Hq, N, hd)
        y = self.o_proj(out.transpose(1, 2).reshape(B, N, self.heads * hd))  # (B, N, dim)
        return (y, state) if state is not None else y


DMA = register(Mechanism(
    name="dma",
    aliases=("dynamic_mask_attention", "flash_dmattn"),
    family="sparse",
    catalog="P016",
    title="Trainable Dynamic Mask Sparse Attention",
    arxiv="2508.02124",
    code="https://github.com/SmallDoges/flash-dmattn",
    summary="Each query keeps the top-w visible keys by a per-key score from the values (learned "
            "A*softplus(V W_dt) in the module, ||v|| training-free), which is also added to the logits.",
    patterns=("noncausal_self", "causal_self", "causal_cross"),
    exact=False,
    state="kv",
    complexity="time O(N (w + 64) d), memory O(N d) + O(N w / 64) indices; decode O(L) per token",
    reference=dma_reference,
    fast=dma_fast,
    step=dma_step,
    init_state=init_kv_cache,
    module=DynamicMaskAttention,
    options=(
        Option("window", 2048, int, low=1, doc="keys kept per query (keep_window_size w); w >= Nk keeps all"),
        Option("bias_scale", 0.0, float, doc="functional form: add bias_scale * ||v_j|| to kept logits (0: none)"),
        Option("bias_form", "linear", str, choices=("linear", "exp"),
               doc="module: A*softplus(v W_dt) as released, or exp(A*softplus(v W_dt)) as in the paper"),
    ),
    test_options={"window": 3},
    test_sizes={"n": 9, "nq": 5, "nk": 11},
    notes="functional = training-free form (score ||v||, selection only by default); attnzoo.build('dma', ...) "
          "gives the trainable layer. window >= Nk with no bias is exact softmax attention; step == forward.",
))
