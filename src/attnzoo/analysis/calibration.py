"""Training-free attention calibration: ACT (CATALOG P046) and VAR (CATALOG P098), as dense references on a weight
matrix and as streamed output corrections that never form the n x n matrix.

**ACT** -- "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training
through Attention Calibration", Yu, Wang, Fu, Shi, Shaikh, Lin, ICML 2024 (arXiv 2406.15765). Official code:
https://github.com/GATECH-EIC/ACT (``models/llama_modelling_aug.py``, ``scripts/calibration.sh``). In a selected head,
key j is a sink when its mean attention over the queries that see it exceeds ``threshold``
(``sum_i A_ij / (N - j) > 0.1``, causal), the first token excluded (the official drops the first sink found, which
is the first token whenever it is a sink); the sinks' weights are multiplied by ``beta`` (0.4) and the removed mass
``(1 - beta) S_i`` is given to the other keys of row i in proportion to their weights. Heads are selected offline,
one at a time on a calibration set: a head is kept when calibrating it alone improves the calibration metric
(official: accuracy on 900 classification prompts; here: next-token loss of calibration text -- a choice).
Layers 0 and 1 are never calibrated (the official script starts at layer 2).

**VAR** -- "See What You Are Told: Visual Attention Sink in Large Multimodal Models", Kang, Kim, Kim, Hwang,
ICLR 2025 (arXiv 2503.03321); no official code found. Sink dimensions are the hidden-state dimensions where the first
token has a massive activation, ``|h_0[d]| / RMS(h_0) >= tau``; a token of the visual span is a visual sink when it
also has one there. Image-centric heads are those whose text queries put at least ``rho`` of their span attention
on non-sink span tokens (the "visual non-sink ratio"); in them a fraction ``p`` of the attention on the span's sink
tokens moves to its non-sink tokens, in proportion to their weights. Defaults tau = 20, rho = 0.5, p = 0.6 are
this library's reading (the CATALOG marks them (?)). Text-only here: the "visual" span is a marked segment of a
text prompt on a text LM (SmolLM2), and the redistributed rows are the queries after the span.

Streamed forms. With o = A v the output, S_i the sink mass of row i and o_s = sum_{j in sinks} A_ij v_j:

    ACT:  o' = o - (1 - beta) o_s + (1 - beta) S / (1 - S) (o - o_s)
    VAR:  o' = o - p o_s + p S / T o_n,   T, o_n the mass and output of the span's non-sink tokens

so only the sink (and span) columns of A are needed: O(N |sinks|) from q, k and the log-sum-exp. A row whose whole
mass is on sinks (S = 1; ACT) or whose span has no non-sink mass (T = 0; VAR) is left unchanged (the official ACT
code would divide by zero there).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import check_float, check_tensor
from ..kernels.sdpa import sdpa_with_lse
from ..reduce.importance import attention_received, attention_row
from ..reference import repeat_kv
from .capture import AttentionCall

__all__ = ["act_sinks", "act_calibrate", "act_correction", "ACT", "sink_dimensions", "span_sinks",
           "var_redistribute", "var_correction", "image_centric", "VAR"]

ACT_BETA, ACT_THRESHOLD = 0.4, 0.1
VAR_TAU, VAR_RHO, VAR_P = 20.0, 0.5, 0.6


# --------------------------------------------------------------------------------------------------------
# ACT: dense reference
# --------------------------------------------------------------------------------------------------------
def _seen_counts(nq: int, nk: int, causal: bool, device) -> torch.Tensor:
    """(Nk,) how many of the Nq queries see each key (bottom-right causal: key j is seen by rows i >= j - (Nk - Nq))."""
    if not causal:
        return torch.full((nk,), float(nq), device=device)
    j = torch.arange(nk, device=device)
    return (nq - (j - (nk - nq)).clamp(min=0)).clamp(min=0).to(torch.float64)


def act_sinks(column_sums: torch.Tensor, *, nq: int, causal: bool = True, threshold: float = ACT_THRESHOLD,
              exclude_first: bool = True) -> torch.Tensor:
    """Sink keys (bool, the shape of ``column_sums`` (..., Nk)): mean attention over the queries that see the key
    above ``threshold``; the first key is excluded (the first token is the known sink ACT leaves alone)."""
    check_tensor("column_sums", column_sums)
    check_float("threshold", threshold, low=0.0)
    nk = column_sums.shape[-1]
    mean = column_sums.double() / _seen_counts(nq, nk, causal, column_sums.device).clamp(min=1)
    sinks = mean > threshold
    if exclude_first:
        sinks[..., 0] = False
    return sinks


def act_calibrate(weights: torch.Tensor, sinks: torch.Tensor, beta: float = ACT_BETA) -> torch.Tensor:
    """The ACT-calibrated attention matrix: weights (B, H, Nq, Nk), sinks bool broadcastable to (B, H, 1, Nk).

    Sink columns are scaled by ``beta``; the removed mass goes to the other keys of each row in proportion to their
    weights. Rows keep their sums; rows with no non-sink mass are unchanged."""
    check_tensor("weights", weights, ndim=4)
    check_float("beta", beta, low=0.0, high=1.0)
    s = sinks.to(torch.bool)
    if s.dim() == 1:
        s = s.view(1, 1, 1, -1)
    elif s.dim() == 3:
        s = s.unsqueeze(2)
    sink_w = weights * s  # (B, H, Nq, Nk)
    S = sink_w.sum(-1, keepdim=True)  # (B, H, Nq, 1)
    rest = weights - sink_w
    R = rest.sum(-1, keepdim=True)  # non-sink mass = 1 - S on a stochastic row
    ok = R > 0
    gain = torch.where(ok, (1 - beta) * S / torch.where(ok, R, torch.ones_like(R)), torch.zeros_like(R))
    out = beta * sink_w + rest * (1 + gain)
    return torch.where(ok, out, weights)


# --------------------------------------------------------------------------------------------------------
# Streamed corrections: only the sink / span columns of A, from q, k and the LSE
# --------------------------------------------------------------------------------------------------------
def _columns(q, k, v, cols: torch.Tensor, *, lse, scale, causal):
    """A[:, :, :, cols] (B, H, Nq, C) and A[..., cols] @ v[cols] (B, H, Nq, Dv) from q (B, H, Nq, D), k/v with H
    heads already matched, the rows' lse (B, H, Nq); cols (C,) key indices."""
    nq, nk = q.shape[2], k.shape[2]
    if cols.numel() == 0:
        return q.new_zeros(*q.shape[:3], 0), q.new_zeros(*q.shape[:3], v.shape[-1])
    kc, vc = k[:, :, cols], v[:, :, cols]  # (B, H, C, D)
    s = torch.matmul(q, kc.transpose(-1, -2)) * scale  # (B, H, Nq, C)
    if causal:
        vis = cols.view(1, -1) <= (torch.arange(nq, device=q.device) + (nk - nq)).view(-1, 1)  # (Nq, C)
        s = s.masked_fill(~vis, float("-inf"))
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1)
    a = torch.exp(s - safe)  # (B, H, Nq, C)
    return a, torch.matmul(a, vc.to(a.dtype))


