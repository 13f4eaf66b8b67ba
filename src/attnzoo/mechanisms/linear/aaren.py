"""Aaren: attention of a learned query, computed for every prefix by a parallel prefix scan (an RNN).

Paper: "Attention as an RNN", Feng, Tung, Hajimirsadeghi, Bengio, Ahmed (Borealis AI), arXiv 2405.13956.
Official code: none published (a Borealis AI paper; nothing on GitHub or PyPI as of this writing).
With an input-independent learned query q and scores s_i = q . k_i, Aaren outputs for every t the softmax
attention of q over the prefix, ``o_t = sum_{i<=t} exp(s_i - m_t) v_i / sum_{i<=t} exp(s_i - m_t)``. The prefix
triples (m, u, w) = (max score, sum of exp, weighted sum of values) combine associatively,
``(mA, uA, wA) + (mB, uB, wB) = (m, uA e^(mA-m) + uB e^(mB-m), wA e^(mA-m) + wB e^(mB-m))``, m = max(mA, mB),
so all N outputs come from one parallel prefix scan in O(log N) depth, and decoding keeps one triple
per head (constant memory): an RNN whose cell is attention.

Forms:
- reference: the per-prefix softmax written out, ``softmax_attention`` of the query repeated at every
  position over the causally masked keys (O(N^2)).
- :func:`prefix_scan`: the paper's parallel scan over tokens (Hillis-Steele, log2 N rounds of the
  operator above); the oracle tests compare it with the reference and the sequential RNN update.
- fast (:func:`aaren_scan`): a work-efficient two-level version of the same scan: within blocks of
  ``chunk`` tokens the prefix triples are the rows of one masked (chunk x chunk) block, across blocks the
  paper's scan combines the block summaries; O(N chunk) memory, never N x N.
- step: the triple after the last token; T new tokens are scanned from it.

Choices where the paper is silent (each an option or a documented convention):
- Multi-head: ``heads`` learned queries of ``head_dim`` each, keys/values projected per head, outputs
  concatenated and projected (the paper's Aaren is one head); scores are scaled by 1/sqrt(head_dim).
- The query is initialised N(0, 1) (truncated, std 1) so that initial scores have unit scale like q.k of
  unit-variance projections; keys and values use nn.Linear's default initialisation, no bias.
- ``key_padding_mask``: a masked token gets score -inf (it joins no prefix); a position whose prefix holds
  no unmasked token outputs 0.
- Only causal self attention (many-to-many); :meth:`Aaren.pool` gives the many-to-one output (the last
  prefix), which equals one-query softmax attention over all tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import check_backend, check_heads, check_init_state, check_int, check_sequence_call
from ...reference import acc_dtype, softmax_attention
from ...registry import Mechanism, Option, register
from ...state import RecurrentState

NEG_INF = float("-inf")


def _factor(mx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(mx - m), 0 where mx = -inf (an empty part), never NaN (also when m = -inf)."""
    ok = mx > NEG_INF
    return torch.where(ok, torch.exp(torch.where(ok, mx - m, torch.zeros_like(mx))), torch.zeros_like(mx))


