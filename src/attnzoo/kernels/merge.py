"""Merging partial attentions computed over disjoint key sets, by their log-sum-exp.

If ``o_i = softmax(s_i) v_i`` over key set ``i`` with ``lse_i = logsumexp(s_i)``, the attention over the
union is ``sum_i exp(lse_i - lse) o_i`` with ``lse = logsumexp_i(lse_i)``. Ring attention, split-KV decoding
and sampled approximations (HyperAttention) all reduce to this.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """outs: each (..., N, Dv); lses: each (..., N) with -inf for empty parts. Returns (out, lse).

    A row empty in every part gets out 0 and lse -inf.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"outs, lses: expected equally many (>= 1) parts, got {len(outs)} and {len(lses)}")
    lse_all = torch.stack(list(lses), dim=0)  # (P, ..., N)
    top = lse_all.amax(dim=0)  # (..., N)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse_all - top)  # (P, ..., N); 0 for empty parts
    total = w.sum(dim=0)  # (..., N)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    # log of the safe total: log(0) would give -inf here but a NaN gradient (0 * inf) in the backward.
    lse = torch.where(total > 0, top + torch.log(safe), torch.full_like(top, float("-inf")))  # (..., N)
    out = sum(wi.unsqueeze(-1) * o.to(w.dtype) for wi, o in zip(w, outs)) / safe.unsqueeze(-1)
    return out.to(outs[0].dtype), lse