def act_correction(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, *,
                   lse: torch.Tensor, scale: float, causal: bool = True, beta: float = ACT_BETA) -> torch.Tensor:
    """ACT on a softmax head's output without the matrix: out (B, H, Nq, Dv) = A v, q (B, H, Nq, D), k/v (B, H, Nk, .)
    (heads matched), sinks (Nk,) bool (one set for the batch), lse (B, H, Nq). Equals act_calibrate(A) @ v."""
    check_float("beta", beta, low=0.0, high=1.0)
    cols = torch.nonzero(sinks.reshape(-1)).flatten()
    a, o_s = _columns(q, k, v, cols, lse=lse, scale=scale, causal=causal)
    S = a.sum(-1, keepdim=True).to(out.dtype)  # (B, H, Nq, 1)
    o_s = o_s.to(out.dtype)
    R = 1 - S
    ok = R > 1e-12
    gain = (1 - beta) * S / torch.where(ok, R, torch.ones_like(R))
    new = out - (1 - beta) * o_s + gain * (out - o_s)
    return torch.where(ok, new, out)


# --------------------------------------------------------------------------------------------------------
# ACT inside a model
# --------------------------------------------------------------------------------------------------------
@dataclass
class ACT:
    """Hook calibrating the (layer, head) pairs in ``heads`` on every forward (sinks detected per input, per head).

    Softmax calls are corrected from q, k and the LSE (:func:`act_correction`, no n x n matrix); other mechanisms
    through their dense effective operator (:func:`act_calibrate`). ``log`` collects, per calibrated head, the sinks
    found and the mass moved (when ``record`` is True)."""

    heads: Iterable[tuple[int, int]]
    beta: float = ACT_BETA
    threshold: float = ACT_THRESHOLD
    record: bool = False
    log: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            self.by_layer.setdefault(int(layer), []).append(int(head))

    def __call__(self, call: AttentionCall) -> torch.Tensor | None:
        hs = self.by_layer.get(call.layer)
        if not hs:
            return None
        if call.q.shape[0] != 1:
            raise ValueError(f"ACT: one sequence at a time (sinks are per input), got batch {call.q.shape[0]}")
        G = call.q.shape[1] // call.k.shape[1]
        idx = torch.tensor(hs)
        q = call.q[:, idx]
        k, v = repeat_kv(call.k, G)[:, idx], repeat_kv(call.v, G)[:, idx]  # (1, h, N, D)
        out = call.out.clone()
        with torch.no_grad():
            if call.streams() and call.predicate() is None and call.key_padding_mask is None:
                _, lse = sdpa_with_lse(q, k, v, causal=call.causal, scale=call.scale)  # (1, h, N)
                received = attention_received(q, k, scale=call.scale, causal=call.causal)  # (1, h, Nk) means
                sums = received * q.shape[2]
                for i, h in enumerate(hs):
                    sinks = act_sinks(sums[0, i], nq=q.shape[2], causal=call.causal, threshold=self.threshold)
                    out[:, h : h + 1] = act_correction(call.out[:, h : h + 1], q[:, i : i + 1], k[:, i : i + 1],
                                                       v[:, i : i + 1], sinks, lse=lse[:, i : i + 1],
                                                       scale=call.scale, causal=call.causal, beta=self.beta)
                    self._note(call.layer, h, sinks)
            else:
                w = call.weights()[:, idx]  # (1, h, Nq, Nk)
                for i, h in enumerate(hs):
                    sinks = act_sinks(w[0, i].sum(0), nq=w.shape[2], causal=call.causal, threshold=self.threshold)
                    wc = act_calibrate(w[:, i : i + 1], sinks, self.beta)
                    out[:, h : h + 1] = torch.matmul(wc, v[:, i : i + 1].to(wc.dtype)).to(out.dtype)
                    self._note(call.layer, h, sinks)
        return out

    def _note(self, layer: int, head: int, sinks: torch.Tensor) -> None:
        if self.record:
            self.log.append({"layer": layer, "head": head, "sinks": torch.nonzero(sinks).flatten().tolist()})


