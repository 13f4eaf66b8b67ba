"""Sparsifiner: learned instance-dependent sparse attention with a low-rank connectivity predictor.

Paper: "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
Wei et al., CVPR 2023, arXiv 2303.13755. Official code: https://github.com/lim142857/Sparsifiner
(``src/models/sparsifiner.py``, ``src/losses.py``, ``.../experiments/sparsifiner_default_config.yaml``).
CATALOG lists no official code; the repository above is the authors' (linked from the paper's project page).

A cheap predictor estimates every query's connectivity to every token; each query then keeps its top-k
tokens (k = ceil(keep_rate * N)) and softmax attention is computed on the kept entries only:

    q_r, k_r = q W_cq, k W_ck                         (per-head channel reduction, head_dim -> head_dim / c)
    k_d      = W_n^T k_r                              (token down-projection N -> N / r, Linformer style)
    coef     = topk_8(softmax(q_r k_d^T * heads^-0.5))  (sparse basis coefficients, N x N/r)
    approx   = coef @ threshold(|W_back|^T, 0.02)     (sparse up-projection basis -> N x N connectivity)
    M        = top-k per row of approx               out = softmax(q k^T / sqrt(d), masked by M) v

Confirmed against the official code and its default config: ``reduce_n_factor=6``, ``reduce_c_factor=2``,
``attn_keep_rate=0.25``, basis threshold 0.02 on ``|W_back|``, top-8 basis coefficients, predictor scale
``num_heads ** -0.5`` (not the head dim; kept), separate down/up token projections (``share_inout_proj``
option), ``trunc_normal(std=0.02)`` init, the mask is detached (no gradient reaches the predictor through
the attention output), the class token's row is dense (``cls_tokens`` option, default 0 here: set 1 for a
DeiT-style class token), padded/inactive tokens are zeroed before the down-projection and their columns
scored -inf. The predictor is trained by distillation to the dense attention: here ``aux_loss`` (read by
the training loop, as attnzoo's other auxiliary losses) = ``distill_weight`` * sum of squared differences
between the un-thresholded ``softmax(q_r k_d^T) W_back^T`` and the layer's own dense attention (detached),
computed in training mode only (the official attention-reconstruction loss uses a frozen dense teacher
with weight 0.01; its self-distillation variant uses the layer's own attention -- this is that variant).

Choices where the code is silent: ``num_tokens`` is fixed at construction (the token projections have that
size; other lengths raise); ties in the connectivity scores (frequent: thresholded bases give exact zeros)
keep the earlier token; top-8 is capped at N/r; self attention only, no grouped-query heads.

Forms: ``reference`` runs dense softmax attention with the selected mask materialized; ``fast`` gathers
every query's k selected keys (:func:`attnzoo.kernels.gather.gather_attention`, hand-written backward):
O(N k d) attention instead of O(N^2 d). The connectivity scores are N x N by construction of the method
(the paper's O(N^2 r) predictor); they are computed in row chunks and only their top-k indices are kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_bool, check_heads, check_sequence_call
from ...kernels.gather import gather_attention
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register

_ROW_CHUNK = 1024


def _stable_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of the last axis, ties to the earlier index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def sparse_attention_reference(q, k, v, index, key_padding_mask, scale, cls_tokens):
    """Dense attention with the selected mask: q, k, v (B, H, N, d); index (B, H, N - cls, K) -> (B, H, N, d)."""
    B, H, N, _ = q.shape
    mask = torch.zeros(B, H, N, N, dtype=torch.bool, device=q.device)
    mask[:, :, :cls_tokens] = True  # class-token rows stay dense
    mask[:, :, cls_tokens:].scatter_(-1, index, True)
    return softmax_attention(q, k, v, attn_mask=mask, key_padding_mask=key_padding_mask, scale=scale)


def sparse_attention_fast(q, k, v, index, key_padding_mask, scale, cls_tokens):
    """Gathered top-k attention, same signature as :func:`sparse_attention_reference`."""
    B, H, N, D = q.shape
    out_rows, _ = gather_attention(q[:, :, cls_tokens:].unsqueeze(3), k, v, index, scale=scale,
                                   key_padding_mask=key_padding_mask)  # (B, H, N - cls, 1, dv)
    out = out_rows.squeeze(3)
    if cls_tokens:
        every = torch.arange(N, device=q.device).view(1, 1, 1, N)
        out_cls, _ = gather_attention(q[:, :, :cls_tokens].unsqueeze(2), k, v, every, scale=scale,
                                      key_padding_mask=key_padding_mask)  # (B, H, 1, cls, dv)
        out = torch.cat([out_cls.squeeze(2), out], dim=2)
    return out.to(q.dtype)


class SparsifinerAttention(nn.Module):
    """Sparsifiner multi-head self attention on (B, N, dim) tokens with N = ``num_tokens``.

    ``backend``: "fast" (gathered top-k), "reference" (dense masked) or "auto" (= "fast"). In training
    mode with ``distill_weight > 0`` the forward sets ``self.aux_loss`` (the predictor's distillation loss;
    add it to the task loss), else ``aux_loss`` is None.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 backend: str = "auto", **options: Any) -> None:
        super().__init__()
        opts = SPARSIFINER.resolve_options(options)
        dim, heads, _, hd = check_heads(dim, heads, kv_heads, gqa=False, what="sparsifiner (multi-head self attention)")
        if check_bool("causal", causal):
            raise ValueError("causal: sparsifiner supports noncausal_self only (a vision transformer layer), "
                             "got causal=True")
        check_backend(backend)
        n = opts["num_tokens"]
        reduced_c = max(1, hd // opts["reduce_c_factor"])
        reduced_n = max(1, int(n // opts["reduce_n_factor"]))
        if opts["cls_tokens"] >= n:
            raise ValueError(f"cls_tokens: must be < num_tokens={n}, got {opts['cls_tokens']}")
        self.dim, self.heads, self.head_dim, self.num_tokens = dim, heads, hd, n
        self.cls_tokens, self.backend = opts["cls_tokens"], backend
        self.budget = math.ceil(opts["keep_rate"] * n)
        self.coef_topk = min(opts["coef_topk"], reduced_n)
        self.basis_threshold, self.distill_weight = opts["basis_threshold"], opts["distill_weight"]
        self.scale = hd ** -0.5
        self.predictor_scale = heads ** -0.5  # official MaskPredictor default (qk_scale=None)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_c_q = nn.Linear(hd, reduced_c)
        self.proj_c_k = nn.Linear(hd, reduced_c)
        self.proj_n = nn.Parameter(torch.empty(n, reduced_n))
        nn.init.trunc_normal_(self.proj_n, std=0.02)
        if opts["share_inout_proj"]:
            self.proj_back_n = self.proj_n
        else:
            self.proj_back_n = nn.Parameter(torch.empty(n, reduced_n))
            nn.init.trunc_normal_(self.proj_back_n, std=0.02)
        self.aux_loss: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, num_tokens={self.num_tokens}, budget={self.budget}, "
                f"cls_tokens={self.cls_tokens}, backend={self.backend!r}")

    def _basis_coefficients(self, q, k, key_padding_mask):
        """softmax(q_r k_d^T * heads^-0.5) for the non-class rows: (B, H, N - cls, N/r), in float32 or wider
        (low-precision inputs would otherwise reorder near-ties of the top-k)."""
        acc = torch.promote_types(q.dtype, torch.float32)
        q_r = F.linear(q.to(acc), self.proj_c_q.weight.to(acc), self.proj_c_q.bias.to(acc))  # (B, H, N, c)
        k_r = F.linear(k.to(acc), self.proj_c_k.weight.to(acc), self.proj_c_k.bias.to(acc))  # (B, H, N, c)
        if key_padding_mask is not None:
            k_r = k_r.masked_fill(~key_padding_mask.view(k.shape[0], 1, -1, 1), 0.0)
        k_d = torch.matmul(k_r.transpose(-1, -2), self.proj_n.to(acc))  # (B, H, c, N/r)
        cheap = torch.matmul(q_r[:, :, self.cls_tokens:], k_d) * self.predictor_scale  # (B, H, N - cls, N/r)
        return cheap.softmax(dim=-1)

    def select(self, q, k, key_padding_mask=None) -> torch.Tensor:
        """The predicted connectivity's top-k per row: (B, H, N - cls, k) key indices (not differentiable)."""
        with torch.no_grad():
            coef = self._basis_coefficients(q, k, key_padding_mask)  # (B, H, M, N/r)
            top = _stable_topk_indices(coef, self.coef_topk)
            coef = torch.zeros_like(coef).scatter_(-1, top, coef.gather(-1, top))  # sparse coefficients
            basis = self.proj_back_n.t().abs().to(coef.dtype)  # (N/r, N)
            basis = torch.where(basis > self.basis_threshold, basis, torch.zeros_like(basis))
            out = []
            for s in range(0, coef.shape[2], _ROW_CHUNK):  # N x N connectivity in row chunks
                approx = torch.matmul(coef[:, :, s:s + _ROW_CHUNK], basis)  # (B, H, rows, N)
                if key_padding_mask is not None:
                    approx = approx.masked_fill(~key_padding_mask.view(q.shape[0], 1, 1, -1), float("-inf"))
                out.append(_stable_topk_indices(approx, self.budget))
            return torch.cat(out, dim=2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state=None) -> torch.Tensor:
        if state is not None:
            raise ValueError("state: sparsifiner has no decoding form (non-causal vision attention)")
        if context is not None:
            raise ValueError("context: sparsifiner is self attention only, got a context")
        check_sequence_call(self, x, key_padding_mask=key_padding_mask)
        B, N, C = x.shape
        if N != self.num_tokens:
            raise ValueError(f"x: this layer was built for num_tokens={self.num_tokens} tokens (its token "
                             f"projections have that size), got {N}")
        check_backend(self.backend)
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd)
        index = self.select(q, k, key_padding_mask)  # (B, H, N - cls, budget)
        fn = sparse_attention_reference if self.backend == "reference" else sparse_attention_fast
        out = fn(q, k, v, index, key_padding_mask, self.scale, self.cls_tokens)  # (B, H, N, hd)
        self.aux_loss = None
        if self.training and self.distill_weight > 0 and torch.is_grad_enabled():
            coef = self._basis_coefficients(q.detach(), k.detach(), key_padding_mask)
            approx = torch.matmul(coef, self.proj_back_n.t().to(coef.dtype))  # (B, H, N - cls, N), training path
            with torch.no_grad():
                teacher = softmax_attention(q, k, torch.eye(N, dtype=q.dtype, device=q.device).expand(B, self.heads,
                                            N, N), key_padding_mask=key_padding_mask, scale=self.scale)
            loss = F.mse_loss(approx, teacher[:, :, self.cls_tokens:].to(approx.dtype), reduction="sum")
            self.aux_loss = (self.distill_weight * loss).to(x.dtype)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def _case_options(*, n, side, heads, causal):
    """Benchmark/training cases: token projections built for the case's length."""
    return {"num_tokens": n}

SPARSIFINER = register(Mechanism(
    name="sparsifiner",
    case_options=_case_options,
    aliases=("sparsifiner_attention",),
    family="sparse",
    catalog="P074",
    title="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
    arxiv="2303.13755",
    code="https://github.com/lim142857/Sparsifiner",
    summary="A low-rank connectivity predictor (channel + token down-projection, sparse up-projection basis) "
            "picks each query's top-k tokens; softmax attention on those only; predictor distilled to dense.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="predictor O(N^2 N/r) (row-chunked), attention O(N k d) with k = keep_rate * N",
    module=SparsifinerAttention,
    fast=sparse_attention_fast,
    options=(
        Option("num_tokens", 197, int, low=1, doc="sequence length the token projections are built for"),
        Option("keep_rate", 0.25, float, low=1e-9, high=1.0, doc="fraction of keys kept per query (k = ceil(rate N))"),
        Option("reduce_n_factor", 6.0, float, low=1.0, doc="token down-projection N -> N / r"),
        Option("reduce_c_factor", 2, int, low=1, doc="predictor channel reduction head_dim -> head_dim / c"),
        Option("coef_topk", 8, int, low=1, doc="basis coefficients kept per row (capped at N / r)"),
        Option("basis_threshold", 0.02, float, low=0.0, doc="up-projection entries below this are zeroed"),
        Option("share_inout_proj", False, bool, doc="one token projection for down and up"),
        Option("cls_tokens", 0, int, low=0, doc="leading class tokens whose rows stay dense (DeiT: 1)"),
        Option("distill_weight", 0.01, float, low=0.0, doc="weight of the predictor distillation aux_loss"),
    ),
    test_options={"num_tokens": 9, "reduce_n_factor": 2.0, "keep_rate": 0.4, "cls_tokens": 1, "coef_topk": 3},
    test_sizes={"n": 9, "dim": 16},
    notes="keep_rate = 1 is dense softmax attention; each non-class row keeps exactly ceil(keep_rate N) keys "
          "(fewer only where keys are padding). The predictor learns through aux_loss only.",
))
