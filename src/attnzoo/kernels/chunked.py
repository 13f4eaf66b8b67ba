"""Chunked causal linear attention with an optional per-head decay, forward and hand-written backward.

Computes, per key/value head and with ``lambda = 1`` when there is no decay,

    o_i = sum_{j <= i} lambda^(i - j) (q_i . k_j) v_j  +  lambda^(i + 1) q_i S_0
    S_N = sum_j lambda^(N - 1 - j) k_j v_j^T + lambda^N S_0          (the final state)

on features that are already mapped (phi(q), phi(k)) and scaled; normalisation, if any, is the caller's
(append a column of ones to v and divide). This is Lightning Attention-2's algorithm (Qin et al., arXiv
2401.04658): the sequence is cut into chunks of ``C`` tokens; inside a chunk the masked quadratic form
``[(Q_c K_c^T) (.) M] V_c`` with ``M_ts = lambda^(t - s)`` (t >= s), across chunks the state
``S_(c+1) = lambda^C S_c + (Gamma K_c)^T V_c`` with ``Gamma = diag(lambda^(C - 1 - s))``, and the chunk's
inter term ``(Lambda Q_c) S_c`` with ``Lambda = diag(lambda^(t + 1))``. Every decay power has a non-negative
exponent of at most C, so nothing overflows (no ``lambda^-t``); there is no cumulative sum over tokens,
only a scan over the ``N / C`` chunk states (a cumsum over chunks without decay, a loop with decay).

Memory is O(N (C + F + Dv) + (N / C) F Dv) for a fixed chunk size: the (C x C) score blocks, the chunk
states, never an N x N matrix. Time is O(N C (F + Dv) + N F Dv).

The backward pass is written by hand (:class:`_ChunkedLinearAttention`): the forward saves its inputs and
the chunk states; the backward scans the state gradients in reverse,
``dS_c = (Lambda Q_c)^T dO_c + lambda^C dS_(c+1)``, and recomputes each chunk's score block:

    dQ_c = [(dO_c V_c^T) (.) M] K_c + Lambda dO_c S_c^T
    dK_c = [(dO_c V_c^T) (.) M]^T Q_c + Gamma V_c dS_(c+1)^T
    dV_c = [(Q_c K_c^T) (.) M]^T dO_c + (Gamma K_c) dS_(c+1)

A sequence length that is not a multiple of C ends with one shorter chunk (its own decay tables), so no
token is padded and the final state is exact.

Grouped-query attention: the ``G = Hq / Hk`` query heads sharing a key/value head are stacked as rows of
one (G C x F) block against that head's keys and state, so the state is kept once per key/value head.
Low-precision inputs are computed in float32 (the state always accumulates in float32 or wider).
"""

from __future__ import annotations

import torch

