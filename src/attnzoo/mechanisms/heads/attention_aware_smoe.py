"""Similarity-aware / attention-aware routing for sparse mixtures of experts (an (S)MoE-attention block).

Paper: "Improving Routing in Sparse Mixture of Experts with Graph of Tokens", Nguyen, Tran, Nguyen, Baraniuk,
arXiv 2505.00792. Official code: none found.
A standard SMoE routes token i by its own gate ``p_i = softmax(W_g x_i)``; here tokens vote on each other's
routing: similarity-aware ``p~_i = sum_j S_ij p_j`` with ``S = softmax(x W_s x^T / tau)``, attention-aware
``p~_i = sum_j A_ij p_j`` with A the attention matrix of the attention layer just before the MoE (the PGM of an
(S)MoE-attention block); top-k experts are chosen from ``p~`` (lower routing entropy, fewer routing flips).

The module is that block: ``h = x + Attn(LN1 x)``, ``y = LN2 h``, ``out = h + sum_{e in topk(p~_i)} g_{i,e} FFN_e(y_i)``
(pre-norm residual, the usual MoE-transformer layout). Router (``router`` option): ``"attention"`` (default; A of
the block's own attention, averaged over heads), ``"similarity"``, or ``"standard"`` (``p~ = p``, the baseline).

(?) Choices where the paper text was not available here (all options or documented): A is head-averaged; the
gate values are ``p~`` on the top-k renormalised to 1 (Mixtral style); ``S`` uses a learned ``W_s`` (dim x dim,
no bias) on the routed features and is masked like the attention (causal, padding); experts are 2-layer GELU
FFNs of hidden size ``expert_hidden`` (default 2 * dim). Auxiliary loss (``module.aux_loss``):
``aux_loss_weight * E * sum_e f_e P_e`` on the mixed probabilities ``p~`` (Switch load balancing).

Patterns: self attention only (the routing mixes the gates of the tokens of one sequence); causal uses a causal
A / S, so decoding works with a :class:`RoutedKVCache` (keys, values and each past token's gate
probabilities, plus its router features for similarity routing). Fast form: each expert runs only on the tokens
routed to it (gather, FFN, scatter-add); the reference runs every expert on every token and masks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import (
    check_backend,
    check_bool,
    check_heads,
    check_int,
    check_sequence_call,
)
from ...reference import dense_mask, repeat_kv
from ...registry import Mechanism, Option, register
from ._common import TokenBuffers
from ._routing import load_balancing_loss, split_heads, topk_mask
from .echoatt import attention_probs

ROUTERS = ("attention", "similarity", "standard")


def mix_gates(probs: torch.Tensor, graph: torch.Tensor | None) -> torch.Tensor:
    """``p~ = G p``: probs (B, N, E) gate probabilities, graph (B, Nq, N) row-stochastic token graph (attention or
    similarity matrix) or None (standard routing) -> (B, Nq, E). Rows of p~ sum to 1 when those of G do."""
    return probs if graph is None else torch.matmul(graph, probs)


def similarity_graph(y_q: torch.Tensor, y_k: torch.Tensor, w_s: torch.Tensor, *, tau: float, causal: bool,
                     key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``S = softmax((y_q W_s) y_k^T / tau)`` masked (bottom-right causal, padding).

    y_q (B, Nq, d), y_k (B, N, d) -> (B, Nq, N)."""
    B, Nq, _ = y_q.shape
    N = y_k.shape[1]
    scores = torch.matmul(F.linear(y_q, w_s), y_k.transpose(1, 2)) / tau  # (B, Nq, N)
    mask = dense_mask(B, 1, Nq, N, causal=causal, key_padding_mask=key_padding_mask, device=y_q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    w = torch.exp(scores - row_max)
    den = w.sum(dim=-1, keepdim=True)
    return w / torch.where(den > 0, den, torch.ones_like(den))


class AttentionAwareSMoE(nn.Module):
    """(S)MoE-attention block with attention-aware (or similarity-aware) routing: ``x (B, N, dim)`` -> ``(B, N, dim)``.

    After each forward: ``aux_loss``, ``last_gates`` (B, N, E) mixed probabilities ``p~``, ``last_selected``
    (B, N, E) bool (exactly ``top_k`` per token), ``last_graph`` (B, N, N) the token graph used (or None).
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, experts: int = 4,
                 top_k: int = 2, router: str = "attention", tau: float = 1.0, expert_hidden: int | None = None,
                 pre_norm: bool = True, aux_loss_weight: float = 0.01, head_dim: int | None = None,
                 bias: bool = False, backend: str = "auto") -> None:
        super().__init__()
        opts = SMOE.resolve_options(dict(experts=experts, top_k=top_k, router=router, tau=tau,
                                         expert_hidden=expert_hidden, pre_norm=pre_norm,
                                         aux_loss_weight=aux_loss_weight))
        self.dim, self.heads, self.kv_heads, self.head_dim = check_heads(dim, heads, kv_heads, head_dim=head_dim)
        hd = self.head_dim
        self.experts, self.top_k, self.router = opts["experts"], opts["top_k"], opts["router"]
        if self.top_k > self.experts:
            raise ValueError(f"top_k: expected at most experts={self.experts}, got {self.top_k}")
        if not opts["tau"] > 0:
            raise ValueError(f"tau: expected a positive temperature, got {opts['tau']!r}")
        self.tau, self.aux_loss_weight = opts["tau"], opts["aux_loss_weight"]
        check_bool("causal", causal)
        check_backend(backend)
        self.causal, self.backend = causal, backend
        self.scale = 1.0 / math.sqrt(hd)
        hidden = 2 * dim if opts["expert_hidden"] is None else opts["expert_hidden"]
        self.norm1 = nn.LayerNorm(dim) if opts["pre_norm"] else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if opts["pre_norm"] else nn.Identity()
        self.q_proj = nn.Linear(dim, heads * hd, bias=bias)
        self.k_proj = nn.Linear(dim, self.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(dim, self.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(heads * hd, dim, bias=bias)
        self.gate = nn.Linear(dim, self.experts, bias=False)
        self.w_sim = nn.Linear(dim, dim, bias=False) if self.router == "similarity" else None
        E = self.experts
        self.w1 = nn.Parameter(torch.empty(E, hidden, dim))  # expert e: FFN_e(y) = W2_e gelu(W1_e y + b1_e) + b2_e
        self.b1 = nn.Parameter(torch.zeros(E, hidden))
        self.w2 = nn.Parameter(torch.empty(E, dim, hidden))
        self.b2 = nn.Parameter(torch.zeros(E, dim))
        for w in (self.w1, self.w2):
            nn.init.kaiming_uniform_(w.view(-1, w.shape[-1]), a=math.sqrt(5))
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_gates = self.last_selected = self.last_graph = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, experts={self.experts}, top_k={self.top_k}, "
                f"router={self.router!r}, causal={self.causal}")

    @property
    def _features(self) -> int:
        return {"attention": self.experts, "similarity": self.experts + self.dim, "standard": 0}[self.router]

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> RoutedKVCache:
        """Keys/values of the attention and each past token's gate probabilities (and routed features)."""
        if not self.causal:
            raise ValueError("causal: decoding needs a causal layer; build it with causal=True")
        check_int("batch_size", batch_size)
        w = self.q_proj.weight
        return RoutedKVCache(batch_size, self.kv_heads, self.head_dim, self.head_dim, self._features,
                             dtype=dtype or w.dtype, device=device or w.device)

    def experts_reference(self, y: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by the (zero outside the top-k) gates: y (B, N, d) -> (B, N, d)."""
        h = F.gelu(torch.einsum("bnd,ehd->bneh", y, self.w1) + self.b1)  # (B, N, E, hidden)
        out = torch.einsum("bneh,edh->bned", h, self.w2) + self.b2  # (B, N, E, d)
        return (out * gates.unsqueeze(-1)).sum(dim=2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state: RoutedKVCache | None = None):
        """x (B, N, dim), key_padding_mask (B, N) bool (True = real token). Returns (B, N, dim), or (out, state)."""
        if context is not None:
            raise ValueError("context: attention-aware routing mixes the gates of one sequence's tokens; cross "
                             "attention is not supported (got a context)")
        check_sequence_call(self, x, key_padding_mask=key_padding_mask, state=state, state_type=RoutedKVCache,
                            mech=SMOE)
        B, N, _ = x.shape
        H, Hk, hd, E = self.heads, self.kv_heads, self.head_dim, self.experts
        xa = self.norm1(x)
        q = split_heads(self.q_proj(xa), H, hd)  # (B, H, N, hd)
        k = split_heads(self.k_proj(xa), Hk, hd)  # (B, Hk, N, hd)
        v = split_heads(self.v_proj(xa), Hk, hd)
        kpm = key_padding_mask
        if state is not None:
            kpm = state.pending_mask(N, key_padding_mask)
            k, v = state.write(0, k), state.write(1, v)  # (B, Hk, L, hd)
        A = attention_probs(q, k, causal=self.causal, key_padding_mask=kpm, scale=self.scale)  # (B, H, N, L)
        att = torch.matmul(A, repeat_kv(v, H // Hk).to(A.dtype)).to(x.dtype)  # (B, H, N, hd)
        h = x + self.o_proj(att.transpose(1, 2).reshape(B, N, H * hd))  # (B, N, dim)
        y = self.norm2(h)
        acc = torch.promote_types(x.dtype, torch.float32)
        p = torch.softmax(F.linear(y.to(acc), self.gate.weight.to(acc)), dim=-1)  # (B, N, E) own gate probs
        p_all, y_all = p, y.to(acc)
        if state is not None:
            feats = {"attention": p, "similarity": torch.cat([p, y.to(acc)], dim=-1),
                     "standard": p[..., :0]}[self.router]  # (B, N, F); standard routing needs no past token
            f_all = state.write(2, feats.to(state.dtype).unsqueeze(1)).squeeze(1).to(acc)  # (B, L, F)
            if self.router != "standard":
                p_all, y_all = f_all[..., :E], f_all[..., E:]
        if self.router == "attention":
            graph = A.to(acc).mean(dim=1)  # (B, N, L): head-averaged attention matrix
        elif self.router == "similarity":
            graph = similarity_graph(y.to(acc), y_all, self.w_sim.weight.to(acc), tau=self.tau, causal=self.causal,
                                     key_padding_mask=kpm)
        else:
            graph = None
        p_mix = mix_gates(p_all, graph)  # (B, N, E)
        sel = topk_mask(p_mix, self.top_k)  # (B, N, E)
        g = p_mix * sel
        den = g.sum(dim=-1, keepdim=True)  # 0 for a token that sees no key (all its gates are 0): keep them 0
        g = g / torch.where(den > 0, den, torch.ones_like(den))  # renormalised over the top-k (finite gradients)
        weight = key_padding_mask.reshape(-1) if key_padding_mask is not None else None
        self.aux_loss = load_balancing_loss(p_mix.reshape(-1, E), sel.reshape(-1, E), weight) * self.aux_loss_weight
        self.last_gates, self.last_selected = p_mix.detach(), sel
        self.last_graph = None if graph is None else graph.detach()
        g = g.to(x.dtype)
        if self.backend == "reference":
            moe = self.experts_reference(y, g)
        else:
            moe = smoe_fast(y, g, sel, self.w1, self.b1, self.w2, self.b2)
        out = h + moe
        if state is not None:
            state.advance(N, key_padding_mask)
            return out, state
        return out


def smoe_fast(y: torch.Tensor, gates: torch.Tensor, selected: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Each expert only on its routed tokens: y (B, N, d), gates/selected (B, N, E), expert weights
    w1 (E, hidden, d), b1 (E, hidden), w2 (E, d, hidden), b2 (E, d) -> (B, N, d)."""
    B, N, d = y.shape
    flat = y.reshape(B * N, d)
    out = y.new_zeros(B * N, d)
    sel = selected.reshape(B * N, -1)
    g = gates.reshape(B * N, -1)
    for e in range(sel.shape[1]):
        idx = sel[:, e].nonzero().squeeze(1)  # tokens routed to expert e
        if idx.numel() == 0:
            continue
        h = F.gelu(F.linear(flat.index_select(0, idx), w1[e], b1[e]))  # (n_e, hidden)
        contrib = F.linear(h, w2[e], b2[e]) * g.index_select(0, idx)[:, e : e + 1]  # (n_e, d)
        out = out.index_add(0, idx, contrib)
    return out.view(B, N, d)


def _smoe_module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    return AttentionAwareSMoE(dim, heads, kv_heads=kv_heads, causal=causal, **options)


class RoutedKVCache(TokenBuffers):
    """Keys (B, Hk, L, D), values (B, Hk, L, Dv) and one feature row per token (B, 1, L, F).

    Used by the attention-aware / similarity-aware MoE block: the router of a new token mixes the routing
    probabilities (and, for similarity routing, the router features) of every token before it.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: int, features: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(batch, [(kv_heads, head_dim), (kv_heads, value_dim), (1, features)], dtype=dtype,
                         device=device, names=["k", "v", "router features"])


SMOE = register(Mechanism(
    name="attention_aware_smoe",
    aliases=("similarity_aware_smoe", "graph_of_tokens_smoe"),
    family="heads",
    kind="sequence",
    catalog="P033",
    title="Improving Routing in Sparse Mixture of Experts with Graph of Tokens",
    arxiv="2505.00792",
    code="(none found)",
    summary="(S)MoE-attention block whose router mixes the gate probabilities of all tokens by the attention "
            "matrix (or a token-similarity matrix) before choosing the top-k experts.",
    patterns=("noncausal_self", "causal_self"),
    exact=False,
    state="routed_kv",
    complexity="attention O(N^2 d) with the N x N matrix kept for routing; routing O(N^2 E); experts O(N k d h)",
    module=_smoe_module,
    fast=smoe_fast,
    options=(
        Option("experts", 4, int, low=1, doc="FFN experts E"),
        Option("top_k", 2, int, low=1, doc="experts per token"),
        Option("router", "attention", str, choices=ROUTERS, doc="token graph mixing the gates"),
        Option("tau", 1.0, float, low=0.0, doc="temperature of the similarity graph"),
        Option("expert_hidden", None, int, low=1, allow_none=True, doc="expert FFN hidden size (None: 2 * dim)"),
        Option("pre_norm", True, bool, doc="LayerNorm before the attention and before the MoE"),
        Option("aux_loss_weight", 0.01, float, low=0.0, doc="weight of the load-balancing loss"),
    ),
    test_options={"experts": 4, "top_k": 2, "expert_hidden": 8},
    test_sizes={"n": 6},
    notes="router='standard' is a plain top-k SMoE block; an identity token graph gives standard routing; rows of "
          "the mixed gates sum to 1.",
))
