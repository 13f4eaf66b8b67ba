"""Minimal transformer attention: collapsed or symmetric query-key matrices, no value/output projections.

Paper: "Reducing the Transformer Architecture to a Minimum", Bermeitinger, Hrycej, Pavone, Kath,
Handschuh (KDIR 2024), arXiv 2410.13732. Official code: none found.
The similarity x_i^T W_Q W_K^T x_j is computed with one matrix per head, either collapsed
(W = W_Q W_K^T, D x D) or symmetric (W_Q = W_K, so S = S^T and a token is similar to itself); the value
and output projections are omitted (value = the token itself) or collapsed into one D x D matrix.

Choices (options), where the abstract leaves the multi-head layout open:
- ``qk``: ``"separate"`` (W_Q, W_K: the baseline), ``"collapsed"`` (one D x D matrix per head,
  score x_i^T W_h c_j), ``"symmetric"`` (default; W_Q = W_K per head, score (x_i W_h).(c_j W_h): half the
  parameters of the baseline, positive semi-definite), ``"symmetric_collapsed"`` (W_h = (A_h + A_h^T)/2).
- ``value``: ``"identity"`` (default; head h attends over the h-th slice of the input channels and the
  heads are concatenated: no W_V, no W_O), ``"collapsed"`` (the same followed by one D x D matrix, i.e.
  W_V W_O merged), ``"separate"`` (W_V and W_O, the baseline).
- The score scale is 1/sqrt(head_dim) for every ``qk`` form, so a collapsed matrix W_h = W_Q^h W_K^h^T
  reproduces the two-matrix form exactly (the catalog writes 1/sqrt(D), which is the same for one head).
- Collapsed matrices are initialised as the product of two default-initialised projections, so training
  starts where the two-matrix form starts.

Forms: the reference builds the bilinear scores explicitly; the fast form factorises them as
queries (x W_h) and keys (c, or c W_h) for PyTorch's fused SDPA. Decoding keeps a KV cache of those keys
(the raw tokens for the collapsed forms) and of the values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import check_backend, check_heads, check_pattern_flag, check_sequence_call
from ...kernels.sdpa import sdpa
from ...reference import acc_dtype, dense_mask
from ...registry import PATTERNS, Mechanism, Option, register
from ...state import KVCache
from ._common import masked_softmax, merge_heads, split_heads

QK_FORMS = ("separate", "collapsed", "symmetric", "symmetric_collapsed")
VALUE_FORMS = ("identity", "collapsed", "separate")


def _product_init(heads: int, dim: int, head_dim: int, symmetric: bool) -> torch.Tensor:
    """(heads, dim, dim) = W_Q^h W_K^h^T of two default nn.Linear(dim, heads*head_dim) weights."""
    wq = nn.Linear(dim, heads * head_dim, bias=False).weight.detach().view(heads, head_dim, dim)
    wk = wq if symmetric else nn.Linear(dim, heads * head_dim, bias=False).weight.detach().view(heads, head_dim, dim)
    return torch.einsum("hed,hef->hdf", wq, wk)  # (H, D, D)


class MinimalAttention(nn.Module):
    """x (B, N, dim) [, context (B, M, dim)] -> (B, N, dim) with collapsed/symmetric similarity."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 qk: str = "symmetric", value: str = "identity", backend: str = "auto") -> None:
        super().__init__()
        mech = MINIMAL_SYMMETRIC
        self.dim, self.heads, _, self.head_dim = check_heads(
            dim, heads, kv_heads, gqa=False, what=f"mechanism {mech.name!r}")
        self.causal = check_pattern_flag(mech, causal)
        opts = mech.resolve_options({"qk": qk, "value": value})
        self.qk, self.value = opts["qk"], opts["value"]
        self.backend = check_backend(backend)
        D, H, d = self.dim, self.heads, self.head_dim
        if self.qk == "separate":
            self.q_proj = nn.Linear(D, H * d, bias=False)
            self.k_proj = nn.Linear(D, H * d, bias=False)
        elif self.qk == "symmetric":
            self.qk_proj = nn.Linear(D, H * d, bias=False)
        elif self.qk == "collapsed":
            self.w_qk = nn.Parameter(_product_init(H, D, d, symmetric=False))  # (H, D, D)
        else:
            self.a_qk = nn.Parameter(_product_init(H, D, d, symmetric=True))  # (H, D, D), symmetrised in use
        if self.value == "separate":
            self.v_proj = nn.Linear(D, H * d, bias=False)
            self.o_proj = nn.Linear(H * d, D, bias=False)
        elif self.value == "collapsed":
            self.vo_proj = nn.Linear(D, D, bias=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, causal={self.causal}, qk={self.qk!r}, value={self.value!r}"

    @property
    def collapsed(self) -> bool:
        return self.qk in ("collapsed", "symmetric_collapsed")

    def qk_matrix(self) -> torch.Tensor:
        """The per-head similarity matrix (H, D, D): score_ij = x_i^T W_h c_j * scale."""
        if self.qk == "collapsed":
            return self.w_qk
        if self.qk == "symmetric_collapsed":
            return 0.5 * (self.a_qk + self.a_qk.transpose(1, 2))
        H, d, D = self.heads, self.head_dim, self.dim
        if self.qk == "symmetric":
            w = self.qk_proj.weight.view(H, d, D)
            return torch.einsum("hed,hef->hdf", w, w)
        wq, wk = self.q_proj.weight.view(H, d, D), self.k_proj.weight.view(H, d, D)
        return torch.einsum("hed,hef->hdf", wq, wk)

    def _queries_keys(self, x: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factorised q (B, H, N, e) and k (B, H or 1, M, e) with q_i . k_j = x_i^T W_h c_j."""
        if self.qk == "separate":
            return split_heads(self.q_proj(x), self.heads), split_heads(self.k_proj(src), self.heads)
        if self.qk == "symmetric":
            return split_heads(self.qk_proj(x), self.heads), split_heads(self.qk_proj(src), self.heads)
        q = torch.einsum("bnd,hde->bhne", x, self.qk_matrix().to(x.dtype))  # (B, H, N, D)
        return q, src.unsqueeze(1)  # keys are the raw tokens (B, 1, M, D)

    def _values(self, src: torch.Tensor) -> torch.Tensor:
        """(B, H, M, d): the h-th channel slice of the tokens, or W_V^h c."""
        return split_heads(self.v_proj(src) if self.value == "separate" else src, self.heads)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        y = merge_heads(out)  # (B, N, dim)
        if self.value == "separate":
            return self.o_proj(y)
        if self.value == "collapsed":
            return self.vo_proj(y)
        return y

    def scores(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled scores before any mask, (B, H, N, M), written as the bilinear form x_i^T W_h c_j."""
        src = x if context is None else context
        W = self.qk_matrix().to(x.dtype)  # (H, D, D)
        return torch.einsum("bid,hde,bje->bhij", x, W, src) / math.sqrt(self.head_dim)  # (B, H, N, M)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None) -> KVCache:
        if not self.causal:
            raise ValueError("causal: decoding needs a causal module; build it with causal=True")
        p = next(self.parameters(), None)
        dtype = dtype or (p.dtype if p is not None else torch.get_default_dtype())
        device = device or (p.device if p is not None else None)
        H, d, D = self.heads, self.head_dim, self.dim
        if self.collapsed:  # keys: raw tokens (1 head of width D); values: all heads merged (H * d)
            return KVCache(batch_size, 1, D, H * d, dtype=dtype, device=device)
        return KVCache(batch_size, H, d, d, dtype=dtype, device=device)

    def forward(self, x, context=None, *, key_padding_mask=None, state=None):
        src = check_sequence_call(self, x, context, key_padding_mask=key_padding_mask, state=state,
                                  state_type=KVCache, mech=MINIMAL_SYMMETRIC)
        B, N, _ = x.shape
        q, k = self._queries_keys(x, src)  # (B, H, N, e), (B, H|1, M, e)
        v = self._values(src)  # (B, H, M, d)
        kpm = key_padding_mask
        if state is not None:
            if self.collapsed:
                k, vm, kpm = state.append(k, merge_heads(v).unsqueeze(1), key_padding_mask)  # (B,1,L,D), (B,1,L,Hd)
                v = split_heads(vm.squeeze(1), self.heads)  # (B, H, L, d)
            else:
                k, v, kpm = state.append(k, v, key_padding_mask)  # (B, H, L, d)
        scale = 1.0 / math.sqrt(self.head_dim)
        M = k.shape[2]
        if self.backend == "reference":
            acc = acc_dtype(x.dtype)
            if state is None:  # the paper's bilinear form x_i^T W_h c_j
                scores = self.scores(x.to(acc), src.to(acc))  # (B, H, N, M)
            else:  # cached keys are already factorised
                scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, H, N, M)
            mask = dense_mask(B, self.heads, N, M, causal=self.causal, key_padding_mask=kpm, device=x.device)
            out = torch.matmul(masked_softmax(scores, mask), v.to(acc)).to(x.dtype)  # (B, H, N, d)
        else:
            out = minimal_fast(q, k, v, causal=self.causal, key_padding_mask=kpm, scale=scale)  # (B, H, N, d)
        y = self._output(out)  # (B, N, dim)
        return (y, state) if state is not None else y


def build_minimal(dim, heads, *, kv_heads=None, causal=False, **options):
    return MinimalAttention(dim, heads, kv_heads=kv_heads, causal=causal, **options)


def minimal_fast(q, k, v, *, causal, key_padding_mask, scale):
    """Fast form: factorised queries q (B, H, N, e) and keys k (B, H or 1, M, e) through fused SDPA;
    the collapsed forms' shared raw-token keys are broadcast to every head without a copy."""
    B, H, _, _ = q.shape
    k = k.expand(B, H, k.shape[2], k.shape[3])  # (B, H, M, e)
    return sdpa(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)  # (B, H, N, d)


MINIMAL_SYMMETRIC = register(Mechanism(
    name="minimal_symmetric",
    aliases=("minimal_transformer", "collapsed_qk", "symmetric_attention"),
    family="dense",
    catalog="P032",
    title="Reducing the Transformer Architecture to a Minimum",
    arxiv="2410.13732",
    code="",
    summary="Softmax attention with one (collapsed or symmetric W_Q = W_K) similarity matrix per head and "
            "no value/output projections (value = the token's channel slice).",
    patterns=PATTERNS,
    exact=False,
    state="kv",
    complexity="time O(Nq Nk D), memory O(Nq + Nk) fused (O(Nq Nk) reference); decode state O(N)",
    module=build_minimal,
    fast=minimal_fast,
    options=(
        Option("qk", "symmetric", str, choices=QK_FORMS, doc="similarity: separate, collapsed, symmetric, "
               "symmetric_collapsed"),
        Option("value", "identity", str, choices=VALUE_FORMS, doc="identity (no W_V/W_O), collapsed (one DxD), "
               "separate"),
    ),
    permutation_equivariant=True,
    test_options={"qk": "symmetric_collapsed", "value": "collapsed"},
    notes="symmetric forms give S = S^T for self attention (before masking).",
))
