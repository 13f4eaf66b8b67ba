"""HiP attention: hierarchically pruned attention (training-free tree search for the top-k key blocks).

Paper: "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning", Lee et al.,
arXiv 2406.09827 (ICLR 2025 version: "A Training-Free Sub-quadratic Cost Transformer Model Serving
Framework With Hierarchically Pruned Attention"). Official code: https://github.com/DeepAuto-AI/hip-attention
(the v1.1 mask estimation is ``hip_research/hip_attn_legacy/v1_1/attention2_draft*.py``; the block-sparse
attention ``v1_0/attention1_block_gpu_kernel/calc_prob_return_context.py``).

For every block of ``block_size_q`` queries and every head, a tree search picks ``topk / block_size_k``
key blocks: start with that many contiguous groups of key blocks covering the searchable keys; repeat
until every group is one block: split each group in two halves, score each half by its representative
(its first key block: max over the block's scoring queries of q . r for the block's representative
vectors r), keep the best halves. The queries then attend exactly (softmax) to the union of: the first
``sinks`` keys, the selected key blocks, and a local window. O(T log T) mask estimation, O(T k d)
attention, no T x T matrix.

Confirmed against the official code (v1.1 ``hip_attention``: numba draft and causal-batch GPU version):
groups initialised at ``floor(n_blocks * i / kb)``; a group of size s splits into ``floor(s/2)`` and
``s - floor(s/2)`` blocks; empty halves are never selected; the representative of a half is its first key
block; its score is the max over every second query of the block (``q[1::2]``, our ``query_stride=2``) of
``max(q . k_min, q . k_max)`` with ``k_min``/``k_max`` the element-wise min/max of the block's keys
(``block_size_k=1, block_size_k_group=8``: our ``block_size_k=8, representative="minmax"``); the
searchable range of a causal query block ends ``sliding_window`` keys before the block's last key and
those keys are attended densely (causally) by the whole block; the first ``sink_token_size`` keys are
always attended and not counted twice; defaults ``mask_k=512, block_size_q=32, sliding_window=128,
sinks=4``; selection uses raw q . k (the scale does not change the order).

Choices where the official code is silent or a GPU shortcut (options or documented):
- the searchable range of a causal block also ends at the block's first query and is cut to whole key
  blocks (the rest is local), so every searched key is visible to every query of the block and no
  representative reads a key after a query;
- ``representative="exact"`` scores a block by the exact max over its keys instead of min/max summaries;
- ties (equal scores) keep the earlier half; key padding: padded keys are left out of the summaries
  (a block of padding scores -inf) and never attended;
- non-causal: the whole sequence is searchable and the local window is ``sliding_window`` keys on both
  sides of the block (the official code is causal only); a key selected twice is attended once;
- selection runs in float32 (float64 for float64 inputs) whatever the input dtype.
Not prefix-invariant for ``block_size_q > 1``: a query's key set depends on the other queries of its
block (the max), as in the paper. With ``block_size_q = 1`` every query searches for itself and decoding
one token at a time (``step``, KV cache, the same tree search on the cache) equals the causal forward when
``refresh_interval = 1``.

Mask re-use across decode steps (``refresh_interval`` = the official code's mask refresh interval: v1.0
``hip_attention(using_precomputed_mask=True, precomputed_indices, precomputed_ks)``, v1.1
``hip_attention(previous_metadata=...)`` with the refresh decided by ``decode_step % refresh_interval == 0``
in ``v1_1/offload_runner``; v1.2 ``HiPMaskRefreshState``). What is re-used is the selection alone: the
selected key blocks (indices and count) of the one-query search made at a refresh step. A decode step between
refreshes attends with the same exact softmax to the first ``sinks`` keys, those kept blocks, and its own
local window, placed at its own position (the official sparse-attention kernel computes the sliding window
and sinks from the current query position at every step, and drops selected keys that fall inside that
window): the tokens decoded since the refresh are seen through the window (all of them while the interval is
at most the window, 128 by default). Keys that slid out of the window since the refresh and were not selected
then are not attended until the next refresh (in the official code too). Here the kept blocks all lie before
the refresh step's search end, hence before every later step's local window, so nothing is counted twice.
A refresh (the tree search over the cache, as with interval 1) runs at the first one-token step after a
multi-token step (a prefill chunk: official decode index 0 always refreshes) and then every
``refresh_interval`` one-token steps; a multi-token step always searches and discards the kept selection.
State: :class:`HipCache` keeps the selection and the steps served by it; ``reorder`` permutes it with the
batch, ``crop`` discards it (the next step refreshes).
Default ``refresh_interval = 8``: every decoding run of the official repository uses 8
(``HIP_REFRESH_INTERVAL=8`` throughout docs/REPRODUCE.md, ``--refresh_interval`` default 8 in the v1.0/v1.1
decode benchmarks and latency scripts; v1.2's staged default ``[32, 16, 8]`` refreshes its last stage every
8). It changes only decoding: the forward (prefill) is unchanged, and ``refresh_interval = 1`` is exactly the
search-every-token decode (== the forward of each query).
Not done: the official v1.1 offload runner's refresh step searches with a query block made of the current
query and the ``refresh_interval - 1`` queries decoded since the last refresh (its ``prefix_query``); here a
refresh searches with the current query alone (the v1.0 behaviour and the one-query decode above).

Forms: ``reference`` materializes the selected mask densely and runs exact softmax attention over it;
``fast`` gathers sinks + selected blocks + local window per query block as runs of ``block_size_k`` keys
(:func:`attnzoo.kernels.gather.gather_attention`, hand-written backward). Both share the tree search.
Gradients reach q, k, v through the selected scores and values; the search itself is not differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import check_choice, check_int, check_step
from ...kernels.gather import gather_attention
from ...reference import softmax_attention, softmax_weights
from ...registry import Mechanism, Option, register
from ...state import KVCache

_SCORE_BUDGET = 1 << 22  # elements of q.k scores materialized at once during the search


@dataclass
class HipPlan:
    """Selection of every (batch, query head, query block)."""

    blocks: torch.Tensor  # (B, Hq, nb, kb) selected key block ids (ascending)
    valid: torch.Tensor  # (B, Hq, nb, kb) bool, False for unused slots (fewer blocks than kb exist)
    search_end: torch.Tensor  # (nb,) keys [0, search_end) were searchable
    local_lo: torch.Tensor  # (nb,) local window [local_lo, local_hi)
    local_hi: torch.Tensor  # (nb,)
    rows: torch.Tensor  # (nb,) real queries in each block
    bq: int
    bk: int
    sinks: int


def _geometry(nq, nk, causal, bq, bk, sliding_window, device):
    """Per query block: real rows, search end (causal: a multiple of bk), local window [lo, hi)."""
    nb = -(-nq // bq)
    off = nk - nq
    first = torch.arange(nb, device=device) * bq
    rows = torch.clamp(nq - first, max=bq)  # (nb,)
    start = off + first  # key position of the block's first query
    end = start + rows  # one past the key position of its last query
    if causal:
        search_end = torch.clamp(torch.minimum(end - sliding_window, start), min=0) // bk * bk
        lo, hi = search_end, torch.clamp(end, max=nk)
    else:  # everything is searchable; a partial last key block is scored over its real keys
        search_end = torch.full_like(start, nk)
        lo = torch.clamp(start - sliding_window, min=0)
        hi = torch.clamp(end + sliding_window, max=nk)
    return nb, rows, search_end, lo, hi


def _representatives(k, key_padding_mask, bk, mode):
    """Per key block: representative vectors (B, Hk, nkb, V, D) and their validity (B, Hk, nkb, V).

    ``minmax`` (official v1.1 default, ``block_size_k_group``): the element-wise min and max of the block's
    keys (V = 2); ``exact``: the block's keys themselves (V = bk). Padded keys are left out."""
    B, Hk, Nk, D = k.shape
    nkb = -(-Nk // bk)
    kk = F.pad(k, (0, 0, 0, nkb * bk - Nk)).reshape(B, Hk, nkb, bk, D)
    ok = torch.ones(B, Nk, dtype=torch.bool, device=k.device) if key_padding_mask is None else key_padding_mask
    ok = F.pad(ok, (0, nkb * bk - Nk), value=False).reshape(B, 1, nkb, bk)
    if mode == "exact":
        return kk, ok.expand(B, Hk, nkb, bk)
    okv = ok.unsqueeze(-1)  # (B, 1, nkb, bk, 1)
    kmin = torch.where(okv, kk, torch.full_like(kk, float("inf"))).amin(dim=3)  # (B, Hk, nkb, D)
    kmax = torch.where(okv, kk, torch.full_like(kk, float("-inf"))).amax(dim=3)
    any_ok = ok.any(dim=3).expand(B, Hk, nkb)  # (B, Hk, nkb)
    rep = torch.stack([kmin, kmax], dim=3)  # (B, Hk, nkb, 2, D)
    rep = torch.where(any_ok.view(B, Hk, nkb, 1, 1), rep, torch.zeros_like(rep))
    return rep, any_ok.unsqueeze(-1).expand(B, Hk, nkb, 2)


def hip_select(q, k, key_padding_mask, *, causal, topk, block_size_q, block_size_k, sliding_window,
               sinks, query_stride, representative="minmax", summaries=None) -> HipPlan:
    """The tree search (shared by both forms). q (B, Hq, Nq, D), k (B, Hk, Nk, D).

    ``summaries``: ``(rep (B, Hk, cap, V, D), rep_ok (B, Hk, cap, V), n)``, the representatives of the first
    ``n`` complete key blocks kept by a :class:`HipCache` (decoding); None computes them from ``k``. Only
    complete blocks before the search end are ever scored, so both give the same selection."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = Hq // Hk
    dev = q.device
    bq, bk = block_size_q, block_size_k
    kb = -(-topk // bk)
    nb, rows, search_end, lo, hi = _geometry(Nq, Nk, causal, bq, bk, sliding_window, dev)
    n_blk = -(-search_end // bk)  # (nb,) key blocks in the searchable range
    base = torch.arange(kb, device=dev)
    blocks = base.expand(B, Hq, nb, kb).clone()  # blocks that need no search take the first kb
    valid = (base.view(1, kb) < n_blk.view(nb, 1)).expand(B, Hq, nb, kb).clone()
    searching = (n_blk > kb).nonzero().flatten()  # (ns,)
    if searching.numel():
        acc = torch.promote_types(q.dtype, torch.float32)
        if summaries is None:
            rep, rep_ok = _representatives(k.detach().to(acc), key_padding_mask, bk, representative)
            n_rep = rep.shape[2]
        else:
            rep, rep_ok, n_rep = summaries
        V = rep.shape[3]
        nkb = rep.shape[2]  # row stride of one (batch, head) in the flattened representatives
        rep = rep.reshape(B * Hk * nkb, V * D)  # one row per key block
        rep_ok = rep_ok.reshape(B * Hk * nkb, V)
        # scoring queries of every block: rows stride-1, 2*stride-1, ... (clamped to the last real row); rows past
        # the fullest searching block only repeat its last row (decoding: one query, one scoring row)
        r_cnt = -(-min(bq, int(rows[searching].max())) // query_stride)
        r_ids = torch.arange(r_cnt, device=dev) * query_stride + (query_stride - 1)  # (R',)
        r_ids = torch.minimum(r_ids.view(1, r_cnt), rows[searching].view(-1, 1) - 1)  # (ns, R')
        q_rows = searching.view(-1, 1) * bq + r_ids  # (ns, R') query indices
        qs = q.detach().to(acc)[:, :, q_rows.reshape(-1)].view(B, Hq, -1, r_cnt, D)  # (B, Hq, ns, R', D)
        k_base = (torch.arange(B, device=dev).view(B, 1) * Hk
                  + torch.arange(Hq, device=dev).view(1, Hq) // G).view(B, Hq, 1, 1) * nkb
        nbs = n_blk[searching].view(1, 1, -1, 1)
        i = torch.arange(kb, device=dev).view(1, 1, 1, kb)
        start = (nbs * i) // kb  # (1, 1, ns, kb)
        size = (nbs * (i + 1)) // kb - start
        start = start.expand(B, Hq, -1, kb).clone()
        size = size.expand(B, Hq, -1, kb).clone()
        iters = math.ceil(math.log2(int((-(-n_blk[searching] // kb)).max())))
        ns = searching.numel()
        step = max(1, _SCORE_BUDGET // max(1, B * Hq * kb * V * (r_cnt + D)))

        def score_of(first):
            """Score (B, Hq, ns, kb) of the groups starting at key blocks ``first`` (B, Hq, ns, kb): their first
            block's representatives, max over the scoring queries and the representatives (padding: -inf)."""
            out = torch.empty(B, Hq, ns, kb, dtype=acc, device=dev)
            for s in range(0, ns, step):
                e = min(ns, s + step)
                flat = (first[:, :, s:e].clamp(max=n_rep - 1) + k_base).reshape(-1)  # representative blocks
                reps = rep.index_select(0, flat).view(B, Hq, e - s, kb * V, D)
                ok = rep_ok.index_select(0, flat).view(B, Hq, e - s, kb, V)
                sc = torch.matmul(qs[:, :, s:e], reps.transpose(-1, -2))  # (B, Hq, g, R', kb*V)
                sc = sc.amax(dim=3).view(B, Hq, e - s, kb, V)  # max over the scoring queries first
                out[:, :, s:e] = sc.masked_fill(~ok, float("-inf")).amax(dim=-1)
            return out

        # A half's representative is its first block, so the first half of a group scores what the group
        # scored: each level scores only the second halves.
        score = score_of(start)
        for _ in range(iters):
            half = size // 2
            second = start + half
            c_start = torch.stack([start, second], dim=-1).flatten(-2)  # (B, Hq, ns, 2kb)
            c_size = torch.stack([half, size - half], dim=-1).flatten(-2)
            c_score = torch.stack([score, score_of(second)], dim=-1).flatten(-2)
            # empty halves are never kept; a half whose representative keys are all padding ranks last
            ranked = torch.where(c_size < 1, torch.full_like(c_score, float("-inf")),
                                 torch.nan_to_num(c_score, neginf=torch.finfo(acc).min))
            order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :kb]
            start, size, score = c_start.gather(-1, order), c_size.gather(-1, order), c_score.gather(-1, order)
        blocks[:, :, searching] = torch.sort(start, dim=-1).values
        valid[:, :, searching] = True
    return HipPlan(blocks, valid, search_end, lo, hi, rows, bq, bk, sinks)


