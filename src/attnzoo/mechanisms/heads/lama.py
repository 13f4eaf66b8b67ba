"""LAMA: low-rank factorised multi-head attention pooling with a global context query.

Paper: "Low Rank Factorization for Compact Multi-Head Self-Attention", Mehta, Rangwala, Ramakrishnan,
arXiv 1912.00835. Official code: none released.
Over encoder states ``h_1..h_n`` (a GRU in the paper) and a global context vector ``c``, head k scores token t by
a low-rank bilinear form of ``c`` and ``h_t`` with factors shared by all heads,
``s_{t,k} = p_k^T (act(U^T h_t) * act(V^T c))`` (low-rank bilinear pooling, rank r); ``a_{.,k} = softmax_t(s_{.,k})``
and the sentence representation is ``[sum_t a_{t,1} h_t; ...; sum_t a_{t,m} h_t]``: O(n r m), one query per head
instead of n.

(?) Not confirmed against an official code (none exists) or the full paper text, which was not available here:
the exact score formula. Two readings are options (``form``):
- ``"mlb"`` (default; the CATALOG's reading, low-rank bilinear pooling as in Kim et al.): as above, with U, V of
  rank ``rank`` and P (rank x heads).
- ``"hadamard"`` (the reading of the public unofficial PyTorch re-implementation, its "Eq. 3.13"): rank = heads,
  no P, ``s_{t,k} = act((P^T c)_k (Q^T h_t)_k)``, then L2-normalised across heads before the softmax over tokens.
Choices: ``context="mean"`` (masked mean of the states, as the re-implementation; ``"last"``: the last unpadded
state, a GRU's summary); ``activation="tanh"`` (``"none"``: the bilinear form exactly). The GRU encoder is not part of
the mechanism: it pools any token states. Output (B, heads, dim): flatten it for the paper's concatenation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import check_int, check_sequence_call
from ...registry import Mechanism, Option, register

FORMS = ("mlb", "hadamard")
CONTEXTS = ("mean", "last")
ACTIVATIONS = ("tanh", "none")


class LowRankMultiHeadPooling(nn.Module):
    """``x (B, N, dim)`` token states (``key_padding_mask (B, N)`` bool, True = real token) -> ``(B, heads, dim)``.

    ``last_attention`` (B, heads, N) after each forward: each head's weights over the tokens (sum 1, 0 on padding).
    """

    def __init__(self, dim: int, heads: int, *, rank: int | None = None, form: str = "mlb", context: str = "mean",
                 activation: str = "tanh") -> None:
        super().__init__()
        opts = LAMA.resolve_options(dict(rank=rank, form=form, context=context, activation=activation))
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        self.form, self.context, self.activation = opts["form"], opts["context"], opts["activation"]
        r = heads if opts["rank"] is None else opts["rank"]
        if self.form == "hadamard" and r != heads:
            raise ValueError(f"rank: the 'hadamard' form has rank = heads = {heads}, got rank={r}")
        self.rank = r
        self.u = nn.Linear(dim, r, bias=False)  # U^T h (tokens)
        self.v = nn.Linear(dim, r, bias=False)  # V^T c (context)
        self.p = nn.Linear(r, heads, bias=False) if self.form == "mlb" else None  # per-head mixing p_k
        self.last_attention: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, rank={self.rank}, form={self.form!r}, context={self.context!r}, "
                f"activation={self.activation!r}")

    def _act(self, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(t) if self.activation == "tanh" else t

    def global_context(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """c (B, dim): the masked mean of the states, or the last unpadded one."""
        B, N, _ = x.shape
        keep = torch.ones(B, N, dtype=torch.bool, device=x.device) if key_padding_mask is None else key_padding_mask
        if self.context == "mean":
            w = keep.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
            return (x * w).sum(1) / w.sum(1).clamp_min(1)
        last = torch.where(keep, torch.arange(N, device=x.device), torch.full_like(keep, -1, dtype=torch.long))
        idx = last.amax(dim=1).clamp_min(0)  # (B,)
        return x[torch.arange(B, device=x.device), idx]  # (B, dim)

    def scores(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """s (B, heads, N): the low-rank bilinear score of every token under every head."""
        if self.form == "mlb":
            z = self._act(self.u(x)) * self._act(self.v(c)).unsqueeze(1)  # (B, N, r)
            return self.p(z).transpose(1, 2)  # (B, heads, N)
        s = self._act(self.u(x) * self.v(c).unsqueeze(1))  # (B, N, heads)
        s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # L2 over heads (the re-implementation's Eq. 3.13)
        return s.transpose(1, 2)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim) -> (B, heads, dim)."""
        check_sequence_call(self, x, key_padding_mask=key_padding_mask)
        c = self.global_context(x, key_padding_mask)  # (B, dim)
        s = self.scores(x, c)  # (B, heads, N)
        if key_padding_mask is not None:
            keep = key_padding_mask.unsqueeze(1)  # (B, 1, N)
            has = key_padding_mask.any(dim=1).view(-1, 1, 1)  # (B, 1, 1)
            s = s.masked_fill(~keep & has, float("-inf"))  # a sequence with no token: uniform, then zeroed
        a = torch.softmax(s, dim=-1)  # (B, heads, N)
        if key_padding_mask is not None:
            a = a * has  # a sequence with no token pools to zeros
        self.last_attention = a.detach()
        return torch.matmul(a, x)  # (B, heads, dim)


def _lama_module(dim: int, heads: int, **options: Any):
    return LowRankMultiHeadPooling(dim, heads, **options)


LAMA = register(Mechanism(
    name="lama",
    aliases=("low_rank_multihead_pooling",),
    family="heads",
    kind="pooling",
    catalog="P008",
    title="Low Rank Factorization for Compact Multi-Head Self-Attention",
    arxiv="1912.00835",
    code="(none released)",
    summary="Multi-head attention pooling: each head scores tokens against a global context vector with a "
            "shared low-rank bilinear form; (B, N, C) -> (B, heads, C).",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time and memory O(N r heads + N d r)",
    module=_lama_module,
    options=(
        Option("rank", None, int, low=1, allow_none=True, doc="rank r of the shared factors (None: heads)"),
        Option("form", "mlb", str, choices=FORMS, doc="score formula: low-rank bilinear pooling, or the "
                                                       "re-implementation's Hadamard form (?)"),
        Option("context", "mean", str, choices=CONTEXTS, doc="global context: mean of states or last state"),
        Option("activation", "tanh", str, choices=ACTIVATIONS, doc="nonlinearity of the factors"),
    ),
    permutation_equivariant=False,
    test_options={"rank": 5},
    test_sizes={"heads": 3},
    notes="(?) score formula not confirmed (no official code); both readings are options. Weights of each head "
          "sum to 1; with context='mean' the pooled output is invariant to token order.",
))
