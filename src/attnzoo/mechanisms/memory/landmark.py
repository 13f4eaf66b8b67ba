"""Landmark Attention: grouped softmax over blocks represented by landmark tokens.

Paper: "Landmark Attention: Random-Access Infinite Context Length for Transformers", Mohtashami & Jaggi,
arXiv 2305.16300. Official code: https://github.com/epfml/landmark-attention
The sequence is cut into blocks of ``block_size`` regular tokens, each followed by a landmark token.
A query attends with one outer softmax to the regular tokens of its own block and to the landmarks of
earlier blocks; a token j of an earlier block b then gets weight ``w(L_b) * softmax_{j' in b}(s_j')_j``
(the landmark carries no value of its own). At inference each query retrieves only the ``top_k`` blocks
whose landmarks score highest (per query and head) and applies the same grouped softmax to them.

Layout (the official ``lm_benchmark``/``llama`` code): key position ``p`` is a landmark iff
``p % (block_size + 1) == block_size``; blocks are counted from position 0, so with bottom-right causal
alignment a query's role follows from its absolute position ``i + Nk - Nq``. The functional form takes
the interleaved sequence (landmarks included) and returns an output for every position, landmarks too,
as the official attention layer does; :class:`LandmarkAttention` inserts a learned landmark embedding
after every ``block_size`` tokens and drops the landmark outputs.

Choices where the paper is silent, checked against the official code:
- A query's own block's landmark is ignored, also when the query is that landmark.
- An earlier block whose regular tokens are all masked contributes nothing, but its landmark still takes
  outer-softmax mass (the official ``denom < 0.5 -> 0`` rule).
- ``top_k=None`` keeps every earlier block (the training-time grouped softmax); with ``top_k`` the
  selection is per query and per query head ("per_token_and_head" in the official cache). Positional
  re-indexing of retrieved blocks belongs to the model adapter.
- Selection is identical in every form (reference, fast, step) and on every CPU: the landmark scores that
  rank the blocks come from one function, :func:`attnzoo.kernels.select.selection_scores` (float64, fixed
  summation order, so the same query and landmark key give the same bits whatever kernel shapes a path
  uses), and exactly equal scores go to the earlier block. The outer-softmax weights themselves are
  computed by each path's own kernel; only the discrete choice has to be bitwise reproducible.
- :class:`LandmarkAttention` used alone, without positional encoding, gives every landmark the same key
  (they share one input embedding; the layer projects the embedding once, so the keys are bitwise equal);
  in the paper landmarks become block summaries through the layers below. With ``top_k`` every score
  then ties and the earliest blocks are retrieved. A layer of this kind cannot tell blocks apart by their
  landmark (the grouped softmax gives every earlier block the same outer weight), so a model that trains
  landmark attention should do what the paper does: ``LandmarkAttention(..., interleaved=True)`` takes
  the interleaved sequence, the model inserts a landmark token after every block (the official code
  inserts its ``mem_id`` token every ``mem_freq`` tokens of the data) and carries it through every layer,
  so that from the second layer on a landmark's key summarises its block (``interleave`` builds that
  sequence; the bench's quality model does this).
- The layer's decode state (:class:`LandmarkState`) counts input tokens; ``crop(n)`` keeps the first n
  tokens and the landmarks of the blocks they complete, which is the state a fresh decode of those n
  tokens builds (a block cut short loses its landmark).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import (
    check_backend,
    check_bool,
    check_int,
    check_same_device,
    check_sequence_call,
    check_state,
    check_step,
    check_tensor,
)
from ...kernels.gather import run_rows
from ...kernels.select import selection_scores, top_k_indices
from ...reference import acc_dtype, one_hot_values, repeat_kv
from ...registry import Mechanism, Option, register
from ._common import masked_lse, query_positions, rows_per_tile
from .landmark_state import LandmarkCache, LandmarkState


# --------------------------------------------------------------------------------------------------------
# Reference: dense scores, grouped softmax written out
# --------------------------------------------------------------------------------------------------------
def landmark_roles(nq: int, nk: int, block_size: int, key_padding_mask=None, device=None):
    """Bool masks (B|1, 1, Nq, Nk) of the three roles a key plays for a query.

    ``cur``: regular token of the query's own block, at or before the query (outer softmax);
    ``prev_tok``: regular token of an earlier block (inner softmax of its block);
    ``prev_lm``: landmark of an earlier block (outer softmax).
    """
    period = block_size + 1
    pq = query_positions(nq, nk, device).view(nq, 1)  # (Nq, 1)
    pk = torch.arange(nk, device=device).view(1, nk)  # (1, Nk)
    seen = (pk <= pq).view(1, 1, nq, nk)
    if key_padding_mask is not None:
        seen = seen & key_padding_mask.view(-1, 1, 1, nk)
    is_lm = (pk % period) == block_size  # (1, Nk)
    same = (pk // period) == (pq // period)  # (Nq, Nk)
    before = (pk // period) < (pq // period)  # (Nq, Nk)
    cur = seen & ~is_lm & same
    prev_tok = seen & ~is_lm & before
    prev_lm = seen & is_lm & before
    return cur, prev_tok, prev_lm


def retrieve_blocks(q: torch.Tensor, lm_keys: torch.Tensor, cand: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``top_k`` earlier blocks each query retrieves: the one selection rule of every form.

    q (B, Hk, G, T, D) unscaled queries, lm_keys (B, Hk, nl, D) landmark keys, cand bool broadcastable to
    (B, Hk, G, T, nl) (the landmarks a query may retrieve). Returns block indices (B, Hk, G, T, min(top_k,
    nl)), best first; exactly equal scores go to the earlier block. Indices past the candidates (fewer than
    ``top_k`` of them) point at non-candidates: callers keep ``cand`` at the returned indices.
    """
    sel = selection_scores(q, lm_keys.unsqueeze(2))  # (B, Hk, G, T, nl): bitwise the same in every form
    return top_k_indices(sel.masked_fill(~cand, float("-inf")), top_k)


