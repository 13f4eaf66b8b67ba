"""CCA-Attention: core-context-aware attention (globality-pooling + locality-preserved, one softmax).

Paper: "Core Context Aware Attention for Long Context Language Modeling", Chen et al., arXiv 2412.12465.
Official code: https://github.com/chenyaofo/CCA-Attention (formulas confirmed against it in CATALOG.md).
The prefix of the sequence is cut into groups of ``group_size`` tokens; each group is merged into one
core token by attention of the group's LAST query over the group's keys: ``a = softmax_i(q_last k_i /
sqrt d)``, ``k_c = sum a_i k_i``, ``v_c = sum a_i v_i``. A query at position t (1-based) attends in ONE
softmax to the core tokens of groups ``j <= floor((t - w) / g)`` and to the raw tokens not covered by
those groups (its window of ``w`` to ``w + g - 1`` tokens).

Choices: core tokens are per query head (they are pooled with the query of the group's last token, so
with grouped-query attention each query head pools its own); a group whose keys are all padded has no
core token; the pooling uses the same ``scale`` as the attention. Decoding keeps the core tokens (one per
``group_size`` tokens, appended when a group completes) and a raw window: O(N / g + w) state.
"""

from __future__ import annotations

import torch

from ...errors import check_int, check_step
from ...kernels.sdpa import sdpa
from ...reference import acc_dtype, one_hot_values, repeat_kv, softmax_attention, softmax_weights
from ...registry import Mechanism, Option, register
from ...state.base import DecodeState
from ...state.kv import KVCache, SlidingWindowCache
from ._common import attend_parts, masked_lse


def compressed_groups(pos: torch.Tensor, window: int, group_size: int) -> torch.Tensor:
    """m(p): how many leading groups are compressed into core tokens for a query at 0-based position p."""
    return torch.clamp(torch.div(pos + 1 - window, group_size, rounding_mode="floor"), min=0)


def core_tokens(q_last, k_groups, v_groups, mask, scale):
    """Pool groups into core tokens.

    q_last (B, Hq, C, D) queries of each group's last token; k_groups (B, Hq, C, g, D), v_groups
    (B, Hq, C, g, Dv); mask (B|1, 1, C, g) or None. Returns k_c (B, Hq, C, D), v_c (B, Hq, C, Dv) and
    valid (B|1, 1, C) (False where every key of the group is padded).
    """
    s = torch.einsum("bhcd,bhcgd->bhcg", q_last, k_groups) * scale  # (B, Hq, C, g)
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.expand_as(s)
    lse, nonempty = masked_lse(s, m)  # (B, Hq, C)
    a = torch.exp(s.masked_fill(~m, float("-inf")) - lse.unsqueeze(-1))  # core weights (B, Hq, C, g)
    kc = torch.einsum("bhcg,bhcgd->bhcd", a, k_groups)  # (B, Hq, C, D)
    vc = torch.einsum("bhcg,bhcge->bhce", a, v_groups)  # (B, Hq, C, Dv)
    return kc, vc, nonempty[:, :1] if mask is not None else torch.ones_like(nonempty[:, :1])


