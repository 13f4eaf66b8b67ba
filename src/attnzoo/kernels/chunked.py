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
only a scan over the ``N / C`` chunk states (in place, one small step per chunk).

Memory is O(N (C + F + Dv) + (N / C) F Dv) for a fixed chunk size: the (C x C) score blocks, the chunk
states, never an N x N matrix. Time is O(N C (F + Dv) + N F Dv).

The backward pass is written by hand (:class:`_ChunkedLinearAttention`): the forward saves its inputs, the
chunk states and the masked score blocks; the backward scans the state gradients in reverse,
``dS_c = (Lambda Q_c)^T dO_c + lambda^C dS_(c+1)``, then per chunk

    dQ_c = [(dO_c V_c^T) (.) M] K_c + Lambda dO_c S_c^T
    dK_c = [(dO_c V_c^T) (.) M]^T Q_c + Gamma V_c dS_(c+1)^T
    dV_c = [(Q_c K_c^T) (.) M]^T dO_c + (Gamma K_c) dS_(c+1)

(12 batched matmuls per chunk in all, 4 forward and 8 backward). A sequence length that is not a multiple
of C ends with one shorter chunk (its own decay tables), so no token is padded and the final state is exact.
With feature maps given to the kernel (``q_map``/``k_map``), features are computed piece by piece (~4096
tokens), never stored, and recomputed with their states and scores in the backward.

:func:`chunked_taylor_attention` is BASED's variant: packed 2nd-order Taylor features carry the state
across chunks, while inside a chunk the kernel 1 + s + s^2/2 (s = scale q.k) is evaluated from q, k
directly (16 wide instead of 153), forward and backward.

Grouped-query attention: the ``G = Hq / Hk`` query heads sharing a key/value head are stacked as rows of
one (G C x F) block against that head's keys and state, so the state is kept once per key/value head.
Low-precision inputs are computed in float32 (the state always accumulates in float32 or wider).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "chunked_linear_attention", "chunked_taylor_attention", "global_linear_attention", "decay_weights",
    "taylor_map", "DEFAULT_CHUNK",
]

DEFAULT_CHUNK = 64
"""Chunk size: about the feature dimension balances the intra-chunk (C) and state (F) costs."""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _Tables:
    """Decay tables of one chunk size c for Hk heads (all None / a plain triangle without decay)."""

    def __init__(self, log_decay: torch.Tensor | None, c: int, G: int, dtype: torch.dtype, device) -> None:
        self.log_decay = log_decay
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


def _per_head(x: torch.Tensor, b: int, table: torch.Tensor) -> torch.Tensor:
    """x (B*Hk, ...) multiplied in place by a per-head table (Hk, ...) broadcast over the batch."""
    x.view(b, -1, *x.shape[1:]).mul_(table)
    return x


def _mask_scores(A: torch.Tensor, b: int, tab: _Tables) -> torch.Tensor:
    """A (B*Hk, nc, R, c) *= the chunk mask, in place (a plain lower triangle: tril_)."""
    if tab.tril:
        return A.tril_()
    return _per_head(A, b, tab.mask)


def _scan(x: torch.Tensor, s_in: torch.Tensor, log_decay: torch.Tensor | None, c: int, b: int,
          reverse: bool = False):
    """Exclusive scan of chunk contributions with decay lambda^c per chunk.

    x (BH, nc, F, Dv) each chunk's own contribution, s_in (BH, F, Dv). Forward: ``S_0 = s_in``,
    ``S_(i+1) = lambda^c S_i + x_i``; returns S (BH, nc, F, Dv) and ``lambda^c S_(nc-1) + x_(nc-1)``.
    ``reverse`` runs from the end: ``S_(nc-1) = s_in``, ``S_i = lambda^c S_(i+1) + x_(i+1)``, and returns
    ``lambda^c S_0 + x_0`` (the backward pass's state gradients).

    A loop over chunks (nc = N / C small steps, in place). A two-level variant (a matmul inside blocks of
    16 chunks, a loop across blocks) measured slower here in CPU time and in wall time."""
    BH, nc, F, Dv = x.shape
    S = torch.empty_like(x)
    blk = None if log_decay is None else \
        torch.exp(log_decay.to(device=x.device, dtype=torch.float64) * c).to(x.dtype).view(-1, 1, 1)  # lambda^c
    order = range(nc - 1, 0, -1) if reverse else range(nc - 1)
    first, step = (nc - 1, -1) if reverse else (0, 1)
    S[:, first] = s_in
    for i in order:
        j = i + step  # S_j = lambda^c S_i + x_i
        if blk is None:
            torch.add(x[:, i], S[:, i], out=S[:, j])
        else:
            torch.addcmul(x[:, i].view(b, -1, F, Dv), S[:, i].view(b, -1, F, Dv), blk, out=S[:, j].view(b, -1, F, Dv))
    end = nc - 1 - first
    last = S[:, end] if blk is None else (S[:, end].view(b, -1, F, Dv) * blk).view(BH, F, Dv)
    return S, x[:, end] + last


