"""BAM: soft mixture of attention experts (Branch-Attend-Mix upcycling).

Paper: "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts", Zhang et al.,
arXiv 2408.08274. Official code: none released.
E full multi-head attention experts (each with its own W_Q, W_K, W_V, W_O, upcycled from E dense seed models)
are mixed per token by a router, ``y_t = sum_e r_e(x_t) MHA_e(x)_t``, ``r = softmax(W_r x_t)``; BAM routes softly
(every expert on every token). The KV-sharing variant shares W_K, W_V across experts: one KV cache.

Choices (options): ``routing="soft"`` (the paper's default, all experts) or ``"topk"`` (each token uses its
``top_k`` experts, router probabilities renormalised over them, Mixtral style; the paper compares a top-k
variant); ``kv_sharing``. :meth:`BAMAttention.from_dense` upcycles attnzoo :class:`~attnzoo.layers.Attention`
layers (one per expert); with KV sharing the experts' W_K, W_V are averaged (the paper averages every
parameter that is not an expert's own). The parallel block ``x + Attn(LN x) + MoE-FFN(LN x)`` is outside the
mechanism.

Auxiliary loss (``module.aux_loss``): with top-k routing, ``aux_loss_weight * E * sum_e f_e P_e`` (the load-balancing
loss of Switch/MoH, f_e the fraction of tokens sent to expert e, P_e its mean router probability). Soft routing
sends every token to every expert, so there is no load to balance: the loss is zero there.

Fast forms: soft routing runs all experts' heads in one fused attention call (shared K/V read through
grouped-query attention, not copied); top-k routing attends, per expert, only the query rows of its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
from ...kernels.sdpa import sdpa
from ...reference import softmax_attention
from ...registry import PATTERNS, Mechanism, Option, register
from ...state import KVCache
from ._routing import gather_positions, load_balancing_loss, routed_attention, split_heads, topk_mask

ROUTINGS = ("soft", "topk")


class BAMAttention(nn.Module):
    """Mixture of ``experts`` multi-head attention experts mixed per token: ``x (B, N, dim)`` (``context`` for
    cross attention) -> ``(B, N, dim)``.

    ``q_proj[e]``, ``o_proj[e]`` per expert; ``k_proj``/``v_proj`` per expert, or one each with ``kv_sharing``.
    After each forward: ``aux_loss``, ``last_router`` (B, N, E) mixing weights. Decoding keeps one
    :class:`~attnzoo.state.KVCache` of ``E * kv_heads`` heads, or ``kv_heads`` with KV sharing.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, experts: int = 4,
                 routing: str = "soft", top_k: int = 2, kv_sharing: bool = False, aux_loss_weight: float = 0.01,
                 head_dim: int | None = None, context_dim: int | None = None, bias: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        opts = BAM.resolve_options(dict(experts=experts, routing=routing, top_k=top_k, kv_sharing=kv_sharing,
                                        aux_loss_weight=aux_loss_weight))
        self.dim, self.heads, self.kv_heads, self.head_dim = check_heads(dim, heads, kv_heads, head_dim=head_dim)
        hd = self.head_dim
        self.experts, self.routing, self.top_k = opts["experts"], opts["routing"], opts["top_k"]
        self.kv_sharing, self.aux_loss_weight = opts["kv_sharing"], opts["aux_loss_weight"]
        if self.routing == "topk" and self.top_k > self.experts:
            raise ValueError(f"top_k: expected at most experts={self.experts}, got {self.top_k}")
        check_bool("causal", causal)
        check_backend(backend)
        self.causal, self.backend = causal, backend
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        self.scale = 1.0 / math.sqrt(hd)
        E, H, Hk = self.experts, heads, self.kv_heads
        nkv = 1 if self.kv_sharing else E
        self.router = nn.Linear(dim, E, bias=False)
        self.q_proj = nn.ModuleList(nn.Linear(dim, H * hd, bias=bias) for _ in range(E))
        self.k_proj = nn.ModuleList(nn.Linear(self.context_dim, Hk * hd, bias=bias) for _ in range(nkv))
        self.v_proj = nn.ModuleList(nn.Linear(self.context_dim, Hk * hd, bias=bias) for _ in range(nkv))
        self.o_proj = nn.ModuleList(nn.Linear(H * hd, dim, bias=bias) for _ in range(E))
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_router: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, layers: Sequence[nn.Module], *, causal: bool | None = None, kv_sharing: bool = False,
                   **options: Any) -> BAMAttention:
        """Upcycle dense attention layers (attnzoo ``Attention``, one per expert) into a BAM layer; the router
        starts random. With ``kv_sharing`` the shared W_K, W_V are the experts' average."""
        if not layers:
            raise ValueError("layers: expected at least one dense attention layer, got none")
        first = layers[0]
        for i, layer in enumerate(layers):
            for attr in ("q_proj", "k_proj", "v_proj", "o_proj", "heads", "kv_heads", "head_dim", "dim"):
                if not hasattr(layer, attr):
                    raise TypeError(f"layers[{i}]: expected an attnzoo Attention layer, missing {attr!r}")
            if (layer.dim, layer.heads, layer.kv_heads, layer.head_dim) != (
                    first.dim, first.heads, first.kv_heads, first.head_dim):
                raise ValueError(f"layers[{i}]: shapes differ from layers[0]")
        bias = first.q_proj.bias is not None
        m = cls(first.dim, first.heads, kv_heads=first.kv_heads, causal=first.causal if causal is None else causal,
                experts=len(layers), kv_sharing=kv_sharing, head_dim=first.head_dim, bias=bias, **options)
        m = m.to(dtype=first.q_proj.weight.dtype, device=first.q_proj.weight.device)
        with torch.no_grad():
            for e, layer in enumerate(layers):
                m.q_proj[e].load_state_dict(layer.q_proj.state_dict())
                m.o_proj[e].load_state_dict(layer.o_proj.state_dict())
                if not kv_sharing:
                    m.k_proj[e].load_state_dict(layer.k_proj.state_dict())
                    m.v_proj[e].load_state_dict(layer.v_proj.state_dict())
            if kv_sharing:
                for name in ("k_proj", "v_proj"):
                    for pname, p in getattr(m, name)[0].named_parameters():
                        p.copy_(torch.stack([getattr(getattr(lay, name), pname) for lay in layers]).mean(0))
        return m

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, experts={self.experts}, "
                f"routing={self.routing!r}, top_k={self.top_k}, kv_sharing={self.kv_sharing}, causal={self.causal}")

    def route(self, x: torch.Tensor, token_weight: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixing weights (B, N, E), selected experts (B, N, E) bool, aux loss. Computed in >= float32."""
        acc = torch.promote_types(x.dtype, torch.float32)
        probs = torch.softmax(F.linear(x.to(acc), self.router.weight.to(acc)), dim=-1)  # (B, N, E)
        if self.routing == "soft":
            return probs, torch.ones_like(probs, dtype=torch.bool), x.new_zeros((), dtype=acc)
        sel = topk_mask(probs, self.top_k)  # (B, N, E)
        r = probs * sel
        r = r / r.sum(dim=-1, keepdim=True)  # renormalised over the chosen experts
        E = self.experts
        aux = load_balancing_loss(probs.reshape(-1, E), sel.reshape(-1, E),
                                  None if token_weight is None else token_weight.reshape(-1))
        return r, sel, aux * self.aux_loss_weight

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        """One KV cache for all experts: E * kv_heads heads (kv_heads with KV sharing)."""
        if not self.causal:
            raise ValueError("causal: decoding needs a causal layer; build it with causal=True")
        check_int("batch_size", batch_size)
        w = self.router.weight
        heads = self.kv_heads * (1 if self.kv_sharing else self.experts)
        return KVCache(batch_size, heads, self.head_dim, self.head_dim, dtype=dtype or w.dtype,
                       device=device or w.device)

    def _kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of all experts stacked: (B, n * kv_heads, M, hd), n = 1 (shared) or E."""
        k = torch.cat([split_heads(p(src), self.kv_heads, self.head_dim) for p in self.k_proj], dim=1)
        v = torch.cat([split_heads(p(src), self.kv_heads, self.head_dim) for p in self.v_proj], dim=1)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state: KVCache | None = None):
        """x (B, N, dim), context (B, M, context_dim) or None, key_padding_mask (B, M or N) bool (True = attend).

        Returns (B, N, dim), or ``(out, state)`` with a decode state.
        """
        src = check_sequence_call(self, x, context, key_padding_mask=key_padding_mask, state=state,
                                  state_type=KVCache, mech=BAM)
        B, N, _ = x.shape
        k, v = self._kv(src)  # (B, n Hk, M, hd)
        kpm = key_padding_mask
        if state is not None:
            k, v, kpm = state.append(k, v, key_padding_mask)
        token_weight = key_padding_mask if (context is None and key_padding_mask is not None) else None
        r, sel, aux = self.route(x, token_weight)  # (B, N, E)
        self.aux_loss, self.last_router = aux, r.detach()
        r = r.to(x.dtype)
        if self.backend == "reference":
            y = self._reference(x, k, v, r, kpm)
        else:
            y = bam_fast(self, x, k, v, r, sel, kpm)
        return (y, state) if state is not None else y

    def _reference(self, x, k, v, r, kpm):
        """sum_e r_e MHA_e(x): one expert at a time."""
        B, N, _ = x.shape
        Hk = self.kv_heads
        y = 0
        for e in range(self.experts):
            q = split_heads(self.q_proj[e](x), self.heads, self.head_dim)  # (B, H, N, hd)
            j = 0 if self.kv_sharing else e
            out = softmax_attention(q, k[:, j * Hk : (j + 1) * Hk], v[:, j * Hk : (j + 1) * Hk], causal=self.causal,
                                    key_padding_mask=kpm, scale=self.scale)  # (B, H, N, hd)
            y = y + r[..., e : e + 1] * self.o_proj[e](out.transpose(1, 2).reshape(B, N, -1))  # (B, N, dim)
        return y