def _plan(q, k, key_padding_mask, causal, opts) -> HipPlan:
    return hip_select(q, k, key_padding_mask, causal=causal, topk=opts["topk"], block_size_q=opts["block_size_q"],
                      block_size_k=opts["block_size_k"], sliding_window=opts["sliding_window"],
                      sinks=opts["sinks"], query_stride=opts["query_stride"], representative=opts["representative"])


def selected_mask(p: HipPlan, nq: int, nk: int, *, causal: bool, key_padding_mask=None) -> torch.Tensor:
    """Dense (B, Hq, Nq, Nk) bool mask of the plan: sinks | selected blocks (within the searched range) |
    local window, then causal and padding."""
    B, Hq, nb, kb = p.blocks.shape
    dev = p.blocks.device
    j = torch.arange(nk, device=dev)
    blk_of_row = torch.arange(nq, device=dev) // p.bq  # (Nq,)
    chosen = torch.zeros(B, Hq, nb, -(-nk // p.bk) + 1, dtype=torch.bool, device=dev)
    chosen.scatter_(-1, torch.where(p.valid, p.blocks, torch.full_like(p.blocks, chosen.shape[-1] - 1)), True)
    chosen = chosen[..., :-1]  # (B, Hq, nb, nk_blocks)
    in_sel = chosen[:, :, :, j // p.bk] & (j < p.search_end.view(nb, 1))  # (B, Hq, nb, Nk)
    in_local = (j >= p.local_lo.view(nb, 1)) & (j < p.local_hi.view(nb, 1))  # (nb, Nk)
    mask = (in_sel | in_local | (j < p.sinks))[:, :, blk_of_row]  # (B, Hq, Nq, Nk)
    if causal:
        mask = mask & (j.view(1, nk) <= torch.arange(nq, device=dev).view(nq, 1) + (nk - nq))
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.view(B, 1, 1, nk)
    return mask


def hip_reference(q, k, v, *, causal, key_padding_mask, scale, **opts):
    """Exact softmax attention over the tree search's selection, the mask materialized densely."""
    p = _plan(q, k, key_padding_mask, causal, opts)
    mask = selected_mask(p, q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask)
    return softmax_attention(q, k, v, attn_mask=mask, scale=scale)


def hip_operator(q, k, v, *, causal, key_padding_mask, scale, **opts):
    """Effective operator (B, Hq, Nq, Nk): softmax over the tree search's selection (zero off the selected keys)."""
    p = _plan(q, k, key_padding_mask, causal, opts)
    mask = selected_mask(p, q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask)
    return softmax_weights(q, k, attn_mask=mask, scale=scale)


def hip_fast(q, k, v, *, causal, key_padding_mask, scale, **opts):
    """Gathered sinks + selected key blocks + local window per query block, as runs of ``block_size_k``
    keys; O(T (k + w) d)."""
    B, Nk = k.shape[0], k.shape[2]
    p = _plan(q, k, key_padding_mask, causal, opts)
    pad = -(-Nk // p.bk) * p.bk - Nk
    kpm = key_padding_mask
    if pad:  # whole key blocks: pad keys/values, the padding is masked
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        kpm = torch.ones(B, Nk, dtype=torch.bool, device=k.device) if kpm is None else kpm
        kpm = F.pad(kpm, (0, pad), value=False)
    return _attend(q, k, v, p, Nk, kpm, causal=causal, scale=scale)


def _selected_slots(p: HipPlan, Nk) -> torch.Tensor:
    """(B, Hq, nb, kb*bk) bool: the keys of the plan's selected blocks that are attended as selected keys
    (valid slots, not sinks, within the searched range, not in the local window: non-causal overlap)."""
    nb, bk, S = p.blocks.shape[2], p.bk, min(p.sinks, Nk)
    lo5, hi5 = p.local_lo.view(1, 1, nb, 1, 1), p.local_hi.view(1, 1, nb, 1, 1)
    sel = p.blocks.unsqueeze(-1) * bk + torch.arange(bk, device=p.blocks.device)  # (B, Hq, nb, kb, bk)
    sel_ok = p.valid.unsqueeze(-1) & (sel >= S) & (sel < p.search_end.view(1, 1, nb, 1, 1))
    return (sel_ok & ~((sel >= lo5) & (sel < hi5))).flatten(-2)


def _attend(q, k, v, p: HipPlan, Nk, kpm, *, causal, scale, sel_ok=None):
    """The plan's attention. k (B, Hk, nkb*bk, D), v: the ``Nk`` keys padded to whole key blocks; ``kpm``
    (B, nkb*bk) masks the padding (may be None when causal: every padded key lies after every query).
    ``sel_ok``: :func:`_selected_slots` of the plan, if already computed."""
    B, Hq, Nq, D = q.shape
    Hk = k.shape[1]
    G = Hq // Hk
    nb, bq, bk, S = p.blocks.shape[2], p.bq, p.bk, min(p.sinks, Nk)
    if nb == 1:  # one query block (decoding): no padding rows
        bq = Nq
    dev = q.device
    nkb = k.shape[2] // bk
    tok = torch.arange(bk, device=dev)
    # sink blocks (keys < S)
    ns_blk = -(-S // bk)
    sink_blk = torch.arange(ns_blk, device=dev).expand(B, Hq, nb, ns_blk)
    sink_ok = ((sink_blk.unsqueeze(-1) * bk + tok) < S).flatten(-2)  # (B, Hq, nb, ns_blk*bk)
    if sel_ok is None:
        sel_ok = _selected_slots(p, Nk)  # (B, Hq, nb, kb*bk)
    # local window blocks
    lo_blk, hi_blk = p.local_lo // bk, -(-p.local_hi // bk)  # (nb,)
    wl = int((hi_blk - lo_blk).max())
    loc_blk = torch.minimum(lo_blk.view(nb, 1) + torch.arange(wl, device=dev), torch.tensor(nkb - 1, device=dev))
    loc = loc_blk.unsqueeze(-1) * bk + tok  # (nb, wl, bk)
    loc_ok = ((loc >= p.local_lo.view(nb, 1, 1)) & (loc < p.local_hi.view(nb, 1, 1)) & (loc >= S)
              & (torch.arange(wl, device=dev).view(1, wl, 1) < (hi_blk - lo_blk).view(nb, 1, 1))).flatten(-2)
    index = torch.cat([sink_blk, p.blocks, loc_blk.expand(B, Hq, nb, wl)], dim=-1)  # (B, Hq, nb, Lr)
    # Unused selection slots (topk beyond the searchable blocks) may hold ids past the last key block; they
    # are masked by ``slot``, but the gather must stay in range.
    index = index.clamp(0, nkb - 1)
    slot = torch.cat([sink_ok, sel_ok, loc_ok.expand(B, Hq, nb, wl * bk)], dim=-1)  # (B, Hq, nb, Lr*bk)
    Lr = index.shape[-1]
    qb = F.pad(q, (0, 0, 0, nb * bq - Nq)).reshape(B, Hk, G * nb, bq, D)  # (B, Hk, G*nb, bq, D)
    qpos = None
    if causal:
        pos = (Nk - Nq) + torch.arange(nb * bq, device=dev).view(1, nb, bq)
        qpos = pos.expand(G, nb, bq).reshape(1, 1, G * nb, bq)
    out, _ = gather_attention(qb, k, v, index.reshape(B, Hk, G * nb, Lr), scale=scale,
                              slot_mask=slot.reshape(B, Hk, G * nb, Lr * bk), qpos=qpos, key_padding_mask=kpm,
                              run=bk)
    return out.reshape(B, Hq, nb * bq, -1)[:, :, :Nq].to(q.dtype)


def init_hip_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device, block_size_k, representative,
                   **_options):
    return HipCache(batch, kv_heads, head_dim, value_dim, block_size_k=block_size_k, representative=representative,
                    dtype=dtype, device=device)


class HipCache(KVCache):
    """HiP's decode state: every key and value (a :class:`KVCache`), plus the representatives of every complete
    key block, computed once when the block completes (``minmax``: O(b d) per block) instead of re-reducing all
    N keys at every token; a step then scores O(N / b) cached representatives per tree level.

    Storage is whole key blocks, zero (or finite, after a crop) beyond the stored keys, so a step reads the
    keys padded to whole blocks as a view instead of copying them. ``representative="exact"`` keeps no
    summaries (its representatives are the keys themselves).

    Mask re-use (``refresh_interval > 1``): the key blocks selected by the last refresh step's search, per batch
    row and query head, and ``mask_age``, the one-token steps served by them counting the refresh step (0: none
    kept). ``reorder`` permutes them with the batch; ``crop`` discards them, so the next step refreshes.
    """

    _tensor_fields = ("_k", "_v", "_mask", "_rep", "_rep_ok", "_sel_blocks", "_sel_valid", "_sel_slots")

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 block_size_k: int, representative: str = "minmax", dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)
        self.block_size_k = check_int("block_size_k", block_size_k, low=1)
        self.representative = check_choice("representative", representative, ("minmax", "exact"))
        acc = torch.promote_types(self.dtype, torch.float32)
        V = 2 if self.representative == "minmax" else 0
        self._rep = torch.zeros(batch, kv_heads, 0, V, head_dim, dtype=acc, device=self.device)  # (B, Hk, cap, V, D)
        self._rep_ok = torch.zeros(batch, kv_heads, 0, V, dtype=torch.bool, device=self.device)  # (B, Hk, cap, V)
        self.n_rep = 0  # complete key blocks summarised
        self._sel_blocks: torch.Tensor | None = None  # (B, Hq, kb) key blocks selected at the last refresh
        self._sel_valid: torch.Tensor | None = None  # (B, Hq, kb) bool, False for unused slots
        self._sel_slots: torch.Tensor | None = None  # (B, Hq, 1, kb*bk) bool, attended keys of those blocks
        self.mask_age = 0  # one-token steps served by the kept selection, its refresh step included; 0: none kept

    def _capacity(self, need: int) -> int:
        bk = self.block_size_k
        return -(-super()._capacity(need) // bk) * bk

    def _grow(self, capacity: int) -> None:
        super()._grow(capacity)
        self._k[:, :, self.length:].zero_()  # finite padding: the step reads whole blocks
        self._v[:, :, self.length:].zero_()

    def append(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        keys, values, mask = super().append(k, v, key_padding_mask)
        bk, n = self.block_size_k, self.length // self.block_size_k
        if self.representative == "minmax" and n > self.n_rep:
            lo, hi = self.n_rep * bk, n * bk
            rep, ok = _representatives(keys[:, :, lo:hi].detach().to(self._rep.dtype),
                                       None if mask is None else mask[:, lo:hi], bk, "minmax")
            if n > self._rep.shape[2]:
                cap = max(n, self._rep.shape[2] * 2, 16)
                grown = self._rep.new_zeros(self.batch, self.kv_heads, cap, *self._rep.shape[3:])
                grown_ok = self._rep_ok.new_zeros(self.batch, self.kv_heads, cap, self._rep_ok.shape[3])
                grown[:, :, : self.n_rep] = self._rep[:, :, : self.n_rep]
                grown_ok[:, :, : self.n_rep] = self._rep_ok[:, :, : self.n_rep]
                self._rep, self._rep_ok = grown, grown_ok
            self._rep[:, :, self.n_rep: n] = rep
            self._rep_ok[:, :, self.n_rep: n] = ok
            self.n_rep = n
        return keys, values, mask

    def summaries(self):
        """(rep (B, Hk, cap, 2, D), rep_ok (B, Hk, cap, 2), n) for :func:`hip_select`, or None (``exact``)."""
        return None if self.representative != "minmax" else (self._rep, self._rep_ok, self.n_rep)

    def whole_blocks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values padded to whole key blocks, as views of the storage; None if it is not that long."""
        end = -(-self.length // self.block_size_k) * self.block_size_k
        if self._off + end > self._k.shape[2]:
            return None
        return self._k[:, :, self._off: self._off + end], self._v[:, :, self._off: self._off + end]

    def keep_selection(self, blocks: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor) -> None:
        """Keep a refresh step's selection, blocks (B, Hq, kb), valid (B, Hq, kb) and the attended keys of those
        blocks, slots (B, Hq, 1, kb*bk) (``_selected_slots``); it has served one step."""
        self._sel_blocks, self._sel_valid, self._sel_slots, self.mask_age = blocks, valid, slots, 1

    def drop_selection(self) -> None:
        self._sel_blocks, self._sel_valid, self._sel_slots, self.mask_age = None, None, None, 0

    def selected_slots(self) -> torch.Tensor | None:
        return self._sel_slots

    def selection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(blocks (B, Hq, kb), valid (B, Hq, kb)) kept at the last refresh, or None."""
        return None if self._sel_blocks is None else (self._sel_blocks, self._sel_valid)

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self._rep = self._rep.index_select(0, index.to(self._rep.device))
        self._rep_ok = self._rep_ok.index_select(0, index.to(self._rep_ok.device))
        if self._sel_blocks is not None:  # the kept selection follows its batch rows
            self._sel_blocks = self._sel_blocks.index_select(0, index.to(self._sel_blocks.device))
            self._sel_valid = self._sel_valid.index_select(0, index.to(self._sel_valid.device))
            self._sel_slots = self._sel_slots.index_select(0, index.to(self._sel_slots.device))

    def crop(self, length: int) -> None:
        super().crop(length)
        self.n_rep = min(self.n_rep, self.length // self.block_size_k)
        self.drop_selection()  # selected for a query that may be gone: the next step refreshes


def _reused_plan(blocks, valid, nk, opts, device) -> HipPlan:
    """Plan of one new query (key position ``nk - 1``) re-using the blocks (B, Hq, kb) kept at the last refresh,
    with this step's own local window. The kept blocks lie before the refresh step's search end, which is at most
    this step's: no kept key is in the window."""
    bq, bk = opts["block_size_q"], opts["block_size_k"]
    _, rows, search_end, lo, hi = _geometry(1, nk, True, bq, bk, opts["sliding_window"], device)
    return HipPlan(blocks.unsqueeze(2), valid.unsqueeze(2), search_end, lo, hi, rows, bq, bk, opts["sinks"])


def hip_step(q, k, v, state: KVCache, *, scale, key_padding_mask=None, **opts):
    """Append T tokens to the KV cache and run the same tree search for the new queries over the cache
    (a :class:`HipCache` supplies its incrementally kept block representatives and whole-block views).
    ``refresh_interval > 1``: a one-token step between refreshes re-uses the blocks the last refresh selected."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=KVCache)
    interval = check_int("refresh_interval", opts["refresh_interval"], low=1)
    own = isinstance(state, HipCache) and state.block_size_k == opts["block_size_k"] \
        and state.representative == opts["representative"]
    if interval > 1 and not own:
        got = type(state).__name__ if not isinstance(state, HipCache) else (
            f"a HipCache with block_size_k={state.block_size_k}, representative={state.representative!r}")
        raise ValueError(f"refresh_interval: re-using the selection across decode steps (refresh_interval="
                         f"{interval}) needs the state of init_state, a HipCache with block_size_k="
                         f"{opts['block_size_k']} and representative={opts['representative']!r}; got state {got}")
    keys, values, mask = state.append(k, v, key_padding_mask)  # (B, Hk, L, D), (B, Hk, L, Dv), (B, L)
    if not own:
        return hip_fast(q, keys, values, causal=True, key_padding_mask=mask, scale=scale, **opts)
    one, sel_ok = q.shape[2] == 1, None
    if one and interval > 1 and 0 < state.mask_age < interval:  # between refreshes: the kept selection
        p = _reused_plan(*state.selection(), keys.shape[2], opts, q.device)
        sel_ok = state.selected_slots()  # the refresh step's, equal to this step's (no kept key is local)
        state.mask_age += 1
    else:
        p = hip_select(q, keys, mask, causal=True, topk=opts["topk"], block_size_q=opts["block_size_q"],
                       block_size_k=opts["block_size_k"], sliding_window=opts["sliding_window"],
                       sinks=opts["sinks"], query_stride=opts["query_stride"],
                       representative=opts["representative"], summaries=state.summaries())
        if one and interval > 1:  # a refresh
            sel_ok = _selected_slots(p, keys.shape[2])  # (B, Hq, 1, kb*bk)
            state.keep_selection(p.blocks[:, :, 0], p.valid[:, :, 0], sel_ok)
        else:
            state.drop_selection()
    Nk = keys.shape[2]
    whole = state.whole_blocks()
    pad = -(-Nk // p.bk) * p.bk - Nk
    if whole is None:
        keys, values = F.pad(keys, (0, 0, 0, pad)), F.pad(values, (0, 0, 0, pad))
    else:
        keys, values = whole
    # the padding lies after every query (causal): the mask needs no padding unless the cache holds one
    kpm = None if mask is None else F.pad(mask, (0, pad), value=False)
    return _attend(q, keys, values, p, Nk, kpm, causal=True, scale=scale, sel_ok=sel_ok)


HIP = register(Mechanism(
    name="hip",
    aliases=("hip_attention", "hierarchically_pruned_attention"),
    family="sparse",
    catalog="P103",
    title="HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
    arxiv="2406.09827",
    code="https://github.com/DeepAuto-AI/hip-attention",
    summary="Per query block, a binary tree search over key blocks keeps the top-k blocks by a "
            "representative q.k max; exact softmax over those blocks + sinks + a local window.",
    patterns=("noncausal_self", "causal_self", "causal_cross"),
    exact=False,
    state="kv",
    complexity="search O(T log(T/k) k d / b_q), attention O(T (k + w) d); memory O(T) + tiles",
    reference=hip_reference,
    fast=hip_fast,
    step=hip_step,
    init_state=init_hip_cache,
    operator=hip_operator,
    options=(
        Option("topk", 512, int, low=1, doc="keys kept by the tree search (mask_k); rounded up to key blocks"),
        Option("block_size_q", 32, int, low=1, doc="queries sharing one search (b_q); 1 = per-query, decodable"),
        Option("block_size_k", 8, int, low=1, doc="keys per key block (b_k)"),
        Option("sliding_window", 128, int, low=0, doc="keys before each query block attended densely"),
        Option("sinks", 4, int, low=0, doc="leading keys every query attends to (official sink_token_size)"),
        Option("query_stride", 2, int, low=1, doc="score halves with every query_stride-th query of the block"),
        Option("representative", "minmax", str, choices=("minmax", "exact"),
               doc="score of a key block: q . (element-wise min / max of its keys) as official, or exact max"),
        Option("refresh_interval", 8, int, low=1,
               doc="decoding: search every refresh_interval one-token steps, re-use the selected blocks "
                   "in between (official 8); 1 = search every token (step == forward)"),
    ),
    prefix_invariant=False,  # with the default block_size_q=32; block_size_q=1 is (tests/mechanisms/sparse/test_hip.py)
    test_options={"topk": 4, "block_size_q": 1, "block_size_k": 2, "sliding_window": 1, "sinks": 1,
                  "query_stride": 1, "refresh_interval": 1},
    test_sizes={"n": 13, "nq": 5, "nk": 15},
    notes="topk >= the searchable keys is exact softmax attention; block_size_q = 1 makes it prefix-invariant "
          "and decodable (step == forward); larger query blocks share one selection (the paper's prefill), so "
          "a query's keys then depend on the later queries of its block: prefix_invariant=False. Decoding re-uses "
          "the selected blocks for refresh_interval (default 8, official) one-token steps; 1 searches every "
          "token.",
))
