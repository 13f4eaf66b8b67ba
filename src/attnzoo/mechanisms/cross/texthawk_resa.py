"""TextHawk ReSA: a resampler whose query proposals come from the features, reading several ViT levels, whose output
tokens are rearranged (concatenated in groups) for a 16x compression.

Paper: "TextHawk: Exploring Efficient Fine-Grained Perception of Multimodal Large Language Models", Yu, Liao, Wu,
Liao, Zheng, Zeng, arXiv 2404.09204. Official code: https://github.com/yuyq96/TextHawk (the README; the model code
is not released). CATALOG P091.
ReSampling and ReArrangement (ReSA): queries cross-attend to a sub-image's visual features (resampling, 4x fewer
tokens), then groups of r neighbouring output tokens are concatenated along channels (rearrangement, 4x more) --
16x fewer visual tokens for the LLM. A Query Proposal Network (QPN) initialises the queries from each sub-image's
features instead of one fixed set; Multi-Level Cross-Attention (MLCA) routes features of different ViT stages to
different resampler layers.

(?) From the abstract, the README and summaries (the paper's equations were not available here): the resampler is
the shared block of :class:`attnzoo.cross.LatentResampler` (pre-norms, cross-attention of the queries to the
features, GEGLU feed-forward); QPN here = learned queries + an MLP of the features average-pooled into as many
groups as queries (padding excluded) (``query_proposal``); MLCA = ``levels`` {name: width} with ``routing`` (the
level each layer reads); rearrangement concatenates ``rearrange`` consecutive queries. Scalable positional embeddings
(SPEs) are positional encodings of the features, outside the attention. Defaults: 144 queries (a 24 x 24 sub-image
resampled 4x) and groups of 4.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...cross import LatentResampler
from ...errors import check_bool, check_int, check_key_padding_mask, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register


def masked_group_mean(x: torch.Tensor, groups: int, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, M, C) -> (B, groups, C): the mean of each of ``groups`` contiguous token ranges (adaptive average
    pooling over the token axis), padded tokens excluded (a range of padding only gives zeros)."""
    B, M, C = x.shape
    w = x.new_ones(B, M) if key_padding_mask is None else key_padding_mask.to(x.dtype)  # (B, M)
    total = F.adaptive_avg_pool1d((x * w.unsqueeze(-1)).transpose(1, 2), groups)  # (B, C, groups)
    count = F.adaptive_avg_pool1d(w.unsqueeze(1), groups)  # (B, 1, groups)
    return (total / count.clamp_min(torch.finfo(x.dtype).tiny)).transpose(1, 2) * (count.transpose(1, 2) > 0)