def combine(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The associative operator on prefix triples: a, b = (m (...), u (...), w (..., Dv)); a comes first.

    The maxima m are stabilisers only (the output w / u does not depend on them), so they are detached:
    gradients flow through u and w alone and stay exact."""
    ma, ua, wa = a
    mb, ub, wb = b
    m = torch.maximum(ma, mb)
    fa, fb = _factor(ma, m), _factor(mb, m)
    return m, ua * fa + ub * fb, wa * fa.unsqueeze(-1) + wb * fb.unsqueeze(-1)


def leaf_triples(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One triple per token: (s, 1, v) written as (sg(s), exp(s - sg(s)), exp(s - sg(s)) v) so that the
    gradient w.r.t. s flows; s = -inf (masked) gives the empty triple (-inf, 0, 0)."""
    m = s.detach()
    u = _factor(s, m)  # 1 (0 when masked), with d/ds = 1
    return m, u, u.unsqueeze(-1) * v


def prefix_scan(m: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inclusive prefix of triples along the sequence axis (m, u: (..., N); w: (..., N, Dv)) by the
    Hillis-Steele parallel scan: log2 N rounds, round r combines each position with the one 2^r back."""
    N = m.shape[-1]
    step = 1
    while step < N:
        head = (m[..., step:], u[..., step:], w[..., step:, :])
        back = (m[..., :-step], u[..., :-step], w[..., :-step, :])
        cm, cu, cw = combine(back, head)
        m = torch.cat([m[..., :step], cm], dim=-1)
        u = torch.cat([u[..., :step], cu], dim=-1)
        w = torch.cat([w[..., :step, :], cw], dim=-2)
        step *= 2
    return m, u, w


def finish(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """o = w / u, 0 where the prefix is empty (u = 0)."""
    return w / torch.where(u > 0, u, torch.ones_like(u)).unsqueeze(-1)


def aaren_scan(s: torch.Tensor, v: torch.Tensor, *, chunk: int = 64, initial=None):
    """Every prefix's softmax of scores s (B, H, N) over values v (B, H, N, Dv), two-level scan.

    ``initial`` is a triple (m (B, H), u (B, H), w (B, H, Dv)) summarising earlier tokens, or None.
    Returns (o (B, H, N, Dv), final triple). Memory O(N chunk + N Dv); never an N x N matrix.
    """
    B, H, N = s.shape
    Dv = v.shape[-1]
    C = max(1, min(chunk, N))
    nb = -(-N // C)
    pad = nb * C - N
    if pad:  # padded tokens are empty triples: the identity of the operator, so nothing changes
        s = torch.cat([s, s.new_full((B, H, pad), NEG_INF)], dim=-1)
        v = torch.cat([v, v.new_zeros(B, H, pad, Dv)], dim=-2)
    sb = s.view(B, H, nb, C)  # (B, H, nb, C)
    vb = v.reshape(B, H, nb, C, Dv)  # (B, H, nb, C, Dv)
    # Within each block: prefix triples as the rows of a masked block, stabilised by the running max.
    mloc = torch.cummax(sb.detach(), dim=-1).values  # (B, H, nb, C)
    tri = torch.ones(C, C, dtype=torch.bool, device=s.device).tril()  # row t sees i <= t
    sc = sb.unsqueeze(-2).expand(B, H, nb, C, C).masked_fill(~tri, NEG_INF)  # (B, H, nb, C, C): s_i at (t, i)
    P = _factor(sc, mloc.unsqueeze(-1))  # (B, H, nb, C, C): exp(s_i - m_t), i <= t
    uloc = P.sum(dim=-1)  # (B, H, nb, C)
    wloc = torch.matmul(P, vb)  # (B, H, nb, C, Dv)
    # Across blocks: the paper's parallel scan of the block summaries, then an exclusive shift.
    incl = prefix_scan(mloc[..., -1], uloc[..., -1], wloc[..., -1, :])  # (B, H, nb) x2, (B, H, nb, Dv)
    if initial is None:
        initial = (s.new_full((B, H), NEG_INF), s.new_zeros(B, H), s.new_zeros(B, H, Dv))
    m0, u0, w0 = initial
    excl = (torch.cat([s.new_full((B, H, 1), NEG_INF), incl[0][..., :-1]], dim=-1),  # empty before block 0
            torch.cat([s.new_zeros(B, H, 1), incl[1][..., :-1]], dim=-1),
            torch.cat([s.new_zeros(B, H, 1, Dv), incl[2][..., :-1, :]], dim=-2))
    carry = combine((m0.unsqueeze(-1), u0.unsqueeze(-1), w0.unsqueeze(-2)), excl)  # (B, H, nb): before each block
    tot = combine((carry[0].unsqueeze(-1), carry[1].unsqueeze(-1), carry[2].unsqueeze(-2)), (mloc, uloc, wloc))
    out = finish(tot[1], tot[2]).reshape(B, H, nb * C, Dv)[:, :, :N]  # (B, H, N, Dv)
    final = combine(initial, (incl[0][..., -1], incl[1][..., -1], incl[2][..., -1, :]))
    return out, final


def aaren_reference(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-prefix softmax: query (H, D) repeated at every position, causal softmax attention over k, v
    (B, H, N, D|Dv) -> (B, H, N, Dv). O(N^2); the oracle of every other form."""
    B, H, N, D = k.shape
    q = query.to(k.dtype).view(1, H, 1, D).expand(B, H, N, D)  # (B, H, N, D): the same query everywhere
    return softmax_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale)


def aaren_scores(query: torch.Tensor, k: torch.Tensor, scale: float, key_padding_mask=None) -> torch.Tensor:
    """s_i = scale q . k_i, -inf for masked tokens: (B, H, N) in the accumulation dtype."""
    acc = acc_dtype(k.dtype)
    s = torch.einsum("bhnd,hd->bhn", k.to(acc), query.to(acc)) * scale  # (B, H, N)
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask.view(k.shape[0], 1, k.shape[2]), NEG_INF)
    return s