__all__ = ["chunked_linear_attention", "global_linear_attention", "decay_weights", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64
"""Chunk size: about the feature dimension balances the intra-chunk (C) and state (F) costs."""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _Tables:
    """Decay tables of one chunk size c for Hk heads (all None / a plain triangle without decay)."""

    def __init__(self, log_decay: torch.Tensor | None, c: int, G: int, dtype: torch.dtype, device) -> None:
        t = torch.arange(c, device=device, dtype=torch.float64)
        tri = (t.view(c, 1) >= t.view(1, c))  # (c, c): query t sees key s <= t
        if log_decay is None:
            self.qdec = self.kdec = self.blk = None
            mask = tri.to(dtype).view(1, 1, c, c)  # (1, 1, c, c)
        else:
            ld = log_decay.to(device=device, dtype=torch.float64).view(-1, 1, 1)  # (Hk, 1, 1)
            self.qdec = torch.exp(ld * (t + 1).view(1, c, 1)).to(dtype)  # (Hk, c, 1): lambda^(t+1)
            self.kdec = torch.exp(ld * (c - 1 - t).view(1, c, 1)).to(dtype)  # (Hk, c, 1): lambda^(c-1-s)
            self.blk = torch.exp(ld * c).to(dtype).view(-1, 1, 1)  # (Hk, 1, 1): lambda^c
            diff = (t.view(c, 1) - t.view(1, c)).clamp(min=0)  # (c, c)
            mask = torch.where(tri, torch.exp(ld * diff), torch.zeros((), dtype=torch.float64, device=device))
            mask = mask.to(dtype).view(-1, 1, c, c)  # (Hk, 1, c, c)
            if G > 1:
                self.qdec = self.qdec.repeat(1, G, 1)  # (Hk, G*c, 1)
        if G > 1:
            mask = mask.repeat(1, 1, G, 1)  # (Hk|1, 1, G*c, c): the G query heads stacked as rows
        self.mask = mask
        self.tril = log_decay is None and G == 1  # the mask is a plain lower triangle
        # Broadcast shapes against (B, Hk, nc, rows, cols):
        if self.qdec is not None:
            self.qdec = self.qdec.unsqueeze(1)  # (Hk, 1, G*c, 1)
            self.kdec = self.kdec.unsqueeze(1)  # (Hk, 1, c, 1)


def _to_rows(x: torch.Tensor, hk: int, nc: int, c: int) -> torch.Tensor:
    """(B, Hq, nc*c, F) -> (B*Hk, nc, G*c, F): each chunk's G query heads stacked as rows (a view when
    G == 1 and x is contiguous)."""
    B, Hq, _, F = x.shape
    G = Hq // hk
    if G == 1:
        return x.reshape(B * hk, nc, c, F)
    x = x.reshape(B, hk, G, nc, c, F).transpose(2, 3)  # (B, Hk, nc, G, c, F)
    return x.reshape(B * hk, nc, G * c, F)


def _from_rows(x: torch.Tensor, b: int, hq: int) -> torch.Tensor:
    """Inverse of :func:`_to_rows`: (B*Hk, nc, G*c, D) -> (B, Hq, nc*c, D)."""
    BH, nc, R, D = x.shape
    hk = BH // b
    G = hq // hk
    c = R // G
    if G == 1:
        return x.view(b, hq, nc * c, D)
    return x.view(b, hk, nc, G, c, D).transpose(2, 3).reshape(b, hq, nc * c, D)


def _segments(n: int, chunk: int) -> list[tuple[int, int, int]]:
    """(start, chunk size, number of chunks): the full chunks, then one shorter chunk if n % chunk."""
    full, rest = divmod(n, chunk)
    out = []
    if full:
        out.append((0, chunk, full))
    if rest:
        out.append((full * chunk, rest, 1))
    return out


def _per_head(x: torch.Tensor, b: int, table: torch.Tensor) -> torch.Tensor:
    """x (B*Hk, ...) multiplied in place by a per-head table (Hk, ...) broadcast over the batch."""
    x.view(b, -1, *x.shape[1:]).mul_(table)
    return x


def _mask_scores(A: torch.Tensor, b: int, tab: _Tables) -> torch.Tensor:
    """A (B*Hk, nc, R, c) *= the chunk mask, in place (a plain lower triangle: tril_)."""
    if tab.tril:
        return A.tril_()
    return _per_head(A, b, tab.mask)


def _seg_forward(qb, kb, vb, tab: _Tables, s_in, b: int):
    """One segment of nc chunks of c tokens, heads flattened: qb (BH, nc, R, F) with R = G*c,
    kb (BH, nc, c, F), vb (BH, nc, c, Dv), s_in (BH, F, Dv) the state before the segment.

    Returns out (BH, nc, R, Dv), the states before each chunk (BH, nc, F, Dv), the state after the
    segment (BH, F, Dv) and the masked scores (BH, nc, R, c), kept for the backward (recomputing them
    costs one more batched matmul; keeping them costs N*c numbers per head, as much as the states).
    All bmm operands are contiguous 3-D views (no hidden copies)."""
    BH, nc, c, F = kb.shape
    R, Dv = qb.shape[2], vb.shape[3]
    q3, k3, v3 = qb.view(-1, R, F), kb.view(-1, c, F), vb.view(-1, c, Dv)
    kd3 = k3 if tab.kdec is None else _per_head(kb.clone(), b, tab.kdec).view(-1, c, F)  # Gamma K_c
    kv = torch.bmm(kd3.transpose(1, 2), v3).view(BH, nc, F, Dv)  # each chunk's (Gamma K_c)^T V_c
    S = torch.empty(BH, nc, F, Dv, dtype=kb.dtype, device=kb.device)  # state before each chunk
    S[:, 0] = s_in
    for i in range(nc - 1):  # S_(i+1) = lambda^c S_i + (Gamma K_i)^T V_i
        if tab.blk is None:
            torch.add(kv[:, i], S[:, i], out=S[:, i + 1])
        else:
            torch.addcmul(kv[:, i].view(b, -1, F, Dv), S[:, i].view(b, -1, F, Dv), tab.blk, out=S[:, i + 1].view(b, -1, F, Dv))
    last = S[:, nc - 1] if tab.blk is None else (S[:, nc - 1].view(b, -1, F, Dv) * tab.blk).view(BH, F, Dv)
    s_out = kv[:, nc - 1] + last  # (BH, F, Dv)
    del kv
    qd3 = q3 if tab.qdec is None else _per_head(qb.clone(), b, tab.qdec).view(-1, R, F)  # Lambda Q_c
    out = torch.bmm(qd3, S.view(-1, F, Dv))  # (BH*nc, R, Dv): inter-chunk term
    del qd3
    A = _mask_scores(torch.bmm(q3, k3.transpose(1, 2)).view(BH, nc, R, c), b, tab)  # masked scores
    out.baddbmm_(A.view(-1, R, c), v3)  # + intra-chunk term
    return out.view(BH, nc, R, Dv), S, s_out, A


def _seg_backward(qb, kb, vb, tab: _Tables, S, A, dob, g_out, b: int):
    """Gradients of one segment given its states S and masked scores A from the forward, dO (BH, nc, R, Dv) and the gradient of the state after it
    (BH, F, Dv) or None. Returns dq (BH, nc, R, F), dk (BH, nc, c, F), dv (BH, nc, c, Dv) and the
    gradient of the state before the segment (BH, F, Dv)."""
    BH, nc, c, F = kb.shape
    R, Dv = qb.shape[2], vb.shape[3]
    q3, k3, v3, do3 = qb.view(-1, R, F), kb.view(-1, c, F), vb.view(-1, c, Dv), dob.view(-1, R, Dv)
    qd3 = q3 if tab.qdec is None else _per_head(qb.clone(), b, tab.qdec).view(-1, R, F)
    qdo = torch.bmm(qd3.transpose(1, 2), do3).view(BH, nc, F, Dv)  # (Lambda Q_i)^T dO_i
    del qd3
    Gn = torch.empty(BH, nc, F, Dv, dtype=kb.dtype, device=kb.device)  # dL/d(state after chunk i)
    if g_out is None:
        Gn[:, nc - 1].zero_()
    else:
        Gn[:, nc - 1] = g_out
    for i in range(nc - 2, -1, -1):  # dS_(i+1) = (Lambda Q_(i+1))^T dO_(i+1) + lambda^c dS_(i+2)
        if tab.blk is None:
            torch.add(qdo[:, i + 1], Gn[:, i + 1], out=Gn[:, i])
        else:
            torch.addcmul(qdo[:, i + 1].view(b, -1, F, Dv), Gn[:, i + 1].view(b, -1, F, Dv), tab.blk, out=Gn[:, i].view(b, -1, F, Dv))
    first = Gn[:, 0] if tab.blk is None else (Gn[:, 0].view(b, -1, F, Dv) * tab.blk).view(BH, F, Dv)
    g_in = qdo[:, 0] + first  # gradient of the state before the segment
    del qdo
    G3 = Gn.view(-1, F, Dv)
    S3 = S.view(-1, F, Dv)

    dP = _mask_scores(torch.bmm(do3, v3.transpose(1, 2)).view(BH, nc, R, c), b, tab).view(-1, R, c)
    dq = torch.bmm(do3, S3.transpose(1, 2))  # dO_i S_i^T
    if tab.qdec is not None:
        _per_head(dq.view(BH, nc, R, F), b, tab.qdec)
    dq.baddbmm_(dP, k3)
    dk = torch.bmm(v3, G3.transpose(1, 2))  # V_i dS_(i+1)^T
    if tab.kdec is not None:
        _per_head(dk.view(BH, nc, c, F), b, tab.kdec)
    dk.baddbmm_(dP.transpose(1, 2), q3)
    del dP
    A = A.view(-1, R, c)  # the forward's masked scores
    kd3 = k3 if tab.kdec is None else _per_head(kb.clone(), b, tab.kdec).view(-1, c, F)
    dv = torch.bmm(kd3, G3)  # (Gamma K_i) dS_(i+1)
    dv.baddbmm_(A.transpose(1, 2), do3)
    return dq.view(BH, nc, R, F), dk.view(BH, nc, c, F), dv.view(BH, nc, c, Dv), g_in


class _ChunkedLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s0, log_decay, chunk):
        B, Hq, N, F = q.shape
        Hk, Dv = k.shape[1], v.shape[3]
        acc = _acc_dtype(q.dtype)
        qf, kf, vf = (t.to(acc).contiguous() for t in (q, k, v))
        state = torch.zeros(B * Hk, F, Dv, dtype=acc, device=q.device) if s0 is None else \
            s0.to(acc).reshape(B * Hk, F, Dv)
        segs = _segments(N, chunk)
        out = None if len(segs) == 1 else torch.empty(B, Hq, N, Dv, dtype=acc, device=q.device)
        saved = []
        for start, c, nc in segs:
            sl = slice(start, start + c * nc)
            tab = _Tables(log_decay, c, Hq // Hk, acc, q.device)
            qb = _to_rows(qf[:, :, sl], Hk, nc, c).contiguous()  # (B*Hk, nc, G*c, F)
            kb = kf[:, :, sl].reshape(B * Hk, nc, c, F).contiguous()  # (B*Hk, nc, c, F)
            vb = vf[:, :, sl].reshape(B * Hk, nc, c, Dv).contiguous()  # (B*Hk, nc, c, Dv)
            ob, S, state, A = _seg_forward(qb, kb, vb, tab, state, B)
            if out is None:
                out = _from_rows(ob, B, Hq)  # (B, Hq, N, Dv)
            else:
                out[:, :, sl] = _from_rows(ob, B, Hq)
            saved += [S, A]
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(q, k, v, log_decay, *saved)
        ctx.chunk = chunk
        ctx.has_s0 = s0 is not None
        ctx.set_materialize_grads(False)
        return out, state.view(B, Hk, F, Dv)

    @staticmethod
    def backward(ctx, dout, dstate):
        q, k, v, log_decay, *saved = ctx.saved_tensors
        B, Hq, N, F = q.shape
        Hk, Dv = k.shape[1], v.shape[3]
        acc = _acc_dtype(q.dtype)
        qf, kf, vf = (t.to(acc).contiguous() for t in (q, k, v))
        g = None if dstate is None else dstate.to(acc).reshape(B * Hk, F, Dv)
        dout = torch.zeros(B, Hq, N, Dv, dtype=acc, device=q.device) if dout is None else dout.to(acc).contiguous()
        segs = _segments(N, ctx.chunk)
        one = len(segs) == 1
        if not one:
            dq = torch.empty(B, Hq, N, F, dtype=acc, device=q.device)
            dk = torch.empty(B, Hk, N, F, dtype=acc, device=q.device)
            dv = torch.empty(B, Hk, N, Dv, dtype=acc, device=q.device)
        for (start, c, nc), S, A in reversed(list(zip(segs, saved[0::2], saved[1::2]))):
            sl = slice(start, start + c * nc)
            tab = _Tables(log_decay, c, Hq // Hk, acc, q.device)
            qb = _to_rows(qf[:, :, sl], Hk, nc, c).contiguous()
            kb = kf[:, :, sl].reshape(B * Hk, nc, c, F).contiguous()
            vb = vf[:, :, sl].reshape(B * Hk, nc, c, Dv).contiguous()
            dob = _to_rows(dout[:, :, sl], Hk, nc, c).contiguous()
            dqb, dkb, dvb, g = _seg_backward(qb, kb, vb, tab, S, A, dob, g, B)
            if one:
                dq = _from_rows(dqb, B, Hq)
                dk, dv = dkb.view(B, Hk, N, F), dvb.view(B, Hk, N, Dv)
            else:
                dq[:, :, sl] = _from_rows(dqb, B, Hq)
                dk[:, :, sl] = dkb.reshape(B, Hk, nc * c, F)
                dv[:, :, sl] = dvb.reshape(B, Hk, nc * c, Dv)
        ds0 = g.view(B, Hk, F, Dv) if ctx.has_s0 else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds0, None, None


def _check_log_decay(decay: torch.Tensor | None, hk: int) -> torch.Tensor | None:
    if decay is None:
        return None
    if not isinstance(decay, torch.Tensor) or decay.shape != (hk,):
        got = tuple(decay.shape) if isinstance(decay, torch.Tensor) else type(decay).__name__
        raise ValueError(f"decay: expected a tensor of shape (Hk,) = ({hk},), got {got}")
    if decay.requires_grad:
        raise ValueError("decay: the chunked kernel treats the decay as a constant; got a decay that requires grad")
    d = decay.detach().to(torch.float64)
    if not bool(((d > 0) & (d <= 1)).all()):
        raise ValueError(f"decay: expected values in (0, 1], got {d.tolist()}")
    if bool((d == 1).all()):
        return None
    return torch.log(d)


def chunked_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK, initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal (decayed) linear attention on mapped features, chunk by chunk.

    Args:
        q: (B, Hq, N, F) query features (feature map and score scale already applied).
        k: (B, Hk, N, F) key features; v: (B, Hk, N, Dv); Hq % Hk == 0.
        decay: (Hk,) per key/value head decay in (0, 1], or None for no decay (lambda = 1).
        chunk: tokens per chunk (any N works; the last chunk may be shorter).
        initial_state: (B, Hk, F, Dv) state summarising earlier tokens, or None (zeros).

    Returns:
        out (B, Hq, N, Dv) and the final state (B, Hk, F, Dv), both in float32 (or float64 for float64
        inputs); both differentiable (hand-written backward), including through ``initial_state``.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    log_decay = _check_log_decay(decay, k.shape[1])
    return _ChunkedLinearAttention.apply(q, k, v, initial_state, log_decay, chunk)


def global_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention through the global key-value summary: o_i = q_i (sum_j k_j v_j^T).

    q (B, Hq, Nq, F), k (B, Hk, Nk, F), v (B, Hk, Nk, Dv) -> (B, Hq, Nq, Dv) in float32 (or wider).
    O((Nq + Nk) F Dv) time, O(F Dv) state; autograd differentiates the two matmuls.
    """
    acc = _acc_dtype(q.dtype)
    B, Hq, Nq, F = q.shape
    Hk = k.shape[1]
    kv = torch.matmul(k.to(acc).transpose(-1, -2), v.to(acc))  # (B, Hk, F, Dv)
    out = torch.matmul(q.to(acc).reshape(B, Hk, (Hq // Hk) * Nq, F), kv)  # (B, Hk, G*Nq, Dv)
    return out.view(B, Hq, Nq, -1)


def decay_weights(decay: torch.Tensor | None, length: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """(Hk, length, 1) weights lambda^(length - 1 - j): each key's decay at the end of ``length`` tokens."""
    if decay is None:
        return None
    j = torch.arange(length, device=device, dtype=torch.float64)
    ld = torch.log(decay.detach().to(device=device, dtype=torch.float64)).view(-1, 1)  # (Hk, 1)
    return torch.exp(ld * (length - 1 - j).view(1, -1)).to(dtype).unsqueeze(-1)