# --------------------------------------------------------------------------------------------------------
# VAR
# --------------------------------------------------------------------------------------------------------
def _phi(hidden: torch.Tensor) -> torch.Tensor:
    """|h[d]| / RMS(h) per token and dimension: hidden (..., C)."""
    h = hidden.double()
    return h.abs() / h.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)


def sink_dimensions(first_token_hidden: torch.Tensor, tau: float = VAR_TAU) -> torch.Tensor:
    """Dimensions (D',) where the first token's hidden state (C,) has a massive activation |h[d]|/RMS(h) >= tau."""
    check_tensor("first_token_hidden", first_token_hidden, ndim=1)
    return torch.nonzero(_phi(first_token_hidden) >= tau).flatten()


def span_sinks(hidden: torch.Tensor, dims: torch.Tensor, span: torch.Tensor, tau: float = VAR_TAU) -> torch.Tensor:
    """Sink tokens of the span: hidden (N, C), dims (D',), span (N,) bool -> (N,) bool, True for span tokens with
    a massive activation on a sink dimension."""
    check_tensor("hidden", hidden, ndim=2)
    if dims.numel() == 0:
        return torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    return (_phi(hidden)[:, dims].amax(-1) >= tau) & span.to(torch.bool)


def image_centric(weights_on_span: torch.Tensor, sinks_in_span: torch.Tensor, rho: float = VAR_RHO) -> torch.Tensor:
    """(H,) bool: heads whose queries put >= rho of their span attention on the span's non-sink tokens (mean over the
    rows given). weights_on_span (H, R, M): the attention of R query rows on the M span tokens; sinks_in_span (M,)."""
    mass = weights_on_span.sum(-1)  # (H, R)
    non_sink = (weights_on_span * (~sinks_in_span).to(weights_on_span.dtype)).sum(-1)
    ratio = torch.where(mass > 0, non_sink / mass.clamp_min(1e-300), torch.zeros_like(mass)).mean(-1)
    return ratio >= rho


def var_redistribute(weights: torch.Tensor, span: torch.Tensor, sinks: torch.Tensor, *, rows: torch.Tensor,
                     heads: torch.Tensor, p: float = VAR_P) -> torch.Tensor:
    """Dense VAR: weights (B, H, Nq, Nk); span, sinks (Nk,) bool (sinks inside the span); rows (Nq,) bool = the query
    rows redistributed (the text after the span); heads (H,) bool = the image-centric heads. In those rows and heads a
    fraction p of each sink's weight moves to the span's non-sink tokens in proportion to their weights."""
    check_tensor("weights", weights, ndim=4)
    check_float("p", p, low=0.0, high=1.0)
    sk = (sinks & span).view(1, 1, 1, -1).to(weights.dtype)
    ns = (span & ~sinks).view(1, 1, 1, -1).to(weights.dtype)
    S = (weights * sk).sum(-1, keepdim=True)
    T = (weights * ns).sum(-1, keepdim=True)
    ok = T > 0
    moved = weights - p * weights * sk + p * S * weights * ns / torch.where(ok, T, torch.ones_like(T))
    where = ok & rows.view(1, 1, -1, 1) & heads.view(1, -1, 1, 1)
    return torch.where(where, moved, weights)


