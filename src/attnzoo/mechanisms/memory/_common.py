"""Small helpers shared by the long-context / memory mechanisms (not a mechanism itself)."""

from __future__ import annotations

import torch

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


def attend_parts(q: torch.Tensor, parts, scale: float) -> torch.Tensor:
    """Softmax attention of q (B, Hq, T, D) over the union of key sets given separately, without
    concatenating the keys (only the (T, L_i) score rows are concatenated): for decoding, where copying a
    long key set into one tensor costs more than attending to it.

    parts: [(k (B, H_i, L_i, D), v (B, H_i, L_i, Dv), mask (B|1, H_i|1, T, L_i) bool or None)], each
    H_i dividing Hq (query head h reads head h // (Hq // H_i)). Rows that see no key return zeros.
    """
    B, Hq, T, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    scores, masks = [], []
    for k, _v, m in parts:
        Hi, L = k.shape[1], k.shape[2]
        qg = q.to(acc).view(B, Hi, Hq // Hi, T, D)
        s = torch.matmul(qg, k.to(acc).unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hi, G, T, L)
        mm = torch.ones(1, 1, 1, T, L, dtype=torch.bool, device=q.device) if m is None else m.unsqueeze(2)
        scores.append(s.reshape(B, Hq, T, L))
        masks.append(mm.expand(B, Hi, Hq // Hi, T, L).reshape(B, Hq, T, L))
    s, m = torch.cat(scores, -1), torch.cat(masks, -1)  # (B, Hq, T, sum L)
    lse, _ = masked_lse(s, m)
    p = torch.exp(s.masked_fill(~m, float("-inf")) - lse.unsqueeze(-1))
    out, i = 0, 0
    for k, v, _ in parts:
        Hi, L = k.shape[1], k.shape[2]
        pi = p[..., i : i + L].reshape(B, Hi, Hq // Hi, T, L)
        out = out + torch.matmul(pi, v.to(acc).unsqueeze(2)).reshape(B, Hq, T, -1)
        i += L
    return out.to(q.dtype)
