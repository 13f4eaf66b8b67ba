"""Recycled Attention: alternate full attention steps with attention over a recycled top-K token set.

Paper: "Recycled Attention: Efficient inference for long-context language models", Xu, Goyal & Choi,
arXiv 2411.05787 (v2 retitled "RefreshKV"). Official code: github.com/carriex/recycled-attention (not
reachable from here; the algorithm follows the paper and CATALOG.md).
Decoding over a cached context: every ``stride`` steps a full attention step over the whole cache; it
records, per key/value head, the ``top_k`` keys its query heads attended to most. The steps in between
attend only to that recycled set plus the tokens generated since the full step. An inference-time
approximation of full attention: ``stride = 1`` or ``top_k >=`` context length is exact.

Schedule (absolute positions, so that the parallel form and decoding are the same computation): with
``start = s`` the positions ``p <= a`` for ``a = max(s - 1, 0)`` attend fully (the prompt's prefill, its
last token being the first full step), and then ``p`` is a full step iff ``(p - a) % stride == 0``. A
recycled step at p uses the set recorded at its anchor ``f`` (the last full step before p) and the keys
``f < j <= p``.

Choices where the paper is silent (the (?) of CATALOG.md): the per-KV-head score is the ``sum`` (or
``max``, option ``aggregate``) over its query heads of their attention probabilities; ties go to the
earlier token; padded keys are never recycled; a full step whose query is padding records an empty set
(until the next full step its successors attend to the tokens since it: with left padding, to every real key);
the recycled set does not change between full steps (the
paper also describes evicting the lowest-scored recycled token for each new one; not confirmed, not done).
The dynamic (query-similarity) schedule and continued pre-training are not implemented.
Memory is not reduced (the full cache is kept): the saving is per-token compute, O(top_k + stride).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from ...errors import check_int, check_step
from ...kernels.sdpa import sdpa
from ...kernels.select import top_k_indices
from ...reference import repeat_kv, softmax_attention
from ...registry import Mechanism, Option, register
from ...state.base import DecodeState
from ...state.kv import KVCache
from ._common import masked_lse


def schedule(pos: torch.Tensor, stride: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, anchor) for absolute positions ``pos``: is p a full step, and the last full step <= p."""
    a = max(start - 1, 0)
    full = (pos <= a) | ((pos - a) % stride == 0)
    anchor = torch.where(pos <= a, pos, a + torch.div(pos - a, stride, rounding_mode="floor") * stride)
    return full, anchor


