"""Criss-cross attention (CCNet), optionally recurrent.

Paper: "CCNet: Criss-Cross Attention for Semantic Segmentation", Huang et al., arXiv 1811.11721
(catalog P064). Official code: https://github.com/speedinghzl/CCNet
Each position u = (i, j) of an H x W map attends to the H + W - 1 positions of its row and column (itself
once) in one softmax; out = gamma * attention + x. Applying the same module R = 2 times (shared weights,
"RCCA") lets every position see every other one. O(HW (H + W) d).

Following the official ``CrissCrossAttention``: 1x1 convolutions (here one Linear on channels-last grids,
with bias, holding the three stacked) for Q and K to C / 8 channels and V to C channels; no score scaling
(the logits are plain q . k); the column part masks the query's own position so it is counted once (in
the row part); gamma is a learnable scalar initialised to 0 (so the module starts as the identity).

Choices where the paper is silent:
- ``heads``: the paper is single-head (heads=1). With heads > 1, Q/K channels (C / qk_reduction) and V
  channels (C) are split evenly over heads, each with its own criss-cross softmax.
- No output projection (the paper has none; V already maps C -> C).
- The convolution-BN layers around RCCA in CCNet's head (``conva``/``convb``) are not part of the module.

Forms: ``reference`` = dense softmax over all H*W tokens with the criss-cross mask (same row or same column,
:func:`criss_cross_mask`); ``fast`` = row and column scores only, (B, h, H, W, W + H), in one softmax.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import check_backend, check_int, check_module_input
from ...masks import Predicate, materialize
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register


def criss_cross_mask(height: int, width: int) -> Predicate:
    """Predicate over flattened indices i = row * width + col: key in the query's row or column."""

    def criss_cross(b, h, q_idx, kv_idx):
        same_row = torch.div(q_idx, width, rounding_mode="floor") == torch.div(kv_idx, width, rounding_mode="floor")
        same_col = torch.remainder(q_idx, width) == torch.remainder(kv_idx, width)
        return same_row | same_col

    return criss_cross


def criss_cross_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense reference: q, k (B, h, H, W, dq), v (B, h, H, W, dv) -> (B, h, H, W, dv), scale 1."""
    B, h, H, W, _ = q.shape
    n = H * W
    mask = materialize(criss_cross_mask(H, W), 1, 1, n, n, device=q.device)  # (1, 1, N, N)
    flat = lambda t: t.reshape(B, h, n, t.shape[-1])  # (B, h, N, d)
    return softmax_attention(flat(q), flat(k), flat(v), attn_mask=mask, scale=1.0).view(B, h, H, W, -1)


def criss_cross_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row + column scores in one softmax: O(HW (H + W)) scores, never (HW)^2."""
    H = q.shape[2]
    e_row = torch.einsum("bhijd,bhikd->bhijk", q, k)  # (B, h, H, W, W): key (i, k)
    e_col = torch.einsum("bhijd,bhkjd->bhijk", q, k)  # (B, h, H, W, H): key (k, j)
    self_pos = torch.eye(H, dtype=torch.bool, device=q.device).view(1, 1, H, 1, H)  # key row == query row
    e_col = e_col.masked_fill(self_pos, float("-inf"))  # the query itself is counted in the row part
    p = torch.cat([e_row, e_col], dim=-1).softmax(dim=-1)  # (B, h, H, W, W + H)
    p_row, p_col = p[..., : q.shape[3]], p[..., q.shape[3]:]
    return torch.einsum("bhijk,bhikd->bhijd", p_row, v) + torch.einsum("bhijk,bhkjd->bhijd", p_col, v)


class CrissCrossAttention(nn.Module):
    """Recurrent criss-cross attention, ``x (B, H, W, dim) -> (B, H, W, dim)``.

    Args:
        dim: channels; heads: heads (1 = the paper); qk_reduction: Q/K channels = dim // qk_reduction
            (default 8); recurrence: R applications with shared weights (default 2); backend.
    """

    def __init__(self, dim: int, heads: int = 1, *, qk_reduction: int = 8, recurrence: int = 2,
                 backend: str = "auto") -> None:
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads), ("qk_reduction", qk_reduction), ("recurrence", recurrence)):
            check_int(name, val)
        qk_dim = dim // qk_reduction
        if qk_dim < heads or qk_dim % heads or dim % heads:
            raise ValueError(f"heads: dim // qk_reduction = {qk_dim} and dim = {dim} must both be divisible by heads "
                             f"(and qk channels >= heads), got heads={heads}")
        check_backend(backend)
        self.dim, self.heads, self.qk_dim, self.recurrence, self.backend = dim, heads, qk_dim, recurrence, backend
        # The three 1x1 convolutions as one Linear (weights [W_q; W_k; W_v], biases likewise).
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        self.gamma = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, qk_dim={self.qk_dim}, recurrence={self.recurrence}"

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """One criss-cross pass: gamma * attention(x) + x."""
        B, H, W, C = x.shape
        split = lambda t: t.view(B, H, W, self.heads, -1).permute(0, 3, 1, 2, 4)  # (B, h, H, W, d)
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)  # (B, H, W, dq|dq|dim)
        q, k, v = split(q), split(k), split(v)
        fn = criss_cross_reference if self.backend == "reference" else criss_cross_fast
        out = fn(q, k, v).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)  # (B, H, W, dim)
        return self.gamma * out + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_module_input(self, x, layout="(B, H, W, C)", channels=self.dim)
        check_backend(self.backend)
        for _ in range(self.recurrence):
            x = self.attend(x)
        return x


CRISS_CROSS = register(Mechanism(
    name="criss_cross",
    aliases=("ccnet", "rcca", "criss_cross_attention"),
    family="local",
    kind="grid",
    catalog="P064",
    title="CCNet: Criss-Cross Attention for Semantic Segmentation",
    arxiv="1811.11721",
    code="https://github.com/speedinghzl/CCNet",
    summary="Each position attends to its row and column (H + W - 1 keys) in one softmax; applied R = 2 times "
            "with shared weights for full-image context.",
    patterns=("noncausal_self",),
    exact=True,
    complexity="time O(R HW (H + W) d), memory O(HW (H + W))",
    fast=criss_cross_fast,
    module=CrissCrossAttention,
    options=(
        Option("qk_reduction", 8, int, low=1, doc="query/key channels = dim // qk_reduction"),
        Option("recurrence", 2, int, low=1, doc="applications with shared weights (RCCA's R)"),
    ),
    test_options={"qk_reduction": 2, "recurrence": 2},
    test_sizes={"height": 5, "width": 7},
    notes="kind 'grid': x (B, H, W, C) -> (B, H, W, C) (the paper's (B, C, H, W) maps, channels-last). "
          "out = gamma * attention + x per pass; no score scaling, as the official code.",
))