class ReSampleReArrange(nn.Module):
    """``x (B, M, context_dim)`` (one level) or ``{level: (B, M_l, C_l)}`` (with ``routing``) -> ``(B, num_queries /
    rearrange, rearrange * dim)``: query proposals, multi-level resampling, rearrangement."""

    def __init__(self, dim: int, heads: int, *, num_queries: int = 144, context_dim: int | None = None,
                 levels: Mapping[str, int] | None = None, routing: Sequence[str] | None = None, depth: int = 1,
                 rearrange: int = 4, query_proposal: bool = True, ff_mult: int = 4) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.num_queries = check_int("num_queries", num_queries)
        self.rearrange = check_int("rearrange", rearrange)
        if num_queries % rearrange:
            raise ValueError(f"rearrange: must divide num_queries ({num_queries}), got {rearrange}")
        self.query_proposal = check_bool("query_proposal", query_proposal)
        if (levels is None) != (routing is None):
            raise ValueError("levels, routing: multi-level cross-attention needs both the level widths and the level "
                             "each layer reads")
        if levels is not None:
            if context_dim is not None:
                raise ValueError("context_dim, levels: give the widths per level, not context_dim")
            routing = tuple(routing)  # type: ignore[arg-type]
            depth = len(routing)
            self.first_level: str | None = routing[0]
            width = levels[routing[0]] if routing[0] in levels else None
            self.resampler = LatentResampler(dim, heads, num_latents=num_queries, context_dim=dict(levels),
                                             depth=depth, routing=routing, ff_mult=ff_mult)
        else:
            self.first_level = None
            width = dim if context_dim is None else check_int("context_dim", context_dim)
            self.resampler = LatentResampler(dim, heads, num_latents=num_queries, context_dim=width, depth=depth,
                                             ff_mult=ff_mult)
        self.context_dim = width
        self.qpn = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim)) if query_proposal else None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_queries={self.num_queries}, rearrange={self.rearrange}, "
                f"query_proposal={self.query_proposal}")

    def forward(self, x, *, key_padding_mask=None) -> torch.Tensor:
        """x (B, M, C) or {level: (B, M_l, C_l)}; key_padding_mask (B, M) or {level: mask} -> (B, Nq/r, r * dim)."""
        if self.first_level is None:
            check_module_input(self, x, channels=self.context_dim)
            check_key_padding_mask(key_padding_mask, x.shape[0], x.shape[1], device=x.device)
            base, base_mask = x, key_padding_mask
        else:
            if not isinstance(x, Mapping) or self.first_level not in x:
                raise TypeError(f"x: expected {{level: (B, M, C)}} with the levels {self.resampler.routing}")
            base = x[self.first_level]
            base_mask = None if key_padding_mask is None else key_padding_mask.get(self.first_level)
        B = base.shape[0]
        latents = self.resampler.latents.unsqueeze(0).expand(B, -1, -1)  # (B, Nq, dim)
        if self.qpn is not None:  # query proposals from the (first level's) features
            latents = latents + self.qpn(masked_group_mean(base, self.num_queries, base_mask))
        z = self.resampler(x, key_padding_mask=key_padding_mask, latents=latents)  # (B, Nq, dim)
        return z.reshape(B, self.num_queries // self.rearrange, self.rearrange * self.dim)  # concatenate r queries


def _module(dim: int, heads: int, **options: Any):
    return ReSampleReArrange(dim, heads, **TEXTHAWK_RESA.resolve_options(options))


TEXTHAWK_RESA = register(Mechanism(
    name="texthawk_resa",
    aliases=("resa", "texthawk"),
    family="cross",
    kind="pooling",
    catalog="P091",
    title="TextHawk: Exploring Efficient Fine-Grained Perception of Multimodal Large Language Models",
    arxiv="2404.09204",
    code="https://github.com/yuyq96/TextHawk",
    summary="Resampler with feature-proposed queries (QPN) over several ViT levels routed to its layers (MLCA); its "
            "output queries are concatenated in groups of r (rearrangement): 16x fewer visual tokens.",
    patterns=("noncausal_cross",),
    exact=False,
    complexity="time O(Nq M d) per layer, memory O(Nq + M) fused",
    module=_module,
    options=(
        Option("num_queries", 144, int, low=1, doc="resampler queries per sub-image"),
        Option("context_dim", None, int, low=1, allow_none=True, doc="feature width (one level; None: dim)"),
        Option("levels", None, dict, allow_none=True, doc="{level: width} for multi-level cross-attention"),
        Option("routing", None, tuple, allow_none=True, doc="the level each resampler layer reads (MLCA)"),
        Option("depth", 1, int, low=1, doc="resampler layers (one level)"),
        Option("rearrange", 4, int, low=1, doc="queries concatenated into one output token"),
        Option("query_proposal", True, bool, doc="queries proposed from the features (QPN) (?)"),
        Option("ff_mult", 4, int, low=0, doc="feed-forward width multiple (0: none)"),
    ),
    test_options={"num_queries": 6, "rearrange": 2, "context_dim": 12, "depth": 2},
    cross=CrossSpec(),
    notes="(?) QPN, MLCA routing and the resampler block follow the abstract and README (no released model code); "
          "query proposals pool the features in token order, so the output depends on it.",
))