def _kv_head_probs(q_rows, k, key_mask, scale, aggregate):
    """Attention probabilities of the given query rows, aggregated per key/value head.

    q_rows (B, Hq, R, D), k (B, Hk, L, D), key_mask (B|1, 1, R, L) -> (B, Hk, R, L)."""
    B, Hq, R, _ = q_rows.shape
    Hk = k.shape[1]
    acc = torch.promote_types(q_rows.dtype, torch.float32)
    s = torch.matmul(q_rows.to(acc), repeat_kv(k, Hq // Hk).to(acc).transpose(-1, -2)) * scale  # (B, Hq, R, L)
    m = key_mask.expand_as(s)
    lse, _ = masked_lse(s, m)
    p = torch.exp(s.masked_fill(~m, float("-inf")) - lse.unsqueeze(-1)).view(B, Hk, Hq // Hk, R, -1)
    return p.sum(2) if aggregate == "sum" else p.amax(2)


def recycled_sets(probs, valid, top_k):
    """Top-K keys per (batch, kv head, anchor row): indices (.., K') and whether each is a real key."""
    idx = top_k_indices(probs.masked_fill(~valid, float("-inf")), top_k)  # (B, Hk, R, K')
    return idx, valid.expand_as(probs).gather(-1, idx)


def _keys_mask(N, key_padding_mask, device):
    pos = torch.arange(N, device=device)
    causal = pos.view(1, 1, N, 1) >= pos.view(1, 1, 1, N)  # (1, 1, N, N)
    return causal if key_padding_mask is None else causal & key_padding_mask.view(-1, 1, 1, N)


def recycled_reference(q, k, v, *, causal, key_padding_mask, scale, stride, top_k, start, aggregate):
    """Dense: probabilities of every row, top-K sets of the anchor rows, one (B, Hq, N, N) mask."""
    B, Hq, N, _ = q.shape
    Hk = k.shape[1]
    pos = torch.arange(N, device=q.device)
    full, anchor = schedule(pos, stride, start)
    with torch.no_grad():  # the selection is discrete
        seen = _keys_mask(N, key_padding_mask, q.device)  # (B|1, 1, N, N)
        probs = _kv_head_probs(q, k, seen, scale, aggregate)  # (B, Hk, N, N): row f = query f's probabilities
        if key_padding_mask is not None:  # a padded query records an empty set
            seen = seen & key_padding_mask.view(-1, 1, N, 1)
        idx, ok = recycled_sets(probs, seen, top_k)  # (B, Hk, N, K')
        recycled = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, ok)  # (B, Hk, N, N)
        rows = recycled[:, :, anchor]  # the set recorded at each query's anchor
        local = (pos.view(N, 1) > anchor.view(N, 1)) & (pos.view(1, N) > anchor.view(N, 1))  # anchor < j
        mask = torch.where(full.view(1, 1, N, 1), torch.ones_like(rows), rows | local)
        mask = repeat_kv(mask, Hq // Hk)  # (B, Hq, N, N)
    return softmax_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, attn_mask=mask, scale=scale)


def _recycled_tile(q, k, v, idx, ok, which, anchor, full, key_padding_mask, r0, scale):
    """One query tile: the recycled mask rebuilt from the compact sets, then fused SDPA.

    q (B, Hq, T, D) rows r0.., k/v (B, Hk, L, D) keys 0..L-1, idx/ok (B, Hk, |anc|, K') the sets of the
    tile's anchors, which/anchor/full (T,) per row -> (B, Hq, T, Dv)."""
    Hq, T, L = q.shape[1], q.shape[2], k.shape[2]
    with torch.no_grad():
        sets = torch.zeros(*idx.shape[:3], L, dtype=torch.bool, device=q.device).scatter(-1, idx, ok)  # (B, Hk, A, L)
        rows = torch.arange(r0, r0 + T, device=q.device).view(-1, 1)
        kp = torch.arange(L, device=q.device).view(1, L)
        local = (kp > anchor.view(-1, 1)) & (kp <= rows)  # keys since the row's anchor
        causal_rows = kp <= rows
        mask = torch.where(full.view(1, 1, -1, 1), causal_rows.view(1, 1, T, L),
                           (sets[:, :, which] | local) & causal_rows)  # (B, Hk, T, L)
        mask = repeat_kv(mask, Hq // k.shape[1])
        if key_padding_mask is not None:
            mask = mask & key_padding_mask.view(-1, 1, 1, L)
    return sdpa(q, k, v, attn_mask=mask, scale=scale)


def recycled_fast(q, k, v, *, causal, key_padding_mask, scale, stride, top_k, start, aggregate, tile: int = 256):
    """Query tiles through fused SDPA with the recycled mask; only the anchor rows' probabilities are
    formed. Each tile's (T x L) mask is rebuilt from the compact top-K sets in the backward
    (activation checkpointing), so training memory is O(N (K + d)) beyond one tile, never N x N. The
    per-token saving of the paper is in ``step``."""
    B, Hq, N, D = q.shape
    pos = torch.arange(N, device=q.device)
    full, anchor = schedule(pos, stride, start)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for r0 in range(0, N, tile):
        r1 = min(N, r0 + tile)
        anc = torch.unique(anchor[r0:r1])  # anchor rows this tile needs
        kpm = None if key_padding_mask is None else key_padding_mask[:, :r1]
        with torch.no_grad():
            seen = (torch.arange(r1, device=q.device).view(1, r1) <= anc.view(-1, 1)).view(1, 1, -1, r1)
            if kpm is not None:
                seen = seen & kpm.view(-1, 1, 1, r1)
            probs = _kv_head_probs(q[:, :, anc], k[:, :, :r1], seen, scale, aggregate)  # (B, Hk, |anc|, L)
            if kpm is not None:  # a padded query records an empty set
                seen = seen & key_padding_mask[:, anc].view(-1, 1, anc.numel(), 1)
            idx, ok = recycled_sets(probs, seen, top_k)  # (B, Hk, |anc|, K')
            which = torch.searchsorted(anc, anchor[r0:r1])  # row -> its anchor among anc
        args = (q[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1], idx, ok, which, anchor[r0:r1], full[r0:r1], kpm, r0,
                scale)
        if grad:
            outs.append(torch.utils.checkpoint.checkpoint(_recycled_tile, *args, use_reentrant=False))
        else:
            outs.append(_recycled_tile(*args))
    return torch.cat(outs, 2)


def init_recycled_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, stride, top_k, start, aggregate):
    return RecycledState(batch, kv_heads, head_dim, value_dim, stride=stride, start=start, dtype=dtype,
                         device=device)


def recycled_step(q, k, v, state: RecycledState, *, scale, stride, top_k, start, aggregate, key_padding_mask=None):
    """Append T tokens; full steps attend to the whole cache and record the recycled set of their last
    row; recycled steps gather the recorded top-K keys plus the keys since the anchor (O(K + stride))."""
    B, Hq, Hk, T, D, Dv = check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=RecycledState)
    if (state.stride, state.start) != (stride, start):
        raise ValueError(f"stride, start: this RecycledState was built for ({state.stride}, {state.start}), got "
                         f"({stride}, {start})")
    keys, values, kmask = state.kv.append(k, v, key_padding_mask)  # (B, Hk, L, D)
    first = state.seq_len - T
    pos = torch.arange(first, state.seq_len, device=q.device)
    full, anchor = schedule(pos, stride, start)
    outs, t = [], 0
    while t < T:
        run = t + 1
        if bool(full[t]):
            while run < T and int(pos[run]) <= max(start - 1, 0):
                run += 1  # consecutive prefill rows attend fully together
            end = first + run  # keys 0 .. end-1
            outs.append(sdpa(q[:, :, t:run], keys[:, :, :end], values[:, :, :end], causal=True,
                             key_padding_mask=None if kmask is None else kmask[:, :end], scale=scale))
            f = end - 1  # record the recycled set of the last full row
            with torch.no_grad():
                seen = torch.ones(1, 1, 1, end, dtype=torch.bool, device=q.device)
                if kmask is not None:
                    seen = seen & kmask[:, :end].view(-1, 1, 1, end)
                probs = _kv_head_probs(q[:, :, run - 1 : run], keys[:, :, :end], seen, scale, aggregate)
                if kmask is not None:  # a padded query records an empty set
                    seen = seen & kmask[:, f].view(-1, 1, 1, 1)
                idx, ok = recycled_sets(probs, seen, top_k)  # (B, Hk, 1, K')
            state.record(f, idx[:, :, 0], ok[:, :, 0])
        else:
            while run < T and not bool(full[run]):
                run += 1
            f, idx, ok = state.current()
            if f != int(anchor[t]):
                raise RuntimeError(f"recycled step at {int(pos[t])} needs the set of step {int(anchor[t])}, "
                                   f"the state holds step {f}")
            end = first + run
            ck, cv = state.recycled_kv(f, idx, end)  # C_r: the set (gathered once) + tokens since the anchor
            L = end - f - 1
            qp = pos[t:run].view(-1, 1)
            lp = torch.arange(f + 1, end, device=q.device).view(1, L)
            local = (lp <= qp).view(1, 1, run - t, L)
            if kmask is not None:
                local = local & kmask[:, f + 1 : end].view(B, 1, 1, L)
            mask = torch.cat([ok.view(B, Hk, 1, -1).expand(B, Hk, run - t, -1),
                              local.expand(B, Hk, run - t, L)], -1)  # (B, Hk, T', K' + L)
            outs.append(sdpa(q[:, :, t:run], ck, cv, attn_mask=repeat_kv(mask, Hq // Hk), scale=scale))
        t = run
    return torch.cat(outs, 2)


class RecycledState(DecodeState):
    """Recycled Attention's decode state: the full key/value cache (the paper does not reduce memory) and
    the recycled top-K sets recorded at the last ``keep`` full steps (indices (B, Hk, K) into the cache,
    and whether each index is a real key). ``crop`` can roll back to any length whose anchor (the last
    full step before it) is still held.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 stride: int, start: int = 0, keep: int = 2, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.stride = check_int("stride", stride)
        self.start = check_int("start", start, low=0)
        self.keep = check_int("keep", keep)
        self.kv = KVCache(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)
        self.built_for(batch=batch, kv_heads=kv_heads, head_dim=head_dim, value_dim=self.kv.value_dim, dtype=dtype,
                       device=self.kv.device)
        self._sets: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._cr: KVCache | None = None  # the paper's recycled cache C_r: the set, then the tokens since
        self._cr_anchor = self._cr_upto = -1

    @property
    def seq_len(self) -> int:
        return self.kv.seq_len

    @seq_len.setter
    def seq_len(self, value: int) -> None:
        if value != 0:
            raise AttributeError("seq_len of a RecycledState follows its key/value cache")

    def tensors(self) -> list[torch.Tensor]:
        out = self.kv.tensors() + [t for _, i, o in self._sets for t in (i, o)]
        return out + ([] if self._cr is None else self._cr.tensors())

    def recycled_kv(self, anchor: int, idx: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The recycled cache C_r: keys/values (B, Hk, K' + upto - anchor - 1, D) of the set recorded at
        ``anchor`` (gathered once) followed by the tokens ``anchor + 1 .. upto - 1`` (appended as they come)."""
        kv = self.kv
        if self._cr is None or self._cr_anchor != anchor or self._cr_upto > upto:
            B, Hk, cap, D = kv._k.shape
            flat = (torch.arange(B * Hk, device=idx.device).view(B, Hk, 1) * cap + idx).flatten()
            gk = kv._k.reshape(B * Hk * cap, D).index_select(0, flat).view(B, Hk, -1, D)
            gv = kv._v.reshape(B * Hk * cap, kv.value_dim).index_select(0, flat).view(B, Hk, -1, kv.value_dim)
            self._cr = KVCache(B, Hk, D, kv.value_dim, dtype=kv.dtype, device=kv.device)
            self._cr.append(gk, gv)
            self._cr_anchor, self._cr_upto = anchor, anchor + 1
        if upto > self._cr_upto:
            self._cr.append(kv.keys[:, :, self._cr_upto : upto], kv.values[:, :, self._cr_upto : upto])
            self._cr_upto = upto
        return self._cr.keys, self._cr.values

    def record(self, anchor: int, idx: torch.Tensor, ok: torch.Tensor) -> None:
        """Keep the recycled set of the full step at position ``anchor``: idx, ok (B, Hk, K')."""
        self._sets = [s for s in self._sets if s[0] < anchor] + [(anchor, idx, ok)]
        del self._sets[: -self.keep]

    def current(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        if not self._sets:
            raise RuntimeError("no full attention step has been recorded yet")
        return self._sets[-1]

    def _anchor(self, p: int) -> int | None:
        a = max(self.start - 1, 0)
        if p <= a or (p - a) % self.stride == 0:
            return None  # a full step: needs no recycled set
        return a + ((p - a) // self.stride) * self.stride

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.kv.batch)
        self.kv.reorder(index)
        self._sets = [(a, i.index_select(0, index.to(i.device)), o.index_select(0, index.to(o.device)))
                      for a, i, o in self._sets]
        self._cr = None
        self.batch = self.kv.batch

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        need = self._anchor(length)
        held = [a for a, _, _ in self._sets if a < length]
        if need is not None and need not in held:
            raise ValueError(f"length: cannot crop this RecycledState to {length} tokens: position {length} "
                             f"recycles the set of step {need}, which is not held (held: {held}); build it with a "
                             f"larger keep")
        self._sets = [s for s in self._sets if s[0] < length]
        self.kv.crop(length)
        self._cr = None


RECYCLED = register(Mechanism(
    name="recycled",
    aliases=("recycled_attention", "refreshkv"),
    family="memory",
    catalog="P102",
    title="Recycled Attention: Efficient inference for long-context language models",
    arxiv="2411.05787",
    code="https://github.com/carriex/recycled-attention",
    summary="Every `stride` steps full attention, recording each KV head's top-K attended keys; the steps "
            "between attend to those recycled keys plus the tokens generated since.",
    patterns=("causal_self",),
    exact=False,
    state="recycled",
    complexity="full step O(N d), recycled step O((K + S) d); KV cache O(N) (not reduced)",
    reference=recycled_reference,
    fast=recycled_fast,
    step=recycled_step,
    init_state=init_recycled_state,
    options=(
        Option("stride", 50, int, low=1, doc="a full attention step every `stride` steps (S)"),
        Option("top_k", 2048, int, low=1, doc="keys recycled per key/value head (K)"),
        Option("start", 0, int, low=0, doc="prompt length: positions < start attend fully (prefill)"),
        Option("aggregate", "sum", str, choices=("sum", "max"), doc="how a KV head scores keys over its query heads"),
    ),
    test_options={"stride": 3, "top_k": 2, "start": 3},
    test_sizes={"n": 12},
    notes="stride = 1 or top_k >= N is full causal attention. causal_cross is not a functional pattern (the "
          "recycled set needs the anchor's query); decode with step().",
))