class Aaren(nn.Module):
    """Aaren: x (B, N, dim) -> (B, N, dim), output t = softmax attention of learned queries over x[:t+1].

    ``backend``: "reference" (per-prefix softmax, O(N^2)) or "fast"/"auto" (two-level prefix scan).
    Decoding: ``state = layer.init_state(batch)`` (a :class:`~attnzoo.state.RecurrentState` holding the
    triple m (B, H), u (B, H), w (B, H, head_dim)), then ``out, state = layer(x_new, state=state)``.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = True,
                 head_dim: int | None = None, chunk: int = 64, backend: str = "auto") -> None:
        super().__init__()
        if causal is not True:
            raise ValueError(f"causal: Aaren computes every prefix's attention (pattern 'causal_self'), "
                             f"got causal={causal!r}; use Aaren.pool for the many-to-one output")
        dim, heads, _, head_dim = check_heads(dim, heads, kv_heads, head_dim=head_dim, gqa=False,
                                              what="Aaren (one learned query per head)")
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.chunk, self.backend = check_int("chunk", chunk), check_backend(backend)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, head_dim), std=1.0))
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}"

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None) -> RecurrentState:
        w = self.query
        spec = check_init_state(batch=batch_size, dtype=w.dtype if dtype is None else dtype,
                                device=w.device if device is None else device)
        acc, device = acc_dtype(spec["dtype"]), spec["device"]
        H = self.heads
        return RecurrentState(m=torch.full((batch_size, H), NEG_INF, dtype=acc, device=device),
                              u=torch.zeros(batch_size, H, dtype=acc, device=device),
                              w=torch.zeros(batch_size, H, self.head_dim, dtype=acc, device=device)).built_for(**spec)

    def _kv(self, x):
        B, N, _ = x.shape
        k = self.k_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        v = self.v_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        return k, v

    def _out(self, o, B, N, dtype):
        return self.o_proj(o.to(dtype).transpose(1, 2).reshape(B, N, self.heads * self.head_dim))  # (B, N, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state: RecurrentState | None = None):
        """x (B, N, dim) -> (B, N, dim), or ``(out, state)`` when decoding with a state."""
        if context is not None:
            raise ValueError("context: Aaren attends over its own prefix (pattern 'causal_self'); got a context")
        check_sequence_call(self, x, key_padding_mask=key_padding_mask, state=state, state_type=RecurrentState)
        B, N, _ = x.shape
        k, v = self._kv(x)
        if state is None and self.backend == "reference":
            o = aaren_reference(self.query, k, v, scale=self.scale, key_padding_mask=key_padding_mask)
            return self._out(o, B, N, x.dtype)
        s = aaren_scores(self.query, k, self.scale, key_padding_mask)  # (B, H, N)
        acc = s.dtype
        initial = None if state is None else (state["m"], state["u"], state["w"])
        o, (m, u, w) = aaren_scan(s, v.to(acc), chunk=self.chunk, initial=initial)  # (B, H, N, hd)
        y = self._out(o, B, N, x.dtype)
        if state is None:
            return y
        state.update(m=m, u=u, w=w)
        state.advance(N)
        return y, state

    def pool(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Many-to-one: the attention of the learned queries over all of x, (B, N, dim) -> (B, dim)."""
        check_sequence_call(self, x, key_padding_mask=key_padding_mask)
        B, N, _ = x.shape
        k, v = self._kv(x)
        s = aaren_scores(self.query, k, self.scale, key_padding_mask)  # (B, H, N)
        _, (m, u, w) = aaren_scan(s, v.to(s.dtype), chunk=self.chunk)
        return self._out(finish(u, w).unsqueeze(2), B, 1, x.dtype)[:, 0]  # (B, dim)


def _aaren(dim, heads, *, kv_heads=None, causal=False, backend="auto", **options):
    """``attnzoo.build("aaren", ...)``: options validated against the record's ranges."""
    return Aaren(dim, heads, kv_heads=kv_heads, causal=causal, backend=backend, **AAREN.resolve_options(options))


AAREN = register(Mechanism(
    name="aaren",
    aliases=("attention_as_an_rnn",),
    family="linear",
    catalog="P031",
    title="Attention as an RNN",
    arxiv="2405.13956",
    code="",
    summary="Softmax attention of a learned query over every prefix, by a parallel prefix scan; O(1) decode state.",
    patterns=("causal_self",),
    exact=False,
    state="recurrent",
    complexity="time O(N C d) two-level scan (O(log N) depth), memory O(N (C + d)); decode state O(d) per head",
    fast=aaren_scan,
    module=_aaren,
    options=(
        Option("head_dim", None, int, low=1, allow_none=True, doc="per-head width (default dim / heads)"),
        Option("chunk", 64, int, low=1, doc="tokens per block of the two-level scan (does not change the result)"),
    ),
    test_options={"chunk": 3},
    notes="no official code; multi-head with a learned query per head; many-to-one output via Aaren.pool.",
))
