"""Compression by learned or selected queries: M new tokens cross-attend to the N input tokens.

- P109 LLaVA-Mini -- "LLaVA-Mini: Efficient Image and Video Large Multimodal Models with One Vision Token", arXiv
  2501.03895, https://github.com/ictnlp/LLaVA-Mini. C x C learnable queries cross-attend to the N visual tokens,
  2-D sinusoidal positions added to queries and keys; values are the visual tokens themselves:
  out = softmax((Q + PE_q)(X + PE_x)^T / sqrt(C)) X. Choice: single head, no projections (the learned queries are
  the only parameters); the modality pre-fusion layers are ordinary transformer layers and not built here.
- P100 TextMonkey -- "TextMonkey: An OCR-Free Large Multimodal Model for Understanding Document", arXiv 2403.04473,
  https://github.com/Yuliang-Liu/Monkey. Token filter: importance_i = 1 - mean_j cos(x_i, x_j) (distinctive
  tokens score high); the top-k tokens (original order) become queries of a resampler that cross-attends to all
  tokens (multi-head, with projections, residual): k output tokens. Choice: the zero-initialised shifted-window
  attention of the paper is an encoder change, not a reduction, and is not built here.
- P053 MULTI-LANE -- "Less is more: Summarizing Patch Tokens for efficient Multi-Label Class-Incremental
  Learning", arXiv 2405.15633, https://github.com/tdemin16/multi-lane. Per task pathway t, S learned selector
  tokens summarise the N patches: summary_t = softmax(S_t X^T / sqrt(C)) X (official code: no projections, scale
  C^-1/2, patches detached); pathways are independent.

Each module's ``assignment`` is not a partition (every output mixes every input), so these return plain tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import check_int, check_module_input, check_tensor
from ..reference import softmax_attention
from .registry import Reduction, register_reduction
from .select import keep_count, topk_indices


def sinusoidal_2d(h: int, w: int, dim: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """(h * w, dim) 2-D sine-cosine positions, row-major: half the channels encode the row, half the column."""
    check_int("dim", dim, low=4)
    if dim % 4:
        raise ValueError(f"dim: expected a multiple of 4 for 2-D sine-cosine positions, got {dim}")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter))  # (dim/4,)
    r = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)  # (h*w,)
    c = torch.arange(w, dtype=torch.float64, device=device).repeat(h)  # (h*w,)
    out = torch.cat([torch.sin(r[:, None] * freq), torch.cos(r[:, None] * freq),
                     torch.sin(c[:, None] * freq), torch.cos(c[:, None] * freq)], dim=1)  # (h*w, dim)
    return out.to(dtype)


class LLaVAMiniCompressor(nn.Module):
    """P109: (B, N, C) visual tokens on an (h, w) grid -> (B, side * side, C) compressed tokens."""

    def __init__(self, dim: int, side: int = 1) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, low=4)
        self.side = check_int("side", side, low=1)
        self.queries = nn.Parameter(torch.randn(side * side, dim) * dim ** -0.5)  # (C^2, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C); ``positions`` (N, C) overrides the grid's sinusoidal positions (e.g. permuted with x)."""
        check_module_input(self, x, channels=self.dim)
        B, N, C = x.shape
        pos_x = sinusoidal_2d(*grid, C, dtype=x.dtype, device=x.device) if positions is None else positions
        if pos_x.shape != (N, C):
            raise ValueError(f"grid/positions: expected ({N}, {C}) positions for the tokens, got {tuple(pos_x.shape)}")
        pos_q = sinusoidal_2d(self.side, self.side, C, dtype=x.dtype, device=x.device)  # (C^2, C)
        q = (self.queries + pos_q).expand(B, -1, -1).unsqueeze(1)  # (B, 1, C^2, C)
        k = (x + pos_x).unsqueeze(1)  # (B, 1, N, C)
        return nn.functional.scaled_dot_product_attention(q, k, x.unsqueeze(1)).squeeze(1)  # (B, C^2, C)


