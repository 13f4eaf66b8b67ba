"""Local (sliding-window) attention with sinks that never builds the N x N score matrix.

Two implementations of the same function (``local_attention(..., impl=...)``):

- ``"windows"`` (default): each query block's key window (plus the sink keys) is gathered -- an overlapping
  strided view of the zero-padded keys, copied once -- and attended with PyTorch's fused
  ``scaled_dot_product_attention`` under the band mask; autograd folds the window gradients back. No
  elementwise pass over the scores leaves the fused kernel, which makes it several times faster on CPU.
- ``"blocked"``: the score-tile kernel below with a hand-written backward.

Blocked kernel: queries are cut into blocks of ``block`` rows. A query block attends to the key blocks that can hold
any key within the window: ``nback`` blocks behind it, itself and (non-causal) ``nfwd`` blocks ahead.
Per block that is a (block x L) score tile with L = (nback + 1 + nfwd) * block, masked by the band
``0 <= p - j < window`` (causal) or ``|p - j| < window``. Memory is O(N * L) for the tiles of one
group of blocks at a time and O(N * D) overall; time is O(N * L * D).

The backward pass is written by hand, FlashAttention style: the forward saves only q, k, v, the output
and the row log-sum-exp; the backward recomputes each tile's probabilities. Overlapping key windows are
folded back by adding each window slice into the key block it came from.

Positions: query i sits at key position ``i + offset`` (bottom-right alignment, offset = Nk - Nq).

Attention sinks (StreamingLLM, arXiv 2309.17453): with ``sinks = S`` the first S keys are visible to every
query as well (causally: to queries at positions >= j). Each tile then scores S + L keys: the sink keys
are prepended to every window and left out of the window part, so no key is counted twice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Score tiles of one group of blocks hold at most this many elements (bounds temporary memory).
_TILE_ELEMENTS = 1 << 23


def _pick_block(window: int, causal: bool) -> int:
    """Query block size: about half the window (fewer wasted scores than one full window per block,
    still large matmuls), at least 16."""
    return max(16, min(128, 1 << max(4, math.ceil(math.log2(max(window, 2))) - 1)))


def _to_blocks(x: torch.Tensor, nb: int, block: int, front: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, nb, block, D), zero-padded with ``front`` rows before and the rest after."""
    B, H, N, D = x.shape
    back = nb * block - N - front
    x = F.pad(x, (0, 0, front, back))  # (B, H, nb*block, D)
    return x.view(B, H, nb, block, D)


def _windows(xb: torch.Tensor, nback: int, nfwd: int) -> torch.Tensor:
    """(B, H, nb, block, D) -> (B, H, nb, (nback+1+nfwd)*block, D): each block with its neighbours.

    An overlapping strided view of the zero-padded sequence (no copy)."""
    B, H, nb, block, D = xb.shape
    L = (nback + 1 + nfwd) * block
    padded = F.pad(xb.reshape(B, H, nb * block, D), (0, 0, nback * block, nfwd * block))  # (B, H, *, D)
    return padded.unfold(2, L, block).transpose(-1, -2)  # (B, H, nb, L, D)


def _fold_windows(dw: torch.Tensor, nback: int, nfwd: int, block: int) -> torch.Tensor:
    """Adjoint of :func:`_windows`: (B, H, nb, L, D) -> (B, H, nb, block, D)."""
    B, H, nb, L, D = dw.shape
    out = dw.new_zeros(B, H, nb + nback + nfwd, block, D)
    for i in range(nback + 1 + nfwd):
        out[:, :, i : i + nb] += dw[:, :, :, i * block : (i + 1) * block]
    return out[:, :, nback : nback + nb]


