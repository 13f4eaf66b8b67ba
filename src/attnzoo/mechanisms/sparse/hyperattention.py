"""HyperAttention: sortLSH bucket blocks plus a sampled residual, merged by log-sum-exp.

Paper: "HyperAttention: Long-context Attention in Near-Linear Time", Han et al., ICLR 2024,
arXiv 2310.05869. Official code: https://github.com/insuhan/hyper-attn (``models/attention/hyper_attn.py``).

Approximates ``softmax(q k^T * scale) v`` in near-linear time. (1) sortLSH: queries and keys are hashed
with one angular LSH (``lsh_num_projs`` random hyperplanes, bucket ids in Gray-code order) and sorted by
bucket; the sorted keys are cut into blocks of ``block_size`` and the sorted queries, padded to a multiple
of ``block_size``, into as many blocks (the official code); query block b attends exactly to key block b.
In self attention the query blocks are blocks of ``block_size`` too, so the query of sorted rank r meets
the keys of sorted rank in the same block, ``r // block_size`` (the paper's mask M^H, Definition 1),
whether or not N is a multiple of ``block_size``. (2) Residual: ``sample_size`` key columns are drawn
uniformly with replacement; each query attends to the samples that are *not* in its own block, and the
partial normaliser is scaled by ``n / sample_size`` (an unbiased estimate of the mass outside the block).
The two parts are merged by their log-sum-exp (:func:`attnzoo.kernels.merge.merge_attention`).
Causal: below ``min_seq_len`` keys exact causal attention; above, the sequence is split in halves (odd
lengths padded by one zero row, as the official code does), each half recursively causal, plus the
non-causal HyperAttention of (second-half queries x first-half keys), merged by log-sum-exp.

Confirmed against the official code: uniform sampling *with replacement* over all n keys, weight
``n / m``, sampled columns falling in the query's own block are dropped (they are counted exactly by the
block part); one projection shared by queries, keys and all heads; ``perm[bin]`` Gray-code bucket ids;
defaults ``lsh_num_projs=7, block_size=256, sample_size=256, min_seq_len=4096``; non-causal inputs with
fewer than ``min_seq_len`` queries are computed exactly.

Choices where the official code is silent or loose (each an option or documented limit):
- randomness is a function of ``seed`` (hyperplanes) and of the recursion node (samples), drawn once per
  (query head, node) and shared by the batch, so results are reproducible and batch rows independent;
- the last key block may be partial (official pads sorted keys with zero rows that then *count* in the
  block softmax); here padded slots are masked;
- cross attention (Nq != Nk): the official query block size is ``ceil(Nq / b) * b // n_blocks``, which
  only works when that division is exact (otherwise its reshape fails); here it is rounded up: the
  official size wherever the official code runs, and elsewhere the last key blocks may meet no query;
- key padding: padded keys (and, in self attention, the queries at padded positions) are sorted after
  every real one (never in a real block), never sampled, and
  the residual weight is ``n_valid / m`` per batch row;
- ``sample_size >= Nk`` uses every key exactly once with weight 1 (the residual is then exact, so the
  whole result is exact): the exact limit of the estimator;
- hashing and sorting run in float64 whatever the input dtype, so bfloat16 and float32 inputs with the
  same values get the same buckets.

Not prefix-invariant (``prefix_invariant=False``): in the causal recursion the output at position i depends
on the *queries* after i (they share its sortLSH blocks) and on the total length (split points), as in the
paper. It never reads keys or values after i. Use it for prefill/evaluation, not for training a causal LM
where that dependence leaks the future. No decode step (the paper's method is a prefill method).

Forms: ``reference`` materializes the estimator's coefficient matrix ``c`` (1 in the own block, the
sample weight times the sample count elsewhere) and computes ``softmax(s + log c) v`` densely;
``fast`` gathers the blocks and samples (:func:`attnzoo.kernels.gather.gather_attention`, hand-written
backward) and merges by log-sum-exp; both use the same hashing and samples. Gradients are exact for the
estimator (selection and samples held fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...kernels.gather import gather_attention
from ...kernels.merge import merge_attention
from ...kernels.sdpa import sdpa
from ...reference import acc_dtype, softmax_attention
from ...registry import CrossSpec, Mechanism, Option, register


# --------------------------------------------------------------------------------------------------------
# Selection (shared by both forms): angular LSH, sorting, blocks, samples
# --------------------------------------------------------------------------------------------------------
def _generator(seed: int, node: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + node * 7919) % (2 ** 63))


def lsh_hash(x: torch.Tensor, num_projs: int, seed: int) -> torch.Tensor:
    """Angular LSH bucket of every row of x (..., N, D) -> (..., N) int64, Gray-code ordered.

    Signs of ``num_projs`` Gaussian projections (drawn from ``seed``) form a bit pattern b; the bucket is
    the b-th entry of the reflected Gray sequence, ``b ^ (b >> 1)`` (the official ``perm[bin_ids]``).
    """
    if num_projs == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device)
    proj = torch.randn(x.shape[-1], num_projs, generator=_generator(seed, 0), dtype=torch.float64)
    bits = (torch.matmul(x.detach().double(), proj.to(x.device)) > 0).to(torch.int64)  # (..., N, r)
    b = (bits << torch.arange(num_projs, device=x.device)).sum(dim=-1)  # (..., N)
    return b ^ (b >> 1)


@dataclass
class _Plan:
    """Selection of one non-causal HyperAttention call (all index tensors int64)."""

    q_order: torch.Tensor  # (B, Hq, Nq) query ids in sorted order
    k_order: torch.Tensor  # (B, Hk, Nk) key ids in sorted order (padded keys last)
    nblocks: int
    qbs: int  # query rows per block (== bk in self attention)
    bk: int  # keys per block
    samples: torch.Tensor | None  # (B, Hq, m) sorted key positions of the residual samples, or None
    log_weight: torch.Tensor | None  # (B,) log of the residual weight n_valid / m (0 when exact)


def plan(q, k, kpm, *, block_size, sample_size, lsh_num_projs, seed, node, qpm=None) -> _Plan:
    """sortLSH blocks and residual samples for q (B, Hq, Nq, D), k (B, Hk, Nk, D), kpm (B, Nk) or None;
    ``qpm`` (B, Nq) marks queries at padded positions (self attention), sorted after every real query."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    hq = lsh_hash(q, lsh_num_projs, seed)  # (B, Hq, Nq)
    hk = lsh_hash(k, lsh_num_projs, seed)  # (B, Hk, Nk)
    if kpm is not None:
        hk = torch.where(kpm.view(B, 1, Nk), hk, torch.full_like(hk, 1 << lsh_num_projs))  # padding sorts last
    if qpm is not None:  # a padded position's query sorts last, so padded content never moves a real query
        hq = torch.where(qpm.view(B, 1, Nq), hq, torch.full_like(hq, 1 << lsh_num_projs))
    q_order = torch.sort(hq, dim=-1, stable=True).indices  # (B, Hq, Nq)
    k_order = torch.sort(hk, dim=-1, stable=True).indices  # (B, Hk, Nk)
    bk = min(block_size, Nk)
    nblocks = -(-Nk // bk)  # key blocks of bk sorted keys (the last may be partial)
    nq_pad = -(-Nq // bk) * bk  # sorted queries padded to a multiple of bk (official)
    # ... and cut into as many blocks as the keys: bk rows when Nq == Nk, so query rank r meets key block
    # r // bk. Rounded up where the official division is not exact (cross only): every query has a block.
    qbs = -(-nq_pad // nblocks)
    samples = log_weight = None
    n_valid = torch.full((B,), Nk, device=q.device) if kpm is None else kpm.sum(dim=1)  # (B,)
    if sample_size > 0 and Nq > qbs and Nk > bk:
        if sample_size >= Nk:  # every key once, weight 1: the residual is exact
            samples = torch.arange(Nk, device=q.device).expand(B, Hq, Nk)
            log_weight = torch.zeros(B, dtype=torch.float64, device=q.device)
        else:  # uniform with replacement over the valid keys (they occupy sorted positions < n_valid)
            u = torch.rand(Hq, sample_size, generator=_generator(seed, node), dtype=torch.float64).to(q.device)
            samples = (u.view(1, Hq, sample_size) * n_valid.view(B, 1, 1)).floor().long()  # (B, Hq, m)
            samples = torch.minimum(samples, (n_valid - 1).clamp(min=0).view(B, 1, 1))
            log_weight = torch.log(n_valid.double() / sample_size)  # (B,); -inf when no valid key
    return _Plan(q_order, k_order, nblocks, qbs, bk, samples, log_weight)


def _rank(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation along the last axis: rank[order[i]] = i."""
    return torch.argsort(order, dim=-1)


# --------------------------------------------------------------------------------------------------------
# Reference: the estimator's coefficient matrix, dense
# --------------------------------------------------------------------------------------------------------
def _coefficients_noncausal(q, k, kpm, p: _Plan | None) -> torch.Tensor:
    """c (B, Hq, Nq, Nk): out_i = sum_j c_ij e^{s_ij} v_j / sum_j c_ij e^{s_ij}. ``p=None`` is exact."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = Hq // Hk
    valid = torch.ones(B, 1, 1, Nk, dtype=torch.float64, device=q.device)
    if kpm is not None:
        valid = kpm.view(B, 1, 1, Nk).double()
    if p is None:
        return valid.expand(B, Hq, Nq, Nk)
    q_block = _rank(p.q_order) // p.qbs  # (B, Hq, Nq) block of every query
    k_pos = _rank(p.k_order).repeat_interleave(G, dim=1)  # (B, Hq, Nk) sorted position of every key
    k_block = k_pos // p.bk  # (B, Hq, Nk)
    same = q_block.unsqueeze(-1) == k_block.unsqueeze(-2)  # (B, Hq, Nq, Nk)
    c = same.double() * valid
    if p.samples is not None:
        key_ids = p.k_order.repeat_interleave(G, dim=1).gather(2, p.samples)  # (B, Hq, m) sampled key ids
        counts = torch.zeros(B, Hq, Nk, dtype=torch.float64, device=q.device)
        counts.scatter_add_(2, key_ids, torch.ones_like(key_ids, dtype=torch.float64))  # (B, Hq, Nk)
        w = p.log_weight.exp().view(B, 1, 1, 1)
        c = c + w * counts.unsqueeze(2) * (~same).double() * valid
    return c


def _coefficients(q, k, kpm, *, causal, opts, node, qpm=None) -> torch.Tensor:
    """Coefficient matrix of the whole (possibly causal, recursive) computation, (B, Hq, Nq, Nk).
    ``qpm``: padding of the query positions (non-causal calls); causal calls are self attention (kpm)."""
    B, Hq, N, _ = q.shape
    if not causal:
        if N < opts["min_seq_len"]:
            return _coefficients_noncausal(q, k, kpm, None)
        p = plan(q, k, kpm, node=node, qpm=qpm, **_plan_opts(opts))
        return _coefficients_noncausal(q, k, kpm, p)
    if N <= opts["min_seq_len"]:
        tril = torch.ones(N, N, dtype=torch.float64, device=q.device).tril()
        return _coefficients_noncausal(q, k, kpm, None) * tril
    q, k, kpm, odd = _pad_odd(q, k, None, kpm)
    n = q.shape[2]
    h = n // 2
    c = torch.zeros(B, Hq, n, n, dtype=torch.float64, device=q.device)
    c[:, :, :h, :h] = _coefficients(q[:, :, :h], k[:, :, :h], _slice(kpm, 0, h), causal=True, opts=opts,
                                    node=2 * node)
    c[:, :, h:, h:] = _coefficients(q[:, :, h:], k[:, :, h:], _slice(kpm, h, n), causal=True, opts=opts,
                                    node=2 * node + 1)
    c[:, :, h:, :h] = _coefficients(q[:, :, h:], k[:, :, :h], _slice(kpm, 0, h), causal=False, opts=opts,
                                    node=node, qpm=_slice(kpm, h, n))
    return c[:, :, :N, :N] if odd else c


def _plan_opts(opts):
    return {name: opts[name] for name in ("block_size", "sample_size", "lsh_num_projs", "seed")}


def _slice(kpm, s, e):
    return None if kpm is None else kpm[:, s:e]


def _pad_odd(q, k, v, kpm):
    """Odd lengths get one zero row appended (official); the padded key is marked as padding."""
    n = q.shape[2]
    if n % 2 == 0:
        return (q, k, kpm, False) if v is None else (q, k, v, kpm, False)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, 1))
    B = q.shape[0]
    kpm = torch.ones(B, n, dtype=torch.bool, device=q.device) if kpm is None else kpm
    kpm = torch.cat([kpm, torch.zeros(B, 1, dtype=torch.bool, device=q.device)], dim=1)
    if v is None:
        return pad(q), pad(k), kpm, True
    return pad(q), pad(k), pad(v), kpm, True


def hyperattention_reference(q, k, v, *, causal, key_padding_mask, scale, **opts):
    """The estimator written densely: softmax(scale q k^T + log c) v with c from :func:`_coefficients`."""
    qpm = key_padding_mask if q.shape[2] == k.shape[2] else None  # self attention: padded query positions
    c = _coefficients(q, k, key_padding_mask, causal=causal, opts=opts, node=1, qpm=qpm)  # (B, Hq, Nq, Nk)
    keep = c > 0
    bias = torch.where(keep, c.clamp(min=1e-300).log(), torch.zeros_like(c)).to(acc_dtype(q.dtype))
    return softmax_attention(q, k, v, attn_mask=keep, bias=bias, scale=scale)


# --------------------------------------------------------------------------------------------------------
# Fast: gathered blocks + gathered samples, merged by log-sum-exp
# --------------------------------------------------------------------------------------------------------
def _sorted_blocks(x: torch.Tensor, order: torch.Tensor, nblocks: int, rows: int, kv_heads: int) -> torch.Tensor:
    """x (B, Hq, N, D) rows in ``order`` -> (B, Hk, G*nblocks, rows, D), zero rows after the end."""
    B, Hq, N, D = x.shape
    G = Hq // kv_heads
    xs = x.gather(2, order.unsqueeze(-1).expand(B, Hq, N, D))  # (B, Hq, N, D) sorted
    xs = torch.nn.functional.pad(xs, (0, 0, 0, nblocks * rows - N))  # (B, Hq, nblocks*rows, D)
    return xs.view(B, kv_heads, G * nblocks, rows, D)


def _unsort(xb: torch.Tensor, order: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hk, G*nblocks, rows, ...) blocked sorted rows -> (B, Hq, n, ...) in original order."""
    B, Hq = order.shape[:2]
    x = xb.reshape(B, Hq, -1, *xb.shape[4:])[:, :, :n]  # (B, Hq, n, ...) sorted
    inv = _rank(order)  # (B, Hq, n)
    idx = inv.view(B, Hq, n, *([1] * (x.dim() - 3))).expand_as(x)
    return x.gather(2, idx)


def _exact_lse(q, k, v, kpm, causal, scale, rows: int = 64):
    """Exact (causal: bottom-right) attention with its log-sum-exp, blocked: (B, Hq, Nq, Dv), (B, Hq, Nq)."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = Hq // Hk
    rows = min(rows, Nq)
    nb = -(-Nq // rows)
    qb = torch.nn.functional.pad(q, (0, 0, 0, nb * rows - Nq)).reshape(B, Hk, G * nb, rows, D)
    index = torch.arange(Nk, device=q.device).view(1, 1, 1, Nk).expand(1, 1, G * nb, Nk)
    qpos = None
    if causal:
        pos = torch.arange(nb * rows, device=q.device) + (Nk - Nq)  # (nb*rows,)
        qpos = pos.view(1, 1, nb, rows).repeat(1, 1, G, 1)  # (1, 1, G*nb, rows)
    out, lse = gather_attention(qb, k, v, index, scale=scale, qpos=qpos, key_padding_mask=kpm)
    out = out.reshape(B, Hq, nb * rows, -1)[:, :, :Nq]
    lse = lse.reshape(B, Hq, nb * rows)[:, :, :Nq]
    return out, lse


def _hyper_noncausal(q, k, v, kpm, scale, opts, node, qpm=None):
    """Non-causal HyperAttention with its log-sum-exp: (B, Hq, Nq, Dv), (B, Hq, Nq)."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = Hq // Hk
    if Nq < opts["min_seq_len"]:
        return _exact_lse(q, k, v, kpm, False, scale)
    p = plan(q, k, kpm, node=node, qpm=qpm, **_plan_opts(opts))
    nb, qbs, bk = p.nblocks, p.qbs, p.bk
    qb = _sorted_blocks(q, p.q_order, nb, qbs, Hk)  # (B, Hk, G*nb, qbs, D)
    # (1) sortLSH block diagonal: query block b <-> sorted key block b
    pos = torch.arange(nb * bk, device=q.device).view(nb, bk)  # sorted key positions of every block
    in_range = pos < Nk  # (nb, bk): the last block may be partial
    key_ids = p.k_order.gather(2, pos.clamp(max=Nk - 1).view(1, 1, -1).expand(B, Hk, -1))  # (B, Hk, nb*bk)
    index = key_ids.view(B, Hk, 1, nb, bk).expand(B, Hk, G, nb, bk).reshape(B, Hk, G * nb, bk)
    slot = in_range.view(1, 1, 1, nb, bk).expand(1, 1, G, nb, bk).reshape(1, 1, G * nb, bk)
    out_b, lse_b = gather_attention(qb, k, v, index, scale=scale, slot_mask=slot, key_padding_mask=kpm)
    if p.samples is None:
        return _unsort(out_b, p.q_order, Nq), _unsort(lse_b, p.q_order, Nq)
    # (2) sampled residual, excluding samples that fall in the query's own block
    m = p.samples.shape[-1]
    k_ord = p.k_order.repeat_interleave(G, dim=1)  # (B, Hq, Nk)
    s_ids = k_ord.gather(2, p.samples).view(B, Hk, G, 1, m)  # sampled key ids
    index_r = s_ids.expand(B, Hk, G, nb, m).reshape(B, Hk, G * nb, m)
    s_block = (p.samples // bk).view(B, Hk, G, 1, m)
    own = torch.arange(nb, device=q.device).view(1, 1, 1, nb, 1)
    slot_r = (s_block != own).reshape(B, Hk, G * nb, m)  # (B, Hk, G*nb, m)
    out_r, lse_r = gather_attention(qb, k, v, index_r, scale=scale, slot_mask=slot_r, key_padding_mask=kpm)
    lse_r = lse_r + p.log_weight.to(lse_r.dtype).view(B, 1, 1, 1)
    out, lse = merge_attention([out_b, out_r], [lse_b, lse_r])  # (B, Hk, G*nb, qbs, Dv)
    return _unsort(out, p.q_order, Nq), _unsort(lse, p.q_order, Nq)


def _hyper_causal(q, k, v, kpm, scale, opts, node):
    """Causal recursion (self attention, Nq == Nk): returns (out, lse)."""
    N = q.shape[2]
    if N <= opts["min_seq_len"]:
        return _exact_lse(q, k, v, kpm, True, scale)
    q, k, v, kpm, odd = _pad_odd(q, k, v, kpm)
    n = q.shape[2]
    h = n // 2
    o1, l1 = _hyper_causal(q[:, :, :h], k[:, :, :h], v[:, :, :h], _slice(kpm, 0, h), scale, opts, 2 * node)
    o2, l2 = _hyper_causal(q[:, :, h:], k[:, :, h:], v[:, :, h:], _slice(kpm, h, n), scale, opts, 2 * node + 1)
    o3, l3 = _hyper_noncausal(q[:, :, h:], k[:, :, :h], v[:, :, :h], _slice(kpm, 0, h), scale, opts, node,
                              qpm=_slice(kpm, h, n))
    o_down, l_down = merge_attention([o2, o3], [l2, l3])
    out, lse = torch.cat([o1, o_down], dim=2), torch.cat([l1, l_down], dim=2)
    return (out[:, :, :N], lse[:, :, :N]) if odd else (out, lse)


def hyperattention_fast(q, k, v, *, causal, key_padding_mask, scale, **opts):
    """The paper's computation: gathered sortLSH blocks + gathered samples, merged by log-sum-exp."""
    if not causal and q.shape[2] < opts["min_seq_len"]:
        return sdpa(q, k, v, key_padding_mask=key_padding_mask, scale=scale)
    if causal:
        out, _ = _hyper_causal(q, k, v, key_padding_mask, scale, opts, 1)
    else:
        qpm = key_padding_mask if q.shape[2] == k.shape[2] else None  # self attention: padded query positions
        out, _ = _hyper_noncausal(q, k, v, key_padding_mask, scale, opts, 1, qpm=qpm)
    return out.to(q.dtype)


HYPERATTENTION = register(Mechanism(
    name="hyperattention",
    aliases=("hyper_attention", "hyper_attn"),
    family="sparse",
    catalog="P041",
    title="HyperAttention: Long-context Attention in Near-Linear Time",
    arxiv="2310.05869",
    code="https://github.com/insuhan/hyper-attn",
    summary="sortLSH bucket blocks attended exactly plus a uniformly sampled residual (weight n/m), merged "
            "by log-sum-exp; causal by recursive halving.",
    patterns=("noncausal_self", "causal_self", "noncausal_cross"),
    exact=False,
    complexity="time O(N (b + m) d + N log N), memory O(N (b + m)) per tile group; causal adds a log N factor",
    reference=hyperattention_reference,
    fast=hyperattention_fast,
    options=(
        Option("block_size", 256, int, low=1, doc="keys per sortLSH block (b); b >= Nk is exact attention"),
        Option("sample_size", 256, int, low=0, doc="sampled key columns (m); m >= Nk uses every key (exact)"),
        Option("lsh_num_projs", 7, int, low=0, high=30, doc="LSH hyperplanes (2^r buckets)"),
        Option("min_seq_len", 4096, int, low=1,
               doc="below this many queries (non-causal) / keys (causal leaf) attention is exact"),
        Option("seed", 0, int, low=0, doc="seed of the hyperplanes and the samples"),
    ),
    prefix_invariant=False,
    test_options={"block_size": 2, "sample_size": 3, "lsh_num_projs": 3, "min_seq_len": 2},
    test_sizes={"n": 9, "nq": 7, "nk": 11},
    notes="approximate; exact when block_size >= Nk, when sample_size >= Nk, or below min_seq_len. "
          "Causal outputs depend on later queries (sortLSH blocks) and on the length (recursion), as in the "
          "paper: prefix_invariant=False.",
    cross=CrossSpec(query_independent=False),  # queries are sorted into LSH blocks together
))