def bam_fast(layer: BAMAttention, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor,
             sel: torch.Tensor, kpm: torch.Tensor | None) -> torch.Tensor:
    """All experts' heads in one fused call (soft routing), or only each expert's routed query rows (top-k).

    x (B, N, dim), k/v (B, n Hk, M, hd) stacked experts' keys/values, r (B, N, E) mixing weights, sel (B, N, E)
    routed experts -> (B, N, dim)."""
    B, N, _ = x.shape
    E, H, hd = layer.experts, layer.heads, layer.head_dim
    w_q = torch.cat([p.weight for p in layer.q_proj])  # (E*H*hd, dim)
    b_q = None if layer.q_proj[0].bias is None else torch.cat([p.bias for p in layer.q_proj])
    q = F.linear(x, w_q, b_q).view(B, N, E, H, hd)  # (B, N, E, H, hd)
    # Query heads ordered so that grouped-query attention maps each to its expert's (or the shared) KV head.
    order = (2, 3) if not layer.kv_sharing else (3, 2)
    q = q.permute(0, *order, 1, 4).reshape(B, E * H, N, hd)  # (B, E*H, N, hd) in (e, h) or (h, e) order
    if layer.routing == "soft":
        out = sdpa(q, k, v, causal=layer.causal, key_padding_mask=kpm, scale=layer.scale)  # (B, E*H, N, hd)
    else:
        pos, valid = gather_positions(sel)  # (B, E, A): each expert's tokens
        A = pos.shape[-1]
        if layer.kv_sharing:
            pos_h = pos.unsqueeze(1).expand(B, H, E, A).reshape(B, H * E, A)
            val_h = valid.unsqueeze(1).expand(B, H, E, A).reshape(B, H * E, A)
        else:
            pos_h = pos.unsqueeze(2).expand(B, E, H, A).reshape(B, E * H, A)
            val_h = valid.unsqueeze(2).expand(B, E, H, A).reshape(B, E * H, A)
        idx = pos_h.unsqueeze(-1).expand(B, E * H, A, hd)
        rows = routed_attention(q.gather(2, idx), k, v, pos_h, val_h, causal=layer.causal, offset=k.shape[2] - N,
                                key_padding_mask=kpm, scale=layer.scale)  # (B, E*H, A, hd)
        out = q.new_zeros(B, E * H, N, hd).scatter(2, idx, rows * val_h.unsqueeze(-1))  # 0 where not routed
    out = out.view(B, *((E, H) if not layer.kv_sharing else (H, E)), N, hd)
    if layer.kv_sharing:
        out = out.transpose(1, 2)  # (B, E, H, N, hd)
    out = out.permute(0, 3, 1, 2, 4).reshape(B, N, E, H * hd) * r.unsqueeze(-1)  # (B, N, E, H*hd), gated
    w_o = torch.stack([p.weight for p in layer.o_proj])  # (E, dim, H*hd)
    y = torch.einsum("bned,emd->bnm", out, w_o)  # (B, N, dim) = sum_e r_e out_e W_O^e
    if layer.o_proj[0].bias is not None:
        y = y + r @ torch.stack([p.bias for p in layer.o_proj])  # (B, N, dim)
    return y


