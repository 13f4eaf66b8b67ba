"""LongHeads: every head attends to a few chunks it selects, within the pre-trained length.

Paper: "LongHeads: Multi-Head Attention is Secretly a Long Context Processor", Lu et al., arXiv 2402.10685.
Official code: https://github.com/LuLuLuyi/LongHeads (formulas confirmed against it in CATALOG.md).
The sequence is cut into chunks of ``chunk_size`` (w) tokens. Each complete chunk gets, per head, a
summary: bidirectional attention among the chunk's tokens, mean-pooled to ``c_v``, and the chunk key
``c_k = softmax(c_v K_chunk^T / sqrt(d)) K_chunk``. A query in chunk c attends (causally, one softmax) to
``max_chunks`` (A = L / w) chunks: all of them while c < A; otherwise the first chunk, the previous and
its own chunk, and the A - 3 others with the highest ``q . c_k`` -- per query and per head. Training-free:
``max_chunks * chunk_size >= N`` is exact causal attention, anything shorter an approximation of it.

Choices where the paper is silent (checked against the official code where it speaks):
- Selection ties go to the earlier chunk; chunks whose keys are all padded are never selected by score.
- The mean pooling of ``c_v`` is over the chunk's unpadded tokens (the official code zeroes padded
  rows and averages over the whole chunk). Requires value dim == head dim (c_v is used as a query).
- The official prefill truncates the query's own chunk just before the query; we keep the query's own
  key (causal attention, as its decoding path does).
- Positions inside [0, L) are remapped by the model adapter (RoPE), not by this function.
- With grouped-query attention the summaries are per query head.
Decoding keeps every key (O(N), offloadable in the paper) and one summary per chunk; a step scores the
N / w summaries and attends to A * w keys: O((N / w + A w) d) per token.
"""

from __future__ import annotations

import torch

from ...errors import check_int, check_step, check_tensor
from ...kernels.gather import run_rows
from ...kernels.sdpa import sdpa
from ...kernels.select import top_k_indices
from ...reference import repeat_kv, softmax_attention, softmax_weights
from ...registry import Mechanism, Option, register
from ...state.base import DecodeState
from ...state.kv import KVCache
from ._common import masked_lse, query_positions, rows_per_tile


def chunk_summaries(q, k, v, key_padding_mask, scale, chunk_size):
    """Summary key c_k (B, Hq, C, D) of each complete chunk, and valid (B|1, C).

    q (B, Hq, C*w, D) the chunks' queries, k/v (B, Hk, C*w, D) their keys/values (Dv == D)."""
    B, Hq, n, D = q.shape
    w = chunk_size
    C = n // w
    G = Hq // k.shape[1]
    qc = q[:, :, : C * w].reshape(B, Hq, C, w, D)
    kc = repeat_kv(k[:, :, : C * w], G).reshape(B, Hq, C, w, D)  # (B, Hq, C, w, D)
    vc = repeat_kv(v[:, :, : C * w], G).reshape(B, Hq, C, w, v.shape[-1])
    m = None if key_padding_mask is None else key_padding_mask[:, : C * w].reshape(B, 1, C, 1, w)
    s = torch.einsum("bhcid,bhcjd->bhcij", qc, kc) * scale  # bidirectional inside the chunk (B, Hq, C, w, w)
    mm = torch.ones_like(s, dtype=torch.bool) if m is None else m.expand_as(s)
    lse, _ = masked_lse(s, mm)
    o = torch.einsum("bhcij,bhcje->bhcie", torch.exp(s.masked_fill(~mm, float("-inf")) - lse.unsqueeze(-1)), vc)
    if m is None:
        c_v = o.mean(3)  # (B, Hq, C, Dv)
        valid = torch.ones(1, C, dtype=torch.bool, device=q.device)
    else:
        rows = m.view(B, 1, C, w, 1).to(o.dtype)
        cnt = rows.sum(3)
        c_v = (o * rows).sum(3) / cnt.clamp(min=1)
        valid = cnt.view(B, C) > 0
    sk = torch.einsum("bhce,bhcje->bhcj", c_v, kc) * scale  # (B, Hq, C, w)
    km = torch.ones_like(sk, dtype=torch.bool) if m is None else m.view(B, 1, C, w).expand_as(sk)
    lse_k, _ = masked_lse(sk, km)
    c_k = torch.einsum("bhcj,bhcjd->bhcd", torch.exp(sk.masked_fill(~km, float("-inf")) - lse_k.unsqueeze(-1)), kc)
    return c_k, valid