def _retrieved_mask(q, lm_keys, cand, top_k) -> torch.Tensor:
    """:func:`retrieve_blocks` as a mask (B, Hk, G, T, nl): candidate and among the top_k."""
    cand = cand.expand(*q.shape[:-1], lm_keys.shape[-2])
    if lm_keys.shape[-2] <= top_k:  # every candidate is retrieved: no ranking needed
        return cand
    idx = retrieve_blocks(q, lm_keys, cand, top_k)
    return torch.zeros_like(cand).scatter(-1, idx, True) & cand


def landmark_reference(q, k, v, *, causal, key_padding_mask, scale, block_size, top_k):
    """Dense grouped softmax: all scores (B, Hq, Nq, Nk) are built, then the two softmaxes applied."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = Hq // Hk
    period = block_size + 1
    acc = acc_dtype(q.dtype)
    kf, vf = repeat_kv(k, G).to(acc), repeat_kv(v, G).to(acc)
    s = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    cur, prev_tok, prev_lm = (m.expand_as(s) for m in landmark_roles(Nq, Nk, block_size, key_padding_mask, q.device))
    if top_k is not None:  # retrieval: keep the best top_k earlier landmarks (landmark p = b*period + block_size)
        cand = prev_lm[..., block_size::period].reshape(B, Hk, G, Nq, -1)  # (B, Hk, G, Nq, nl)
        keep = _retrieved_mask(q.reshape(B, Hk, G, Nq, D), k[:, :, block_size::period], cand, top_k)
        chosen = torch.zeros_like(prev_lm)  # (B, Hq, Nq, Nk)
        chosen[..., block_size::period] = keep.reshape(B, Hq, Nq, -1)
        prev_lm = chosen
    nb = -(-Nk // period)
    pad = nb * period - Nk
    blocks = lambda x: F.pad(x, (0, pad)).view(B, Hq, Nq, nb, period)  # (B, Hq, Nq, nb, period)
    # Inner softmax: one per earlier block, over its regular tokens.
    s_blk, in_mask = blocks(s), blocks(prev_tok)
    lse_in, _ = masked_lse(s_blk, in_mask)  # (B, Hq, Nq, nb)
    p_in = torch.exp(s_blk.masked_fill(~in_mask, float("-inf")) - lse_in.unsqueeze(-1))  # (B, Hq, Nq, nb, period)
    # Outer softmax: own-block tokens and earlier landmarks.
    out_mask = cur | prev_lm
    lse_out, _ = masked_lse(s, out_mask)  # (B, Hq, Nq)
    w = torch.exp(s.masked_fill(~out_mask, float("-inf")) - lse_out.unsqueeze(-1))  # (B, Hq, Nq, Nk)
    w_lm = blocks(w)[..., block_size]  # (B, Hq, Nq, nb): outer weight of each block's landmark
    probs = (p_in * w_lm.unsqueeze(-1)).reshape(B, Hq, Nq, nb * period)[..., :Nk]  # earlier blocks' tokens
    probs = probs + w.masked_fill(~cur, 0.0)  # + own block; landmarks themselves carry no value
    return torch.matmul(probs, vf).to(q.dtype)  # (B, Hq, Nq, Dv)


def landmark_operator(q, k, v, *, causal, key_padding_mask, scale, block_size, top_k):
    """Effective operator (B, Hq, Nq, Nk): the reference's ``probs`` -- own-block tokens by the outer softmax,
    retrieved blocks' tokens by their landmark's outer weight times the inner softmax, 0 on landmarks and on
    blocks not retrieved. The reference is linear in v with weights from q, k only: run on one-hot values."""
    return landmark_reference(q, k, one_hot_values(k, q.dtype), causal=causal, key_padding_mask=key_padding_mask,
                              scale=scale, block_size=block_size, top_k=top_k)


# --------------------------------------------------------------------------------------------------------
# Fast: tiled grouped softmax with a hand-written backward (never the N x N matrix)
# --------------------------------------------------------------------------------------------------------
class _Tile:
    """Scores and masks of query rows r0:r1 against the blocks they can see (blocks 0..last).

    ``qs``: scaled queries (B, Hk, G, Nq, D) for the scores; ``qsel``: the unscaled ones for the selection.
    """

    def __init__(self, qs, qsel, kb, valid, r0, r1, off, block_size, top_k):
        period = block_size + 1
        dev = qs.device
        pos = torch.arange(r0, r1, device=dev) + off  # (T,)
        bq = pos // period
        self.nbt = nbt = int(bq.max()) + 1
        self.S = torch.einsum("bhgtd,bhnpd->bhgtnp", qs[:, :, :, r0:r1], kb[:, :, :nbt])  # (B, Hk, G, T, nbt, P)
        blk = torch.arange(nbt, device=dev)
        kpos = blk.view(nbt, 1) * period + torch.arange(period, device=dev).view(1, period)  # (nbt, P)
        seen = (kpos.view(1, nbt, period) <= pos.view(-1, 1, 1)) & valid[:, None, :nbt]  # (B|1, T, nbt, P)
        is_lm = torch.arange(period, device=dev) == block_size  # (P,)
        same = (blk.view(1, nbt) == bq.view(-1, 1)).unsqueeze(-1)  # (T, nbt, 1)
        before = (blk.view(1, nbt) < bq.view(-1, 1)).unsqueeze(-1)
        sh = lambda m: m.unsqueeze(1).unsqueeze(1)  # (B|1, 1, 1, T, nbt, P)
        self.cur = sh(seen & ~is_lm & same)
        self.prev_tok = sh(seen & ~is_lm & before)
        lm_cand = sh(seen & is_lm & before)[..., block_size].expand(self.S.shape[:-1])  # (B, Hk, G, T, nbt)
        if top_k is not None:  # qsel: the unscaled queries, kb[..., block_size, :]: the landmark keys
            lm_cand = _retrieved_mask(qsel[:, :, :, r0:r1], kb[:, :, :nbt, block_size], lm_cand, top_k)
        self.lm_sel = lm_cand
        self.lse_in, _ = masked_lse(self.S, self.prev_tok.expand_as(self.S))  # (B, Hk, G, T, nbt)
        outer = self.cur.expand_as(self.S).clone()
        outer[..., block_size] = lm_cand
        self.outer = outer

    def probs(self, lse_out):
        """Final weights (B, Hk, G, T, nbt, P) given the outer log-normaliser (B, Hk, G, T)."""
        ninf = float("-inf")
        lo = lse_out[..., None, None]
        self.log_wl = self.S[..., -1].masked_fill(~self.lm_sel, ninf) - lse_out.unsqueeze(-1)  # (B, Hk, G, T, nbt)
        lp_cur = self.S.masked_fill(~self.cur, ninf) - lo
        lp_prev = (self.S - self.lse_in.unsqueeze(-1) + self.log_wl.unsqueeze(-1)).masked_fill(~self.prev_tok, ninf)
        return torch.exp(torch.maximum(lp_cur, lp_prev))  # the two sets are disjoint


class _LandmarkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_size, scale, key_padding_mask, top_k):
        B, Hq, Nq, D = q.shape
        Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hk
        acc = acc_dtype(q.dtype)
        period = block_size + 1
        nb = -(-Nk // period)
        pad = nb * period - Nk
        kb = F.pad(k.to(acc), (0, 0, 0, pad)).view(B, Hk, nb, period, D)  # (B, Hk, nb, P, D)
        vb = F.pad(v.to(acc), (0, 0, 0, pad)).view(B, Hk, nb, period, Dv)  # (B, Hk, nb, P, Dv)
        valid = torch.zeros(1, nb * period, dtype=torch.bool, device=q.device)
        valid[:, :Nk] = True
        if key_padding_mask is not None:
            valid = valid & F.pad(key_padding_mask, (0, pad))
        valid = valid.view(-1, nb, period)  # (B|1, nb, P)
        qsel = q.reshape(B, Hk, G, Nq, D)
        qs = (q.to(acc) * scale).view(B, Hk, G, Nq, D)  # scale folded into the queries
        out = torch.zeros(B, Hk, G, Nq, Dv, dtype=acc, device=q.device)  # (B, Hk, G, Nq, Dv)
        lse = torch.zeros(B, Hk, G, Nq, dtype=acc, device=q.device)  # (B, Hk, G, Nq)
        off = Nk - Nq
        step = rows_per_tile(B * Hq * (Nk + period))
        for r0 in range(0, Nq, step):
            r1 = min(Nq, r0 + step)
            t = _Tile(qs, qsel, kb, valid, r0, r1, off, block_size, top_k)
            lse_out = _lse2(t.S, t.outer)  # (B, Hk, G, T): outer log-normaliser
            p = t.probs(lse_out)  # (B, Hk, G, T, nbt, P)
            out[:, :, :, r0:r1] = torch.einsum("bhgtnp,bhnpe->bhgte", p, vb[:, :, : t.nbt])
            lse[:, :, :, r0:r1] = lse_out
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.args = (block_size, scale, top_k, key_padding_mask is not None)
        return out.view(B, Hq, Nq, Dv).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        block_size, scale, top_k, has_mask = ctx.args
        if not has_mask:
            key_padding_mask = None
        B, Hq, Nq, D = q.shape
        Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hk
        acc = acc_dtype(q.dtype)
        period = block_size + 1
        nb = -(-Nk // period)
        pad = nb * period - Nk
        kb = F.pad(k.to(acc), (0, 0, 0, pad)).view(B, Hk, nb, period, D)
        vb = F.pad(v.to(acc), (0, 0, 0, pad)).view(B, Hk, nb, period, Dv)
        valid = torch.zeros(1, nb * period, dtype=torch.bool, device=q.device)
        valid[:, :Nk] = True
        if key_padding_mask is not None:
            valid = valid & F.pad(key_padding_mask, (0, pad))
        valid = valid.view(-1, nb, period)
        qsel = q.reshape(B, Hk, G, Nq, D)
        qs = (q.to(acc) * scale).view(B, Hk, G, Nq, D)
        do = dout.to(acc).view(B, Hk, G, Nq, Dv)  # (B, Hk, G, Nq, Dv)
        delta = (do * out).sum(-1)  # (B, Hk, G, Nq): sum_j P_ij dP_ij
        dq = torch.zeros_like(qs)  # (B, Hk, G, Nq, D)
        dkb = torch.zeros_like(kb)  # (B, Hk, nb, P, D)
        dvb = torch.zeros_like(vb)  # (B, Hk, nb, P, Dv)
        off = Nk - Nq
        step = rows_per_tile(B * Hq * (Nk + period))
        for r0 in range(0, Nq, step):
            r1 = min(Nq, r0 + step)
            t = _Tile(qs, qsel, kb, valid, r0, r1, off, block_size, top_k)
            n_ = t.nbt
            p = t.probs(lse[:, :, :, r0:r1])  # (B, Hk, G, T, nbt, P)
            dot = do[:, :, :, r0:r1]  # (B, Hk, G, T, Dv)
            dP = torch.einsum("bhgte,bhnpe->bhgtnp", dot, vb[:, :, :n_])  # (B, Hk, G, T, nbt, P)
            # g_b: gradient reaching the outer weight of block b = inner output of b dotted with dO.
            p_in = torch.exp(t.S.masked_fill(~t.prev_tok, float("-inf")) - t.lse_in.unsqueeze(-1))
            g = (p_in * dP).sum(-1)  # (B, Hk, G, T, nbt)
            dl = delta[:, :, :, r0:r1, None, None]
            dS = torch.where(t.prev_tok, p * (dP - g.unsqueeze(-1)), p * (dP - dl))  # p is 0 off the two sets
            w_l = torch.exp(t.log_wl)  # (B, Hk, G, T, nbt): outer weight of each selected landmark
            dS[..., block_size] += w_l * (g - delta[:, :, :, r0:r1, None])
            dq[:, :, :, r0:r1] = torch.einsum("bhgtnp,bhnpd->bhgtd", dS, kb[:, :, :n_])
            dkb[:, :, :n_] += torch.einsum("bhgtnp,bhgtd->bhnpd", dS, qs[:, :, :, r0:r1])
            dvb[:, :, :n_] += torch.einsum("bhgtnp,bhgte->bhnpe", p, dot)
        dq = (dq * scale).view(B, Hq, Nq, D).to(q.dtype)
        dk = dkb.view(B, Hk, nb * period, D)[:, :, :Nk].to(k.dtype)
        dv = dvb.view(B, Hk, nb * period, Dv)[:, :, :Nk].to(v.dtype)
        return dq, dk, dv, None, None, None, None


def _lse2(S: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked log-sum-exp over the last two axes (nbt, P)."""
    lse, _ = masked_lse(S.flatten(-2), mask.expand_as(S).flatten(-2))
    return lse