def uniqueness_scores(x: torch.Tensor) -> torch.Tensor:
    """P100: (B, N) importance_i = 1 - mean_j cos(x_i, x_j) over all tokens j (itself included)."""
    check_tensor("x", x, ndim=3)
    xn = nn.functional.normalize(x, dim=-1)  # (B, N, C)
    # mean_j cos(x_i, x_j) = x_i . mean_j x_j for unit vectors: O(N C), no (N, N) matrix
    return 1 - (xn * xn.mean(dim=1, keepdim=True)).sum(dim=-1)  # (B, N)


class TextMonkeyResampler(nn.Module):
    """P100: keep the ``keep`` most distinctive tokens as queries; they cross-attend (multi-head, projections,
    residual) to all tokens: (B, N, C) -> (B, k, C), and the kept indices (B, k)."""

    def __init__(self, dim: int, heads: int = 1) -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"heads: expected a divisor of dim={dim}, got {heads}")
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, keep: float | int) -> tuple[torch.Tensor, torch.Tensor]:
        check_module_input(self, x, channels=self.dim)
        B, N, C = x.shape
        idx = topk_indices(uniqueness_scores(x), keep_count(N, keep))  # (B, k)
        sel = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, C))  # (B, k, C)
        H, D = self.heads, C // self.heads
        q = self.q(sel).view(B, -1, H, D).transpose(1, 2)  # (B, H, k, D)
        k = self.k(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        v = self.v(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, C)  # (B, k, C)
        return sel + self.o(out), idx


class MultiLaneSummary(nn.Module):
    """P053: ``tasks`` independent pathways of ``summaries`` selector tokens each: (B, N, C) -> (T, B, S, C)."""

    def __init__(self, dim: int, tasks: int = 1, summaries: int = 8) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        check_int("tasks", tasks)
        check_int("summaries", summaries)
        self.selectors = nn.Parameter(torch.randn(tasks, summaries, dim) * dim ** -0.5)  # (T, S, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_module_input(self, x, channels=self.dim)
        B = x.shape[0]
        T, S, C = self.selectors.shape
        q = self.selectors.unsqueeze(1).expand(T, B, S, C)  # (T, B, S, C)
        kv = x.unsqueeze(0).expand(T, B, *x.shape[1:])  # (T, B, N, C)
        return nn.functional.scaled_dot_product_attention(q, kv, kv, scale=1 / math.sqrt(C))  # (T, B, S, C)


def cross_attention_reference(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              scale: float | None = None) -> torch.Tensor:
    """(B, M, Cv): single-head softmax(queries keys^T * scale) values, the exact reference the modules reduce to."""
    out = softmax_attention(queries.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), scale=scale)
    return out.squeeze(1)


register_reduction(Reduction(
    name="llava_mini", catalog="P109",
    title="LLaVA-Mini: Efficient Image and Video Large Multimodal Models with One Vision Token", arxiv="2501.03895",
    code="https://github.com/ictnlp/LLaVA-Mini", step="compress",
    scores="learned: C x C queries (+ 2-D sinusoidal positions) attend to the visual tokens (+ positions)",
    keeps="C x C new tokens (C = 1: one vision token)", training_free=False, entry=LLaVAMiniCompressor,
    notes="the modality pre-fusion layers are not built",
))
register_reduction(Reduction(
    name="textmonkey", catalog="P100",
    title="TextMonkey: An OCR-Free Large Multimodal Model for Understanding Document", arxiv="2403.04473",
    code="https://github.com/Yuliang-Liu/Monkey", step="compress",
    scores="uniqueness: 1 - mean cosine similarity to all tokens",
    keeps="k new tokens: the k most distinctive tokens (original order) resampled by cross-attention to all tokens",
    training_free=False, entry=TextMonkeyResampler,
    notes="the zero-initialised shifted-window attention (an encoder change) is not built",
))
register_reduction(Reduction(
    name="multi_lane", catalog="P053",
    title="Less is more: Summarizing Patch Tokens for efficient Multi-Label Class-Incremental Learning",
    arxiv="2405.15633", code="https://github.com/tdemin16/multi-lane", step="compress",
    scores="learned: S selector tokens per task, softmax similarity to the patches (scale C^-1/2)",
    keeps="S summary tokens per task pathway (pathways independent)", training_free=False, entry=MultiLaneSummary,
))
