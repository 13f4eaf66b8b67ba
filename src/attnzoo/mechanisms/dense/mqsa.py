"""MQSA: multi-query self-attention built from L-query self-attention (sequential recommendation).

Paper: "Collaboration and Transition: Distilling Item Transitions into Multi-Query Self-Attention for
Sequential Recommendation" (MQSA-TED), Zhu et al., arXiv 2311.01056 (WSDM 2024). Official code: none found.
L-query self-attention: the query at step t is built from the last L items (a window of the history)
instead of item t alone; keys and values are the items, causally. Multi-query self-attention mixes a long
and a short window: ``o_t = alpha * o_t^(L_long) + (1 - alpha) * o_t^(L_short)``. (The paper's second part,
transition-aware embedding distillation, is a training loss on item embeddings, not attention: not here.)

Choices (options; from the abstract and catalog, the paper's exact pooling is unconfirmed):
- ``pool="mean"`` (default): the window's items are averaged before the query projection
  (q_t = W_Q mean(x_{t-L+1..t})); ``"weighted"``: a learned weight per offset (softmax over the offsets
  present, zero-initialised so it starts as the mean), one set per window.
- Steps t < L - 1 pool the items that exist; padded items (key_padding_mask False) are left out of every
  pool and every key set.
- Both branches share W_Q, W_K, W_V and W_O; ``alpha`` is a fixed hyper-parameter (default 0.5),
  ``long_window`` 4 and ``short_window`` 1 (the standard one-item query) by default.
- Causal self attention only (recommendation predicts the next item), as the catalog states.

Forms: the reference builds the (N x N) pooling matrix and each branch's softmax explicitly; the fast form
pools with L shifted adds (O(N L d)) and runs both branches in one fused SDPA call (the two query sets
interleaved as query heads sharing each key/value head). Decoding keeps a KV cache plus the last
``L_long - 1`` projected items (:class:`TokenHistoryCache`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_heads, check_pattern_flag, check_sequence_call
from ...kernels.sdpa import sdpa
from ...reference import acc_dtype, dense_mask, repeat_kv
from ...registry import Mechanism, Option, register
from ._common import TokenHistoryCache, masked_softmax, merge_heads, split_heads


def pooling_matrix(n: int, window: int, mask: torch.Tensor | None, logits: torch.Tensor | None,
                   dtype=torch.float64, device=None) -> torch.Tensor:
    """(B|1, N, N) row-stochastic matrix: row t averages (or softmax-weights by offset) items s in
    [t - window + 1, t] that are not padded. logits (window,) per offset t - s, or None for the mean."""
    t = torch.arange(n, device=device).view(n, 1)
    s = torch.arange(n, device=device).view(1, n)
    off = t - s  # (N, N)
    inwin = (off >= 0) & (off < window)  # (N, N)
    if mask is not None:
        inwin = inwin.unsqueeze(0) & mask.view(mask.shape[0], 1, n)  # (B, N, N)
    else:
        inwin = inwin.unsqueeze(0)  # (1, N, N)
    if logits is None:
        score = torch.zeros(off.shape, dtype=dtype, device=device)
    else:
        score = logits.to(dtype)[off.clamp(0, window - 1)]  # (N, N): logit of each offset
    return masked_softmax(score.unsqueeze(0).expand(inwin.shape), inwin)  # (B|1, N, N)


def pool_shifted(q: torch.Tensor, mask: torch.Tensor | None, window: int, logits: torch.Tensor | None,
                 rows: int) -> torch.Tensor:
    """Fast pooling of the last ``rows`` positions of q (B, R, F) over their windows, by ``window``
    shifted adds: (B, rows, F). mask (B, R) bool or None; logits (window,) or None (mean)."""
    B, R, Fd = q.shape
    m = torch.ones(B, R, dtype=q.dtype, device=q.device) if mask is None else mask.to(q.dtype)
    qp = F.pad(q * m.unsqueeze(-1), (0, 0, window - 1, 0))  # (B, R + L - 1, F), zeros before the start
    mp = F.pad(m, (window - 1, 0))  # (B, R + L - 1)
    w = torch.ones(window, dtype=q.dtype, device=q.device) if logits is None else torch.exp(
        logits.to(q.dtype) - logits.to(q.dtype).max())  # (L,) unnormalised offset weights
    num = torch.zeros(B, rows, Fd, dtype=q.dtype, device=q.device)
    den = torch.zeros(B, rows, dtype=q.dtype, device=q.device)
    for lag in range(window):  # item t - lag contributes w[lag]
        lo = R - rows + window - 1 - lag
        num = num + w[lag] * qp[:, lo : lo + rows]
        den = den + w[lag] * mp[:, lo : lo + rows]
    return num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)  # (B, rows, F)


class MultiQuerySelfAttention(nn.Module):
    """MQSA: x (B, N, dim) -> (B, N, dim), causal. Decoding: ``state = m.init_state(batch)``,
    ``out, state = m(x_new, state=state)``."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = True,
                 long_window: int = 4, short_window: int = 1, alpha: float = 0.5, pool: str = "mean",
                 backend: str = "auto") -> None:
        super().__init__()
        mech = MQSA
        self.dim, self.heads, self.kv_heads, self.head_dim = check_heads(
            dim, heads, kv_heads, gqa=True, what=f"mechanism {mech.name!r}")
        self.causal = check_pattern_flag(mech, causal)
        opts = mech.resolve_options({"long_window": long_window, "short_window": short_window, "alpha": alpha,
                                     "pool": pool})
        self.windows = (opts["long_window"], opts["short_window"])
        self.alpha, self.pool = opts["alpha"], opts["pool"]
        self.backend = check_backend(backend)
        H, Hk, d = self.heads, self.kv_heads, self.head_dim
        self.q_proj = nn.Linear(self.dim, H * d, bias=False)
        self.k_proj = nn.Linear(self.dim, Hk * d, bias=False)
        self.v_proj = nn.Linear(self.dim, Hk * d, bias=False)
        self.o_proj = nn.Linear(H * d, self.dim, bias=False)
        if self.pool == "weighted":
            self.long_logits = nn.Parameter(torch.zeros(self.windows[0]))
            self.short_logits = nn.Parameter(torch.zeros(self.windows[1]))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, windows={self.windows}, "
                f"alpha={self.alpha}, pool={self.pool!r}")

    def _logits(self):
        if self.pool == "weighted":
            return self.long_logits, self.short_logits
        return None, None

    def pooled_queries(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        """Reference pooled queries, each (B, H, N, d): the projected items averaged over each window."""
        qx = self.q_proj(x)  # (B, N, H d)
        out = []
        for window, logits in zip(self.windows, self._logits()):
            P = pooling_matrix(x.shape[1], window, key_padding_mask, logits, dtype=qx.dtype, device=x.device)
            out.append(split_heads(torch.matmul(P, qx), self.heads))  # (B, H, N, d)
        return out

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None) -> TokenHistoryCache:
        w = self.q_proj.weight
        return TokenHistoryCache(batch_size, self.kv_heads, self.head_dim, self.head_dim,
                                 features=self.heads * self.head_dim, keep=max(self.windows) - 1,
                                 dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, x, context=None, *, key_padding_mask=None, state=None):
        if context is not None:
            raise ValueError("context: MQSA is causal self attention over one item sequence; got a context")
        check_sequence_call(self, x, None, key_padding_mask=key_padding_mask, state=state, state_type=TokenHistoryCache,
                            mech=MQSA)
        B, N, _ = x.shape
        k = split_heads(self.k_proj(x), self.kv_heads)  # (B, Hk, N, d)
        v = split_heads(self.v_proj(x), self.kv_heads)  # (B, Hk, N, d)
        scale = 1.0 / math.sqrt(self.head_dim)
        if state is not None:
            hist, hist_mask = state.extend_history(self.q_proj(x), key_padding_mask)  # (B, h + N, H d)
            q_long, q_short = (split_heads(pool_shifted(hist, hist_mask, w, lg, rows=N), self.heads)
                               for w, lg in zip(self.windows, self._logits()))
            k, v, kpm = state.append(k, v, key_padding_mask)  # (B, Hk, L, d)
            out = mqsa_fast(q_long, q_short, k, v, alpha=self.alpha, key_padding_mask=kpm, scale=scale)
            return self.o_proj(merge_heads(out)), state
        if self.backend == "reference":
            q_long, q_short = self.pooled_queries(x, key_padding_mask)  # (B, H, N, d) each
            acc = acc_dtype(x.dtype)
            g = self.heads // self.kv_heads
            kf, vf = repeat_kv(k, g).to(acc), repeat_kv(v, g).to(acc)
            mask = dense_mask(B, self.heads, N, N, causal=True, key_padding_mask=key_padding_mask, device=x.device)
            outs = [torch.matmul(masked_softmax(torch.matmul(qb.to(acc), kf.transpose(-2, -1)) * scale, mask), vf)
                    for qb in (q_long, q_short)]  # (B, H, N, d) each
            out = (self.alpha * outs[0] + (1 - self.alpha) * outs[1]).to(x.dtype)
        else:
            qx = self.q_proj(x)  # (B, N, H d)
            q_long, q_short = (split_heads(pool_shifted(qx, key_padding_mask, w, lg, rows=N), self.heads)
                               for w, lg in zip(self.windows, self._logits()))
            out = mqsa_fast(q_long, q_short, k, v, alpha=self.alpha, key_padding_mask=key_padding_mask, scale=scale)
        return self.o_proj(merge_heads(out))  # (B, N, dim)


