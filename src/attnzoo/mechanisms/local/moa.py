"""MoA: Mixture of Sparse Attention -- heterogeneous elastic sliding windows per head, with attention sinks.

Paper: "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression", Fu, Huang, Ning et
al., arXiv 2406.14909. Official code: https://github.com/thu-nics/MoA
Every head ``h`` attends to the ``sinks`` first tokens plus a causal sliding window; the head's span (keys it
keeps, sinks included) grows with the input length ``N``: ``span_h = alpha_h + beta_h * N``. MoA's offline
profiling and search pick ``(alpha_h, beta_h)`` per head; this file runs a given plan (pass the per-head
``alphas``/``betas`` of a ``moa_alpha_beta.json`` layer as tuples).

Choices (each is an option):
- ``span_h = min(int(alpha_h + beta_h * N), N)``, then raised to ``min_span`` and rounded up to a multiple of
  ``span_multiple``, as the official ``moa_config_to_cache_config`` does (its defaults: min 128, multiple 64,
  sinks 64; ours default to 1 and 1, i.e. the exact rule). The window is ``w_h = max(1, span_h - sinks)``
  keys ending at the query, so a head scores at most ``span_h`` keys.
- ``N`` is the key length of the call (the context) unless ``length`` pins it. MoA's runtime fixes ``N`` once,
  at prefill (prompt + max new tokens), and keeps the cache sizes; decoding here does the same: the decode
  state fixes the windows at its first step from ``length`` if given, else from the prefill length. Token-by-
  token decoding equals the causal forward when both use the same ``length``.
- Windows are token-granular (as MoA's decode cache); the official prefill kernels round them to 64-token
  blocks. Causal only, as MoA (its profiler and kernels assert causal attention): non-causal calls raise.
- Grouped-query attention: windows are per query head; a key/value head keeps the widest window among its
  query heads (:class:`PerHeadWindowCache`).

Fast form: query heads are grouped by window and each group runs the blocked sliding-window kernel with
sinks (``kernels/local.py``, hand-written backward); a window reaching every key runs fused SDPA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...errors import check_append, check_int, check_step
from ...kernels.local import local_attention
from ...kernels.sdpa import sdpa
from ...masks import materialize
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from ...state import DecodeState
from ...state.kv import SinkWindowCache


def _per_head(name: str, value, heads: int, kind: type) -> list:
    """A scalar (the same for every head) or a sequence of exactly ``heads`` values."""
    ok = (int, float) if kind is float else (int,)
    if isinstance(value, (list, tuple)):
        vals = list(value)
        if len(vals) != heads:
            raise ValueError(f"{name}: expected one value per query head ({heads}), got {len(vals)}: {value!r}")
    else:
        vals = [value] * heads
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, ok) or not math.isfinite(x):
            raise ValueError(f"{name}: expected finite {'numbers' if kind is float else 'ints'} (a scalar or one per "
                             f"query head), got {value!r}")
    return [kind(x) for x in vals]


def moa_windows(heads: int, length: int, *, alphas, betas, sinks: int, min_span: int = 1,
                span_multiple: int = 1) -> list[int]:
    """Per-query-head causal windows (keys including the query's own, sinks excluded) for input length N."""
    a = _per_head("alphas", alphas, heads, float)
    b = _per_head("betas", betas, heads, float)
    if any(x < 0 for x in b):
        raise ValueError(f"betas: expected values >= 0 (the span grows with the length), got {betas!r}")
    out = []
    for ah, bh in zip(a, b):
        span = min(int(ah + bh * length), length)
        span = -(-max(span, min_span) // span_multiple) * span_multiple
        out.append(max(1, span - sinks))
    return out


def moa_mask_predicate(windows: Sequence[int], sinks: int, causal: bool, offset: int = 0):
    """Predicate ``(b, h, q_idx, kv_idx)``: head h sees its window ``windows[h]`` plus the first ``sinks`` keys
    (causally: those not after the query). Bottom-right aligned (query i at key position i + offset)."""
    table = torch.tensor(list(windows))

    def moa_mask(b, h, q_idx, kv_idx):
        w = table.to(q_idx.device)[h]
        d = q_idx + offset - kv_idx
        band = ((d >= 0) & (d < w)) if causal else ((d > -w) & (d < w))
        sink = kv_idx < sinks
        return band | ((sink & (d >= 0)) if causal else sink)

    return moa_mask


def moa_registry_mask(nq: int, nk: int, *, causal: bool, heads=None, kv_heads=None, alphas, betas, sinks, length,
                      min_span, span_multiple):
    """The registry's predicate: each query head's window (``heads`` default: one per value of a per-head
    ``alphas``/``betas`` tuple, else 1) plus the sinks, for keys of length ``nk`` (or ``length``)."""
    if not causal:
        raise ValueError("causal: moa is causal only, got causal=False")
    if heads is None:
        heads = next((len(x) for x in (alphas, betas) if isinstance(x, (tuple, list))), 1)
    windows = moa_windows(heads, nk if length is None else length, alphas=alphas, betas=betas, sinks=sinks,
                          min_span=min_span, span_multiple=span_multiple)
    pred = moa_mask_predicate(windows, sinks, causal=True, offset=nk - nq)
    pred.heads = heads
    return pred


def _resolve(q, k, alphas, betas, sinks, length, min_span, span_multiple) -> list[int]:
    n = k.shape[2] if length is None else length
    return moa_windows(q.shape[1], n, alphas=alphas, betas=betas, sinks=sinks, min_span=min_span,
                       span_multiple=span_multiple)


def moa_reference(q, k, v, *, causal, key_padding_mask, scale, alphas, betas, sinks, length, min_span,
                  span_multiple):
    """Exact softmax attention with each head's sinks + window mask materialized densely."""
    nq, nk, hq = q.shape[2], k.shape[2], q.shape[1]
    windows = _resolve(q, k, alphas, betas, sinks, length, min_span, span_multiple)
    pred = moa_mask_predicate(windows, sinks, causal, offset=nk - nq)
    mask = materialize(pred, 1, hq, nq, nk, device=q.device)  # (1, Hq, Nq, Nk)
    return softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=mask, scale=scale)


def _head_classes(windows: Sequence[int]) -> list[tuple[int, list[int]]]:
    """[(window, query heads with that window)], widest first."""
    return [(w, [h for h, x in enumerate(windows) if x == w]) for w in sorted(set(windows), reverse=True)]


def _kv_for(heads: list[int], groups: int, k: torch.Tensor, v: torch.Tensor):
    """Keys/values for a subset of query heads: whole GQA groups keep sharing their key/value head; otherwise
    each selected query head gets its own copy of its key/value head."""
    kv = sorted({h // groups for h in heads})
    whole = heads == [x * groups + g for x in kv for g in range(groups)]
    idx = kv if whole else [h // groups for h in heads]
    idx_t = torch.tensor(idx, device=k.device)
    return k.index_select(1, idx_t), v.index_select(1, idx_t)  # (B, Hk', Nk, D), (B, Hk', Nk, Dv)


def _attend_classes(q, k, v, windows, sinks, causal, scale, key_padding_mask):
    """Run each window class through the blocked kernel and put the heads back in order."""
    Hq, Hk, nk = q.shape[1], k.shape[1], k.shape[2]
    G = Hq // Hk
    classes = _head_classes(windows)
    outs, order = [], []
    for w, heads in classes:
        if len(classes) == 1:
            qc, kc, vc = q, k, v
        else:
            qc = q.index_select(1, torch.tensor(heads, device=q.device))  # (B, |heads|, Nq, D)
            kc, vc = _kv_for(heads, G, k, v)
        if w >= nk:  # the window alone reaches every key: plain (fused) softmax attention
            o = sdpa(qc, kc, vc, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        else:
            o = local_attention(qc, kc, vc, window=w, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                sinks=sinks)
        outs.append(o)  # (B, |heads|, Nq, Dv)
        order += heads
    if len(classes) == 1:
        return outs[0]
    out = torch.cat(outs, dim=1)  # (B, Hq, Nq, Dv), heads in class order
    inverse = torch.empty(Hq, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(Hq)
    return out.index_select(1, inverse.to(out.device))


def moa_fast(q, k, v, *, causal, key_padding_mask, scale, alphas, betas, sinks, length, min_span, span_multiple):
    """Heads grouped by window, each group through the blocked sliding-window kernel with sinks
    (O(N (sinks + w_h) d) per head, hand-written backward)."""
    windows = _resolve(q, k, alphas, betas, sinks, length, min_span, span_multiple)
    return _attend_classes(q, k, v, windows, sinks, causal, scale, key_padding_mask)


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------
class MoAState(DecodeState):
    """MoA's decode state: a :class:`PerHeadWindowCache` (``self.cache``) whose per-head windows
    are fixed at the first step -- from ``length`` if given, else from the prefill length, as MoA's runtime
    sizes its cache at prefill. ``reorder``/``crop``/``nbytes`` act on that cache."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *, sinks: int,
                 extra: int = 0, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.built_for(batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                       value_dim=head_dim if value_dim is None else value_dim, dtype=dtype, device=device)
        self.sinks, self.extra = check_int("sinks", sinks, low=0), check_int("extra", extra, low=0)
        self.query_windows: list[int] | None = None  # per query head, set by configure()
        self.cache: PerHeadWindowCache | None = None

    def configure(self, query_windows: Sequence[int]) -> None:
        """Fix the per-query-head windows; key/value head x keeps the widest window of its query heads."""
        self.query_windows = list(query_windows)
        G = len(self.query_windows) // self.kv_heads
        per_kv = [max(self.query_windows[x * G : (x + 1) * G]) for x in range(self.kv_heads)]
        self.cache = PerHeadWindowCache(self.batch, self.kv_heads, self.head_dim, self.value_dim, windows=per_kv,
                                        sinks=self.sinks, extra=self.extra, dtype=self.dtype, device=self.device)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.cache is None else self.cache.tensors()

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        if self.cache is not None:
            self.cache.reorder(index)
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        if self.cache is not None:
            self.cache.crop(length)
        self.seq_len = length


def init_moa_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, alphas, betas, sinks, length, min_span,
                   span_multiple):
    return MoAState(batch, kv_heads, head_dim, value_dim, sinks=sinks, dtype=dtype, device=device)


def moa_step(q, k, v, state: MoAState, *, scale, alphas, betas, sinks, length, min_span, span_multiple,
             key_padding_mask=None):
    """Append T tokens to the per-head bounded cache, attend each query head to its sinks + window, evict."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=MoAState)
    Hq, Hk = q.shape[1], k.shape[1]
    if Hq % Hk:
        raise ValueError(f"q, k: query heads must be a multiple of key/value heads, got Hq={Hq}, Hk={Hk}")
    if state.query_windows is None:
        n = state.seq_len + k.shape[2] if length is None else length
        state.configure(moa_windows(Hq, n, alphas=alphas, betas=betas, sinks=sinks, min_span=min_span,
                                    span_multiple=span_multiple))
    elif len(state.query_windows) != Hq:
        raise ValueError(f"q: the state was configured for {len(state.query_windows)} query heads, got {Hq}")
    G = Hq // Hk
    out = q.new_empty(q.shape[0], Hq, q.shape[2], v.shape[3])  # (B, Hq, T, Dv)
    groups = state.cache.append(k, v, key_padding_mask)
    state.seq_len = state.cache.seq_len
    for kv_heads, keys, values, mask in groups:  # keys (B, |kv_heads|, L, D)
        local = {x: i for i, x in enumerate(kv_heads)}
        heads = [h for h in range(Hq) if h // G in local]
        for w, hs in _head_classes([state.query_windows[h] for h in heads]):
            qh = [heads[i] for i in hs]
            whole = qh == heads  # the class is every query head of the group, in order: no head gather
            qc = q if qh == list(range(Hq)) else q[:, qh]  # (B, |qh|, T, D)
            if whole:
                kc, vc = keys, values  # (B, |kv_heads|, L, D): grouped-query heads read them in place
            else:
                idx = torch.tensor([local[h // G] for h in qh], device=k.device)
                kc, vc = keys.index_select(1, idx), values.index_select(1, idx)  # (B, |qh|, L, D)
            if q.shape[2] == 1:
                o = _decode_token(qc, kc, vc, mask, window=w, sinks=min(sinks, state.seq_len), scale=scale)
            else:
                o = local_attention(qc, kc, vc, window=w, causal=True, scale=scale, key_padding_mask=mask,
                                    sinks=min(sinks, state.seq_len))
            if qc is q:
                out = o
            else:
                out[:, qh] = o
    state.cache.evict()
    return out


def _decode_token(q, k, v, mask, *, window: int, sinks: int, scale: float) -> torch.Tensor:
    """One new token (the last stored) against a [sinks | recent] cache: its sinks and its last ``window`` keys.
    When the cache holds no more than that (the usual case: the cache keeps ``window - 1`` recent tokens plus the
    new one), every stored key is visible and fused SDPA reads the cache in place; otherwise the visible keys
    (sinks, then the last ``window``) are sliced out. q (B, Hq, 1, D), k/v (B, Hk, L, D|Dv), mask (B, L) or None."""
    L = k.shape[2]
    if L - sinks > window:
        keep = torch.cat([torch.arange(sinks), torch.arange(L - window, L)]).to(k.device)
        k, v = k.index_select(2, keep), v.index_select(2, keep)  # (B, Hk, sinks + window, D|Dv)
        mask = None if mask is None else mask.index_select(1, keep)
    return sdpa(q, k, v, key_padding_mask=mask, scale=scale)  # (B, Hq, 1, Dv)


class PerHeadWindowCache(DecodeState):
    """Sinks + a per-key/value-head window: key/value head ``k`` keeps ``sinks + windows[k] - 1 + extra`` tokens.

    Args:
        windows: one causal window (keys including the query's own) per key/value head.
        sinks: leading tokens every head keeps.
        extra: additional recent tokens kept so that ``crop`` can roll back that many.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
                 windows: Sequence[int], sinks: int, extra: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        windows = list(windows)
        if len(windows) != kv_heads:
            raise ValueError(f"windows: expected one window per key/value head ({kv_heads}), got {len(windows)}")
        for w in windows:
            check_int("windows", w)
        self.built_for(batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                       value_dim=head_dim if value_dim is None else value_dim, dtype=dtype, device=device)
        self.windows, self.sinks, self.extra = windows, sinks, extra
        self.groups: list[tuple[list[int], SinkWindowCache]] = []
        for w in sorted(set(windows)):
            heads = [h for h in range(kv_heads) if windows[h] == w]
            cache = SinkWindowCache(batch, len(heads), head_dim, self.value_dim, window=w, sinks=sinks, extra=extra,
                                    dtype=dtype, device=device)
            self.groups.append((heads, cache))

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, cache in self.groups for t in cache.tensors()]

    def append(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        """Append T tokens, k (B, Hk, T, D), v (B, Hk, T, Dv); return per group (heads, keys, values, mask)
        with keys (B, |heads|, L_g, D) laid out [sinks | recent] as in SinkWindowCache."""
        check_append(self, k, v, key_padding_mask)
        out = []
        for heads, cache in self.groups:
            idx = torch.tensor(heads, device=k.device)
            keys, values, mask = cache.append(k.index_select(1, idx), v.index_select(1, idx), key_padding_mask)
            out.append((heads, keys, values, mask))
        self.seq_len += k.shape[2]
        return out

    def evict(self) -> None:
        for _, cache in self.groups:
            cache.evict()

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        for _, cache in self.groups:
            cache.reorder(index)
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        for _, cache in self.groups:  # check every group first, so that a crop that fails changes nothing
            recent = cache.length - min(cache.sinks, cache.seq_len)  # SinkWindowCache.crop's condition
            if recent - (cache.seq_len - length) < min(cache.window - 1, max(0, length - cache.sinks)):
                cache.crop(length)  # raises, naming the tokens that are gone and the `extra` needed
        for _, cache in self.groups:
            cache.crop(length)
        self.seq_len = length

    def stored_tokens(self) -> list[int]:
        """Tokens currently stored for each key/value head."""
        out = [0] * self.kv_heads
        for heads, cache in self.groups:
            for h in heads:
                out[h] = cache.length
        return out


MOA = register(Mechanism(
    name="moa",
    aliases=("mixture_of_sparse_attention",),
    family="local",
    catalog="P044",
    title="MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
    arxiv="2406.14909",
    code="https://github.com/thu-nics/MoA",
    summary="Per-head elastic sliding windows (span alpha_h + beta_h N) plus shared attention sinks; per-head "
            "bounded KV cache.",
    patterns=("causal_self", "causal_cross"),
    exact=False,
    state="per_head_window",
    complexity="time O(N (s + mean_h w_h) d), memory O(N d); decode state O(sum_h (s + w_h))",
    reference=moa_reference,
    fast=moa_fast,
    step=moa_step,
    init_state=init_moa_state,
    mask=moa_registry_mask,
    options=(
        Option("alphas", 2048, (int, float, tuple), doc="span offset alpha_h: a number for every head or a tuple "
                                                        "with one per query head"),
        Option("betas", 0.0, (int, float, tuple), doc="span slope beta_h >= 0 (span = alpha_h + beta_h * N): a "
                                                      "number or one per query head"),
        Option("sinks", 64, int, low=0, doc="leading tokens every head attends to (MoA's global / static size)"),
        Option("length", None, int, low=1, allow_none=True, doc="N of the elastic rule; None = key length of the "
                                                                "call (decoding: the prefill length)"),
        Option("min_span", 1, int, low=1, doc="smallest span (official runtime: 128)"),
        Option("span_multiple", 1, int, low=1, doc="spans rounded up to a multiple of this (official runtime: 64)"),
    ),
    test_options={"alphas": (2, 3, 5, 4), "betas": (0.0, 0.25, 0.0, 0.5), "sinks": 1, "length": 8},
    notes="causal only; spans >= N reduce to dense causal attention; one shared window is sink_window; windows "
          "per query head, a key/value head caches the widest of its group; decoding == causal forward at equal "
          "`length`.",
))
