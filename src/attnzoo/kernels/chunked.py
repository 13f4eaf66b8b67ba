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

The chunk engine's pieces (:class:`ChunkTables`, :func:`to_rows`/:func:`from_rows`, :func:`scan_states`,
:func:`mask_scores`, :func:`chunk_pieces`) are public for variants that change the intra-chunk kernel:
BASED's Taylor form (``attnzoo.mechanisms.linear.based.chunked_taylor_attention``) evaluates 1 + s + s^2/2
inside a chunk from q, k directly and carries the state with packed Taylor features.

Grouped-query attention: the ``G = Hq / Hk`` query heads sharing a key/value head are stacked as rows of
one (G C x F) block against that head's keys and state, so the state is kept once per key/value head.
Low-precision inputs are computed in float32 (the state always accumulates in float32 or wider).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import check_int
from ..reference import acc_dtype

__all__ = [
    "DEFAULT_CHUNK", "PIECE_TOKENS", "ChunkTables", "chunk_pieces", "chunked_linear_attention", "decay_weights",
    "from_rows", "global_linear_attention", "mask_scores", "per_head", "scan_states", "to_rows",
]

DEFAULT_CHUNK = 64
"""Chunk size: about the feature dimension balances the intra-chunk (C) and state (F) costs."""


class ChunkTables:
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


def to_rows(x: torch.Tensor, hk: int, nc: int, c: int) -> torch.Tensor:
    """(B, Hq, nc*c, F) -> (B*Hk, nc, G*c, F): each chunk's G query heads stacked as rows (a view when
    G == 1 and x is contiguous)."""
    B, Hq, _, F = x.shape
    G = Hq // hk
    if G == 1:
        return x.reshape(B * hk, nc, c, F)
    x = x.reshape(B, hk, G, nc, c, F).transpose(2, 3)  # (B, Hk, nc, G, c, F)
    return x.reshape(B * hk, nc, G * c, F)


def from_rows(x: torch.Tensor, b: int, hq: int) -> torch.Tensor:
    """Inverse of :func:`to_rows`: (B*Hk, nc, G*c, D) -> (B, Hq, nc*c, D)."""
    BH, nc, R, D = x.shape
    hk = BH // b
    G = hq // hk
    c = R // G
    if G == 1:
        return x.view(b, hq, nc * c, D)
    return x.view(b, hk, nc, G, c, D).transpose(2, 3).reshape(b, hq, nc * c, D)


def per_head(x: torch.Tensor, b: int, table: torch.Tensor) -> torch.Tensor:
    """x (B*Hk, ...) multiplied in place by a per-head table (Hk, ...) broadcast over the batch."""
    x.view(b, -1, *x.shape[1:]).mul_(table)
    return x


def mask_scores(A: torch.Tensor, b: int, tab: ChunkTables) -> torch.Tensor:
    """A (B*Hk, nc, R, c) *= the chunk mask, in place (a plain lower triangle: tril_)."""
    if tab.tril:
        return A.tril_()
    return per_head(A, b, tab.mask)