def _bam_module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    return BAMAttention(dim, heads, kv_heads=kv_heads, causal=causal, **options)


BAM = register(Mechanism(
    name="bam",
    aliases=("branch_attend_mix", "soft_mixture_of_attention"),
    family="heads",
    kind="sequence",
    catalog="P012",
    title="BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts",
    arxiv="2408.08274",
    code="(none released)",
    summary="Per-token router mixture of E full attention experts (soft or top-k), optionally sharing K/V "
            "(one KV cache); upcycled from dense layers.",
    patterns=PATTERNS,
    exact=False,
    state="kv",
    complexity="time O(E N M d) soft, O(k N M d) top-k; KV cache O(E M d), O(M d) with KV sharing",
    module=_bam_module,
    fast=bam_fast,
    options=(
        Option("experts", 4, int, low=1, doc="attention experts E"),
        Option("routing", "soft", str, choices=ROUTINGS, doc="soft (all experts, BAM) or top-k"),
        Option("top_k", 2, int, low=1, doc="experts per token when routing='topk'"),
        Option("kv_sharing", False, bool, doc="share W_K, W_V across experts (one KV cache)"),
        Option("aux_loss_weight", 0.01, float, low=0.0, doc="weight of the load-balancing loss (top-k routing)"),
    ),
    test_options={"experts": 3, "routing": "topk", "top_k": 2},
    notes="experts=1 is multi-head attention; top_k = experts equals soft routing; KV sharing with identical "
          "experts is a single MHA.",
))
