"""Shared pieces of the routed head-level mechanisms (MoH, BAM, attention-aware SMoE).

- :func:`topk_mask`: the k largest entries of each row, as a bool mask.
- :func:`load_balancing_loss`: the MoE load-balancing loss ``E * sum_e f_e P_e`` (Switch Transformer form, as
  MoH's official code computes it).
- :func:`gather_positions` / :func:`routed_attention`: softmax attention for only the query rows routed to
  each head, all heads in one fused call (rows padded to the busiest head's count): the compute saving of
  routing. With a causal mask, each block of rows only reads the keys its latest row can see, so a routed
  causal head costs about ``M * N / 2`` scores for ``M`` active rows instead of ``N * N / 2``.
"""

from __future__ import annotations

import torch

from ...kernels.sdpa import sdpa

CAUSAL_ROW_BLOCK = 512
"""Query rows per block in causal :func:`routed_attention` (each block reads keys up to its latest row).

512 measured best on a 2-core CPU: PyTorch's fused CPU kernel tiles queries by 64 below 768 rows and by 256
above, so small blocks lose GEMM efficiency while large ones widen the masked ragged tail of each block."""


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


def gather_positions(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit (head or expert), the positions of the tokens that activated it, padded to a common length.

    active (B, N, U) bool -> pos (B, U, M) long, valid (B, U, M) bool, with M the largest count. The valid
    positions of each (b, u) come first, ascending; the padding rows hold positions of inactive tokens and
    are marked invalid (their results must be multiplied by zero and dropped).
    """
    B, N, U = active.shape
    act = active.permute(0, 2, 1)  # (B, U, N)
    ar = torch.arange(N, device=active.device)
    key = torch.where(act, ar, ar + N)  # active tokens sort first, each group in position order
    counts = act.sum(dim=-1)  # (B, U)
    M = int(counts.max()) if counts.numel() else 0
    pos = key.argsort(dim=-1)[..., :M]  # (B, U, M)
    valid = torch.arange(M, device=active.device) < counts.unsqueeze(-1)  # (B, U, M)
    return pos, valid


_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _block_plan(pos: torch.Tensor, valid: torch.Tensor, offset: int, Nk: int, start: int, stop: int):
    """Key split of one block of routed causal rows: a prefix [0, P) every valid row of the block sees, and a
    ragged tail [P, L) that needs a mask. Returns (P, L, last (B, H, c)): the last key each row may see, with
    padding rows set to see every key (never an empty row, whose backward would not be finite)."""
    ok = valid[..., start:stop]
    last = pos[..., start:stop] + offset  # (B, H, c)
    P = int(torch.where(ok, last, torch.full_like(last, Nk)).min())  # every valid row sees keys 0..P
    L = min(Nk, int(torch.where(ok, last, torch.full_like(last, -1)).max()) + 1)
    return min(P, L - 1), L, torch.where(ok, last, torch.full_like(last, Nk))


def _tail_mask(last: torch.Tensor, P: int, L: int, like: torch.Tensor) -> torch.Tensor:
    """(B, H, c, L - P) additive mask of the tail keys [P, L): 0 where key j <= last, -inf after."""
    allowed = torch.arange(P, L, device=last.device) <= last.unsqueeze(-1)  # (B, H, c, L - P)
    return torch.where(allowed, like.new_zeros(()), like.new_full((), float("-inf")))


class _RoutedCausalAttention(torch.autograd.Function):
    """Causal attention of gathered rows without scoring invisible key blocks and without a mask over the
    visible prefix: per block of rows, an unmasked fused call on the prefix every row sees plus a masked call
    on the short ragged tail, merged by log-sum-exp. The backward calls the fused backward of each part with
    the merged output and log-sum-exp (the gradient of a softmax over a union of key sets, part by part), so
    nothing of size rows x keys is stored. q (B, H, A, D), k (B, H, Nk, D), v (B, H, Nk, D) (heads expanded)."""

    @staticmethod
    def forward(ctx, q, k, v, pos, valid, offset, scale, block):
        B, H, A, D = q.shape
        Nk = k.shape[2]
        out = q.new_empty(B, H, A, v.shape[-1])
        lses, plans = [], []
        for start in range(0, A, block):
            stop = min(start + block, A)
            P, L, last = _block_plan(pos, valid, offset, Nk, start, stop)
            qb = q[:, :, start:stop]
            mask = _tail_mask(last, P, L, q)  # (B, H, c, L - P), kept for the backward
            plans.append((start, stop, P, L, mask))
            o2, l2 = _flash_fwd(qb, k[:, :, P:L], v[:, :, P:L], 0.0, False, attn_mask=mask, scale=scale)
            if P > 0:
                o1, l1 = _flash_fwd(qb, k[:, :, :P], v[:, :, :P], 0.0, False, scale=scale)
                lse = torch.logaddexp(l1, l2)  # (B, H, c)
                ob = o1 * torch.exp(l1 - lse).unsqueeze(-1).to(o1.dtype) + o2 * torch.exp(l2 - lse).unsqueeze(-1).to(
                    o2.dtype)
            else:
                ob, lse = o2, l2
            out[:, :, start:stop] = ob
            lses.append(lse)
        lse = torch.cat(lses, dim=2)  # (B, H, A)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.scale = plans, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dout = dout.contiguous()
        for start, stop, P, L, mask in ctx.plans:
            qb, gb, ob, lb = (t[:, :, start:stop] for t in (q, dout, out, lse))
            gq, gk, gv = _flash_bwd(gb, qb, k[:, :, P:L], v[:, :, P:L], ob, lb, 0.0, False, attn_mask=mask,
                                    scale=ctx.scale)
            dq[:, :, start:stop] += gq
            dk[:, :, P:L] += gk
            dv[:, :, P:L] += gv
            if P > 0:
                gq, gk, gv = _flash_bwd(gb, qb, k[:, :, :P], v[:, :, :P], ob, lb, 0.0, False, scale=ctx.scale)
                dq[:, :, start:stop] += gq
                dk[:, :, :P] += gk
                dv[:, :, :P] += gv
        return dq, dk, dv, None, None, None, None, None


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, *,
                     causal: bool, offset: int, key_padding_mask: torch.Tensor | None, scale: float,
                     block: int = CAUSAL_ROW_BLOCK) -> torch.Tensor:
    """Softmax attention of gathered query rows (the tokens routed to each head), fused over all heads.

    Args:
        q: (B, Hq, M, D) gathered queries; row m of head h sits at sequence position ``pos[b, h, m]``.
        k: (B, Hk, Nk, D), v: (B, Hk, Nk, Dv), Hq % Hk == 0 (grouped-query attention).
        pos, valid: (B, Hq, M) from :func:`gather_positions` (valid rows ascending in position).
        causal: bottom-right aligned: the row at position p sees keys j <= p + offset (offset = Nk - Nq).
        key_padding_mask: (B, Nk) bool, True = attend, or None.

    Returns:
        (B, Hq, M, Dv). Invalid (padding) rows hold finite garbage: multiply them by zero. A valid row that
        sees no key is zero. Non-causal: one fused call over M rows, ``M * Nk`` scores per head. Causal: blocks
        of ``block`` rows, each reading only the keys up to its latest valid row, about ``M * Nk / 2`` scores
        (:class:`_RoutedCausalAttention` on CPU; a masked fused call per block otherwise).
    """
    B, Hq, M, _ = q.shape
    Nk = k.shape[2]
    if M == 0:
        return q.new_zeros(B, Hq, 0, v.shape[-1])
    if not causal:
        return sdpa(q, k, v, key_padding_mask=key_padding_mask, scale=scale)  # (B, Hq, M, Dv)
    if (key_padding_mask is None and offset >= 0 and q.device.type == "cpu" and q.shape[-1] == v.shape[-1]
            and q.dtype in (torch.float32, torch.float64, torch.bfloat16)):
        group = Hq // k.shape[1]
        kx = k.repeat_interleave(group, dim=1) if group > 1 else k  # (B, Hq, Nk, D)
        vx = v.repeat_interleave(group, dim=1) if group > 1 else v
        return _RoutedCausalAttention.apply(q.contiguous(), kx.contiguous(), vx.contiguous(), pos, valid, offset,
                                            scale, block)
    last = torch.where(valid, pos + offset, torch.full_like(pos, -1))  # (B, Hq, M) last visible key per row
    outs = []
    for start in range(0, M, block):
        stop = min(start + block, M)
        L = min(Nk, int(last[..., start:stop].max()) + 1)  # keys the block's latest valid row can see
        if L <= 0:
            outs.append(q.new_zeros(B, Hq, stop - start, v.shape[-1]))
            continue
        rows = last[..., start:stop].unsqueeze(-1)  # (B, Hq, c, 1)
        # Padding rows see every key of the block: never an empty row, whose backward would not be finite.
        mask = (torch.arange(L, device=q.device) <= rows) | ~valid[..., start:stop].unsqueeze(-1)  # (B, Hq, c, L)
        kpm = None if key_padding_mask is None else key_padding_mask[:, :L]
        outs.append(sdpa(q[:, :, start:stop], k[:, :, :L], v[:, :, :L], attn_mask=mask, key_padding_mask=kpm,
                         scale=scale))  # (B, Hq, c, Dv)
    return torch.cat(outs, dim=2)


def split_heads(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """(B, N, heads * dim) -> (B, heads, N, dim)."""
    B, N, _ = x.shape
    return x.view(B, N, heads, dim).transpose(1, 2)