def mqsa_fast(q_long, q_short, k, v, *, alpha, key_padding_mask, scale):
    """Both branches in one fused causal SDPA call: queries interleaved (B, 2H, N, d) so query heads
    2h and 2h+1 read key/value head h // groups; then o = alpha o_long + (1 - alpha) o_short."""
    B, H, N, d = q_long.shape
    q2 = torch.stack([q_long, q_short], dim=2).reshape(B, 2 * H, N, d)  # (B, 2H, N, d)
    o2 = sdpa(q2, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale)  # (B, 2H, N, dv)
    o2 = o2.view(B, H, 2, N, o2.shape[-1])
    return alpha * o2[:, :, 0] + (1 - alpha) * o2[:, :, 1]  # (B, H, N, dv)


def build_mqsa(dim, heads, *, kv_heads=None, causal=False, **options):
    return MultiQuerySelfAttention(dim, heads, kv_heads=kv_heads, causal=causal, **options)


MQSA = register(Mechanism(
    name="mqsa",
    aliases=("mqsa_ted", "l_query_attention", "multi_query_self_attention"),
    family="dense",
    catalog="P039",
    title="Collaboration and Transition: Distilling Item Transitions into Multi-Query Self-Attention for "
          "Sequential Recommendation",
    arxiv="2311.01056",
    code="",
    summary="Causal self-attention whose query at t pools the last L items; a long and a short window mixed "
            "as alpha o_long + (1 - alpha) o_short.",
    patterns=("causal_self",),
    exact=False,
    state="kv+history",
    complexity="time O(N^2 d + N L d), memory O(N) fused; decode state O(N)",
    module=build_mqsa,
    fast=mqsa_fast,
    options=(
        Option("long_window", 4, int, low=1, doc="L of the long query (items pooled)"),
        Option("short_window", 1, int, low=1, doc="L of the short query (1 = the standard query)"),
        Option("alpha", 0.5, float, low=0.0, high=1.0, doc="weight of the long-query branch"),
        Option("pool", "mean", str, choices=("mean", "weighted"),
               doc="mean of the window, or learned per-offset weights (unconfirmed in the paper)"),
    ),
    test_options={"long_window": 3, "short_window": 2, "alpha": 0.3, "pool": "weighted"},
    notes="causal_self only. long_window = short_window = 1 is standard causal self-attention.",
))
