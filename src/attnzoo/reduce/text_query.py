"""Text-query attention scores: which visual tokens the language side looks at.

- P083 LSceneLLM -- "LSceneLLM: Enhancing Large 3D Scene Understanding Using Adaptive Visual Preferences", arXiv
  2412.01292, https://github.com/Hoyyyaard/LSceneLLM. The dense token selector: the LLM's instruction -> scene
  attention, averaged over heads, instruction queries and layers, scores the coarse scene tokens; the top-k regions
  are "magnified": their dense fine-grained tokens are selected (original order). Choice: the adaptive fusion
  module after selection (CATALOG marks it (?)) is not built; this is the scoring and the selection.
- P065 YOPO-style pruning -- "Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See", arXiv
  2410.06169 (official code not released). In the LLM, visual token i (on an h x w grid) attends only to the text
  before it and to visual tokens in its k x k spatial neighbourhood (causal), text keeps full causal attention;
  visual queries are skipped in "inactive" heads (chosen offline by the attention mass text queries put on visual
  tokens, :func:`visual_attention_mass`), and visual tokens bypass selected layers (:func:`skip_visual`).

Rows of text-query attention come from ``attnzoo.reduce.importance.attention_row`` (q of the text tokens, K, LSE;
no n x n matrix) or from eager attentions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import check_int, check_tensor
from .registry import Reduction, register_reduction
from .select import Reduced, keep_count, select_tokens, topk_indices


def text_query_scores(rows: Sequence[torch.Tensor] | torch.Tensor, visual: slice) -> torch.Tensor:
    """(B, Nv): attention of text queries on the visual tokens ``visual``, averaged over heads, queries and layers.

    ``rows``: one (B, H, T, N) tensor of text-query attention rows, or a sequence of them (one per layer)."""
    rows = [rows] if isinstance(rows, torch.Tensor) else list(rows)
    if not rows:
        raise ValueError("rows: expected at least one (B, H, T, N) tensor of attention rows")
    for r in rows:
        check_tensor("rows", r, ndim=4)
    return torch.stack([r[..., visual].mean(dim=(1, 2)) for r in rows]).mean(dim=0)  # (B, Nv)


def lscenellm_select(fine: torch.Tensor, region: torch.Tensor, coarse_scores: torch.Tensor, k: int) -> Reduced:
    """P083: keep the fine tokens (B, Nf, C) of the top-``k`` coarse regions by ``coarse_scores`` (B, R).

    ``region`` (Nf,) long: the coarse region of each fine token. Output in original (fine) order."""
    check_tensor("fine", fine, ndim=3)
    B, Nf, _ = fine.shape
    R = coarse_scores.shape[1]
    check_int("k", k, low=1, high=R)
    if region.shape != (Nf,) or int(region.min()) < 0 or int(region.max()) >= R:
        raise ValueError(f"region: expected ({Nf},) region ids in [0, {R}), got shape {tuple(region.shape)}")
    top = topk_indices(coarse_scores, k)  # (B, k)
    chosen = torch.zeros(B, R, dtype=torch.bool, device=fine.device).scatter_(1, top, True)  # (B, R)
    keep = chosen[:, region]  # (B, Nf)
    counts = keep.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError("region: the chosen regions hold different numbers of fine tokens across the batch; "
                         "select one example at a time")
    index = torch.nonzero(keep)[:, 1].view(B, int(counts[0]))  # (B, M), ascending per row
    return select_tokens(fine, index)


def yopo_predicate(prefix: int, grid: tuple[int, int], kernel: int, *, inactive_heads: Sequence[int] = (),
                   offset: int = 0) -> Callable:
    """P065: mask predicate (b, h, q_idx, kv_idx) -> bool for [text prefix; h x w visual tokens; text suffix].

    Causal everywhere (bottom-right ``offset`` = Nk - Nq); a visual query sees the prefix and the visual tokens
    within its ``kernel`` x ``kernel`` neighbourhood (|dr|, |dc| <= kernel // 2); in ``inactive_heads`` visual
    queries see nothing (their computation is skipped: output 0). Text queries are unchanged."""
    check_int("prefix", prefix, low=0)
    gh, gw = grid
    check_int("kernel", kernel, low=1)
    nv = gh * gw
    half = kernel // 2
    inactive = torch.tensor(sorted(set(inactive_heads)), dtype=torch.long)

    def mask(b, h, q_idx, kv_idx):
        p = q_idx + offset
        causal = kv_idx <= p
        qv = (p >= prefix) & (p < prefix + nv)
        kvv = (kv_idx >= prefix) & (kv_idx < prefix + nv)
        qr, qc = (p - prefix) // gw, (p - prefix) % gw
        kr, kc = (kv_idx - prefix) // gw, (kv_idx - prefix) % gw
        near = ((qr - kr).abs() <= half) & ((qc - kc).abs() <= half)
        visual_row = (kv_idx < prefix) | (kvv & near)
        allowed = causal & torch.where(qv, visual_row, torch.ones_like(visual_row))
        if inactive.numel():
            off = torch.isin(h, inactive.to(h.device))
            allowed = allowed & ~(off & qv)
        return allowed

    return mask


def visual_attention_mass(rows: torch.Tensor, visual: slice) -> torch.Tensor:
    """(H,): attention mass text queries put on visual tokens per head, averaged over batch and queries
    (rows (B, H, T, N)); P065 marks the heads with the lowest mass inactive."""
    check_tensor("rows", rows, ndim=4)
    return rows[..., visual].sum(dim=-1).mean(dim=(0, 2))


def inactive_heads(mass: torch.Tensor, active: int) -> list[int]:
    """The heads outside the ``active`` ones with the most visual attention mass (ties: lower index active)."""
    check_int("active", active, low=0, high=mass.numel())
    order = torch.sort(mass, descending=True, stable=True).indices
    return sorted(order[active:].tolist())


def skip_visual(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, visual: slice) -> torch.Tensor:
    """P065 layer skipping: run ``layer`` on x (B, N, C) but keep the visual tokens' states unchanged."""
    out = layer(x)
    out = out.clone()
    out[:, visual] = x[:, visual]
    return out


def text_query_prune(tokens: torch.Tensor, rows: Sequence[torch.Tensor] | torch.Tensor, visual: slice,
                     keep: float | int) -> Reduced:
    """Keep the visual tokens (B, Nv, C) with the most text-query attention (original order)."""
    scores = text_query_scores(rows, visual)
    return select_tokens(tokens, topk_indices(scores, keep_count(tokens.shape[1], keep)))


register_reduction(Reduction(
    name="lscenellm", catalog="P083",
    title="LSceneLLM: Enhancing Large 3D Scene Understanding Using Adaptive Visual Preferences",
    arxiv="2412.01292", code="https://github.com/Hoyyyaard/LSceneLLM", step="prune",
    scores="instruction -> scene attention of the LLM, averaged over heads, instruction queries and layers, per "
           "coarse scene token",
    keeps="the dense fine-grained tokens of the top-k coarse regions, in original order", training_free=True,
    entry=lscenellm_select, notes="the adaptive fusion of coarse and selected fine tokens is not built",
))
register_reduction(Reduction(
    name="yopo", catalog="P065",
    title="Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See", arxiv="2410.06169",
    code="not released", step="mask",
    scores="per head: the attention mass text queries put on visual tokens (inactive heads = the lowest)",
    keeps="every token; visual queries attend to the text prefix and a k x k spatial neighbourhood, and nothing in "
          "inactive heads; visual tokens bypass selected layers",
    training_free=True, entry=yopo_predicate,
))
