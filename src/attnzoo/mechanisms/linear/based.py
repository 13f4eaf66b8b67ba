"""BASED: linear attention with a 2nd-order Taylor feature map, beside short convolutions and a small
sliding window.

Paper: "Simple linear attention language models balance the recall-throughput tradeoff", Arora, Eyuboglu,
Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra, Re, arXiv 2402.18668. Official code:
https://github.com/HazyResearch/based
Approximates exp(q.k / sqrt(d')) by its Taylor polynomial: ``phi(x) = [1, x / d'^(1/4), vec(x x^T) / (sqrt(2)
sqrt(d'))]`` so that ``phi(q).phi(k) = 1 + q.k/sqrt(d') + (q.k)^2 / (2 d')`` (> 0 always), then normalised
causal linear attention ``y_i = phi(q_i) sum_{j<=i} phi(k_j) v_j^T / (phi(q_i) . sum_{j<=i} phi(k_j))`` with a
state of (1 + d' + d'^2) x d per head; the paper's layers project q, k to d' = 16 per head.

Two records:
- ``based`` (functional): the Taylor linear attention on SDPA-layout q, k (of dim d' = D), v.
- ``based_layer`` (module): one BASED sequence-mixer layer, ``mixer="linear"`` (projections to d' = 16 per
  head, Taylor map, normalised linear attention, output projection: the official ``LinearAttention``),
  ``"conv"`` (``BaseConv``: in-projection, causal depthwise short convolution of kernel 3, SiLU, gated by
  the other half, out-projection) or ``"window"`` (exact softmax attention over a sliding window: the
  registered ``sliding_window`` mechanism and its blocked kernel, :mod:`attnzoo.kernels.local`). The official
  360M model (train/configs/experiment/reference/based-360m.yaml) stacks 27 such layers: linear at
  1, 6, 11, 16, 21, window (256) at 2, 7, 12, 17, 22, conv elsewhere, each followed by an MLP.

Choices where the paper is silent (each an option or a documented convention):
- ``scale`` plays the role of 1/sqrt(d'): the map approximates exp(s) with s = scale q.k, i.e.
  ``phi(q).phi(k) = 1 + s + s^2 / 2``. attnzoo's default scale 1/sqrt(D), with D = d', is the paper's.
- The fast form uses the symmetric half of vec(x x^T): ``x_i x_j`` for i < j and ``x_i^2 / sqrt(2)`` on the
  diagonal (1 + d' + d'(d'+1)/2 = 153 features for d' = 16 instead of 273). The inner products, hence the
  outputs and gradients, are identical; the decode state is the packed one. Inside each chunk the fast form
  evaluates the kernel 1 + s + s^2/2 from q.k directly (as the paper's IO-aware kernels do), so the features
  only carry the state between chunks (:func:`chunked_taylor_attention` below, on the chunk engine of
  :mod:`attnzoo.kernels.chunked`).
- ``eps`` = 1e-12 is added to the denominator as in the official code; a row that sees no key returns 0.
- The window mixer has no rotary embedding (positions belong to the model, not the attention function).
- ``key_padding_mask`` in the conv mixer zeroes masked tokens before the convolution, so they cannot leak
  into their neighbours.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import (
    check_backend,
    check_bool,
    check_choice,
    check_float,
    check_heads,
    check_init_state,
    check_int,
    check_sequence_call,
    check_step,
)
from ...kernels import chunked  # chunked.PIECE_TOKENS read at call time (tests shrink it)
from ...kernels.chunked import (
    DEFAULT_CHUNK,
    ChunkTables,
    chunk_pieces,
    from_rows,
    mask_scores,
    scan_states,
    to_rows,
)
from ...reference import acc_dtype
from ...registry import PATTERNS, Mechanism, Option, register
from ...state import KVCache, RecurrentState
from .linear_attention import (
    CHUNK_OPTION,
    fast_linear_attention,
    init_linear_state,
    linear_state_step,
    quadratic_linear_attention,
)


def taylor_features(x: torch.Tensor, scale: float, *, packed: bool = True) -> torch.Tensor:
    """phi(x) with ``phi(q).phi(k) = 1 + s + s^2 / 2``, s = scale q.k.

    x (..., D) -> (..., 1 + D + D^2) (``packed=False``: the paper's map, ``[1, sqrt(scale) x,
    scale vec(x x^T) / sqrt(2)]``) or (..., 1 + D + D (D + 1) / 2) (``packed=True``: the symmetric half).
    """
    D = x.shape[-1]
    ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    first = x * math.sqrt(scale)  # (..., D)
    if packed:
        i, j = torch.triu_indices(D, D, device=x.device)  # pairs i <= j
        w = torch.full(i.shape, float(scale), dtype=x.dtype, device=x.device)  # off-diagonal pairs count twice,
        w[i == j] = scale / math.sqrt(2.0)  # the diagonal once
        second = x[..., i] * x[..., j] * w  # (..., D (D + 1) / 2)
    else:
        second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * (scale / math.sqrt(2.0))  # (..., D^2)
    return torch.cat([ones, first, second], dim=-1)


def taylor_feature_dim(d: int, packed: bool = True) -> int:
    return 1 + d + (d * (d + 1) // 2 if packed else d * d)


def taylor_kernel(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel itself, ``1 + s + s^2 / 2`` with s = scale q k^T: (B, H, Nq, D) x (B, H, Nk, D) -> (B, H, Nq, Nk)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    return 1 + s + 0.5 * s * s


def based_reference(q, k, v, *, causal, key_padding_mask, scale, normalize, eps, chunk):
    """``[T(scale Q K^T) (.) M] V / (row sums + eps)`` with T(s) = 1 + s + s^2/2, M the causal mask."""
    acc = acc_dtype(q.dtype)
    G = q.shape[1] // k.shape[1]
    scores = taylor_kernel(q.to(acc), k.to(acc).repeat_interleave(G, dim=1), scale)  # (B, Hq, Nq, Nk)
    out = quadratic_linear_attention(q, k, v, causal=causal, normalize=normalize, eps=eps,
                                     key_padding_mask=key_padding_mask, scores=scores)
    return out.to(q.dtype)


def _taylor_qk(q, k, scale):
    acc = acc_dtype(q.dtype)
    return taylor_features(q.to(acc), scale), taylor_features(k.to(acc), scale)


# --------------------------------------------------------------------------------------------------------
# The fast form: packed Taylor features carry the chunk states, the polynomial is evaluated inside chunks
# (the chunk engine of attnzoo.kernels.chunked with BASED's intra-chunk kernel)
# --------------------------------------------------------------------------------------------------------
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


def _taylor_scores(qr, kr, tab: ChunkTables, scale: float, km, b: int):
    """Masked intra-chunk kernel values ``1 + s + s^2/2``, s = scale q.k, straight from q, k (d wide, not F):
    returns (A, s), both (BH, nc, R, c); ``km`` (B, nc, c) key mask or None."""
    BH, nc, R, d = qr.shape
    c = kr.shape[2]
    s = torch.bmm(qr.view(-1, R, d), kr.view(-1, c, d).transpose(1, 2)).mul_(scale).view(BH, nc, R, c)
    A = torch.mul(s, 0.5).add_(1).mul_(s).add_(1)  # 1 + s (1 + s / 2)
    mask_scores(A, b, tab)
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
        acc = acc_dtype(q.dtype)
        F = taylor_feature_dim(d)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v = (t.to(acc).contiguous() for t in (q, k, v))
        km_all = None if k_mask is None else k_mask.to(acc)
        pieces = chunk_pieces(N, chunk, max(1, chunked.PIECE_TOKENS // chunk))
        state = torch.zeros(B * Hk, F, Dv, dtype=acc, device=q.device) if s0 is None else \
            s0.to(acc).reshape(B * Hk, F, Dv)
        out = torch.empty(B, Hq, N, Dv, dtype=acc, device=q.device)
        saved = []
        for start, c, nc in pieces:
            sl = slice(start, start + c * nc)
            tab = ChunkTables(None, c, G, acc, q.device)
            qr = to_rows(q[:, :, sl], Hk, nc, c).contiguous()  # (BH, nc, R, d)
            R = qr.shape[2]
            kr = k[:, :, sl].reshape(B * Hk, nc, c, d).contiguous()  # (BH, nc, c, d)
            v3 = v[:, :, sl].reshape(B * Hk, nc, c, Dv).contiguous().view(-1, c, Dv)  # (BH*nc, c, Dv)
            km = None if km_all is None else km_all[:, sl].reshape(B, nc, c)
            fk = _key_features(kr, scale, km, B)  # (BH, nc, F, c)
            kv = torch.bmm(fk.view(-1, F, c), v3).view(-1, nc, F, Dv)  # phi(K_i)^T V_i
            del fk
            S, state = scan_states(kv, state, None, c, B)  # (BH, nc, F, Dv) before each chunk
            del kv
            fq = taylor_map(qr.transpose(-1, -2).contiguous(), scale, dim=-2)  # (BH, nc, F, R)
            o = torch.bmm(fq.view(-1, F, R).transpose(1, 2), S.view(-1, F, Dv))  # inter-chunk term
            del fq
            A, _ = _taylor_scores(qr, kr, tab, scale, km, B)
            o.baddbmm_(A.view(-1, R, c), v3)  # intra-chunk term
            out[:, :, sl] = from_rows(o.view(B * Hk, nc, R, Dv), B, Hq)
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
            tab = ChunkTables(None, c, G, acc, q.device)
            qr = to_rows(q[:, :, sl], Hk, nc, c).contiguous()  # (BH, nc, R, d)
            R = qr.shape[2]
            kr = k[:, :, sl].reshape(B * Hk, nc, c, d).contiguous()
            v3 = v[:, :, sl].reshape(B * Hk, nc, c, Dv).contiguous().view(-1, c, Dv)
            km = None if km_all is None else km_all[:, sl].reshape(B, nc, c)
            do3 = to_rows(dout[:, :, sl], Hk, nc, c).contiguous().view(-1, R, Dv)  # (BH*nc, R, Dv)
            qT = qr.transpose(-1, -2).contiguous()  # (BH, nc, d, R)
            fq = taylor_map(qT, scale, dim=-2)  # (BH, nc, F, R)
            qdo = torch.bmm(fq.view(-1, F, R), do3).view(-1, nc, F, Dv)  # phi(Q_i)^T dO_i
            del fq
            g0 = torch.zeros(B * Hk, F, Dv, dtype=acc, device=q.device) if g is None else g
            Gn, g = scan_states(qdo, g0, None, c, B, reverse=True)  # gradient of the state after each chunk
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
            mask_scores(dA, B, tab)
            if km is not None:
                dA.view(B, -1, nc, R, c).mul_(km.view(B, 1, nc, 1, c))
            ds = dA.mul_(s.add_(1)).mul_(scale).view(-1, R, c)  # d(1 + s + s^2/2)/ds = 1 + s
            dqr = torch.baddbmm(dqT.view(-1, d, R).transpose(1, 2), ds, kr.view(-1, c, d))  # (BH*nc, R, d)
            dkr = torch.baddbmm(dkT.view(-1, d, c).transpose(1, 2), ds.transpose(1, 2), qr.view(-1, R, d))
            dq[:, :, sl] = from_rows(dqr.view(-1, nc, R, d), B, Hq)
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
    check_int("chunk", chunk)
    return _ChunkedTaylorAttention.apply(q, k, v, initial_state, float(scale), chunk, key_padding_mask)


def based_fast(q, k, v, *, causal, key_padding_mask, scale, normalize, eps, chunk):
    """Causal: :func:`chunked_taylor_attention` (packed Taylor features for the
    chunk states, computed piece by piece and never stored, ~10x wider than q, k; the polynomial
    1 + s + s^2/2 from q.k inside chunks); non-causal: the global summary. Never N x N."""
    phi = functools.partial(taylor_features, scale=scale)
    kernel = functools.partial(chunked_taylor_attention, scale=scale)
    out = fast_linear_attention(q, k, v, causal=causal, normalize=normalize, eps=eps,
                                key_padding_mask=key_padding_mask, chunk=chunk, q_map=phi, k_map=phi,
                                causal_kernel=kernel)
    return out.to(q.dtype)


def based_init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, normalize, eps, chunk):
    return init_linear_state(batch, kv_heads, taylor_feature_dim, value_dim, normalize=normalize, dtype=dtype,
                             device=device, head_dim=head_dim)


def based_step(q, k, v, state, *, scale, key_padding_mask=None, normalize, eps, chunk):
    """Decode T tokens on the packed (kv, z) state: (1 + d' + d'(d'+1)/2) x (Dv + 1) numbers per head."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=RecurrentState)
    qf, kf = _taylor_qk(q, k, scale)
    out = linear_state_step(qf, kf, v, state, normalize=normalize, eps=eps, key_padding_mask=key_padding_mask,
                            chunk=chunk)
    return out.to(q.dtype)


BASED_OPTIONS = (
    Option("normalize", True, bool, doc="divide by phi(q) . sum phi(k) (the paper's); False = numerator only"),
    Option("eps", 1e-12, float, low=0.0, doc="added to the denominator (official 1e-12)"),
    CHUNK_OPTION,
)

BASED = register(Mechanism(
    name="based",
    aliases=("taylor_linear", "based_linear"),
    family="linear",
    catalog="P118",
    title="Simple linear attention language models balance the recall-throughput tradeoff",
    arxiv="2402.18668",
    code="https://github.com/HazyResearch/based",
    summary="Normalised linear attention with the 2nd-order Taylor map of exp(q.k/sqrt(d')); q, k of dim d' (16).",
    patterns=PATTERNS,
    exact=False,
    state="recurrent",
    complexity="time O(N C (d'^2 + Dv) + N d'^2 Dv), memory O(N (C + d'^2)); decode state O(d'^2 Dv) per head",
    reference=based_reference,
    fast=based_fast,
    step=based_step,
    init_state=based_init_state,
    options=BASED_OPTIONS,
    permutation_equivariant=True,
    test_options={"chunk": 3},
    test_sizes={"head_dim": 4},
    notes="D is the feature dimension d' (use 16 as the paper; the state grows as D^2); scale plays 1/sqrt(d'). "
          "The layer (projections, short convolution, sliding window) is `based_layer`.",
))


# --------------------------------------------------------------------------------------------------------
# The BASED layer (module)
# --------------------------------------------------------------------------------------------------------
MIXERS = ("linear", "conv", "window")


class BasedLayer(nn.Module):
    """One BASED sequence mixer: x (B, N, dim) -> (B, N, dim), causal.

    ``mixer="linear"``: q, k = x W_q, x W_k in d' = ``feature_dim`` per head, v = x W_v (dim / heads per
    head), Taylor linear attention, out-projection. ``"conv"``: BaseConv, ``out(silu(conv(u1)) * u2)`` with
    ``[u1, u2] = in(x)`` of width ``expand * dim / 2`` each. ``"window"``: softmax attention over the last
    ``window`` tokens (the ``sliding_window`` mechanism in attnzoo's generic attention layer).

    Decoding: ``state = layer.init_state(batch)`` (a :class:`RecurrentState`: ``kv``/``z`` for linear, the
    last ``kernel_size - 1`` inputs for conv; a ``SlidingWindowCache`` for window), then
    ``out, state = layer(x_new, state=state)``.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = True,
                 mixer: str = "linear", feature_dim: int = 16, normalize: bool = True, eps: float = 1e-12,
                 kernel_size: int = 3, expand: int = 4, window: int = 64, chunk: int = 64,
                 backend: str = "auto") -> None:
        super().__init__()
        if causal is not True:
            raise ValueError(f"causal: a BASED layer is causal (patterns ['causal_self']), got causal={causal!r}")
        dim, heads, _, self.head_dim = check_heads(dim, heads, kv_heads, gqa=False,
                                                   what="BASED (one key/value head per head)")
        check_choice("mixer", mixer, MIXERS)
        self.dim, self.heads, self.mixer = dim, heads, mixer
        self.feature_dim, self.normalize = check_int("feature_dim", feature_dim), check_bool("normalize", normalize)
        self.eps, self.chunk = check_float("eps", eps, low=0.0), check_int("chunk", chunk)
        self.kernel_size, self.window = check_int("kernel_size", kernel_size), check_int("window", window)
        expand = check_int("expand", expand)
        self.backend = check_backend(backend)
        if mixer == "linear":
            self.proj_q = nn.Linear(dim, feature_dim * heads, bias=False)
            self.proj_k = nn.Linear(dim, feature_dim * heads, bias=False)
            self.proj_v = nn.Linear(dim, heads * self.head_dim, bias=False)
            self.out_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        elif mixer == "conv":
            self.d_inner = expand * dim // 2
            self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=True)
            self.conv = nn.Conv1d(self.d_inner, self.d_inner, kernel_size, groups=self.d_inner, bias=False)
            self.out_proj = nn.Linear(self.d_inner, dim, bias=True)
        else:
            from ...layers import Attention

            self.attn = Attention(dim, heads, mechanism="sliding_window", causal=True, window=window,
                                  backend=backend)

    def extra_repr(self) -> str:
        return f"mixer={self.mixer!r}, dim={self.dim}, heads={self.heads}, feature_dim={self.feature_dim}"

    # -- state ---------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None):
        w = next(self.parameters())
        dtype, device = (w.dtype if dtype is None else dtype), (w.device if device is None else device)
        if self.mixer == "linear":
            return init_linear_state(batch_size, self.heads, taylor_feature_dim(self.feature_dim), self.head_dim,
                                     normalize=self.normalize, dtype=dtype, device=device)
        if self.mixer == "conv":
            spec = check_init_state(batch=batch_size, dtype=dtype, device=device)
            return RecurrentState(conv=torch.zeros(batch_size, self.kernel_size - 1, self.d_inner, dtype=dtype,
                                                   device=spec["device"])).built_for(**spec)
        return self.attn.init_state(batch_size, dtype=dtype, device=device)

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state=None):
        """x (B, N, dim) -> (B, N, dim), or ``(out, state)`` when decoding with a state."""
        if context is not None:
            raise ValueError("context: a BASED layer is causal self attention (pattern 'causal_self'); got a context")
        check_sequence_call(self, x, key_padding_mask=key_padding_mask, state=state,
                            state_type=KVCache if self.mixer == "window" else RecurrentState)
        if self.mixer == "window":
            self.attn.backend = self.backend
            return self.attn(x, key_padding_mask=key_padding_mask, state=state)
        out = self._linear(x, key_padding_mask, state) if self.mixer == "linear" else \
            self._conv(x, key_padding_mask, state)
        return (out, state) if state is not None else out

    def _linear(self, x, key_padding_mask, state):
        B, N, _ = x.shape
        H, d = self.heads, self.feature_dim
        q = self.proj_q(x).view(B, N, H, d).transpose(1, 2)  # (B, H, N, d')
        k = self.proj_k(x).view(B, N, H, d).transpose(1, 2)  # (B, H, N, d')
        v = self.proj_v(x).view(B, N, H, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        scale = 1.0 / math.sqrt(d)
        opts = dict(normalize=self.normalize, eps=self.eps, chunk=self.chunk)
        if state is not None:
            y = based_step(q, k, v, state, scale=scale, key_padding_mask=key_padding_mask, **opts)
        else:
            fn = based_reference if self.backend == "reference" else based_fast
            y = fn(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale, **opts)  # (B, H, N, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, H * self.head_dim))  # (B, N, dim)

    def _conv(self, x, key_padding_mask, state):
        B, N, _ = x.shape
        u1, u2 = self.in_proj(x).split(self.d_inner, dim=-1)  # (B, N, d_inner) each
        if key_padding_mask is not None:
            u1 = u1 * key_padding_mask.view(B, N, 1).to(u1.dtype)  # masked tokens reach no neighbour
        K = self.kernel_size
        past = state["conv"] if state is not None else u1.new_zeros(B, K - 1, self.d_inner)  # (B, K-1, d_inner)
        seq = torch.cat([past.to(u1.dtype), u1], dim=1)  # (B, K-1+N, d_inner): causal left context
        w = self.conv.weight[:, 0]  # (d_inner, K): nn.Conv1d's layout (the official checkpoint's)
        y = sum(seq[:, i:i + N] * w[:, i] for i in range(K))  # (B, N, d_inner): causal depthwise convolution
        if state is not None:
            state.update(conv=seq[:, seq.shape[1] - (K - 1):].to(past.dtype))
            state.advance(N)
        return self.out_proj(F.silu(y) * u2)  # (B, N, dim)


def _based_layer(dim, heads, *, kv_heads=None, causal=False, backend="auto", **options):
    """``attnzoo.build("based_layer", ...)``: options validated against the record's ranges."""
    return BasedLayer(dim, heads, kv_heads=kv_heads, causal=causal, backend=backend,
                      **BASED_LAYER.resolve_options(options))


BASED_LAYER = register(Mechanism(
    name="based_layer",
    aliases=("based_mixer",),
    family="linear",
    catalog="P118",
    title="Simple linear attention language models balance the recall-throughput tradeoff",
    arxiv="2402.18668",
    code="https://github.com/HazyResearch/based",
    summary="A BASED mixer layer: Taylor linear attention (d'=16), gated short convolution or sliding window.",
    patterns=("causal_self",),
    exact=False,
    state="recurrent",
    complexity="linear: O(N d'^2 d), state O(d'^2 d); conv: O(N k d), state O(k d); window: O(N w d), state O(w d)",
    fast=based_fast,
    module=_based_layer,
    options=(
        Option("mixer", "linear", str, choices=MIXERS, doc="which BASED layer: Taylor linear attention, BaseConv "
               "short convolution, or sliding-window softmax"),
        Option("feature_dim", 16, int, low=1, doc="d': per-head q/k dimension of the Taylor map (linear mixer)"),
        Option("normalize", True, bool, doc="linear mixer: divide by phi(q) . sum phi(k)"),
        Option("eps", 1e-12, float, low=0.0, doc="linear mixer: added to the denominator"),
        Option("kernel_size", 3, int, low=1, doc="conv mixer: short convolution length"),
        Option("expand", 4, int, low=1, doc="conv mixer: in-projection width expand * dim, split in two halves"),
        Option("window", 64, int, low=1, doc="window mixer: keys per causal window"),
        CHUNK_OPTION,
    ),
    test_options={"feature_dim": 4, "chunk": 3},
    notes="mixer='linear' is the official LinearAttention (TaylorExp, d'=16); see tests for the conv and window "
          "mixers' conformance.",
))
