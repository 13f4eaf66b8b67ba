"""Mixture-of-Head attention (MoH).

Paper: "MoH: Multi-Head Attention as Mixture-of-Head Attention", Jin, Zhu, Yuan, Yan, arXiv 2410.11842.
Official code: https://github.com/SkyworkAI/MoH
Multi-head attention in summation form, ``O_t = sum_i g_{t,i} H_{t,i} W_O^i``: every token keeps ``h_s`` shared
heads and routes itself to the top-K of the ``h - h_s`` routed heads; the other heads are neither computed nor
attended for that token (the fast form gathers, per head, only the query rows of the tokens that activated it).

Gates (``gate`` option; the paper and the official code differ, both are here):
- ``"official"`` (default, the MoH-ViT/DiT code that produced the paper's numbers): routed gates are the
  router softmax restricted to the top-K and renormalised to sum to K; shared gates are ``h_s * softmax(W_s x)``
  (1 when ``h_s = 1``); both are scaled by ``2 * softmax(W_h x)`` (shared, routed) when both kinds exist.
- ``"paper"`` (Eq. 5-6 of the paper): routed ``g_i = a2 * softmax(W_r x)_i`` on the top-K (no renormalisation),
  shared ``g_i = a1 * softmax(W_s x)_i``, ``[a1, a2] = softmax(W_h x)``.
- ``"binary"``: gate 1 on every active head (the MoH-LLaMA3 continue-tuning code); with all heads active this
  is standard multi-head attention exactly.

Router (``router`` option): ``"linear"`` (W_r x, the paper) or ``"query_norm"`` (MoH-LLaMA3: the L2 norms of the
routed heads' queries divided by their standard deviation, no router parameters). Router logits are computed
in at least float32 whatever the input dtype, so a bfloat16 run picks the same heads as float32 on the same values.

Auxiliary loss (``module.aux_loss`` after each forward): ``aux_loss_weight * R * sum_i f_i P_i`` over the R routed
heads (f_i: fraction of tokens routed to head i, P_i: mean router probability), as the official code computes it
(0.01 is the official training weight). Padded query tokens of self attention are not counted. It is zero when
there are no routed heads.

Defaults where the paper leaves a choice: ``shared_heads = heads // 2``, ``routed_topk = heads // 4`` (75% of heads
active, the MoH-LLaMA3 configuration); key/value heads may be fewer than query heads (GQA, as in LLaMA3).
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
from ...reference import softmax_attention
from ...registry import PATTERNS, Mechanism, Option, register
from ...state import KVCache
from ._routing import gather_positions, load_balancing_loss, routed_attention, split_heads, topk_mask

GATES = ("official", "paper", "binary")
ROUTERS = ("linear", "query_norm")


class MixtureOfHeadsAttention(nn.Module):
    """MoH attention layer: ``x (B, N, dim)`` (and ``context (B, M, context_dim)`` for cross attention) ->
    ``(B, N, dim)``.

    After each forward: ``aux_loss`` (scalar load-balancing loss to add to the training loss), ``last_gates``
    (B, N, heads) float and ``last_active`` (B, N, heads) bool (exactly ``shared_heads + routed_topk`` per token).
    ``backend``: ``"reference"`` computes every head densely and multiplies by the (zero) gates; ``"fast"`` /
    ``"auto"`` computes each head only for the tokens that activated it.
    Decoding: ``state = layer.init_state(batch)``; ``out, state = layer(x_new, state=state)`` (causal layers).
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 shared_heads: int | None = None, routed_topk: int | None = None, gate: str = "official",
                 router: str = "linear", aux_loss_weight: float = 0.01, head_dim: int | None = None,
                 context_dim: int | None = None, bias: bool = False, backend: str = "auto") -> None:
        super().__init__()
        opts = MOH.resolve_options(dict(shared_heads=shared_heads, routed_topk=routed_topk, gate=gate, router=router,
                                        aux_loss_weight=aux_loss_weight))
        self.dim, self.heads, self.kv_heads, self.head_dim = check_heads(dim, heads, kv_heads, head_dim=head_dim)
        check_bool("causal", causal)
        check_backend(backend)
        self.causal, self.backend = causal, backend
        hs = heads // 2 if opts["shared_heads"] is None else opts["shared_heads"]
        if hs > heads:
            raise ValueError(f"shared_heads: expected at most heads={heads}, got {hs}")
        routed = heads - hs
        k = min(max(heads // 4, 1), routed) if opts["routed_topk"] is None else opts["routed_topk"]
        if k > routed:
            raise ValueError(f"routed_topk: expected at most the {routed} routed heads (heads - shared_heads), got {k}")
        if routed > 0 and k == 0:
            raise ValueError(f"routed_topk: expected >= 1 when there are routed heads ({routed}), got 0; "
                             f"set shared_heads={heads} for no routing")
        self.shared_heads, self.routed_heads, self.routed_topk = hs, routed, k
        self.gate, self.router, self.aux_loss_weight = opts["gate"], opts["router"], opts["aux_loss_weight"]
        if self.router == "query_norm" and 0 < routed < 2:
            raise ValueError(f"router: 'query_norm' normalises by the std over routed heads and needs >= 2 of them, "
                             f"got {routed}")
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        hd = self.head_dim
        self.q_proj = nn.Linear(dim, heads * hd, bias=bias)
        self.k_proj = nn.Linear(self.context_dim, self.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(self.context_dim, self.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(heads * hd, dim, bias=bias)
        # Routers (no bias, as the official code); only the ones the gate formula uses exist.
        weighted = self.gate != "binary"
        self.w_routed = nn.Linear(dim, routed, bias=False) if routed > 0 and self.router == "linear" else None
        self.w_shared = nn.Linear(dim, hs, bias=False) if weighted and hs > 1 else None
        self.w_mix = nn.Linear(dim, 2, bias=False) if weighted and hs > 0 and routed > 0 else None
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_gates: torch.Tensor | None = None
        self.last_active: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, shared_heads={self.shared_heads}, "
                f"routed_topk={self.routed_topk} of {self.routed_heads}, gate={self.gate!r}, router={self.router!r}, "
                f"causal={self.causal}")

    # -- routing ---------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor, q: torch.Tensor | None = None, token_weight: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates (B, N, heads) in at least float32, active mask (B, N, heads) bool and the load-balancing loss.

        ``q`` (B, heads, N, head_dim) is needed by the query-norm router only.
        """
        B, N, _ = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        hs, R, K = self.shared_heads, self.routed_heads, self.routed_topk
        lin = lambda layer: F.linear(xf, layer.weight.to(acc))  # (B, N, out), at least float32
        parts, active = [], []
        aux = x.new_zeros((), dtype=acc)
        if hs > 0:
            if self.gate == "binary":
                g_s = xf.new_ones(B, N, hs)
            elif hs > 1:
                g_s = torch.softmax(lin(self.w_shared), dim=-1)  # (B, N, hs)
                g_s = g_s * hs if self.gate == "official" else g_s
            else:
                g_s = xf.new_ones(B, N, 1)
            parts.append(g_s)
            active.append(torch.ones(B, N, hs, dtype=torch.bool, device=x.device))
        if R > 0:
            if self.router == "linear":
                logits = lin(self.w_routed)  # (B, N, R)
            else:
                norms = q[:, hs:].to(acc).norm(dim=-1).permute(0, 2, 1)  # (B, N, R)
                logits = norms / norms.std(dim=-1, keepdim=True)
            probs = torch.softmax(logits, dim=-1)  # (B, N, R)
            sel = topk_mask(probs, K)  # (B, N, R)
            aux = load_balancing_loss(probs.reshape(-1, R), sel.reshape(-1, R),
                                      None if token_weight is None else token_weight.reshape(-1))
            if self.gate == "binary":
                g_r = sel.to(xf.dtype)
            elif self.gate == "official":
                g_r = probs * sel
                g_r = g_r / g_r.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(g_r.dtype).eps) * K
            else:
                g_r = probs * sel
            parts.append(g_r)
            active.append(sel)
        if self.w_mix is not None:
            a = torch.softmax(lin(self.w_mix), dim=-1)  # (B, N, 2)
            if self.gate == "official":
                a = a * 2
            parts = [parts[0] * a[..., :1], parts[1] * a[..., 1:]]
        gates = torch.cat(parts, dim=-1)  # (B, N, heads)
        return gates, torch.cat(active, dim=-1), aux * self.aux_loss_weight

    # -- decoding --------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        """An empty KV cache (B, kv_heads, L, head_dim), exactly as multi-head attention keeps."""
        if not self.causal:
            raise ValueError("causal: decoding needs a causal layer; build it with causal=True")
        check_int("batch_size", batch_size)
        w = self.q_proj.weight
        return KVCache(batch_size, self.kv_heads, self.head_dim, self.head_dim, dtype=dtype or w.dtype,
                       device=device or w.device)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state: KVCache | None = None):
        """x (B, N, dim), context (B, M, context_dim) or None, key_padding_mask (B, M or N) bool (True = attend).

        Returns (B, N, dim), or ``(out, state)`` when a decode state is given.
        """
        src = check_sequence_call(self, x, context, key_padding_mask=key_padding_mask, state=state,
                                  state_type=KVCache, mech=MOH)
        B, N, _ = x.shape
        hd, H, Hk = self.head_dim, self.heads, self.kv_heads
        k = split_heads(self.k_proj(src), Hk, hd)  # (B, Hk, M, hd)
        v = split_heads(self.v_proj(src), Hk, hd)  # (B, Hk, M, hd)
        kpm = key_padding_mask
        if state is not None:
            k, v, kpm = state.append(k, v, key_padding_mask)  # (B, Hk, L, hd), (B, L)
        # Self attention: padded query tokens do not count in the load-balancing statistics.
        token_weight = key_padding_mask if (context is None and key_padding_mask is not None) else None
        q = split_heads(self.q_proj(x), H, hd)  # (B, H, N, hd)
        gates, active, aux = self.route(x, q, token_weight)  # (B, N, H) x2, ()
        self.aux_loss, self.last_gates, self.last_active = aux, gates.detach(), active
        gates = gates.to(x.dtype)
        if self.backend != "reference":
            y = moh_fast(q, k, v, gates, active, self.o_proj, causal=self.causal, key_padding_mask=kpm,
                         scale=self.scale)
        else:
            y = moh_reference(q, k, v, gates, self.o_proj, causal=self.causal, key_padding_mask=kpm, scale=self.scale)
        return (y, state) if state is not None else y


def moh_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, o_proj: nn.Linear, *,
                  causal: bool, key_padding_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Every head densely, weighted by its gate (0 for inactive heads), summed through W_O.

    q (B, H, N, hd), k/v (B, Hk, M, hd), gates (B, N, H) -> (B, N, dim).
    """
    B, H, N, hd = q.shape
    heads_out = softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)  # (B,H,N,hd)
    weighted = heads_out * gates.transpose(1, 2).unsqueeze(-1)  # (B, H, N, hd); inactive heads are exactly 0
    return o_proj(weighted.transpose(1, 2).reshape(B, N, H * hd))  # (B, N, dim) = sum_i g_i H_i W_O^i


def moh_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, active: torch.Tensor,
             o_proj: nn.Linear, *, causal: bool, key_padding_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Each head's attention only for the tokens that activated it.

    The routed query rows of every head are gathered (padded to the busiest head's count; padding rows are
    multiplied by zero, load balancing keeps them few) and attended in one fused call, causal rows reading
    only the keys they can see; the gated results are scattered back and projected by W_O. The query and
    output projections stay dense GEMMs: on CPU, gathering token rows per head costs more memory traffic
    than the projection FLOPs it would save (the attention is >80% of the FLOPs at N = 4096, d = 512).

    q (B, H, N, hd), k/v (B, Hk, M, hd), gates (B, N, H), active (B, N, H) bool -> (B, N, dim).
    """
    B, H, N, hd = q.shape
    pos, valid = gather_positions(active)  # (B, H, A), A = most tokens any head got
    idx = pos.unsqueeze(-1).expand(B, H, pos.shape[-1], hd)  # (B, H, A, hd)
    out = routed_attention(q.gather(2, idx), k, v, pos, valid, causal=causal, offset=k.shape[2] - N,
                           key_padding_mask=key_padding_mask, scale=scale)  # (B, H, A, hd)
    g = gates.permute(0, 2, 1).gather(2, pos) * valid  # (B, H, A); exactly 0 on padding rows
    heads_out = q.new_zeros(B, H, N, hd).scatter(2, idx, out * g.unsqueeze(-1))  # (B, H, N, hd); 0 if inactive
    return o_proj(heads_out.transpose(1, 2).reshape(B, N, H * hd))  # (B, N, dim)


def _moh_module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    return MixtureOfHeadsAttention(dim, heads, kv_heads=kv_heads, causal=causal, **options)


MOH = register(Mechanism(
    name="moh",
    aliases=("mixture_of_heads", "mixture_of_head_attention"),
    family="heads",
    kind="sequence",
    catalog="P006",
    title="MoH: Multi-Head Attention as Mixture-of-Head Attention",
    arxiv="2410.11842",
    code="https://github.com/SkyworkAI/MoH",
    summary="Each token uses h_s shared heads plus its router's top-K heads, weighted by gates; "
            "inactive heads are not computed.",
    patterns=PATTERNS,
    exact=False,
    state="kv",
    complexity="time O(N M d (h_s + K) / h) for the attention; decode state O(M) as MHA",
    module=_moh_module,
    fast=moh_fast,
    options=(
        Option("shared_heads", None, int, low=0, allow_none=True, doc="always-on heads h_s (None: heads // 2)"),
        Option("routed_topk", None, int, low=0, allow_none=True,
               doc="routed heads per token K (None: heads // 4, at most heads - shared_heads)"),
        Option("gate", "official", str, choices=GATES, doc="gate normalisation: official code, paper, or binary"),
        Option("router", "linear", str, choices=ROUTERS, doc="linear router W_r x, or MoH-LLaMA3's query norms"),
        Option("aux_loss_weight", 0.01, float, low=0.0, doc="weight of the load-balancing loss in module.aux_loss"),
    ),
    test_options={"shared_heads": 1, "routed_topk": 2},
    test_sizes={"n": 7, "nq": 5, "nk": 9},
    notes="shared_heads=heads with gate='binary' is standard multi-head attention; routing depends only on the "
          "query token, so all four patterns and KV-cache decoding work as for MHA.",
))