def _seg_states(qb, kb, vb, tab: _Tables, s_in, b: int):
    """States and masked scores of one piece of nc chunks of c tokens, heads flattened: qb (BH, nc, R, F)
    with R = G*c, kb (BH, nc, c, F), vb (BH, nc, c, Dv), s_in (BH, F, Dv) the state before the piece.

    Returns the states before each chunk (BH, nc, F, Dv), the state after the piece (BH, F, Dv) and the
    masked scores (BH, nc, R, c). All bmm operands are contiguous 3-D views (no hidden copies)."""
    BH, nc, c, F = kb.shape
    R, Dv = qb.shape[2], vb.shape[3]
    q3, k3, v3 = qb.view(-1, R, F), kb.view(-1, c, F), vb.view(-1, c, Dv)
    kd3 = k3 if tab.kdec is None else _per_head(kb.clone(), b, tab.kdec).view(-1, c, F)  # Gamma K_c
    kv = torch.bmm(kd3.transpose(1, 2), v3).view(BH, nc, F, Dv)  # each chunk's (Gamma K_c)^T V_c
    S, s_out = _scan(kv, s_in, tab.log_decay, c, b)  # states before each chunk, state after the piece
    del kv
    A = _mask_scores(torch.bmm(q3, k3.transpose(1, 2)).view(BH, nc, R, c), b, tab)  # masked scores
    return S, s_out, A


def _seg_forward(qb, kb, vb, tab: _Tables, s_in, b: int):
    """One piece's output (BH, nc, R, Dv), with its states, final state and masked scores
    (:func:`_seg_states`)."""
    BH, nc, c, F = kb.shape
    R, Dv = qb.shape[2], vb.shape[3]
    S, s_out, A = _seg_states(qb, kb, vb, tab, s_in, b)
    q3 = qb.view(-1, R, F)
    qd3 = q3 if tab.qdec is None else _per_head(qb.clone(), b, tab.qdec).view(-1, R, F)  # Lambda Q_c
    out = torch.bmm(qd3, S.view(-1, F, Dv))  # (BH*nc, R, Dv): inter-chunk term
    del qd3
    out.baddbmm_(A.view(-1, R, c), vb.view(-1, c, Dv))  # + intra-chunk term
    return out.view(BH, nc, R, Dv), S, s_out, A


def _seg_backward(qb, kb, vb, tab: _Tables, S, A, dob, g_out, b: int):
    """Gradients of one segment given its states S and masked scores A from the forward, dO (BH, nc, R, Dv)
    and the gradient of the state after it (BH, F, Dv) or None. Returns dq (BH, nc, R, F), dk (BH, nc, c, F),
    dv (BH, nc, c, Dv) and the gradient of the state before the segment (BH, F, Dv)."""
    BH, nc, c, F = kb.shape
    R, Dv = qb.shape[2], vb.shape[3]
    q3, k3, v3, do3 = qb.view(-1, R, F), kb.view(-1, c, F), vb.view(-1, c, Dv), dob.view(-1, R, Dv)
    qd3 = q3 if tab.qdec is None else _per_head(qb.clone(), b, tab.qdec).view(-1, R, F)
    qdo = torch.bmm(qd3.transpose(1, 2), do3).view(BH, nc, F, Dv)  # (Lambda Q_i)^T dO_i
    del qd3
    # dS_i = (Lambda Q_i)^T dO_i + lambda^c dS_(i+1): the same scan, run backwards from g_out
    g0 = torch.zeros(BH, F, Dv, dtype=kb.dtype, device=kb.device) if g_out is None else g_out
    Gn, g_in = _scan(qdo, g0, tab.log_decay, c, b, reverse=True)  # (BH, nc, F, Dv): after each chunk
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


