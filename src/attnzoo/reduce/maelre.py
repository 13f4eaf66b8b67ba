"""P048 MAELRE -- "Modality Agnostic Efficient Long Range Encoder", arXiv 2507.19409 (official code: none found).

Token merging at stage boundaries plus an attention switch: while a stage has more tokens than the threshold, a
lightweight approximate attention (O(N D^2)) runs; once merging has made the sequence short, exact (proportional)
softmax attention. The paper switches when the number of tokens N exceeds the token dimension D (the approximate
attention costs O(N D^2), exact O(N^2 D)); here ``threshold`` defaults to D and is an option.

Choices where the paper is silent (CATALOG marks P048 (?)): merging is ToMe's bipartite matching on key cosine
similarity with size-weighted averages (``attnzoo.reduce.tome``); the approximate attention is size-weighted linear
attention with the elu + 1 feature map, out_i = sum_j s_j phi(q_i).phi(k_j) v_j / sum_j s_j phi(q_i).phi(k_j), the
linear counterpart of proportional attention (a merged token of size s counts as s copies in both forms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check_int, check_module_input, check_qkv
from .registry import Reduction, register_reduction
from .tome import proportional_attention, tome_merge


def size_weighted_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   sizes: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq, Dv): linear attention with phi = elu + 1, each key weighted by its size; O(N D Dv), no (N, N)."""
    check_qkv(q, k, v)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1  # (B, H, Nq, D), (B, H, Nk, D)
    fk = fk * sizes.to(q.dtype)[:, None, :, None]  # (B, H, Nk, D)
    kv = fk.transpose(-2, -1) @ v  # (B, H, D, Dv)
    num = fq @ kv  # (B, H, Nq, Dv)
    den = fq @ fk.sum(dim=2, keepdim=True).transpose(-2, -1)  # (B, H, Nq, 1)
    return num / den


def maelre_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: torch.Tensor, *,
                     threshold: float, scale: float | None = None) -> torch.Tensor:
    """Approximate (size-weighted linear) attention while Nk > threshold, exact proportional softmax otherwise."""
    if k.shape[2] > threshold:
        return size_weighted_linear_attention(q, k, v, sizes)
    return proportional_attention(q, k, v, sizes, scale=scale)


class MAELREStage(nn.Module):
    """One MAELRE stage: merge ``merge`` tokens (ToMe on key cosine similarity, sizes tracked), then multi-head
    attention that is approximate while the stage has more than ``threshold`` tokens (default: dim) and exact
    proportional softmax otherwise. forward(x (B, N, C), sizes (B, N) | None) -> (x (B, N - merge, C), sizes)."""

    def __init__(self, dim: int, heads: int, *, merge: int = 0, threshold: float | None = None,
                 protected: int = 0) -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"heads: expected a divisor of dim={dim}, got {heads}")
        self.merge = check_int("merge", merge, low=0)
        self.protected = check_int("protected", protected, low=0)
        self.threshold = float(dim) if threshold is None else float(threshold)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_module_input(self, x, channels=self.dim)
        B, N, C = x.shape
        H, D = self.heads, C // self.heads
        if sizes is None:
            sizes = torch.ones(B, N, dtype=x.dtype, device=x.device)
        if self.merge:
            keys = self.qkv(x)[..., C:2 * C]  # (B, N, C) the metric: keys, as ToMe
            red = tome_merge(x, self.merge, metric=keys, sizes=sizes, protected=self.protected)
            x, sizes = red.tokens, red.sizes
            N = x.shape[1]
        q, k, v = self.qkv(x).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        out = maelre_attention(q, k, v, sizes, threshold=self.threshold, scale=1 / math.sqrt(D))  # (B, H, N, D)
        return x + self.proj(out.transpose(1, 2).reshape(B, N, C)), sizes


register_reduction(Reduction(
    name="maelre", catalog="P048", title="Modality Agnostic Efficient Long Range Encoder", arxiv="2507.19409",
    code="none found", step="merge",
    scores="similarity: cosine of the keys, ToMe bipartite matching at each stage boundary",
    keeps="N - r merged tokens per stage (sizes tracked); approximate linear attention while N > threshold "
          "(default D), exact proportional softmax after",
    training_free=False, entry=MAELREStage,
))