class _Plan:
    """Block geometry and masks shared by forward and backward."""

    def __init__(self, nq: int, nk: int, window: int, causal: bool, offset: int, block: int,
                 key_padding_mask: torch.Tensor | None, device: torch.device, sinks: int = 0) -> None:
        self.block = block
        self.sinks = sinks = min(sinks, nk)
        # Work in key positions: query i is at position i + offset. Pad queries in front so that query
        # block b covers positions [b*block, (b+1)*block), the same grid as the key blocks.
        self.q_front = offset if offset > 0 else 0
        self.k_front = -offset if offset < 0 else 0
        total = max(nq + self.q_front, nk + self.k_front)
        self.nb = nb = -(-total // block)
        self.nback = -(-(window - 1) // block)
        self.nfwd = 0 if causal else self.nback
        self.L = L = (self.nback + 1 + self.nfwd) * block
        t = torch.arange(block, device=device).view(block, 1)
        u = torch.arange(L, device=device).view(1, L)
        d = self.nback * block + t - u  # (block, L): query position minus key position
        band = (d >= 0) & (d < window) if causal else (d > -window) & (d < window)  # (block, L)
        # Keys that exist (not padding) and are not masked, in window layout: (B|1, nb, L).
        valid = torch.zeros(1, nb * block, dtype=torch.bool, device=device)
        valid[:, self.k_front : self.k_front + nk] = True
        if key_padding_mask is not None:
            valid = valid.repeat(key_padding_mask.shape[0], 1)
            valid[:, self.k_front : self.k_front + nk] = key_padding_mask
        sink_valid = valid[:, self.k_front : self.k_front + sinks]  # (B|1, S)
        valid = valid.clone()
        valid[:, self.k_front : self.k_front + sinks] = False  # sinks are scored in their own part
        vw = F.pad(valid.to(torch.uint8), (self.nback * block, self.nfwd * block)).unfold(1, L, block).bool()
        # masked[b, blk, t, u] is True where the score must be dropped: (B|1, 1, nb, 1, block, S + L)
        masked = ~(band.view(1, 1, block, L) & vw.view(vw.shape[0], nb, 1, L))  # (B|1, nb, block, L)
        if sinks:
            qpos = torch.arange(nb * block, device=device).view(nb, block, 1)  # grid position of each query
            kpos = torch.arange(sinks, device=device).view(1, 1, sinks) + self.k_front
            seen = (kpos <= qpos) if causal else torch.ones(nb, block, sinks, dtype=torch.bool, device=device)
            sink_masked = ~(seen.unsqueeze(0) & sink_valid.view(-1, 1, 1, sinks))  # (B|1, nb, block, S)
            rows = max(masked.shape[0], sink_masked.shape[0])
            masked = torch.cat([sink_masked.expand(rows, -1, -1, -1), masked.expand(rows, -1, -1, -1)], dim=-1)
        self.masked = masked.view(masked.shape[0], 1, nb, 1, block, sinks + L)


def _tile_groups(nb: int, rows: int) -> list[tuple[int, int]]:
    step = max(1, _TILE_ELEMENTS // max(rows, 1))
    return [(s, min(nb, s + step)) for s in range(0, nb, step)]


def _query_blocks(x: torch.Tensor, plan: _Plan, kv_heads: int) -> torch.Tensor:
    """(B, Hq, N, D) -> (B, Hk, nb, G*block, D): the G query heads sharing a key head stacked as rows."""
    B, Hq, N, D = x.shape
    G = Hq // kv_heads
    xb = _to_blocks(x, plan.nb, plan.block, plan.q_front)  # (B, Hq, nb, block, D)
    xb = xb.view(B, kv_heads, G, plan.nb, plan.block, D).transpose(2, 3)  # (B, Hk, nb, G, block, D)
    return xb.reshape(B, kv_heads, plan.nb, G * plan.block, D)


def _unblock_queries(xb: torch.Tensor, plan: _Plan, hq: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_query_blocks`: (B, Hk, nb, G*block, D) -> (B, Hq, N, D)."""
    B, Hk, nb, _, D = xb.shape
    G = hq // Hk
    x = xb.view(B, Hk, nb, G, plan.block, D).transpose(2, 3).reshape(B, hq, nb * plan.block, D)
    return x[:, :, plan.q_front : plan.q_front + n]


def _tile_keys(xw: torch.Tensor, x_sink: torch.Tensor | None, s: int, e: int) -> torch.Tensor:
    """Keys (or values) scored by blocks s:e: (B, Hk, g, S + L, D), sinks first."""
    if x_sink is None:
        return xw[:, :, s:e]
    B, Hk, S, D = x_sink.shape
    return torch.cat([x_sink.unsqueeze(2).expand(B, Hk, e - s, S, D), xw[:, :, s:e]], dim=3)


def _scores(qs, kx, masked, s, e, G, block):
    """Masked scaled scores of blocks s:e, (B, Hk, g, G*block, S + L), -inf where masked."""
    sc = torch.matmul(qs[:, :, s:e], kx.transpose(-1, -2))  # (B, Hk, g, G*block, S + L)
    B, Hk, g, _, L = sc.shape
    sc.view(B, Hk, g, G, block, L).masked_fill_(masked[:, :, s:e], float("-inf"))
    return sc


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, causal, offset, scale, key_padding_mask, block, sinks):
        B, Hq, Nq, D = q.shape
        Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hk
        acc = torch.promote_types(q.dtype, torch.float32)
        plan = _Plan(Nq, Nk, window, causal, offset, block, key_padding_mask, q.device, sinks)
        nb, S = plan.nb, plan.sinks
        qs = _query_blocks(q.to(acc) * scale, plan, Hk)  # (B, Hk, nb, G*block, D), scale folded in
        kw = _windows(_to_blocks(k.to(acc), nb, block, plan.k_front), plan.nback, plan.nfwd)  # (B, Hk, nb, L, D)
        vw = _windows(_to_blocks(v.to(acc), nb, block, plan.k_front), plan.nback, plan.nfwd)  # (B, Hk, nb, L, Dv)
        ks = k[:, :, :S].to(acc) if S else None  # (B, Hk, S, D)
        vs = v[:, :, :S].to(acc) if S else None  # (B, Hk, S, Dv)
        out = torch.empty(B, Hk, nb, G * block, Dv, dtype=acc, device=q.device)  # (B, Hk, nb, G*block, Dv)
        lse = torch.empty(B, Hk, nb, G * block, 1, dtype=acc, device=q.device)  # (B, Hk, nb, G*block, 1)
        for s, e in _tile_groups(nb, B * Hq * block * (S + plan.L)):
            sc = _scores(qs, _tile_keys(kw, ks, s, e), plan.masked, s, e, G, block)  # (B, Hk, g, G*block, S+L)
            m = sc.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no key: exp(-inf) = 0
            p = sc.sub_(m).exp_()  # (B, Hk, g, G*block, S+L), unnormalised
            denom = p.sum(dim=-1, keepdim=True)  # (B, Hk, g, G*block, 1)
            torch.matmul(p, _tile_keys(vw, vs, s, e), out=out[:, :, s:e])
            out[:, :, s:e].div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
            lse[:, :, s:e] = m + torch.log(denom)
        result = _unblock_queries(out, plan, Hq, Nq).to(q.dtype)  # (B, Hq, Nq, Dv)
        ctx.save_for_backward(q, k, v, result, lse, key_padding_mask)
        ctx.args = (window, causal, offset, scale, block, sinks)
        ctx.has_mask = key_padding_mask is not None
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        if not ctx.has_mask:
            key_padding_mask = None
        window, causal, offset, scale, block, sinks = ctx.args
        B, Hq, Nq, D = q.shape
        Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hk
        acc = torch.promote_types(q.dtype, torch.float32)
        plan = _Plan(Nq, Nk, window, causal, offset, block, key_padding_mask, q.device, sinks)
        nb, S = plan.nb, plan.sinks
        qs = _query_blocks(q.to(acc) * scale, plan, Hk)  # (B, Hk, nb, G*block, D)
        dob = _query_blocks(dout.to(acc), plan, Hk)  # (B, Hk, nb, G*block, Dv)
        delta = _query_blocks((dout.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True), plan, Hk)  # (..., 1)
        kw = _windows(_to_blocks(k.to(acc), nb, block, plan.k_front), plan.nback, plan.nfwd)  # (B, Hk, nb, L, D)
        vw = _windows(_to_blocks(v.to(acc), nb, block, plan.k_front), plan.nback, plan.nfwd)  # (B, Hk, nb, L, Dv)
        ks = k[:, :, :S].to(acc) if S else None  # (B, Hk, S, D)
        vs = v[:, :, :S].to(acc) if S else None  # (B, Hk, S, Dv)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        dq = torch.empty_like(qs)  # (B, Hk, nb, G*block, D)
        dkw = torch.empty(kw.shape, dtype=acc, device=q.device)  # (B, Hk, nb, L, D)
        dvw = torch.empty(vw.shape, dtype=acc, device=q.device)  # (B, Hk, nb, L, Dv)
        dks = torch.zeros(B, Hk, S, D, dtype=acc, device=q.device)  # (B, Hk, S, D)
        dvs = torch.zeros(B, Hk, S, Dv, dtype=acc, device=q.device)  # (B, Hk, S, Dv)
        for s, e in _tile_groups(nb, B * Hq * block * (S + plan.L)):
            kx, vx = _tile_keys(kw, ks, s, e), _tile_keys(vw, vs, s, e)  # (B, Hk, g, S+L, D|Dv)
            p = _scores(qs, kx, plan.masked, s, e, G, block).sub_(lse[:, :, s:e]).exp_()  # (B, Hk, g, G*block, S+L)
            dvx = torch.matmul(p.transpose(-1, -2), dob[:, :, s:e])  # (B, Hk, g, S+L, Dv)
            dp = torch.matmul(dob[:, :, s:e], vx.transpose(-1, -2))  # (B, Hk, g, G*block, S+L)
            ds = dp.sub_(delta[:, :, s:e]).mul_(p)  # dL/d(scaled scores)
            torch.matmul(ds, kx, out=dq[:, :, s:e])
            dkx = torch.matmul(ds.transpose(-1, -2), qs[:, :, s:e])  # (B, Hk, g, S+L, D)
            dkw[:, :, s:e], dvw[:, :, s:e] = dkx[:, :, :, S:], dvx[:, :, :, S:]
            if S:
                dks += dkx[:, :, :, :S].sum(dim=2)
                dvs += dvx[:, :, :, :S].sum(dim=2)
        dq = _unblock_queries(dq, plan, Hq, Nq) * scale  # (B, Hq, Nq, D)
        c = plan.k_front
        dk = _fold_windows(dkw, plan.nback, plan.nfwd, block).reshape(B, Hk, nb * block, D)[:, :, c : c + Nk]
        dv = _fold_windows(dvw, plan.nback, plan.nfwd, block).reshape(B, Hk, nb * block, Dv)[:, :, c : c + Nk]
        if S:
            dk, dv = dk.clone(), dv.clone()
            dk[:, :, :S] += dks
            dv[:, :, :S] += dvs
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def _windowed_sdpa(q, k, v, window, causal, offset, scale, key_padding_mask, block, sinks):
    """Gathered-window form: each query block with its (sinks +) key window, through PyTorch's fused
    ``scaled_dot_product_attention`` with the band mask; autograd folds the window gradients back.

    q is cut into blocks (B*Hq, nb, block, D), the keys into overlapping windows (B*Hq, nb, S + L, D) --
    copies of about (S + L) / block times K and V -- and the (nb, block, S + L) mask is shared by every head.
    Rows that see no key get one extra all-zero "null" key, so they return zeros (not NaN) and send no
    gradient anywhere."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hk
    plan = _Plan(Nq, Nk, window, causal, offset, block, key_padding_mask, q.device, sinks)
    nb, S, L = plan.nb, plan.sinks, plan.L
    allow = ~plan.masked.view(-1, nb, block, S + L)  # (R, nb, block, S + L), R = B or 1
    qb = _to_blocks(q, nb, block, plan.q_front).reshape(B * Hq, nb, block, D)  # (B*Hq, nb, block, D)
    kw = _windows(_to_blocks(k, nb, block, plan.k_front), plan.nback, plan.nfwd)  # (B, Hk, nb, L, D) view
    vw = _windows(_to_blocks(v, nb, block, plan.k_front), plan.nback, plan.nfwd)  # (B, Hk, nb, L, Dv) view
    if S:
        kw = torch.cat([k[:, :, :S].unsqueeze(2).expand(B, Hk, nb, S, D), kw], dim=3)  # (B, Hk, nb, S+L, D)
        vw = torch.cat([v[:, :, :S].unsqueeze(2).expand(B, Hk, nb, S, Dv), vw], dim=3)  # (B, Hk, nb, S+L, Dv)
    empty = ~allow.any(dim=-1, keepdim=True)  # (R, nb, block, 1): rows without any visible key
    if bool(empty.any()):
        allow = torch.cat([allow, empty], dim=-1)
        kw, vw = F.pad(kw, (0, 0, 0, 1)), F.pad(vw, (0, 0, 0, 1))
    Lk = allow.shape[-1]
    if G > 1:
        kw, vw = kw.repeat_interleave(G, dim=1), vw.repeat_interleave(G, dim=1)  # (B, Hq, nb, Lk, D|Dv)
    kw, vw = kw.reshape(B * Hq, nb, Lk, D), vw.reshape(B * Hq, nb, Lk, Dv)
    if allow.shape[0] > 1:  # per-batch padding: one mask per (batch, head)
        allow = allow.unsqueeze(1).expand(B, Hq, nb, block, Lk).reshape(B * Hq, nb, block, Lk)
    out = F.scaled_dot_product_attention(qb, kw, vw, attn_mask=allow, scale=scale)  # (B*Hq, nb, block, Dv)
    return out.view(B, Hq, nb * block, Dv)[:, :, plan.q_front : plan.q_front + Nq]


IMPLS = ("auto", "windows", "blocked")


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, causal: bool, scale: float,
    key_padding_mask: torch.Tensor | None = None, sinks: int = 0, block: int | None = None, impl: str = "auto",
) -> torch.Tensor:
    """Sliding-window attention, q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) -> (B, Hq, Nq, Dv).

    Query i (at key position p = i + Nk - Nq) sees keys with ``0 <= p - j < window`` if causal, else
    ``|p - j| < window``, plus the first ``sinks`` keys (causally: those with j <= p). Inputs are validated
    by the caller (``attnzoo.attention``).

    ``impl``: ``"blocked"`` is the score-tile kernel with the hand-written backward (saves only q, k, v, the
    output and the log-sum-exp); ``"windows"`` gathers each query block's key window and runs PyTorch's fused
    SDPA on it with the band mask (several times faster on CPU: no elementwise passes over the scores; keeps
    the (S + L) / block window copies of K and V for the backward); ``"auto"`` = ``"windows"``. Neither
    builds the N x N score matrix.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {list(IMPLS)}, got {impl!r}")
    offset = k.shape[2] - q.shape[2]
    window = min(window, q.shape[2] + k.shape[2])  # a wider window sees nothing more; keep the tiles small
    block = _pick_block(window, causal) if block is None else block
    if impl == "blocked":
        return _LocalAttention.apply(q, k, v, window, causal, offset, scale, key_padding_mask, block, sinks)
    return _windowed_sdpa(q, k, v, window, causal, offset, scale, key_padding_mask, block, sinks)