def scan_states(x: torch.Tensor, s_in: torch.Tensor, log_decay: torch.Tensor | None, c: int, b: int,
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


def _seg_states(qb, kb, vb, tab: ChunkTables, s_in, b: int):
    """States and masked scores of one piece of nc chunks of c tokens, heads flattened: qb (BH, nc, R, F)
    with R = G*c, kb (BH, nc, c, F), vb (BH, nc, c, Dv), s_in (BH, F, Dv) the state before the piece.

    Returns the states before each chunk (BH, nc, F, Dv), the state after the piece (BH, F, Dv) and the
    masked scores (BH, nc, R, c). All bmm operands are contiguous 3-D views (no hidden copies)."""
    BH, nc, c, F = kb.shape
    R, Dv = qb.shape[2], vb.shape[3]
    q3, k3, v3 = qb.view(-1, R, F), kb.view(-1, c, F), vb.view(-1, c, Dv)
    kd3 = k3 if tab.kdec is None else per_head(kb.clone(), b, tab.kdec).view(-1, c, F)  # Gamma K_c
    kv = torch.bmm(kd3.transpose(1, 2), v3).view(BH, nc, F, Dv)  # each chunk's (Gamma K_c)^T V_c
    S, s_out = scan_states(kv, s_in, tab.log_decay, c, b)  # states before each chunk, state after the piece
    del kv
    A = mask_scores(torch.bmm(q3, k3.transpose(1, 2)).view(BH, nc, R, c), b, tab)  # masked scores
    return S, s_out, A


def _seg_forward(qb, kb, vb, tab: ChunkTables, s_in, b: int):
    """One piece's output (BH, nc, R, Dv), with its states, final state and masked scores
    (:func:`_seg_states`)."""
    BH, nc, c, F = kb.shape
    R, Dv = qb.shape[2], vb.shape[3]
    S, s_out, A = _seg_states(qb, kb, vb, tab, s_in, b)
    q3 = qb.view(-1, R, F)
    qd3 = q3 if tab.qdec is None else per_head(qb.clone(), b, tab.qdec).view(-1, R, F)  # Lambda Q_c
    out = torch.bmm(qd3, S.view(-1, F, Dv))  # (BH*nc, R, Dv): inter-chunk term
    del qd3
    out.baddbmm_(A.view(-1, R, c), vb.view(-1, c, Dv))  # + intra-chunk term
    return out.view(BH, nc, R, Dv), S, s_out, A


def _seg_backward(qb, kb, vb, tab: ChunkTables, S, A, dob, g_out, b: int):
    """Gradients of one segment given its states S and masked scores A from the forward, dO (BH, nc, R, Dv)
    and the gradient of the state after it (BH, F, Dv) or None. Returns dq (BH, nc, R, F), dk (BH, nc, c, F),
    dv (BH, nc, c, Dv) and the gradient of the state before the segment (BH, F, Dv)."""
    BH, nc, c, F = kb.shape
    R, Dv = qb.shape[2], vb.shape[3]
    q3, k3, v3, do3 = qb.view(-1, R, F), kb.view(-1, c, F), vb.view(-1, c, Dv), dob.view(-1, R, Dv)
    qd3 = q3 if tab.qdec is None else per_head(qb.clone(), b, tab.qdec).view(-1, R, F)
    qdo = torch.bmm(qd3.transpose(1, 2), do3).view(BH, nc, F, Dv)  # (Lambda Q_i)^T dO_i
    del qd3
    # dS_i = (Lambda Q_i)^T dO_i + lambda^c dS_(i+1): the same scan, run backwards from g_out
    g0 = torch.zeros(BH, F, Dv, dtype=kb.dtype, device=kb.device) if g_out is None else g_out
    Gn, g_in = scan_states(qdo, g0, tab.log_decay, c, b, reverse=True)  # (BH, nc, F, Dv): after each chunk
    del qdo
    G3 = Gn.view(-1, F, Dv)
    S3 = S.view(-1, F, Dv)

    dP = mask_scores(torch.bmm(do3, v3.transpose(1, 2)).view(BH, nc, R, c), b, tab).view(-1, R, c)
    dq = torch.bmm(do3, S3.transpose(1, 2))  # dO_i S_i^T
    if tab.qdec is not None:
        per_head(dq.view(BH, nc, R, F), b, tab.qdec)
    dq.baddbmm_(dP, k3)
    dk = torch.bmm(v3, G3.transpose(1, 2))  # V_i dS_(i+1)^T
    if tab.kdec is not None:
        per_head(dk.view(BH, nc, c, F), b, tab.kdec)
    dk.baddbmm_(dP.transpose(1, 2), q3)
    del dP
    A = A.view(-1, R, c)  # the forward's masked scores
    kd3 = k3 if tab.kdec is None else per_head(kb.clone(), b, tab.kdec).view(-1, c, F)
    dv = torch.bmm(kd3, G3)  # (Gamma K_i) dS_(i+1)
    dv.baddbmm_(A.transpose(1, 2), do3)
    return dq.view(BH, nc, R, F), dk.view(BH, nc, c, F), dv.view(BH, nc, c, Dv), g_in


def chunk_pieces(n: int, chunk: int, max_chunks: int | None) -> list[tuple[int, int, int]]:
    """(start, chunk size, number of chunks) of each piece: groups of at most ``max_chunks`` full chunks
    (all of them when None), then one shorter chunk if ``n % chunk``."""
    full, rest = divmod(n, chunk)
    step = full if max_chunks is None else max_chunks
    out = [(s * chunk, chunk, min(step, full - s)) for s in range(0, full, max(step, 1))]
    if rest:
        out.append((full * chunk, rest, 1))
    return out


PIECE_TOKENS = 4096
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
        acc = acc_dtype(q.dtype)
        fused = q_map is not None
        q, k, v = (t.contiguous() for t in (q, k, v))
        pieces = chunk_pieces(N, chunk, max(1, PIECE_TOKENS // chunk) if fused else None)
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
            tab = ChunkTables(log_decay, c, G, acc, q.device)
            qb = to_rows(qf, Hk, nc, c).contiguous()  # (B*Hk, nc, G*c, F)
            kb = kf.reshape(B * Hk, nc, c, F).contiguous()  # (B*Hk, nc, c, F)
            vb = v[:, :, sl].to(acc).reshape(B * Hk, nc, c, Dv).contiguous()  # (B*Hk, nc, c, Dv)
            s_before = state
            ob, S, state, A = _seg_forward(qb, kb, vb, tab, state, B)
            if out is None:
                out = from_rows(ob, B, Hq)  # (B, Hq, N, Dv)
            else:
                out[:, :, sl] = from_rows(ob, B, Hq)
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
        acc = acc_dtype(q.dtype)
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
            tab = ChunkTables(log_decay, c, G, acc, q.device)
            with torch.enable_grad():
                qx = q[:, :, sl].detach().requires_grad_(fused)
                kx = k[:, :, sl].detach().requires_grad_(fused)
                qf, kf = _features(qx, kx, slice(None), q_map, k_map,
                                   None if k_mask is None else k_mask[:, sl], acc)
            F = kf.shape[-1]
            qb = to_rows(qf.detach(), Hk, nc, c).contiguous()
            kb = kf.detach().reshape(B * Hk, nc, c, F).contiguous()
            vb = v[:, :, sl].to(acc).reshape(B * Hk, nc, c, Dv).contiguous()
            if fused:  # recompute this piece's states and scores from its boundary state
                S, _, A = _seg_states(qb, kb, vb, tab, saved[i], B)
            else:
                S, A = saved[2 * i], saved[2 * i + 1]
            dob = to_rows(dout[:, :, sl], Hk, nc, c).contiguous()
            dqb, dkb, dvb, g = _seg_backward(qb, kb, vb, tab, S, A, dob, g, B)
            del S, A, qb, kb, vb, dob
            dqf, dkf = from_rows(dqb, B, Hq), dkb.view(B, Hk, nc * c, F)
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
    check_int("chunk", chunk)
    if (q_map is None) != (k_map is None):
        raise ValueError("q_map, k_map: give both feature maps or neither")
    log_decay = _check_log_decay(decay, k.shape[1])
    return _ChunkedLinearAttention.apply(q, k, v, initial_state, log_decay, chunk, q_map, k_map, key_padding_mask)


def global_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention through the global key-value summary: o_i = q_i (sum_j k_j v_j^T).

    q (B, Hq, Nq, F), k (B, Hk, Nk, F), v (B, Hk, Nk, Dv) -> (B, Hq, Nq, Dv) in float32 (or wider).
    O((Nq + Nk) F Dv) time, O(F Dv) state; autograd differentiates the two matmuls.
    """
    acc = acc_dtype(q.dtype)
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