def _pieces(n: int, chunk: int, max_chunks: int | None) -> list[tuple[int, int, int]]:
    """(start, chunk size, number of chunks) of each piece: groups of at most ``max_chunks`` full chunks
    (all of them when None), then one shorter chunk if ``n % chunk``."""
    full, rest = divmod(n, chunk)
    step = full if max_chunks is None else max_chunks
    out = [(s * chunk, chunk, min(step, full - s)) for s in range(0, full, max(step, 1))]
    if rest:
        out.append((full * chunk, rest, 1))
    return out


_PIECE_TOKENS = 4096
"""With fused feature maps, the sequence is processed in pieces of about this many tokens, so that the
(wide) features exist for one piece at a time."""


class _ChunkedLinearAttention(torch.autograd.Function):
    """Two memory policies. Without feature maps (q, k are the features): the states and masked scores
    are kept from the forward (no recomputation: fastest). With feature maps (``q_map``/``k_map``, e.g.
    BASED's 153-wide Taylor features of 16-wide inputs): the features are computed piece by piece and
    never stored; the forward keeps only the state at each piece boundary, and the backward recomputes a
    piece's features, states and scores (two more batched matmuls) just before using them."""

    @staticmethod
    def forward(ctx, q, k, v, s0, log_decay, chunk, q_map, k_map, k_mask):
        B, Hq, N, _ = q.shape
        Hk, Dv = k.shape[1], v.shape[3]
        G = Hq // Hk
        acc = _acc_dtype(q.dtype)
        fused = q_map is not None
        q, k, v = (t.contiguous() for t in (q, k, v))
        pieces = _pieces(N, chunk, max(1, _PIECE_TOKENS // chunk) if fused else None)
        out = state = None
        saved = []
        for start, c, nc in pieces:
            sl = slice(start, start + c * nc)
            qf, kf = _features(q, k, sl, q_map, k_map, k_mask, acc)
            F = kf.shape[-1]
            if state is None:
                state = torch.zeros(B * Hk, F, Dv, dtype=acc, device=q.device) if s0 is None else \
                    s0.to(acc).reshape(B * Hk, F, Dv)
                if len(pieces) > 1:
                    out = torch.empty(B, Hq, N, Dv, dtype=acc, device=q.device)
            tab = _Tables(log_decay, c, G, acc, q.device)
            qb = _to_rows(qf, Hk, nc, c).contiguous()  # (B*Hk, nc, G*c, F)
            kb = kf.reshape(B * Hk, nc, c, F).contiguous()  # (B*Hk, nc, c, F)
            vb = v[:, :, sl].to(acc).reshape(B * Hk, nc, c, Dv).contiguous()  # (B*Hk, nc, c, Dv)
            s_before = state
            ob, S, state, A = _seg_forward(qb, kb, vb, tab, state, B)
            if out is None:
                out = _from_rows(ob, B, Hq)  # (B, Hq, N, Dv)
            else:
                out[:, :, sl] = _from_rows(ob, B, Hq)
            saved += [s_before] if fused else [S, A]
            del qb, kb, vb, ob, S, A
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(q, k, v, log_decay, k_mask, *saved)
        ctx.chunk, ctx.pieces, ctx.maps = chunk, pieces, (q_map, k_map)
        ctx.has_s0 = s0 is not None
        ctx.set_materialize_grads(False)
        return out, state.view(B, Hk, -1, Dv)

    @staticmethod
    def backward(ctx, dout, dstate):
        q, k, v, log_decay, k_mask, *saved = ctx.saved_tensors
        q_map, k_map = ctx.maps
        fused = q_map is not None
        B, Hq, N, _ = q.shape
        Hk, Dv = k.shape[1], v.shape[3]
        G = Hq // Hk
        acc = _acc_dtype(q.dtype)
        g = None if dstate is None else dstate.to(acc).reshape(B * Hk, -1, Dv)
        dout = torch.zeros(B, Hq, N, Dv, dtype=acc, device=q.device) if dout is None else dout.to(acc).contiguous()
        pieces = ctx.pieces
        one = len(pieces) == 1
        if not one:
            dq, dk = torch.empty(q.shape, dtype=acc, device=q.device), torch.empty(k.shape, dtype=acc, device=q.device)
            dv = torch.empty(B, Hk, N, Dv, dtype=acc, device=q.device)
        for i in range(len(pieces) - 1, -1, -1):
            start, c, nc = pieces[i]
            sl = slice(start, start + c * nc)
            tab = _Tables(log_decay, c, G, acc, q.device)
            with torch.enable_grad():
                qx = q[:, :, sl].detach().requires_grad_(fused)
                kx = k[:, :, sl].detach().requires_grad_(fused)
                qf, kf = _features(qx, kx, slice(None), q_map, k_map,
                                   None if k_mask is None else k_mask[:, sl], acc)
            F = kf.shape[-1]
            qb = _to_rows(qf.detach(), Hk, nc, c).contiguous()
            kb = kf.detach().reshape(B * Hk, nc, c, F).contiguous()
            vb = v[:, :, sl].to(acc).reshape(B * Hk, nc, c, Dv).contiguous()
            if fused:  # recompute this piece's states and scores from its boundary state
                S, _, A = _seg_states(qb, kb, vb, tab, saved[i], B)
            else:
                S, A = saved[2 * i], saved[2 * i + 1]
            dob = _to_rows(dout[:, :, sl], Hk, nc, c).contiguous()
            dqb, dkb, dvb, g = _seg_backward(qb, kb, vb, tab, S, A, dob, g, B)
            del S, A, qb, kb, vb, dob
            dqf, dkf = _from_rows(dqb, B, Hq), dkb.view(B, Hk, nc * c, F)
            if fused:  # through the feature maps (and the key mask), by autograd on this piece only
                dqf, dkf = torch.autograd.grad((qf, kf), (qx, kx), (dqf, dkf))
            elif k_mask is not None:
                dkf = dkf * k_mask[:, sl].view(B, 1, -1, 1).to(acc)
            if one:
                dq, dk, dv = dqf, dkf, dvb.view(B, Hk, N, Dv)
            else:
                dq[:, :, sl], dk[:, :, sl] = dqf, dkf
                dv[:, :, sl] = dvb.view(B, Hk, nc * c, Dv)
        ds0 = g.view(B, Hk, -1, Dv) if ctx.has_s0 else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds0, None, None, None, None, None


def _features(q, k, sl, q_map, k_map, k_mask, acc):
    """A piece's query and key features in the accumulation dtype (maps applied, masked keys zeroed)."""
    qf, kf = q[:, :, sl], k[:, :, sl]
    if q_map is not None:
        qf, kf = q_map(qf.to(acc)), k_map(kf.to(acc))
    qf, kf = qf.to(acc), kf.to(acc)
    if k_mask is not None:
        kf = kf * k_mask[:, sl].view(kf.shape[0], 1, -1, 1).to(acc)
    return qf, kf


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
    q_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal (decayed) linear attention, chunk by chunk.

    Args:
        q: (B, Hq, N, F) query features (feature map and score scale applied), or inputs of ``q_map``.
        k: (B, Hk, N, F) key features, or inputs of ``k_map``; v: (B, Hk, N, Dv); Hq % Hk == 0.
        decay: (Hk,) per key/value head decay in (0, 1], or None for no decay (lambda = 1).
        chunk: tokens per chunk (any N works; the last chunk may be shorter).
        initial_state: (B, Hk, F, Dv) state summarising earlier tokens, or None (zeros).
        q_map, k_map: feature maps (..., D) -> (..., F) applied inside the kernel, piece by piece, so that
            wide features are never stored (both or neither; differentiable torch functions).
        key_padding_mask: (B, N) bool, True = attend; masked keys' features are zeroed.

    Returns:
        out (B, Hq, N, Dv) and the final state (B, Hk, F, Dv), both in float32 (or float64 for float64
        inputs); both differentiable (hand-written backward), including through ``initial_state``.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    if (q_map is None) != (k_map is None):
        raise ValueError("q_map, k_map: give both feature maps or neither")
    log_decay = _check_log_decay(decay, k.shape[1])
    return _ChunkedLinearAttention.apply(q, k, v, initial_state, log_decay, chunk, q_map, k_map, key_padding_mask)


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


# --------------------------------------------------------------------------------------------------------
# Taylor-feature (BASED) linear attention: features for the states, the polynomial inside chunks
# --------------------------------------------------------------------------------------------------------
def taylor_feature_dim(d: int) -> int:
    """1 + d + d (d + 1) / 2: the packed 2nd-order Taylor features of a d-vector."""
    return 1 + d + d * (d + 1) // 2


def taylor_map(x: torch.Tensor, scale: float, dim: int = -1) -> torch.Tensor:
    """Packed 2nd-order Taylor features, ``phi(q).phi(k) = 1 + s + s^2 / 2`` with s = scale q.k.

    Along axis ``dim`` of x (d entries) -> 1 + d + d (d + 1) / 2 entries: [1, sqrt(scale) x, then for
    i = 0..d-1 the row scale x_i x_(i..d-1) with its first (diagonal) entry divided by sqrt(2)] (the upper
    triangle of scale x x^T; off-diagonal entries stand for both symmetric ones). Built row by row, no
    gathers; with ``dim=-2`` (features along the second-to-last axis, tokens last) every row is a
    contiguous block, which is how the chunked kernel uses it. (A full outer product followed by a
    gather of the triangle measured 1.6x slower end to end.)"""
    x = x.movedim(dim, -2)  # (..., d, T)
    d = x.shape[-2]
    out = torch.empty(*x.shape[:-2], taylor_feature_dim(d), x.shape[-1], dtype=x.dtype, device=x.device)
    out[..., 0, :] = 1
    torch.mul(x, scale ** 0.5, out=out[..., 1 : 1 + d, :])
    xs = x * scale
    off = 1 + d
    for i in range(d):
        row = out[..., off : off + d - i, :]
        torch.mul(xs[..., i : i + 1, :], x[..., i:, :], out=row)
        row[..., 0, :] *= 0.5 ** 0.5
        off += d - i
    return out.movedim(-2, dim)


def _pair_weights(d: int, scale: float, dtype, device) -> torch.Tensor:
    """(P, 1) d(feature)/d(x_i x_j) of the packed second-order features: scale, times sqrt(2) on the
    diagonal where the feature is scale x_i^2 / sqrt(2) and its derivative sqrt(2) scale x_i = w * 2 x_i / 2."""
    w = torch.full((d * (d + 1) // 2, 1), float(scale), dtype=dtype, device=device)
    off = 0
    for i in range(d):
        w[off] *= 2 ** 0.5
        off += d - i
    return w


def taylor_map_backward(x: torch.Tensor, g: torch.Tensor, scale: float, dim: int = -1) -> torch.Tensor:
    """The gradient w.r.t. x of ``(taylor_map(x, scale, dim) * g).sum()``; features along ``dim``.

    For row i of the second-order block (entries (i, j), j >= i, weighted gradients r): x_i receives
    sum_j r_j x_j and x_j (j > i) receives r_j x_i; three streaming operations per row."""
    x, g = x.movedim(dim, -2), g.movedim(dim, -2)  # (..., d, T), (..., F, T)
    d = x.shape[-2]
    dx = g[..., 1 : 1 + d, :] * scale ** 0.5
    r = g[..., 1 + d :, :] * _pair_weights(d, scale, g.dtype, g.device)  # (..., P, T)
    off = 0
    for i in range(d):
        row = r[..., off : off + d - i, :]
        dx[..., i, :] += (row * x[..., i:, :]).sum(-2)
        dx[..., i + 1 :, :].addcmul_(row[..., 1:, :], x[..., i : i + 1, :])
        off += d - i
    return dx.movedim(-2, dim)


def _taylor_scores(qr, kr, tab: _Tables, scale: float, km, b: int):
    """Masked intra-chunk kernel values ``1 + s + s^2/2``, s = scale q.k, straight from q, k (d wide, not F):
    returns (A, s), both (BH, nc, R, c); ``km`` (B, nc, c) key mask or None."""
    BH, nc, R, d = qr.shape
    c = kr.shape[2]
    s = torch.bmm(qr.view(-1, R, d), kr.view(-1, c, d).transpose(1, 2)).mul_(scale).view(BH, nc, R, c)
    A = torch.mul(s, 0.5).add_(1).mul_(s).add_(1)  # 1 + s (1 + s / 2)
    _mask_scores(A, b, tab)
    if km is not None:
        A.view(b, -1, nc, R, c).mul_(km.view(b, 1, nc, 1, c))
    return A, s


def _key_features(kr, scale, km, b):
    """Masked key features, feature-major: kr (BH, nc, c, d) -> (BH, nc, F, c)."""
    fk = taylor_map(kr.transpose(-1, -2).contiguous(), scale, dim=-2)  # (BH, nc, F, c)
    if km is not None:
        BH, nc, F, c = fk.shape
        fk.view(b, -1, nc, F, c).mul_(km.view(b, 1, nc, 1, c))
    return fk


class _ChunkedTaylorAttention(torch.autograd.Function):
    """BASED's linear attention (no decay): packed Taylor features carry the state between chunks; inside a
    chunk the kernel ``1 + s + s^2/2`` is evaluated from q.k directly (d = 16 wide instead of F = 153),
    in the forward and in the backward (``d/ds = 1 + s``). The features are kept feature-major per chunk,
    (F x c), so that building them and their gradients streams contiguous rows, and every product with
    them is a plain or transposed bmm. Pieces of ~4096 tokens; features are never stored (recomputed per
    piece in the backward); the chunk states are kept."""

    @staticmethod
    def forward(ctx, q, k, v, s0, scale, chunk, k_mask):
        B, Hq, N, d = q.shape
        Hk, Dv = k.shape[1], v.shape[3]
        G = Hq // Hk
        acc = _acc_dtype(q.dtype)
        F = taylor_feature_dim(d)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v = (t.to(acc).contiguous() for t in (q, k, v))
        km_all = None if k_mask is None else k_mask.to(acc)
        pieces = _pieces(N, chunk, max(1, _PIECE_TOKENS // chunk))
        state = torch.zeros(B * Hk, F, Dv, dtype=acc, device=q.device) if s0 is None else \
            s0.to(acc).reshape(B * Hk, F, Dv)
        out = torch.empty(B, Hq, N, Dv, dtype=acc, device=q.device)
        saved = []
        for start, c, nc in pieces:
            sl = slice(start, start + c * nc)
            tab = _Tables(None, c, G, acc, q.device)
            qr = _to_rows(q[:, :, sl], Hk, nc, c).contiguous()  # (BH, nc, R, d)
            R = qr.shape[2]
            kr = k[:, :, sl].reshape(B * Hk, nc, c, d).contiguous()  # (BH, nc, c, d)
            v3 = v[:, :, sl].reshape(B * Hk, nc, c, Dv).contiguous().view(-1, c, Dv)  # (BH*nc, c, Dv)
            km = None if km_all is None else km_all[:, sl].reshape(B, nc, c)
            fk = _key_features(kr, scale, km, B)  # (BH, nc, F, c)
            kv = torch.bmm(fk.view(-1, F, c), v3).view(-1, nc, F, Dv)  # phi(K_i)^T V_i
            del fk
            S, state = _scan(kv, state, None, c, B)  # (BH, nc, F, Dv) before each chunk
            del kv
            fq = taylor_map(qr.transpose(-1, -2).contiguous(), scale, dim=-2)  # (BH, nc, F, R)
            o = torch.bmm(fq.view(-1, F, R).transpose(1, 2), S.view(-1, F, Dv))  # inter-chunk term
            del fq
            A, _ = _taylor_scores(qr, kr, tab, scale, km, B)
            o.baddbmm_(A.view(-1, R, c), v3)  # intra-chunk term
            out[:, :, sl] = _from_rows(o.view(B * Hk, nc, R, Dv), B, Hq)
            saved.append(S)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(q, k, v, k_mask, *saved)
        ctx.scale, ctx.pieces, ctx.has_s0 = scale, pieces, s0 is not None
        ctx.set_materialize_grads(False)
        return out, state.view(B, Hk, F, Dv)

    @staticmethod
    def backward(ctx, dout, dstate):
        q, k, v, k_mask, *saved = ctx.saved_tensors
        scale = ctx.scale
        B, Hq, N, d = q.shape
        Hk, Dv = k.shape[1], v.shape[3]
        G = Hq // Hk
        acc = q.dtype
        F = taylor_feature_dim(d)
        km_all = None if k_mask is None else k_mask.to(acc)
        g = None if dstate is None else dstate.to(acc).reshape(B * Hk, F, Dv)
        dout = torch.zeros(B, Hq, N, Dv, dtype=acc, device=q.device) if dout is None else dout.to(acc).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for i in range(len(ctx.pieces) - 1, -1, -1):
            start, c, nc = ctx.pieces[i]
            S3 = saved[i].view(-1, F, Dv)  # (BH*nc, F, Dv): states before each chunk
            sl = slice(start, start + c * nc)
            tab = _Tables(None, c, G, acc, q.device)
            qr = _to_rows(q[:, :, sl], Hk, nc, c).contiguous()  # (BH, nc, R, d)
            R = qr.shape[2]
            kr = k[:, :, sl].reshape(B * Hk, nc, c, d).contiguous()
            v3 = v[:, :, sl].reshape(B * Hk, nc, c, Dv).contiguous().view(-1, c, Dv)
            km = None if km_all is None else km_all[:, sl].reshape(B, nc, c)
            do3 = _to_rows(dout[:, :, sl], Hk, nc, c).contiguous().view(-1, R, Dv)  # (BH*nc, R, Dv)
            qT = qr.transpose(-1, -2).contiguous()  # (BH, nc, d, R)
            fq = taylor_map(qT, scale, dim=-2)  # (BH, nc, F, R)
            qdo = torch.bmm(fq.view(-1, F, R), do3).view(-1, nc, F, Dv)  # phi(Q_i)^T dO_i
            del fq
            g0 = torch.zeros(B * Hk, F, Dv, dtype=acc, device=q.device) if g is None else g
            Gn, g = _scan(qdo, g0, None, c, B, reverse=True)  # gradient of the state after each chunk
            del qdo
            G3 = Gn.view(-1, F, Dv)
            dfq = torch.bmm(S3, do3.transpose(1, 2)).view(-1, nc, F, R)  # (dO_i S_i^T)^T, feature-major
            dqT = taylor_map_backward(qT, dfq, scale, dim=-2)  # (BH, nc, d, R)
            del dfq
            dfk = torch.bmm(G3, v3.transpose(1, 2)).view(-1, nc, F, c)  # (V_i dS_(i+1)^T)^T
            if km is not None:
                dfk.view(B, -1, nc, F, c).mul_(km.view(B, 1, nc, 1, c))
            dkT = taylor_map_backward(kr.transpose(-1, -2).contiguous(), dfk, scale, dim=-2)  # (BH, nc, d, c)
            del dfk
            fk = _key_features(kr, scale, km, B)  # (BH, nc, F, c)
            dvb = torch.bmm(fk.view(-1, F, c).transpose(1, 2), G3)  # phi(K_i) dS_(i+1)
            del fk, Gn, G3
            A, s = _taylor_scores(qr, kr, tab, scale, km, B)
            dvb.baddbmm_(A.view(-1, R, c).transpose(1, 2), do3)  # + A^T dO
            dA = torch.bmm(do3, v3.transpose(1, 2)).view(-1, nc, R, c)  # dO V^T
            _mask_scores(dA, B, tab)
            if km is not None:
                dA.view(B, -1, nc, R, c).mul_(km.view(B, 1, nc, 1, c))
            ds = dA.mul_(s.add_(1)).mul_(scale).view(-1, R, c)  # d(1 + s + s^2/2)/ds = 1 + s
            dqr = torch.baddbmm(dqT.view(-1, d, R).transpose(1, 2), ds, kr.view(-1, c, d))  # (BH*nc, R, d)
            dkr = torch.baddbmm(dkT.view(-1, d, c).transpose(1, 2), ds.transpose(1, 2), qr.view(-1, R, d))
            dq[:, :, sl] = _from_rows(dqr.view(-1, nc, R, d), B, Hq)
            dk[:, :, sl] = dkr.view(B, Hk, nc * c, d)
            dv[:, :, sl] = dvb.view(B, Hk, nc * c, Dv)
        ds0 = g.view(B, Hk, F, Dv) if ctx.has_s0 else None
        qt, kt, vt = ctx.dtypes
        return dq.to(qt), dk.to(kt), dv.to(vt), ds0, None, None, None


def chunked_taylor_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, chunk: int = DEFAULT_CHUNK,
    initial_state: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with the Taylor kernel ``1 + s + s^2/2`` (s = scale q.k), chunk by chunk.

    q (B, Hq, N, d), k (B, Hk, N, d), v (B, Hk, N, Dv); initial_state (B, Hk, F, Dv) over the packed features
    of :func:`taylor_map` (F = 1 + d + d(d+1)/2); key_padding_mask (B, N). Unnormalised: append a column of
    ones to v for the denominator. Returns out (B, Hq, N, Dv) and the final state (B, Hk, F, Dv) in float32
    (or float64), both differentiable.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    return _ChunkedTaylorAttention.apply(q, k, v, initial_state, float(scale), chunk, key_padding_mask)