def var_correction(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: torch.Tensor,
                   sinks: torch.Tensor, *, lse: torch.Tensor, scale: float, causal: bool = True,
                   p: float = VAR_P) -> torch.Tensor:
    """VAR on softmax heads' outputs without the matrix (all rows and heads given are redistributed): only the span's
    columns are formed. Shapes as :func:`act_correction`; span, sinks (Nk,) bool."""
    check_float("p", p, low=0.0, high=1.0)
    a_s, o_s = _columns(q, k, v, torch.nonzero(sinks & span).flatten(), lse=lse, scale=scale, causal=causal)
    a_n, o_n = _columns(q, k, v, torch.nonzero(span & ~sinks).flatten(), lse=lse, scale=scale, causal=causal)
    S, T = a_s.sum(-1, keepdim=True).to(out.dtype), a_n.sum(-1, keepdim=True).to(out.dtype)
    ok = T > 0
    new = out - p * o_s.to(out.dtype) + p * S / torch.where(ok, T, torch.ones_like(T)) * o_n.to(out.dtype)
    return torch.where(ok, new, out)


@dataclass
class VAR:
    """Hook redistributing the span's sink attention in image-centric heads, rows after the span, layers >=
    ``first_layer``. ``sinks`` (N,) bool are the span's sink tokens (from :func:`span_sinks`), ``span`` (N,) bool.
    ``log`` records per layer the image-centric heads and the mass moved."""

    span: torch.Tensor
    sinks: torch.Tensor
    p: float = VAR_P
    rho: float = VAR_RHO
    first_layer: int = 2
    log: list[dict] = field(default_factory=list)

    def __call__(self, call: AttentionCall) -> torch.Tensor | None:
        if call.layer < self.first_layer or call.q.shape[0] != 1:
            return None
        n = call.q.shape[2]
        if n != self.span.numel():  # decoding steps or another input: not this prompt
            return None
        span, sinks = self.span.to(call.q.device), self.sinks.to(call.q.device) & self.span.to(call.q.device)
        after = torch.arange(n, device=span.device) > int(torch.nonzero(span).max())
        rows = torch.nonzero(after).flatten()
        if rows.numel() == 0 or not bool(sinks.any()):
            return None
        G = call.q.shape[1] // call.k.shape[1]
        k, v = repeat_kv(call.k, G), repeat_kv(call.v, G)
        cols = torch.nonzero(span).flatten()
        with torch.no_grad():
            if call.streams() and call.predicate() is None and call.key_padding_mask is None:
                p_rows = attention_row(call.q[:, :, rows], call.k, rows=rows, nq=n, scale=call.scale,
                                       causal=call.causal)[..., cols]  # (1, H, R, M) span columns of the rows
                heads = image_centric(p_rows[0], sinks[cols], self.rho)
                if not bool(heads.any()):
                    return None
                hs = torch.nonzero(heads).flatten()
                qh, kh, vh = call.q[:, hs][:, :, rows], k[:, hs], v[:, hs]
                _, lse = sdpa_with_lse(call.q[:, hs], kh, vh, causal=call.causal, scale=call.scale)
                new = var_correction(call.out[:, hs][:, :, rows], qh, kh, vh, span, sinks,
                                     lse=lse[:, :, rows], scale=call.scale, causal=False, p=self.p)
            else:
                w = call.weights()
                heads = image_centric(w[0][:, rows][..., cols], sinks[cols], self.rho)
                if not bool(heads.any()):
                    return None
                hs = torch.nonzero(heads).flatten()
                wr = var_redistribute(w, span, sinks, rows=after, heads=heads, p=self.p)
                new = torch.matmul(wr[:, hs][:, :, rows], v[:, hs].to(wr.dtype)).to(call.out.dtype)
        out = call.out.clone()
        out[:, hs.view(-1, 1), rows.view(1, -1)] = new
        self.log.append({"layer": call.layer, "heads": hs.tolist()})
        return out


def column_sums_dense(weights: torch.Tensor) -> torch.Tensor:
    """(B, H, Nk) column sums of a weight matrix (for :func:`act_sinks` on an effective operator)."""
    return weights.sum(2)


def moved_mass(before: torch.Tensor, after: torch.Tensor, cols: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(B, H, Nq) mass removed from the given columns: sum_cols (before - after)."""
    c = torch.as_tensor(cols, dtype=torch.long)
    return (before[..., c] - after[..., c]).sum(-1)