def landmark_fast(q, k, v, *, causal, key_padding_mask, scale, block_size, top_k):
    """Tiled grouped softmax (FlashAttention-style recomputation in the backward): memory O(N) beyond
    one tile of scores; time O(N^2 d) as the paper's training."""
    return _LandmarkAttention.apply(q, k, v, block_size, scale, key_padding_mask, top_k)


# --------------------------------------------------------------------------------------------------------
# Decoding: block store + top-k block retrieval
# --------------------------------------------------------------------------------------------------------
def init_landmark_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device, block_size, top_k):
    return LandmarkCache(batch, kv_heads, head_dim, value_dim, block_size=block_size, dtype=dtype, device=device)


def _decode_one(q, state: LandmarkCache, scale, block_size, top_k):
    """One new query (the last stored position): score only the landmarks, gather the top_k blocks.

    Cost O(n / block_size * d + top_k * block_size * d) per query head, the paper's inference cost.
    """
    B, Hq, _, D = q.shape
    Hk = state.kv_heads
    G = Hq // Hk
    period = block_size + 1
    p = state.seq_len - 1
    bq = p // period
    keys, values, mask = state.keys, state.values, state.mask  # (B, Hk, L, D), (B, Hk, L, Dv), (B, L)
    acc = acc_dtype(q.dtype)
    qs = (q.to(acc) * scale).view(B, Hk, G, D)  # (B, Hk, G, D)
    parts_s, parts_v = [], []
    if bq > 0:
        nfull = bq * period
        kb = keys[:, :, :nfull].to(acc).view(B, Hk, bq, period, D)  # earlier blocks (B, Hk, bq, P, D)
        vb = values[:, :, :nfull].to(acc).view(B, Hk, bq, period, -1)  # (B, Hk, bq, P, Dv)
        s_lm = torch.einsum("bhgd,bhnd->bhgn", qs, kb[:, :, :, block_size])  # (B, Hk, G, bq) landmark scores
        vmask = None if mask is None else mask[:, :nfull].view(B, 1, 1, bq, period)
        lm_ok = torch.ones_like(s_lm, dtype=torch.bool) if vmask is None else vmask[..., block_size].expand_as(s_lm)
        if top_k is not None and top_k < bq:  # the selection rule shared with the reference and fast forms
            idx = retrieve_blocks(q.reshape(B, Hk, G, 1, D), kb[:, :, :, block_size], lm_ok.unsqueeze(-2),
                                  top_k).squeeze(-2)  # (B, Hk, G, k)
        else:
            idx = torch.arange(bq, device=q.device).expand(B, Hk, G, bq)
        kk = idx.shape[-1]
        # the retrieved blocks, one row of (block_size + 1) keys each, read from the cache's storage (no copy of it)
        kf, k_stride = run_rows(keys[:, :, :nfull].to(acc), period)  # (rows, P*D)
        vf, v_stride = run_rows(values[:, :, :nfull].to(acc), period)  # (rows, P*Dv)
        bh = (torch.arange(B, device=q.device).view(B, 1) * Hk
              + torch.arange(Hk, device=q.device).view(1, Hk)).view(B, Hk, 1, 1)
        Dv = vb.shape[-1]
        ksel = kf.index_select(0, (bh * k_stride + idx).view(-1)).view(B, Hk, G, kk * period, D)
        vsel = vf.index_select(0, (bh * v_stride + idx).view(-1)).view(B, Hk, G, kk, period, Dv)
        s_in = torch.matmul(qs.unsqueeze(-2), ksel.transpose(-1, -2)).view(B, Hk, G, kk, period)[..., :block_size]
        tok_ok = torch.ones_like(s_in, dtype=torch.bool)  # (B, Hk, G, k, l)
        if vmask is not None:
            rows = (torch.arange(B, device=q.device).view(B, 1, 1, 1) * bq + idx).view(-1)
            tok_ok = mask[:, :nfull].reshape(B * bq, period).index_select(0, rows).view(
                B, Hk, G, kk, period)[..., :block_size]
        sel_ok = lm_ok.gather(-1, idx)  # (B, Hk, G, k)
        lse_in, _ = masked_lse(s_in, tok_ok)  # (B, Hk, G, k)
        p_in = torch.exp(s_in.masked_fill(~tok_ok, float("-inf")) - lse_in.unsqueeze(-1))  # (B, Hk, G, k, l)
        o_blk = torch.matmul(p_in.unsqueeze(-2), vsel[..., :block_size, :]).squeeze(-2)  # (B, Hk, G, k, Dv)
        parts_s.append(s_lm.gather(-1, idx).masked_fill(~sel_ok, float("-inf")))
        parts_v.append(o_blk)
    start = bq * period
    stop = min(p, start + block_size - 1)  # own block's regular tokens at or before the query
    kc = keys[:, :, start : stop + 1].to(acc)  # (B, Hk, c, D)
    vc = values[:, :, start : stop + 1].to(acc)  # (B, Hk, c, Dv)
    s_c = torch.einsum("bhgd,bhcd->bhgc", qs, kc)  # (B, Hk, G, c)
    if mask is not None:
        s_c = s_c.masked_fill(~mask[:, start : stop + 1].view(B, 1, 1, -1), float("-inf"))
    parts_s.append(s_c)
    parts_v.append(vc.unsqueeze(2).expand(B, Hk, G, -1, vc.shape[-1]))
    s_all = torch.cat(parts_s, dim=-1)  # (B, Hk, G, k + c)
    lse, _ = masked_lse(s_all, torch.isfinite(s_all))
    w = torch.exp(s_all - lse.unsqueeze(-1))  # (B, Hk, G, k + c)
    out = torch.einsum("bhgm,bhgme->bhge", w, torch.cat(parts_v, dim=-2))  # (B, Hk, G, Dv)
    return out.reshape(B, Hq, 1, -1).to(q.dtype)


