"""Small helpers shared by the long-context / memory mechanisms (not a mechanism itself)."""

from __future__ import annotations

import torch

from ...errors import check_key_padding_mask, check_qkv

# Score tiles hold at most about this many elements (bounds the temporary memory of tiled kernels).
TILE_ELEMENTS = 1 << 22


def masked_lse(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp of ``x`` over the entries where ``mask`` is True, along ``dim``.

    Returns ``(lse, nonempty)``: ``lse`` is 0 (not -inf) where no entry is selected, so that
    ``exp(x - lse)`` never meets ``-inf - -inf``; ``nonempty`` says where the set was not empty. Written
    without ``torch.logsumexp`` so that empty sets give finite (zero) gradients instead of NaN.
    """
    xm = x.masked_fill(~mask, float("-inf"))
    top = xm.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    total = torch.exp(xm - top).sum(dim=dim, keepdim=True)
    nonempty = total > 0
    lse = top + torch.log(torch.where(nonempty, total, torch.ones_like(total)))
    return lse.squeeze(dim), nonempty.squeeze(dim)


def query_positions(nq: int, nk: int, device=None) -> torch.Tensor:
    """Absolute key position of each query under bottom-right alignment: ``i + Nk - Nq``."""
    return torch.arange(nq, device=device) + (nk - nq)


def rows_per_tile(row_cost: int, budget: int = TILE_ELEMENTS) -> int:
    """How many query rows fit in a tile whose rows cost ``row_cost`` elements each."""
    return max(1, budget // max(1, row_cost))


def check_step_inputs(q, k, v, state, key_padding_mask) -> tuple[int, int, int, int, int, int, int]:
    """Validate the T new tokens of a decode step against each other (the state checks its own shapes)."""
    B, Hq, Hk, T, Tk, D, Dv = check_qkv(q, k, v)
    if T != Tk:
        raise ValueError(f"q, k: a decode step takes as many new queries as new keys, got {T} and {Tk}")
    check_key_padding_mask(key_padding_mask, B, T)
    return B, Hq, Hk, T, Tk, D, Dv
