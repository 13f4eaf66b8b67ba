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
  selection is per query and per query head ("per_token_and_head" in the official cache); ties go to
  the earlier block. Positional re-indexing of retrieved blocks belongs to the model adapter.
- :class:`LandmarkAttention` used alone, without positional encoding, gives every landmark the same key
  (they share one input embedding); in the paper landmarks become block summaries through the layers
  below. With ``top_k`` the tie rule then retrieves the earliest blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_int, check_key_padding_mask, check_tensor
from ...reference import repeat_kv
from ...registry import Mechanism, Option, register
from ...state.memory import LandmarkCache
from ._common import check_step_inputs, masked_lse, query_positions, rows_per_tile


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


def top_k_indices(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Indices of the ``k`` highest scores along ``dim``; ties go to the lower index (a stable sort), so
    the parallel form and every decoding path select the same blocks even when landmark keys coincide."""
    order = torch.sort(scores.detach(), dim=dim, descending=True, stable=True).indices
    return order.narrow(dim, 0, min(k, scores.shape[dim]))


def _top_k_mask(scores: torch.Tensor, cand: torch.Tensor, top_k: int, dim: int = -1) -> torch.Tensor:
    """Among the candidates, the ``top_k`` highest scores along ``dim`` (all of them if fewer)."""
    idx = top_k_indices(scores.masked_fill(~cand, float("-inf")), top_k, dim)
    return torch.zeros(cand.shape, dtype=torch.bool, device=cand.device).scatter(dim, idx, True) & cand


def landmark_reference(q, k, v, *, causal, key_padding_mask, scale, block_size, top_k):
    """Dense grouped softmax: all scores (B, Hq, Nq, Nk) are built, then the two softmaxes applied."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    kf, vf = repeat_kv(k, Hq // Hk).to(acc), repeat_kv(v, Hq // Hk).to(acc)
    s = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    cur, prev_tok, prev_lm = (m.expand_as(s) for m in landmark_roles(Nq, Nk, block_size, key_padding_mask, q.device))
    if top_k is not None:
        prev_lm = _top_k_mask(s, prev_lm, top_k)  # retrieval: keep the best top_k earlier landmarks
    period = block_size + 1
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


# --------------------------------------------------------------------------------------------------------
# Fast: tiled grouped softmax with a hand-written backward (never the N x N matrix)
# --------------------------------------------------------------------------------------------------------
class _Tile:
    """Scores and masks of query rows r0:r1 against the blocks they can see (blocks 0..last)."""

    def __init__(self, qs, kb, valid, r0, r1, off, block_size, top_k):
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
        S_L = self.S[..., block_size]  # (B, Hk, G, T, nbt)
        if top_k is not None:
            lm_cand = _top_k_mask(S_L, lm_cand, top_k)
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
        acc = torch.promote_types(q.dtype, torch.float32)
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
        qs = (q.to(acc) * scale).view(B, Hk, G, Nq, D)  # scale folded into the queries
        out = torch.zeros(B, Hk, G, Nq, Dv, dtype=acc, device=q.device)  # (B, Hk, G, Nq, Dv)
        lse = torch.zeros(B, Hk, G, Nq, dtype=acc, device=q.device)  # (B, Hk, G, Nq)
        off = Nk - Nq
        step = rows_per_tile(B * Hq * (Nk + period))
        for r0 in range(0, Nq, step):
            r1 = min(Nq, r0 + step)
            t = _Tile(qs, kb, valid, r0, r1, off, block_size, top_k)
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
        acc = torch.promote_types(q.dtype, torch.float32)
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
            t = _Tile(qs, kb, valid, r0, r1, off, block_size, top_k)
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
    acc = torch.promote_types(q.dtype, torch.float32)
    qs = (q.to(acc) * scale).view(B, Hk, G, D)  # (B, Hk, G, D)
    parts_s, parts_v = [], []
    if bq > 0:
        nfull = bq * period
        kb = keys[:, :, :nfull].to(acc).view(B, Hk, bq, period, D)  # earlier blocks (B, Hk, bq, P, D)
        vb = values[:, :, :nfull].to(acc).view(B, Hk, bq, period, -1)  # (B, Hk, bq, P, Dv)
        s_lm = torch.einsum("bhgd,bhnd->bhgn", qs, kb[:, :, :, block_size])  # (B, Hk, G, bq) landmark scores
        vmask = None if mask is None else mask[:, :nfull].view(B, 1, 1, bq, period)
        lm_ok = torch.ones_like(s_lm, dtype=torch.bool) if vmask is None else vmask[..., block_size].expand_as(s_lm)
        if top_k is not None and top_k < bq:
            idx = top_k_indices(s_lm.masked_fill(~lm_ok, float("-inf")), top_k)  # (B, Hk, G, k)
        else:
            idx = torch.arange(bq, device=q.device).expand(B, Hk, G, bq)
        kk = idx.shape[-1]
        gi = idx.view(B, Hk, G, kk, 1, 1)
        ksel = kb.unsqueeze(2).expand(B, Hk, G, bq, period, D).gather(3, gi.expand(B, Hk, G, kk, period, D))
        vsel = vb.unsqueeze(2).expand(B, Hk, G, bq, period, vb.shape[-1]).gather(
            3, gi.expand(B, Hk, G, kk, period, vb.shape[-1]))  # (B, Hk, G, k, P, Dv)
        s_in = torch.einsum("bhgd,bhgkpd->bhgkp", qs, ksel[..., :block_size, :])  # (B, Hk, G, k, l)
        tok_ok = torch.ones_like(s_in, dtype=torch.bool)
        if vmask is not None:
            tok_ok = vmask[..., :block_size].expand(B, Hk, G, bq, block_size).gather(
                3, idx.view(B, Hk, G, kk, 1).expand(B, Hk, G, kk, block_size))
        sel_ok = lm_ok.gather(-1, idx)  # (B, Hk, G, k)
        lse_in, _ = masked_lse(s_in, tok_ok)  # (B, Hk, G, k)
        p_in = torch.exp(s_in.masked_fill(~tok_ok, float("-inf")) - lse_in.unsqueeze(-1))  # (B, Hk, G, k, l)
        o_blk = torch.einsum("bhgkp,bhgkpe->bhgke", p_in, vsel[..., :block_size, :])  # (B, Hk, G, k, Dv)
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
    check_step_inputs(q, k, v, state, key_padding_mask)
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
    landmark positions are dropped. In a full model the paper's landmarks are tokens of the input stream
    that pass through every layer; a per-layer learned landmark is this layer's stand-in for them.

    Decoding: ``state = layer.init_state(batch)``; ``out, state = layer(x_new, state=state)``. The state
    is a :class:`~attnzoo.state.memory.LandmarkCache` over the interleaved sequence (landmarks included),
    so its ``seq_len`` counts landmark tokens; :meth:`regular_length` gives the count of input tokens.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = True,
                 block_size: int = 50, top_k: int | None = None, bias: bool = False, backend: str = "auto") -> None:
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
        self.causal, self.backend = True, backend
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.landmark = nn.Parameter(0.02 * torch.randn(dim))
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def regular_length(self, state: LandmarkCache) -> int:
        """Input tokens consumed by ``state`` (its ``seq_len`` minus the landmark tokens)."""
        return state.seq_len - state.seq_len // (self.block_size + 1)

    def init_state(self, batch_size: int, *, dtype=None, device=None) -> LandmarkCache:
        w = self.q_proj.weight
        return LandmarkCache(batch_size, self.kv_heads, self.head_dim, self.head_dim, block_size=self.block_size,
                             dtype=dtype or w.dtype, device=device or w.device)

    def _interleave(self, x, start_regular, key_padding_mask):
        """Insert the landmark after every block; returns x_ext (B, N', dim), regular indices, ext mask."""
        B, N, _ = x.shape
        r = torch.arange(start_regular, start_regular + N, device=x.device)  # global regular index
        n_lm_before = r // self.block_size - start_regular // self.block_size  # landmarks inserted before it
        ext_pos = torch.arange(N, device=x.device) + n_lm_before  # position inside this chunk's extension
        ends = (r + 1) % self.block_size == 0  # a landmark follows this token
        total = N + int(ends.sum())
        x_ext = self.landmark.to(x.dtype).expand(B, total, self.dim).clone()
        x_ext[:, ext_pos] = x
        mask = None
        if key_padding_mask is not None:
            mask = torch.ones(B, total, dtype=torch.bool, device=x.device)
            mask[:, ext_pos] = key_padding_mask
        return x_ext, ext_pos, mask

    def forward(self, x, context=None, *, key_padding_mask=None, state=None):
        check_tensor("x", x, ndim=3)
        if context is not None:
            raise ValueError("context: landmark attention is causal self attention; got a context")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dim {self.dim}, got shape {tuple(x.shape)}")
        check_key_padding_mask(key_padding_mask, x.shape[0], x.shape[1])
        start = 0 if state is None else self.regular_length(state)
        x_ext, ext_pos, mask = self._interleave(x, start, key_padding_mask)
        B, M, _ = x_ext.shape
        q = self.q_proj(x_ext).view(B, M, self.heads, self.head_dim).transpose(1, 2)  # (B, H, M, hd)
        k = self.k_proj(x_ext).view(B, M, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, M, hd)
        v = self.v_proj(x_ext).view(B, M, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, M, hd)
        opts = {"block_size": self.block_size, "top_k": self.top_k}
        if state is not None:
            out = landmark_step(q, k, v, state, scale=self.scale, key_padding_mask=mask, **opts)
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