def landmark_step(q, k, v, state: LandmarkCache, *, scale, block_size, top_k, key_padding_mask=None):
    """Append T tokens to the block store; one query retrieves its top_k blocks by landmark score, a
    chunk of queries runs the tiled grouped softmax over the whole store (the same computation)."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=LandmarkCache)
    if state.block_size != block_size:
        raise ValueError(f"block_size: this LandmarkCache was built for {state.block_size}, got {block_size}")
    keys, values, mask = state.append(k, v, key_padding_mask)
    grad = torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad)
    if q.shape[2] == 1 and not grad:
        return _decode_one(q, state, scale, block_size, top_k)
    return landmark_fast(q, keys, values, causal=True, key_padding_mask=mask, scale=scale, block_size=block_size,
                         top_k=top_k)


# --------------------------------------------------------------------------------------------------------
# Module: inserts a learned landmark token after every block
# --------------------------------------------------------------------------------------------------------
class LandmarkAttention(nn.Module):
    """Causal self-attention layer with landmark tokens: ``x (B, N, dim) -> (B, N, dim)``.

    A learned landmark embedding (``self.landmark``) is inserted after every ``block_size`` tokens, the
    interleaved sequence goes through the q/k/v projections and the grouped softmax, and the outputs at
    landmark positions are dropped. The embedding is projected once per call and its rows placed at every
    landmark position, so all landmark keys are bitwise equal in every path (their scores tie exactly and
    the earliest blocks are retrieved). In a full model the paper's landmarks are tokens of the input
    stream that pass through every layer; a per-layer learned landmark is this layer's stand-in for them.

    Decoding: ``state = layer.init_state(batch)``; ``out, state = layer(x_new, state=state)``. The state
    is a :class:`LandmarkState`: its ``seq_len`` counts input tokens and ``crop`` takes a token count.

    ``interleaved=True``: the paper's model. ``x`` is already the interleaved sequence (a landmark token
    after every ``block_size`` tokens, built by the model, e.g. with :meth:`interleave`, and carried through
    every layer, so a landmark's key in a later layer summarises its block); the layer has no landmark
    embedding of its own, returns every position's output (landmarks too) and its state counts positions
    of the interleaved sequence.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = True,
                 block_size: int = 50, top_k: int | None = None, bias: bool = False, backend: str = "auto",
                 interleaved: bool = False) -> None:
        super().__init__()
        if causal is not True:
            raise ValueError(f"causal: landmark attention is causal (causal_self, causal_cross), got {causal!r}")
        dim, heads = check_int("dim", dim), check_int("heads", heads)
        kv_heads = heads if kv_heads is None else check_int("kv_heads", kv_heads)
        if dim % heads or heads % kv_heads:
            raise ValueError(f"heads, kv_heads: need dim % heads == 0 and heads % kv_heads == 0, got dim={dim}, "
                             f"heads={heads}, kv_heads={kv_heads}")
        opts = LANDMARK.resolve_options({"block_size": block_size, "top_k": top_k})
        self.block_size, self.top_k = opts["block_size"], opts["top_k"]
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, dim // heads
        self.causal, self.backend = True, check_backend(backend)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.interleaved = check_bool("interleaved", interleaved)
        self.landmark = None if self.interleaved else nn.Parameter(0.02 * torch.randn(dim))
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def init_state(self, batch_size: int, *, dtype=None, device=None) -> LandmarkState:
        w = self.q_proj.weight
        cache = LandmarkCache(check_int("batch_size", batch_size), self.kv_heads, self.head_dim, self.head_dim,
                              block_size=self.block_size, dtype=dtype or w.dtype, device=device or w.device)
        return LandmarkState(cache, interleaved=self.interleaved)

    def layout(self, start: int, n: int, device=None) -> tuple[torch.Tensor, int]:
        """Where tokens ``start .. start+n-1`` go in this chunk of the interleaved sequence: their positions
        (n,) and the chunk's length (the tokens plus a landmark after each one that completes a block)."""
        r = torch.arange(start, start + n, device=device)  # global token index
        ext_pos = torch.arange(n, device=device) + r // self.block_size - start // self.block_size  # (n,)
        total = n + (start + n) // self.block_size - start // self.block_size
        return ext_pos, total

    def interleave(self, x: torch.Tensor, landmark_row: torch.Tensor, start: int = 0) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """The interleaved sequence of tokens ``start .. start+N-1`` of ``x (B, N, C)``: ``landmark_row (C,)``
        after every token that completes a block. Returns it (B, M, C) and the tokens' positions in it (N,)
        (the model's inputs of an ``interleaved`` layer; ``out[:, positions]`` drops the landmark rows)."""
        x = check_tensor("x", x, ndim=3)
        landmark_row = check_tensor("landmark_row", landmark_row, ndim=1)
        check_same_device(x=x, landmark_row=landmark_row)
        if landmark_row.shape[0] != x.shape[2] or landmark_row.dtype != x.dtype:
            raise ValueError(f"landmark_row: expected {x.shape[2]} features of x's dtype {x.dtype}, got "
                             f"{landmark_row.shape[0]} of {landmark_row.dtype}")
        ext_pos, total = self.layout(check_int("start", start, low=0), x.shape[1], x.device)
        return self._insert(x, landmark_row, ext_pos, total), ext_pos

    @staticmethod
    def _insert(rows: torch.Tensor, landmark_row: torch.Tensor, ext_pos: torch.Tensor, total: int) -> torch.Tensor:
        """rows (B, N, C) at ``ext_pos`` of a (B, total, C) sequence whose other rows are ``landmark_row`` (C,)."""
        B, _, C = rows.shape
        out = landmark_row.expand(B, total, C).clone()  # (B, total, C)
        out[:, ext_pos] = rows
        return out

    def _check_state(self, state, x) -> None:
        if not isinstance(state, LandmarkState):
            raise TypeError(f"state: expected the LandmarkState of layer.init_state(batch), got "
                            f"{type(state).__name__}")
        if state.block_size != self.block_size:
            raise ValueError(f"state: built for block_size={state.block_size}, this layer has {self.block_size}")
        if state.batch != x.shape[0]:
            raise ValueError(f"state: holds a batch of {state.batch}, x has {x.shape[0]} rows")
        check_same_device(x=x, state=state.cache.keys)

    def forward(self, x, context=None, *, key_padding_mask=None, state=None):
        if context is not None:
            raise ValueError("context: landmark attention is causal self attention; got a context")
        check_sequence_call(self, x, key_padding_mask=key_padding_mask, state=state, state_type=LandmarkState)
        B, N, _ = x.shape
        if state is not None:
            self._check_state(state, x)
            check_state(state.cache, batch=B, dtype=x.dtype, device=x.device)
        hd = self.head_dim
        opts = {"block_size": self.block_size, "top_k": self.top_k}
        if self.interleaved:  # x is the interleaved sequence: every position attends, none is dropped
            q = self.q_proj(x).view(B, N, self.heads, hd).transpose(1, 2)  # (B, H, N, hd)
            k = self.k_proj(x).view(B, N, self.kv_heads, hd).transpose(1, 2)  # (B, Hk, N, hd)
            v = self.v_proj(x).view(B, N, self.kv_heads, hd).transpose(1, 2)
            if state is not None:
                out = landmark_step(q, k, v, state.cache, scale=self.scale, key_padding_mask=key_padding_mask,
                                    **opts)
                state.seq_len += N
            else:
                fn = landmark_reference if self.backend == "reference" else landmark_fast
                out = fn(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=self.scale, **opts)
            y = self.o_proj(out.transpose(1, 2).reshape(B, N, self.dim))  # (B, N, dim)
            return (y, state) if state is not None else y
        ext_pos, M = self.layout(0 if state is None else state.seq_len, N, x.device)
        lm = self.landmark
        q = self._insert(self.q_proj(x), self.q_proj(lm), ext_pos, M).view(B, M, self.heads, hd).transpose(1, 2)
        k = self._insert(self.k_proj(x), self.k_proj(lm), ext_pos, M).view(B, M, self.kv_heads, hd).transpose(1, 2)
        v = self._insert(self.v_proj(x), self.v_proj(lm), ext_pos, M).view(B, M, self.kv_heads, hd).transpose(1, 2)
        mask = None  # (B, M): landmarks are always attended
        if key_padding_mask is not None:
            mask = torch.ones(B, M, dtype=torch.bool, device=x.device)
            mask[:, ext_pos] = key_padding_mask
        if state is not None:
            out = landmark_step(q, k, v, state.cache, scale=self.scale, key_padding_mask=mask, **opts)
            state.seq_len += N
        else:
            fn = landmark_reference if self.backend == "reference" else landmark_fast
            out = fn(q, k, v, causal=True, key_padding_mask=mask, scale=self.scale, **opts)  # (B, H, M, hd)
        out = out.transpose(1, 2).reshape(B, M, self.dim)[:, ext_pos]  # drop the landmark rows
        y = self.o_proj(out)  # (B, N, dim)
        return (y, state) if state is not None else y


