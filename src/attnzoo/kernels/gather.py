"""Attention of query blocks over gathered key lists, without the N x N score matrix.

The shared engine of the content-adaptive sparse mechanisms (``attnzoo.mechanisms.sparse``): a mechanism
decides, per block of queries, which keys the block may see (BiFormer: the tokens of its routed regions;
HiP: the key blocks its tree search kept; DMA: the union of its queries' top-w keys; HyperAttention: the
keys of the matching sortLSH bucket block, or the sampled columns; Sparsifiner: a query's top-k keys).
This module then computes, for every block ``m`` and row ``r`` of the block,

    out[m, r] = softmax_j( scale * q[m, r] . k[index[m, j]] + key_bias[index[m, j]] , masked ) v[index[m, j]]
    lse[m, r] = logsumexp_j(...)                      (-inf and out = 0 when every slot is masked)

in groups of blocks whose score tiles stay below a fixed size, so memory is O(tile + N d), time
O(M R L d). A slot ``j`` of row ``r`` is dropped when ``slot_mask`` is False there, when the key is after
the row's position (``qpos``, causal), when the key is padding (``key_padding_mask``) or when
``pair_mask`` says so.

Backward is written by hand, FlashAttention style: the forward saves q, k, v, the index, the output and
the row log-sum-exp; the backward recomputes each tile's probabilities and scatters key/value (and key
bias) gradients back with ``index_add_``. Repeated indices (sampling with replacement) are summed, as
they should be. The gradient of ``lse`` is supported (HyperAttention merges parts through it):
``d lse / d s = p``.

Only the selected scores and values receive gradient; the selection itself (the index and the masks)
is treated as a constant, exactly like a boolean mask in dense attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_TILE_ELEMENTS = 1 << 23
"""Largest score tile (elements) materialized at once; bounds temporary memory."""

PairMask = torch.Tensor | Callable[[int, int], torch.Tensor] | None


def _groups(m: int, per_block: int) -> list[tuple[int, int]]:
    step = max(1, _TILE_ELEMENTS // max(per_block, 1))
    return [(s, min(m, s + step)) for s in range(0, m, step)]


def _flat_index(index: torch.Tensor, s: int, e: int, B: int, Hk: int, nr: int) -> torch.Tensor:
    """Rows of the (B*Hk*Nk/run, run*D) flattened keys for blocks s:e: (B, Hk, g, Lr) int64."""
    idx = index[:, :, s:e].expand(B, Hk, -1, -1)  # (B, Hk, g, Lr)
    base = torch.arange(B * Hk, device=index.device).view(B, Hk, 1, 1) * nr
    return idx + base


def run_rows(x: torch.Tensor, run: int) -> tuple[torch.Tensor, int]:
    """x (B, Hk, N, E) as rows of ``run`` consecutive keys, ``(rows (R, run*E), stride)``: (b, h)'s run j is row
    ``(b*Hk + h) * stride + j``. A view when x is a slice along N of a contiguous buffer (a decode cache with
    spare capacity), else a contiguous copy (stride N / run)."""
    B, Hk, N, E = x.shape
    s0, s1, s2, s3 = x.stride()
    w = run * E
    if N and s3 == 1 and s2 == E and s1 % w == 0 and (B == 1 or s0 == Hk * s1):
        stride = s1 // w
        return x.as_strided(((B * Hk - 1) * stride + N // run, w), (w, 1)), stride
    return x.reshape(B * Hk * (N // run), w), N // run


def _runs(x: torch.Tensor, run: int) -> torch.Tensor:
    """Run starts (..., Lr) in units of ``run`` keys -> every key (..., Lr*run)."""
    if run == 1:
        return x
    return (x.unsqueeze(-1) * run + torch.arange(run, device=x.device)).flatten(-2)


def _chunk_drop(flat, idx, s, e, run, slot_mask, qpos, kpm_flat, pair_mask) -> torch.Tensor | None:
    """Bool (B|1, Hk|1, g, R|1, L), True = masked out, or None when nothing is masked. Built as a drop mask
    so that only the small per-slot parts are negated, not the (R x L) tile."""
    drop = None

    def _or(a, b):
        return b if a is None else a | b

    if slot_mask is not None:
        drop = _or(drop, ~slot_mask[:, :, s:e].unsqueeze(3))  # (B|1, Hk|1, g, 1, L)
    if kpm_flat is not None:
        drop = _or(drop, ~kpm_flat[_runs(flat, run)].unsqueeze(3))  # (B, Hk, g, 1, L)
    if qpos is not None:
        drop = _or(drop, _runs(idx, run).unsqueeze(3) > qpos[:, :, s:e].unsqueeze(-1))  # (B, Hk, g, R, L)
    if pair_mask is not None:
        pm = pair_mask(s, e) if callable(pair_mask) else pair_mask[:, :, s:e]
        drop = _or(drop, ~pm)  # (B|1, Hk|1, g, R, L)
    return drop


def _exp_masked(x: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """exp(x) in place, exactly 0 where ``drop`` is True.

    Arguments are clamped at -80 first: vectorized exp takes a slow path (several times slower) on -inf
    and on results that underflow. exp(-80) = 1.8e-35, so an entry more than 80 below its row maximum
    weighs 1.8e-35 instead of ~0: invisible at any tolerance; masked entries are reset to exactly 0.
    """
    x.clamp_(min=-80.0).exp_()
    if drop is not None:
        x.masked_fill_(drop, 0.0)
    return x


class _GatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qb, k, v, key_bias, index, scale, slot_mask, qpos, key_padding_mask, pair_mask, run):
        B, Hk, M, R, D = qb.shape
        Nk, Dv = k.shape[2], v.shape[3]
        Nr = Nk // run
        L = index.shape[-1] * run
        acc = torch.promote_types(qb.dtype, torch.float32)
        kf, k_stride = run_rows(k.to(acc), run)  # (~B*Hk*Nk/run, run*D): one row per run of keys
        vf, v_stride = run_rows(v.to(acc), run)
        bf = None if key_bias is None else key_bias.to(acc).reshape(B * Hk * Nk)  # (B*Hk*Nk,)
        kpm_flat = None
        if key_padding_mask is not None:
            kpm_flat = key_padding_mask.view(B, 1, Nk).expand(B, Hk, Nk).reshape(-1)  # (B*Hk*Nk,)
        out = torch.empty(B, Hk, M, R, Dv, dtype=acc, device=qb.device)  # (B, Hk, M, R, Dv)
        lse = torch.empty(B, Hk, M, R, dtype=acc, device=qb.device)  # (B, Hk, M, R)
        qs_all = qb.to(acc) * scale  # (B, Hk, M, R, D), scale folded in
        for s, e in _groups(M, B * Hk * L * max(R, D, Dv)):
            flat = _flat_index(index, s, e, B, Hk, Nr)  # (B, Hk, g, L/run)
            g = e - s
            fk = flat if k_stride == Nr else _flat_index(index, s, e, B, Hk, k_stride)
            fv = flat if v_stride == Nr else _flat_index(index, s, e, B, Hk, v_stride)
            kg = kf.index_select(0, fk.reshape(-1)).view(B, Hk, g, L, D)  # (B, Hk, g, L, D)
            vg = vf.index_select(0, fv.reshape(-1)).view(B, Hk, g, L, Dv)  # (B, Hk, g, L, Dv)
            sc = torch.matmul(qs_all[:, :, s:e], kg.transpose(-1, -2))  # (B, Hk, g, R, L)
            if bf is not None:
                sc.add_(bf[_runs(flat, run)].unsqueeze(3))  # key bias broadcast over rows
            drop = _chunk_drop(flat, index[:, :, s:e], s, e, run, slot_mask, qpos, kpm_flat, pair_mask)
            if drop is not None:
                sc.masked_fill_(drop, float("-inf"))
            m = sc.amax(dim=-1, keepdim=True)  # (B, Hk, g, R, 1)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty rows: exp(-inf) = 0
            p = _exp_masked(sc.sub_(m), drop)  # (B, Hk, g, R, L), unnormalised, in place
            denom = p.sum(dim=-1, keepdim=True)  # (B, Hk, g, R, 1)
            o = torch.matmul(p, vg)  # (B, Hk, g, R, Dv)
            out[:, :, s:e] = o.div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
            lse[:, :, s:e] = (m + torch.log(denom)).squeeze(-1)
        out_c = out.to(qb.dtype)
        ctx.save_for_backward(qb, k, v, key_bias, index, slot_mask, qpos, key_padding_mask,
                              pair_mask if isinstance(pair_mask, torch.Tensor) else None, out, lse)
        ctx.pair_fn = pair_mask if callable(pair_mask) and not isinstance(pair_mask, torch.Tensor) else None
        ctx.scale, ctx.run = scale, run
        return out_c, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qb, k, v, key_bias, index, slot_mask, qpos, key_padding_mask, pair_t, out, lse = ctx.saved_tensors
        pair_mask = ctx.pair_fn if ctx.pair_fn is not None else pair_t
        scale, run = ctx.scale, ctx.run
        B, Hk, M, R, D = qb.shape
        Nk, Dv = k.shape[2], v.shape[3]
        Nr = Nk // run
        L = index.shape[-1] * run
        acc = torch.promote_types(qb.dtype, torch.float32)
        kf = k.to(acc).reshape(B * Hk * Nr, run * D)
        vf = v.to(acc).reshape(B * Hk * Nr, run * Dv)
        bf = None if key_bias is None else key_bias.to(acc).reshape(B * Hk * Nk)
        kpm_flat = None
        if key_padding_mask is not None:
            kpm_flat = key_padding_mask.view(B, 1, Nk).expand(B, Hk, Nk).reshape(-1)
        # contiguous: autograd may hand an expanded (stride-0) gradient, which BLAS cannot use
        dout = torch.zeros_like(out) if dout is None else dout.to(acc).contiguous()  # (B, Hk, M, R, Dv)
        delta = (dout * out).sum(dim=-1, keepdim=True)  # (B, Hk, M, R, 1)
        if dlse is not None:
            delta = delta - dlse.to(acc).unsqueeze(-1)  # d lse / d s = p folds into the same term
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1)  # (B, Hk, M, R, 1)
        dq = torch.empty(B, Hk, M, R, D, dtype=acc, device=qb.device)
        dk = torch.zeros(B * Hk * Nr, run * D, dtype=acc, device=qb.device)
        dv = torch.zeros(B * Hk * Nr, run * Dv, dtype=acc, device=qb.device)
        db = None if bf is None else torch.zeros(B * Hk * Nr, run, dtype=acc, device=qb.device)
        qs_all = qb.to(acc) * scale  # (B, Hk, M, R, D)
        for s, e in _groups(M, B * Hk * L * max(R, D, Dv)):
            flat = _flat_index(index, s, e, B, Hk, Nr)  # (B, Hk, g, L/run)
            g = e - s
            fl = flat.reshape(-1)
            kg = kf.index_select(0, fl).view(B, Hk, g, L, D)
            vg = vf.index_select(0, fl).view(B, Hk, g, L, Dv)
            qs = qs_all[:, :, s:e]  # (B, Hk, g, R, D)
            sc = torch.matmul(qs, kg.transpose(-1, -2))  # (B, Hk, g, R, L)
            if bf is not None:
                sc.add_(bf[_runs(flat, run)].unsqueeze(3))
            drop = _chunk_drop(flat, index[:, :, s:e], s, e, run, slot_mask, qpos, kpm_flat, pair_mask)
            if drop is not None:
                sc.masked_fill_(drop, float("-inf"))
            p = _exp_masked(sc.sub_(lse_safe[:, :, s:e]), drop)  # (B, Hk, g, R, L), 0 where masked
            do = dout[:, :, s:e]  # (B, Hk, g, R, Dv)
            dvg = torch.matmul(p.transpose(-1, -2), do)  # (B, Hk, g, L, Dv)
            dp = torch.matmul(do, vg.transpose(-1, -2))  # (B, Hk, g, R, L)
            ds = dp.sub_(delta[:, :, s:e]).mul_(p)  # dL/d(score), (B, Hk, g, R, L)
            dq[:, :, s:e] = torch.matmul(ds, kg).mul_(scale)
            dkg = torch.matmul(ds.transpose(-1, -2), qs)  # (B, Hk, g, L, D)
            # accumulate (repeated indices add up); index_put_ is much faster than index_add_ on CPU
            dk.index_put_((fl,), dkg.reshape(-1, run * D), accumulate=True)
            dv.index_put_((fl,), dvg.reshape(-1, run * Dv), accumulate=True)
            if db is not None:
                db.index_put_((fl,), ds.sum(dim=3).reshape(-1, run), accumulate=True)
        dk = dk.view(B, Hk, Nk, D).to(k.dtype)
        dv = dv.view(B, Hk, Nk, Dv).to(v.dtype)
        dbias = None if db is None else db.view(B, Hk, Nk).to(key_bias.dtype)
        return dq.to(qb.dtype), dk, dv, dbias, None, None, None, None, None, None, None


def gather_attention(
    qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, *, scale: float,
    key_bias: torch.Tensor | None = None, slot_mask: torch.Tensor | None = None, qpos: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None, pair_mask: PairMask = None, run: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked attention over gathered keys; returns ``(out (B, Hk, M, R, Dv), lse (B, Hk, M, R))``.

    Args:
        qb: (B, Hk, M, R, D) queries arranged in M blocks of R rows per key/value head (the caller stacks
            grouped-query heads as rows or as extra blocks).
        k: (B, Hk, Nk, D); v: (B, Hk, Nk, Dv).
        index: (B|1, Hk|1, M, L/run) int64: the keys each block may see, as starts of runs of ``run``
            consecutive keys in units of ``run`` (with ``run=1``: key positions). Entries of masked slots
            must still be valid (e.g. 0). Runs let the gathers and gradient scatters move whole rows of
            ``run * D`` values (BiFormer regions, HiP key blocks, sorted LSH blocks).
        scale: score scale.
        key_bias: optional (B, Hk, Nk) additive per-key score bias (DMA); receives gradient.
        slot_mask: (B|1, Hk|1, M, L) bool, False drops a slot for the whole block.
        qpos: (B|1, Hk|1, M, R) int64 row positions in key coordinates: key j is seen iff j <= qpos (causal).
        key_padding_mask: (B, Nk) bool, True = attend.
        pair_mask: (B|1, Hk|1, M, R, L) bool, or ``fn(s, e)`` returning it for blocks s:e (recomputed in the
            backward, so huge masks need not be stored).

        run: keys per run; Nk must be a multiple of it. Masks are per key slot (L = index length * run).

    Rows that see no key get out 0 and lse -inf.
    """
    if index.dtype != torch.int64:
        raise TypeError(f"index: expected an int64 tensor, got {index.dtype}")
    if k.shape[2] % run:
        raise ValueError(f"run: the key length {k.shape[2]} must be a multiple of run={run}")
    return _GatherAttention.apply(qb, k, v, key_bias, index, float(scale), slot_mask, qpos, key_padding_mask,
                                  pair_mask, int(run))
