"""Shared pieces of the routed head-level mechanisms (MoH, BAM, attention-aware SMoE).

- :func:`topk_mask`: the k largest entries of each row, as a bool mask.
- :func:`load_balancing_loss`: the MoE load-balancing loss ``E * sum_e f_e P_e`` (Switch Transformer form, as
  MoH's official code computes it).
- :func:`gathered_attention`: softmax attention for a *subset* of query rows of one (batch, head) pair: the
  compute saving of routing. Rows are attended in position order; with a causal mask each block of rows
  only reads the keys its last row can see, so a routed causal head costs about ``M * N / 2`` scores for
  ``M`` active rows instead of ``N * N / 2``.
"""

from __future__ import annotations

import torch

from ...kernels.sdpa import sdpa

CAUSAL_ROW_BLOCK = 256
"""Query rows per block in causal :func:`gathered_attention` (each block reads keys up to its last row)."""


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., E) scores -> (..., E) bool, True at the ``k`` largest entries of each row (ties: lowest index)."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    idx = scores.topk(k, dim=-1).indices  # (..., k)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)


def load_balancing_loss(probs: torch.Tensor, selected: torch.Tensor, weight: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` over tokens: ``P_e`` the mean router probability of expert (head) ``e``,
    ``f_e`` the fraction of tokens that selected it. Equals ``k`` (the experts per token) at perfect balance.

    probs (T, E) float, selected (T, E) bool, weight (T,) bool/float or None (tokens to count, e.g. not
    padding). A scalar in probs' dtype; gradient flows through ``P`` only (``f`` is a count).
    """
    E = probs.shape[-1]
    probs = probs.reshape(-1, E)
    sel = selected.reshape(-1, E).to(probs.dtype)
    if weight is None:
        P = probs.mean(dim=0)  # (E,)
        f = sel.mean(dim=0)  # (E,)
    else:
        w = weight.reshape(-1, 1).to(probs.dtype)  # (T, 1)
        total = w.sum().clamp_min(1)
        P = (probs * w).sum(dim=0) / total
        f = (sel * w).sum(dim=0) / total
    return E * (f * P).sum()


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
                       causal: bool, offset: int, key_padding_mask: torch.Tensor | None, scale: float,
                       block: int = CAUSAL_ROW_BLOCK) -> torch.Tensor:
    """Softmax attention of selected query rows of one (batch, head) pair.

    Args:
        q: (M, D) the selected queries, at sequence positions ``positions`` (M,), ascending.
        k: (Nk, D), v: (Nk, Dv) every key/value of that batch row and key/value head.
        causal: bottom-right aligned: the query at position p sees keys j <= p + offset (offset = Nk - Nq).
        key_padding_mask: (Nk,) bool, True = attend, or None.

    Returns:
        (M, Dv); a row that sees no key is zero.
    """
    M = q.shape[0]
    if M == 0:
        return q.new_zeros(0, v.shape[-1])
    kpm = None if key_padding_mask is None else key_padding_mask.view(1, -1)  # (1, Nk)
    if not causal:
        out = sdpa(q.view(1, 1, M, -1), k.view(1, 1, *k.shape), v.view(1, 1, *v.shape), key_padding_mask=kpm,
                   scale=scale)  # (1, 1, M, Dv)
        return out.view(M, -1)
    Nk = k.shape[0]
    last = (positions + offset).tolist()  # the last visible key of each row
    outs = []
    for start in range(0, M, block):
        stop = min(start + block, M)
        L = min(Nk, last[stop - 1] + 1)  # keys the block's last (latest) row can see
        if L <= 0:
            outs.append(q.new_zeros(stop - start, v.shape[-1]))
            continue
        rows = (positions[start:stop] + offset).view(-1, 1)  # (c, 1)
        mask = torch.arange(L, device=q.device).view(1, L) <= rows  # (c, L)
        out = sdpa(q[start:stop].view(1, 1, stop - start, -1), k[:L].view(1, 1, L, -1), v[:L].view(1, 1, L, -1),
                   attn_mask=mask, key_padding_mask=None if kpm is None else kpm[:, :L], scale=scale)
        outs.append(out.view(stop - start, -1))  # (c, Dv)
    return torch.cat(outs, dim=0)


def split_heads(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """(B, N, heads * dim) -> (B, heads, N, dim)."""
    B, N, _ = x.shape
    return x.view(B, N, heads, dim).transpose(1, 2)


def check_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value