LANDMARK = register(Mechanism(
    name="landmark",
    aliases=("landmark_attention",),
    family="memory",
    catalog="P009",
    title="Landmark Attention: Random-Access Infinite Context Length for Transformers",
    arxiv="2305.16300",
    code="https://github.com/epfml/landmark-attention",
    summary="Grouped softmax: own block's tokens + landmarks of earlier blocks (outer), tokens of each "
            "earlier block weighted by its landmark (inner); top-k block retrieval at inference.",
    patterns=("causal_self", "causal_cross"),
    exact=False,
    state="landmark_blocks",
    complexity="train O(N^2 d) time, O(N) memory (tiled); decode O(N/l d + k l d) per token, store O(N)",
    reference=landmark_reference,
    fast=landmark_fast,
    step=landmark_step,
    init_state=init_landmark_cache,
    module=LandmarkAttention,
    operator=landmark_operator,
    options=(
        Option("block_size", 50, int, low=1, doc="regular tokens per block; a landmark follows each block"),
        Option("top_k", None, int, low=1, allow_none=True,
               doc="earlier blocks retrieved per query and head (None: all, the training-time grouped softmax)"),
    ),
    test_options={"block_size": 2, "top_k": 1},
    test_sizes={"n": 9, "nq": 5, "nk": 11},
    notes="Inputs are the interleaved sequence (key p is a landmark iff p % (block_size+1) == block_size); "
          "block_size >= N or top_k >= #blocks with one block gives exact causal softmax over regular tokens.",
))