def select_chunks(q, c_k, valid, pos, chunk_size, max_chunks):
    """Selected chunk ids (B, Hq, T, A), -1 where fewer than A chunks exist.

    q (B, Hq, T, D) at absolute positions pos (T,); c_k (B, Hq, C', D) summaries of chunks 0..C'-1."""
    B, Hq, T, _ = q.shape
    A, w = max_chunks, chunk_size
    cq = (pos // w).view(1, 1, T, 1)  # the query's own chunk
    C = c_k.shape[2]
    if C == 0 or int(pos.max()) // w + 1 <= A:
        ids = torch.arange(A, device=q.device).view(1, 1, 1, A).expand(B, Hq, T, A)
        return torch.where(ids <= cq, ids, torch.full_like(ids, -1))
    score = torch.einsum("bhtd,bhcd->bhtc", q, c_k.to(q.dtype))  # (B, Hq, T, C)
    cid = torch.arange(C, device=q.device).view(1, 1, 1, C)
    middle = (cid >= 1) & (cid <= cq - 2) & valid.view(-1, 1, 1, C)  # candidates for the A - 3 free slots
    top = top_k_indices(score.masked_fill(~middle, float("-inf")), A - 3)  # (B, Hq, T, A - 3)
    top_ok = middle.expand(B, Hq, T, C).gather(-1, top)
    cq = cq.expand(B, Hq, T, 1)
    fixed = torch.cat([torch.zeros_like(cq), cq - 1, cq], -1)  # first, previous and own chunk
    sel = torch.cat([fixed, torch.where(top_ok, top, torch.full_like(top, -1))], -1)  # (B, Hq, T, A)
    few = (cq + 1 <= A).expand_as(sel)  # a query still inside the first A chunks sees all of them
    ids = torch.arange(A, device=q.device).view(1, 1, 1, A).expand_as(sel)
    return torch.where(few, torch.where(ids <= cq, ids, -1), sel)


def _selection(q, k, v, key_padding_mask, scale, chunk_size, max_chunks):
    with torch.no_grad():  # the selection is discrete: no gradient flows through the summaries
        c_k, valid = chunk_summaries(q, k, v, key_padding_mask, scale, chunk_size)
        pos = torch.arange(q.shape[2], device=q.device)
        return select_chunks(q, c_k, valid, pos, chunk_size, max_chunks)


def longheads_reference(q, k, v, *, causal, key_padding_mask, scale, chunk_size, max_chunks):
    """Dense: the per-query, per-head chunk selection as a (B, Hq, N, N) mask over causal attention."""
    _check_dims(q, v)
    N = q.shape[2]
    sel = _selection(q, k, v, key_padding_mask, scale, chunk_size, max_chunks)  # (B, Hq, N, A)
    chunk_of_key = (torch.arange(N, device=q.device) // chunk_size).view(1, 1, 1, 1, N)
    picked = (sel.unsqueeze(-1) == chunk_of_key).any(-2)  # (B, Hq, N, N): key j's chunk is selected
    return softmax_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, attn_mask=picked, scale=scale)


def longheads_operator(q, k, v, *, causal, key_padding_mask, scale, chunk_size, max_chunks):
    """Effective operator (B, Hq, N, N): causal softmax over each query's and head's selected chunks. The chunk
    summaries read v (mean-pooled chunk outputs score the keys), so the selection -- hence W -- depends on v."""
    _check_dims(q, v)
    N = q.shape[2]
    sel = _selection(q, k, v, key_padding_mask, scale, chunk_size, max_chunks)  # (B, Hq, N, A)
    chunk_of_key = (torch.arange(N, device=q.device) // chunk_size).view(1, 1, 1, 1, N)
    picked = (sel.unsqueeze(-1) == chunk_of_key).any(-2)  # (B, Hq, N, N)
    return softmax_weights(q, k, causal=True, key_padding_mask=key_padding_mask, attn_mask=picked, scale=scale)


class _ChunkAttention(torch.autograd.Function):
    """Causal softmax over selected key chunks: q (B, Hq, Nq, D) attends to chunks idx (B, Hq, Nq, A) of
    size w. Query tiles lie inside one query chunk; a tile gathers the union of the chunks its rows and
    heads selected once (shared by every row, as a dense tile would) and masks per row and head. Memory
    O(tile) beyond the inputs; the backward recomputes each tile and adds into dk, dv."""

    @staticmethod
    def forward(ctx, q, k, v, idx, w, scale, key_padding_mask):
        out, lse = _chunk_attention(q, k, v, idx, w, scale, key_padding_mask)
        ctx.save_for_backward(q, k, v, idx, out, lse, key_padding_mask)
        ctx.args = (w, scale, key_padding_mask is not None)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, idx, out, lse, key_padding_mask = ctx.saved_tensors
        w, scale, has_mask = ctx.args
        dq, dk, dv = _chunk_attention_backward(q, k, v, idx, w, scale, key_padding_mask if has_mask else None,
                                               out, lse, dout)
        return dq, dk, dv, None, None, None, None


def _union_positions(union, w, nk):
    """Key positions of the chunks in ``union`` (nU*w,), clamped to the sequence, and which are real."""
    pos = (union.view(-1, 1) * w + torch.arange(w, device=union.device)).flatten()
    return pos.clamp(max=nk - 1), pos < nk


def _tiles(idx, Nq, off, w, B, Hq):
    """(r0, r1, union of selected chunks) per query tile; tiles never cross a query chunk."""
    pos = torch.arange(Nq, device=idx.device) + off
    bounds = torch.nonzero(torch.diff(pos // w)).flatten().tolist()
    starts = [0] + [b + 1 for b in bounds]
    ends = starts[1:] + [Nq]
    for c0, c1 in zip(starts, ends):
        union = torch.unique(idx[:, :, c0:c1])
        union = union[union >= 0]
        step = rows_per_tile(B * Hq * max(1, union.numel()) * w * 3)
        for r0 in range(c0, c1, step):
            yield r0, min(c1, r0 + step), union


def _tile_scores(q, k, key_padding_mask, idx, union, r0, r1, off, w, scale, acc):
    """Scores of rows r0:r1 against the tile's chunks (gathered once, shared by rows and heads) and the
    mask: chunk picked by that row and head, causal, real and unpadded."""
    B, Hq, _, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = Hq // Hk
    T, nU = r1 - r0, union.numel()
    kpos, real = _union_positions(union, w, Nk)  # (nU*w,)
    ku = k.index_select(2, kpos).to(acc)  # (B, Hk, nU*w, D)
    qt = q[:, :, r0:r1].to(acc).view(B, Hk, G, T, D)
    s = torch.matmul(qt, ku.unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hk, G, T, nU*w)
    sel = (idx[:, :, r0:r1].unsqueeze(-1) == union).any(-2)  # (B, Hq, T, nU): chunk picked by row and head
    pos = (torch.arange(r0, r1, device=q.device) + off).view(T, 1)
    ok = sel.repeat_interleave(w, -1) & (kpos.view(1, -1) <= pos) & real.view(1, -1)
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, kpos].view(B, 1, 1, nU * w)
    return s, ok.view(B, Hk, G, T, nU * w), ku, kpos


def _chunk_attention(q, k, v, idx, w, scale, key_padding_mask):
    B, Hq, Nq, _ = q.shape
    Hk, Dv = k.shape[1], v.shape[3]
    acc = torch.promote_types(q.dtype, torch.float32)
    off = k.shape[2] - Nq
    out = torch.zeros(B, Hk, Hq // Hk, Nq, Dv, dtype=acc, device=q.device)
    lse = torch.zeros(B, Hk, Hq // Hk, Nq, dtype=acc, device=q.device)
    for r0, r1, union in _tiles(idx, Nq, off, w, B, Hq):
        if union.numel() == 0:
            continue
        s, ok, _, kpos = _tile_scores(q, k, key_padding_mask, idx, union, r0, r1, off, w, scale, acc)
        lt, _ = masked_lse(s, ok)  # (B, Hk, G, T)
        p = torch.exp(s.masked_fill(~ok, float("-inf")) - lt.unsqueeze(-1))
        out[:, :, :, r0:r1] = torch.matmul(p, v.index_select(2, kpos).to(acc).unsqueeze(2))
        lse[:, :, :, r0:r1] = lt
    return out.view(B, Hq, Nq, Dv), lse


def _chunk_attention_backward(q, k, v, idx, w, scale, key_padding_mask, out, lse, dout):
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hk
    acc = torch.promote_types(q.dtype, torch.float32)
    off = Nk - Nq
    do = dout.to(acc).view(B, Hk, G, Nq, Dv)
    delta = (do * out.to(acc).view(B, Hk, G, Nq, Dv)).sum(-1)  # (B, Hk, G, Nq)
    lse = lse.view(B, Hk, G, Nq)
    dq = torch.zeros(B, Hk, G, Nq, D, dtype=acc, device=q.device)
    dk = torch.zeros(B, Hk, Nk, D, dtype=acc, device=q.device)
    dv = torch.zeros(B, Hk, Nk, Dv, dtype=acc, device=q.device)
    for r0, r1, union in _tiles(idx, Nq, off, w, B, Hq):
        if union.numel() == 0:
            continue
        s, ok, ku, kpos = _tile_scores(q, k, key_padding_mask, idx, union, r0, r1, off, w, scale, acc)
        p = torch.exp(s.masked_fill(~ok, float("-inf")) - lse[:, :, :, r0:r1].unsqueeze(-1))  # (B, Hk, G, T, U)
        vu = v.index_select(2, kpos).to(acc).unsqueeze(2)  # (B, Hk, 1, U, Dv)
        dot = do[:, :, :, r0:r1]
        dp = torch.matmul(dot, vu.transpose(-1, -2))  # (B, Hk, G, T, U)
        ds = p * (dp - delta[:, :, :, r0:r1].unsqueeze(-1))
        dq[:, :, :, r0:r1] = torch.matmul(ds, ku.unsqueeze(2)) * scale
        qt = q[:, :, r0:r1].to(acc).view(B, Hk, G, r1 - r0, D)
        # clamped positions past the end carry p = 0, so their (zero) gradients may land on the last key
        dk.index_add_(2, kpos, torch.einsum("bhgtu,bhgtd->bhud", ds, qt) * scale)
        dv.index_add_(2, kpos, torch.einsum("bhgtu,bhgte->bhue", p, dot))
    return dq.view(B, Hq, Nq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def longheads_fast(q, k, v, *, causal, key_padding_mask, scale, chunk_size, max_chunks):
    """Gathered chunks with a hand-written backward: a tile of queries multiplies only the chunks its rows
    selected (O(N A w d) when selections agree, at most the causal dense cost), O(N) memory."""
    _check_dims(q, v)
    sel = _selection(q, k, v, key_padding_mask, scale, chunk_size, max_chunks)
    return _ChunkAttention.apply(q, k, v, sel, chunk_size, scale, key_padding_mask)


def _check_dims(q, v):
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v: LongHeads uses the chunks' pooled values as queries, so the value dim must equal the "
                         f"head dim {q.shape[-1]}, got v of shape {tuple(v.shape)}")


def init_longheads_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, chunk_size, max_chunks):
    return LongHeadsState(batch, kv_heads, head_dim, value_dim, chunk_size=chunk_size, dtype=dtype, device=device)


def longheads_step(q, k, v, state: LongHeadsState, *, scale, chunk_size, max_chunks, key_padding_mask=None):
    """Append T tokens; chunks they complete get their summary (from the chunk's buffered queries); each
    new query selects its chunks from the summaries and attends to them."""
    B, Hq, Hk, T, D, Dv = check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=LongHeadsState)
    _check_dims(q, v)
    if state.chunk_size != chunk_size:
        raise ValueError(f"chunk_size: this LongHeadsState was built for {state.chunk_size}, got {chunk_size}")
    keys, values, kmask = state.kv.append(k, v, key_padding_mask)  # (B, Hk, L, D)
    state.push_queries(q)
    w = chunk_size
    done = state.kv.seq_len // w
    while state.summaries_count(Hq) < done:  # summarise every chunk completed by the new tokens
        c = state.summaries_count(Hq)
        qc = state.chunk_queries(c)  # (B, Hq, w, D)
        sl = slice(c * w, (c + 1) * w)
        ck, ok = chunk_summaries(qc, keys[:, :, sl], values[:, :, sl], None if kmask is None else kmask[:, sl],
                                 scale, w)
        state.add_summary(ck, ok.expand(B, 1))
    state.trim_queries()
    pos = query_positions(T, state.kv.seq_len, q.device)
    sums = state.summaries  # None until the first chunk is complete
    if sums is None:
        c_k = q.new_zeros(B, Hq, 0, D)  # (B, Hq, 0, D): no summary yet
        valid = torch.ones(1, 0, dtype=torch.bool, device=q.device)
    else:
        c_k = sums.keys
        valid = torch.ones(1, sums.length, dtype=torch.bool, device=q.device) if sums.mask is None else sums.mask
    idx = select_chunks(q, c_k, valid, pos, w, max_chunks)  # (B, Hq, T, A)
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad):
        return _ChunkAttention.apply(q, keys, values, idx, w, scale, kmask)
    if int(pos.max()) // w + 1 <= max_chunks:  # inside the first A chunks every query sees all: causal attention
        return sdpa(q, keys, values, causal=True, key_padding_mask=kmask, scale=scale)
    if T <= 4:  # decoding: each head gathers only its own A chunks
        return _gather_per_head(q, keys, values, idx, w, scale, kmask)
    out, _ = _chunk_attention(q, keys, values, idx, w, scale, kmask)
    return out.to(q.dtype)


def _gather_per_head(q, k, v, idx, w, scale, key_padding_mask):
    """A few queries: per query head, gather its A selected chunks (A w keys, one ``index_select`` of key rows
    from the cache's storage, no copy of the cache) plus the own, possibly partial, chunk as a slice, and attend
    in one softmax; O(A w d) per query and head."""
    B, Hq, T, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hk
    A = idx.shape[-1]
    Cf = Nk // w  # complete chunks
    own = (Nk - T) // w  # the queries' own chunk (T <= 4 never spans more than the last two chunks)
    lo = min(own, Cf) * w
    acc = torch.promote_types(q.dtype, torch.float32)
    qa = q.to(acc).unsqueeze(3)  # (B, Hq, T, 1, D)
    kt, vt = k[:, :, lo:].to(acc), v[:, :, lo:].to(acc)  # the own chunk (and any later keys): a slice
    s_own = torch.matmul(qa.view(B, Hk, G, T, D), kt.unsqueeze(2).transpose(-1, -2)).view(B, Hq, T, -1)
    qpos = (torch.arange(T, device=q.device) + Nk - T).view(T, 1)
    ok_own = (torch.arange(lo, Nk, device=q.device).view(1, -1) <= qpos).view(1, 1, T, -1)
    if key_padding_mask is not None:
        ok_own = ok_own & key_padding_mask[:, lo:].view(B, 1, 1, -1)
    s, m = s_own, ok_own.expand(B, Hq, T, -1)
    if lo > 0:
        sel = (idx >= 0) & (idx * w < lo)  # selected complete chunks before the own chunk's start (B, Hq, T, A)
        ic = idx.clamp(min=0, max=Cf - 1).view(B, Hq, T * A)
        kf, k_stride = run_rows(k[:, :, : Cf * w].to(acc), w)  # one row per chunk (a view of a ChunkKVCache)
        vf, v_stride = run_rows(v[:, :, : Cf * w].to(acc), w)
        bh = (torch.arange(B, device=q.device).view(B, 1) * Hk
              + torch.arange(Hq, device=q.device).view(1, Hq) // G).view(B, Hq, 1)  # (b, key head) row block
        kg = kf.index_select(0, (bh * k_stride + ic).view(-1)).view(B, Hq, T, A * w, D)
        vg = vf.index_select(0, (bh * v_stride + ic).view(-1)).view(B, Hq, T, A * w, Dv)
        s_sel = torch.matmul(qa, kg.transpose(-1, -2)).squeeze(3)  # (B, Hq, T, A w)
        ok = sel.unsqueeze(-1).expand(B, Hq, T, A, w).reshape(B, Hq, T, A * w)
        if key_padding_mask is not None:
            kpos = (ic.unsqueeze(-1) * w + torch.arange(w, device=q.device)).view(B, -1)  # key positions
            ok = ok & key_padding_mask.gather(1, kpos).view(B, Hq, T, A * w)
        s, m = torch.cat([s_sel, s_own], -1), torch.cat([ok, m], -1)
    s = s * scale
    lse, _ = masked_lse(s, m)
    p = torch.exp(s.masked_fill(~m, float("-inf")) - lse.unsqueeze(-1))  # (B, Hq, T, L)
    n_own = kt.shape[2]
    p_own = p[..., p.shape[-1] - n_own:]
    out = torch.matmul(p_own.reshape(B, Hk, G * T, n_own), vt).view(B, Hq, T, Dv)
    if lo > 0:
        out = out + torch.matmul(p[..., : A * w].unsqueeze(3), vg).squeeze(3)
    return out.to(q.dtype)


class ChunkKVCache(KVCache):
    """A :class:`KVCache` whose storage holds whole chunks of ``chunk_size`` tokens, so that a decoding query
    reads each selected chunk as one row of the storage (one ``index_select``, no copy of the cache)."""

    def __init__(self, *args, chunk_size: int, **kwargs) -> None:
        self.chunk_size = check_int("chunk_size", chunk_size)
        super().__init__(*args, **kwargs)

    def _capacity(self, need: int) -> int:
        w = self.chunk_size
        return -(-super()._capacity(need) // w) * w


class LongHeadsState(DecodeState):
    """LongHeads' decode state: every key/value (``kv``, O(N), offloadable in the paper), one summary key
    per completed chunk and query head (``summaries``; its mask marks chunks whose keys were all padded),
    and the queries of the current incomplete chunk (a chunk's summary needs all of its queries).

    ``extra = r`` keeps the queries of the last r tokens as well, so that ``crop`` can roll back into a
    chunk that was already summarised (its summary is recomputed when it completes again).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 chunk_size: int, extra: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.extra = check_int("extra", extra, low=0)
        self.kv = ChunkKVCache(batch, kv_heads, head_dim, value_dim, chunk_size=self.chunk_size, dtype=dtype,
                               device=device)
        self.built_for(batch=batch, kv_heads=kv_heads, head_dim=head_dim, value_dim=self.kv.value_dim, dtype=dtype,
                       device=self.kv.device)
        self.summaries: KVCache | None = None
        self._q: torch.Tensor | None = None  # (B, Hq, L_q, D): queries of positions q_start ..
        self.q_start = 0

    @property
    def seq_len(self) -> int:
        return self.kv.seq_len

    @seq_len.setter
    def seq_len(self, value: int) -> None:
        if value != 0:
            raise AttributeError("seq_len of a LongHeadsState follows its key/value cache")

    def tensors(self) -> list[torch.Tensor]:
        out = self.kv.tensors() + ([] if self.summaries is None else self.summaries.tensors())
        return out + ([] if self._q is None else [self._q])

    def summaries_count(self, heads: int) -> int:
        if self.summaries is not None and self.summaries.kv_heads != heads:
            raise ValueError(f"q: this LongHeadsState holds summaries for {self.summaries.kv_heads} query heads, "
                             f"got {heads}")
        return 0 if self.summaries is None else self.summaries.length

    def push_queries(self, q: torch.Tensor) -> None:
        check_tensor("q", q, ndim=4)
        self._q = q.detach() if self._q is None else torch.cat([self._q, q.detach()], 2)

    def chunk_queries(self, c: int) -> torch.Tensor:
        w = self.chunk_size
        lo = c * w - self.q_start
        if lo < 0:
            raise ValueError(f"the queries of chunk {c} are no longer held (kept from position {self.q_start})")
        return self._q[:, :, lo : lo + w]

    def add_summary(self, c_k: torch.Tensor, valid: torch.Tensor) -> None:
        B, H, _, D = c_k.shape
        if self.summaries is None:
            self.summaries = KVCache(B, H, D, keys_only=True, dtype=self.kv.dtype, device=self.kv.device)
        self.summaries.append(c_k.detach().to(self.kv.dtype), c_k.new_empty(B, H, c_k.shape[2], 0).to(self.kv.dtype),
                              None if bool(valid.all()) and self.summaries.mask is None else valid)

    def trim_queries(self) -> None:
        """Drop the queries of completed, summarised chunks (keeping the last ``extra`` tokens' queries)."""
        keep_from = min((self.seq_len // self.chunk_size) * self.chunk_size, max(0, self.seq_len - self.extra))
        if self._q is not None and keep_from > self.q_start:
            self._q = self._q[:, :, keep_from - self.q_start :].clone()
            self.q_start = keep_from

    def reorder(self, index: torch.Tensor) -> None:
        self.kv.reorder(index)
        if self.summaries is not None:
            self.summaries.reorder(index)
        if self._q is not None:
            self._q = self._q.index_select(0, index.to(self._q.device))
        self.batch = self.kv.batch

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        chunk_start = (length // self.chunk_size) * self.chunk_size
        if chunk_start < self.q_start:
            raise ValueError(f"length: cannot crop this LongHeadsState to {length} tokens: the queries of its chunk "
                             f"(from position {chunk_start}) are gone (kept from {self.q_start}); build it with "
                             f"extra >= {self.seq_len - chunk_start}")
        self.kv.crop(length)
        if self.summaries is not None:
            self.summaries.crop(min(self.summaries.length, length // self.chunk_size))
        if self._q is not None:
            self._q = self._q[:, :, : length - self.q_start]


LONGHEADS = register(Mechanism(
    name="longheads",
    aliases=("long_heads",),
    family="memory",
    catalog="P050",
    title="LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
    arxiv="2402.10685",
    code="https://github.com/LuLuLuyi/LongHeads",
    summary="Training-free: each head and query attends to max_chunks chunks (first, local, and the best by "
            "q . chunk-summary key), keeping every head within the pre-trained length.",
    patterns=("causal_self",),
    exact=False,
    state="longheads",
    complexity="time O(N A w d) to O(N^2 d) (union of a tile's selections); decode O((N/w + A w) d) per token, "
               "KV store O(N)",
    reference=longheads_reference,
    fast=longheads_fast,
    step=longheads_step,
    init_state=init_longheads_state,
    operator=longheads_operator,
    options=(
        Option("chunk_size", 256, int, low=1, doc="tokens per chunk (w)"),
        Option("max_chunks", 16, int, low=3, doc="chunks per query and head (A = L / w, L the pre-trained length)"),
    ),
    test_options={"chunk_size": 2, "max_chunks": 3},
    test_sizes={"n": 13, "value_dim": 8},
    notes="max_chunks * chunk_size >= N is exact causal attention. causal_cross is not a functional pattern "
          "(chunk summaries need the chunks' queries); decode with step().",
))