def _all_cores(q, k, v, key_padding_mask, scale, group_size):
    B, Hq, N, D = q.shape
    Hk = k.shape[1]
    C = N // group_size
    g = group_size
    kg = repeat_kv(k[:, :, : C * g], Hq // Hk).reshape(B, Hq, C, g, D)  # (B, Hq, C, g, D)
    vg = repeat_kv(v[:, :, : C * g], Hq // Hk).reshape(B, Hq, C, g, v.shape[-1])  # (B, Hq, C, g, Dv)
    q_last = q[:, :, g - 1 : C * g : g]  # (B, Hq, C, D): the query of each group's last token
    mask = None if key_padding_mask is None else key_padding_mask[:, : C * g].reshape(B, 1, C, g)
    return core_tokens(q_last, kg, vg, mask, scale)


def _cca_mask(pos, n_core, key_pos, window, group_size, core_valid, key_padding_mask):
    """(B|1, 1, T, n_core + L) bool: cores j < m(p) (and valid), raw keys m(p) g <= i <= p (and unpadded)."""
    m = compressed_groups(pos, window, group_size).view(-1, 1)  # (T, 1)
    cores = torch.arange(n_core, device=pos.device).view(1, -1) < m  # (T, C)
    kp = key_pos.view(1, -1)
    raw = (kp >= m * group_size) & (kp <= pos.view(-1, 1))  # (T, L)
    cores = cores.unsqueeze(0) & core_valid.unsqueeze(1)  # (B|1, T, C)
    raw = raw.unsqueeze(0)
    if key_padding_mask is not None:
        raw = raw & key_padding_mask.view(key_padding_mask.shape[0], 1, -1)
    rows = max(cores.shape[0], raw.shape[0])
    return torch.cat([cores.expand(rows, -1, -1), raw.expand(rows, -1, -1)], -1).unsqueeze(1)


def cca_reference(q, k, v, *, causal, key_padding_mask, scale, group_size, window):
    """Dense: all core tokens are computed, keys are [cores; raw tokens], one masked softmax."""
    B, Hq, N, D = q.shape
    kc, vc, ok = _all_cores(q, k, v, key_padding_mask, scale, group_size)  # (B, Hq, C, D), (B|1, 1, C)
    C = kc.shape[2]
    keys = torch.cat([kc, repeat_kv(k, Hq // k.shape[1])], 2)  # (B, Hq, C + N, D)
    values = torch.cat([vc, repeat_kv(v, Hq // k.shape[1])], 2)  # (B, Hq, C + N, Dv)
    pos = torch.arange(N, device=q.device)
    mask = _cca_mask(pos, C, pos, window, group_size, ok[:, 0], key_padding_mask)  # (B|1, 1, N, C + N)
    return softmax_attention(q, keys, values, attn_mask=mask, scale=scale)


def cca_operator(q, k, v, *, causal, key_padding_mask, scale, group_size, window):
    """Effective operator (B, Hq, N, N): the one softmax over [cores; raw tokens], each core's weight attributed
    to its group's tokens by its pooling weights (core tokens pooled from one-hot values are those weights)."""
    Hq, Hk = q.shape[1], k.shape[1]
    acc = acc_dtype(q.dtype)
    qa, ka = q.to(acc), k.to(acc)
    kc, attribution, ok = _all_cores(qa, ka, one_hot_values(ka), key_padding_mask, scale, group_size)  # (B,Hq,C,N)
    C, N = kc.shape[2], q.shape[2]
    keys = torch.cat([kc, repeat_kv(ka, Hq // Hk)], 2)  # (B, Hq, C + N, D)
    pos = torch.arange(N, device=q.device)
    mask = _cca_mask(pos, C, pos, window, group_size, ok[:, 0], key_padding_mask)  # (B|1, 1, N, C + N)
    p = softmax_weights(qa, keys, attn_mask=mask, scale=scale)  # (B, Hq, N, C + N)
    return p[..., C:] + torch.matmul(p[..., :C], attribution)  # (B, Hq, N, N)


def cca_fast(q, k, v, *, causal, key_padding_mask, scale, group_size, window, tile: int = 1024):
    """Query tiles through fused SDPA: each tile attends to the core tokens it can use and the raw span
    ``[m(first row) g, last row]``: O(N (N/g + w + tile) d) time, no N x N matrix."""
    B, Hq, N, D = q.shape
    Hk = k.shape[1]
    kc, vc, ok = _all_cores(q, k, v, key_padding_mask, scale, group_size)
    ok = ok[:, 0]  # (B|1, C)
    outs = []
    for r0 in range(0, N, tile):
        r1 = min(N, r0 + tile)
        pos = torch.arange(r0, r1, device=q.device)
        m_lo, m_hi = (int(compressed_groups(torch.tensor(p), window, group_size)) for p in (r0, r1 - 1))
        lo = m_lo * group_size
        keys = torch.cat([kc[:, :, :m_hi], repeat_kv(k[:, :, lo:r1], Hq // Hk)], 2)  # (B, Hq, m_hi + r1 - lo, D)
        values = torch.cat([vc[:, :, :m_hi], repeat_kv(v[:, :, lo:r1], Hq // Hk)], 2)
        kpm = None if key_padding_mask is None else key_padding_mask[:, lo:r1]
        mask = _cca_mask(pos, m_hi, torch.arange(lo, r1, device=q.device), window, group_size, ok[:, :m_hi], kpm)
        outs.append(sdpa(q[:, :, r0:r1], keys, values, attn_mask=mask, scale=scale))
    return torch.cat(outs, 2)


def init_cca_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, group_size, window, query_heads=None):
    return CCAState(batch, kv_heads, head_dim, value_dim, group_size=group_size, window=window,
                    query_heads=query_heads, dtype=dtype, device=device)


def cca_step(q, k, v, state: CCAState, *, scale, group_size, window, key_padding_mask=None):
    """Append T tokens: groups they complete become core tokens (pooled with the group's last query);
    each new query attends to its core tokens and its raw window; raw keys no query needs are evicted."""
    B, Hq, Hk, T, D, Dv = check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=CCAState)
    if (state.group_size, state.window) != (group_size, window):
        raise ValueError(f"group_size, window: this CCAState was built for ({state.group_size}, {state.window}), "
                         f"got ({group_size}, {window})")
    state.bind_query_heads(Hq)
    keys, values, kmask = state.raw.append(k, v, key_padding_mask)  # (B, Hk, L, D): positions start..
    start = state.raw.start
    first = state.seq_len - T  # position of the first new token
    g = group_size
    ends = [p for p in range(first, state.seq_len) if (p + 1) % g == 0]  # groups completed by the new tokens
    if ends:
        idx = torch.tensor([[p - start - g + 1 + i for i in range(g)] for p in ends], device=q.device)  # (c, g)
        kg = repeat_kv(keys, Hq // Hk)[:, :, idx]  # (B, Hq, c, g, D)
        vg = repeat_kv(values, Hq // Hk)[:, :, idx]  # (B, Hq, c, g, Dv)
        q_last = q[:, :, [p - first for p in ends]]  # (B, Hq, c, D)
        gm = None if kmask is None else kmask[:, idx].view(B, 1, len(ends), g)
        kc, vc, ok = core_tokens(q_last, kg, vg, gm, scale)
        state.cores.append(kc.to(state.cores.dtype), vc.to(state.cores.dtype),
                           None if gm is None else ok[:, 0].expand(B, -1))
    C = state.cores.length
    core_mask = state.cores.mask
    core_ok = torch.ones(1, C, dtype=torch.bool, device=q.device) if core_mask is None else core_mask
    pos = torch.arange(first, state.seq_len, device=q.device)
    mask = _cca_mask(pos, C, torch.arange(start, start + keys.shape[2], device=q.device), window, g, core_ok, kmask)
    if T <= 64:  # decoding: attend to [cores; raw window] without copying them into one tensor
        parts = [(state.cores.keys, state.cores.values, mask[..., :C]), (keys, values, mask[..., C:])]
        out = attend_parts(q, parts, scale)
    else:
        all_k = torch.cat([state.cores.keys, repeat_kv(keys, Hq // Hk)], 2)  # (B, Hq, C + L, D)
        all_v = torch.cat([state.cores.values, repeat_kv(values, Hq // Hk)], 2)
        out = sdpa(q, all_k, all_v, attn_mask=mask, scale=scale)  # (B, Hq, T, Dv)
    state.raw.evict()
    return out


class CCAState(DecodeState):
    """CCA-Attention's decode state: core tokens and a raw window.

    ``cores``: a :class:`KVCache` over query heads holding one pooled key/value per completed group of
    ``group_size`` tokens (its mask marks groups whose keys were all padded); ``raw``: a
    :class:`SlidingWindowCache` keeping the last ``window + group_size - 2 (+ extra)`` raw tokens, enough for
    every future query's local window. Memory O(N / group_size + window).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 group_size: int, window: int, query_heads: int | None = None, extra: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.group_size = check_int("group_size", group_size)
        self.window = check_int("window", window)
        self.built_for(batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                       value_dim=head_dim if value_dim is None else value_dim, dtype=dtype, device=device)
        self.raw = SlidingWindowCache(batch, kv_heads, head_dim, value_dim, window=window + group_size - 1,
                                      extra=extra, dtype=dtype, device=self.device)
        self.cores: KVCache | None = None
        self._geometry = (batch, head_dim, self.raw.value_dim, dtype, device)
        if query_heads is not None:
            self.bind_query_heads(query_heads)

    def bind_query_heads(self, heads: int) -> None:
        """Core tokens are per query head; the first step tells how many there are."""
        if self.cores is None:
            if heads % self.raw.kv_heads:
                raise ValueError(f"q: query heads must be a multiple of the state's {self.raw.kv_heads} key/value "
                                 f"heads, got {heads}")
            batch, hd, vd, dtype, device = self._geometry
            self.cores = KVCache(self.raw.batch, heads, hd, vd, dtype=dtype, device=device)
        elif self.cores.kv_heads != heads:
            raise ValueError(f"q: this CCAState holds core tokens for {self.cores.kv_heads} query heads, got {heads}")

    @property
    def seq_len(self) -> int:
        return self.raw.seq_len

    @seq_len.setter
    def seq_len(self, value: int) -> None:  # DecodeState.__init__ compatibility; the raw cache counts
        if value != 0:
            raise AttributeError("seq_len of a CCAState follows its raw cache")

    def tensors(self) -> list[torch.Tensor]:
        return self.raw.tensors() + ([] if self.cores is None else self.cores.tensors())

    def reorder(self, index: torch.Tensor) -> None:
        self.raw.reorder(index)
        if self.cores is not None:
            self.cores.reorder(index)
        self.batch = self.raw.batch

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        self.raw.crop(length)
        if self.cores is not None:
            self.cores.crop(length // self.group_size)


CCA = register(Mechanism(
    name="cca",
    aliases=("cca_attention", "core_context_aware"),
    family="memory",
    catalog="P026",
    title="Core Context Aware Attention for Long Context Language Modeling",
    arxiv="2412.12465",
    code="https://github.com/chenyaofo/CCA-Attention",
    summary="Groups of the distant prefix pooled into core tokens by their last query; one softmax over "
            "core tokens and a local window of raw tokens.",
    patterns=("causal_self",),
    exact=False,
    state="cca",
    complexity="time O(N (N/g + w) d); decode state O(N/g + w)",
    reference=cca_reference,
    fast=cca_fast,
    step=cca_step,
    init_state=init_cca_state,
    operator=cca_operator,
    options=(
        Option("group_size", 16, int, low=1, doc="tokens pooled into one core token (g)"),
        Option("window", 1024, int, low=1, doc="local window of raw tokens (w); a query sees w .. w+g-1 of them"),
    ),
    test_options={"group_size": 2, "window": 3},
    test_sizes={"n": 11},
    notes="group_size = 1 or window >= N gives exact causal attention. causal_cross (chunked prefill over a "
          "prefix without its queries) is not a functional pattern: core tokens need the prefix's queries; "
          "decode with step() instead.",
))
