"""Wings: visual and textual learners (low-rank residual cross-attention) beside an MLLM layer's causal attention, mixed
by a router that reads the main attention's weights.

Paper: "Wings: Learning Multimodal LLMs without Text-only Forgetting", Zhang, Lu, Li, Ma, Chen, Xu, Luo, Zhang, Zhan,
Ye, arXiv 2406.03496. Official code: https://github.com/AIDC-AI/Wings (wings/model/base_module.py
``WingsAttention``, ``ReweightLinear``; wings/model/modeling_wings_qwen2.py ``wings_layer_forward``). CATALOG P101.
In each decoder layer, after the main causal self-attention ``h = x + Attn(norm(x))``, two learners attend from h:
the visual learner to the image features, the textual learner to the text features, each a Low-Rank Residual
Attention (LoRRA): ``q = h + B_q A_q h``, ``k = f + B_k A_k f``, ``v = f + B_v A_v f`` (rank r, B zero-initialised),
multi-head softmax attention, output ``B_o A_o attn`` (so the untrained learners add exactly 0). The router turns the
main attention's weights into the mix: ``w_i = softmax(SiLU(W_r[:, :N] sum_heads A_i + b_r))`` (2 weights per token
from its attention row over the N positions), and ``y = h + w_i,v visual_i + w_i,t textual_i``.

Confirmed against the official code: LoRRA projections are identity + low-rank (``query + q_proj(query)`` with
``q_proj = Linear(d, r) -> Linear(r, d)``, the second factor zeroed, the first trunc-normal std 0.02), the output is
the low-rank product alone, scores scaled by 1/sqrt(head_dim); the router is ``ReweightLinear``: heads summed, a
``Linear(P, 2)`` whose weight is truncated to the row length N (P = 4096 officially), SiLU, softmax over the two
learners; the learners' queries are the hidden states after the main residual (not normed); with the image learner
alone (the first training stage, or no text features) its output is added without the router. Defaults: Qwen1.5-7B's
layer (width 4096, 32 heads, RMSNorm eps 1e-6, qkv bias), rank 64 (the official scripts' ``lora_dim``).
Deviations, each a choice: (1) the official layer adds each weighted learner output twice (the explicit sum and then a
loop over the same terms, i.e. a factor 2 absorbed by the learners' zero-initialised output factors); here once, as
the paper writes it. (2) The official applies the model's RoPE to the learners' q/k with the tokens' sequence
positions; positions belong to the host model here (based.py's convention), so the learners are position-free and
their output is invariant to the order of the features. (3) The official masks the textual learner with the causal
mask sliced to the text length (by index, not by position); ``causal_text=True`` gives causal cross by position
(``q_pos``, ``context_pos={"text": ...}``), the default lets every token see every text feature (as for the image).
The main attention's router term is computed on the contract without the N x N weights: ``sum_h A_h W_r^T`` is the
attention output of values ``W_r[:, :N]^T`` appended to the value channels of the same fused call.

Example:
    >>> import torch, attnzoo
    >>> wings = attnzoo.build("wings", 32, 4, rank=4, router_positions=64)
    >>> x = torch.randn(2, 10, 32)                                   # the layer's hidden states
    >>> feats = {"image": torch.randn(2, 6, 32), "text": torch.randn(2, 8, 32)}
    >>> torch.allclose(wings(x, feats), wings.main(x))              # zero-initialised learners: the base layer
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...cross import CrossAttention, cross_attention
from ...errors import check_bool, check_float, check_int, check_key_padding_mask, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import plain_heads, zero_

SOURCES = ("image", "text")


class LowRank(nn.Module):
    """``x -> B A x`` (rank r, no biases; ``residual=True``: ``x + B A x``), B zero-initialised, A trunc-normal 0.02."""

    def __init__(self, dim: int, rank: int, out: int | None = None, *, residual: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = zero_(nn.Linear(rank, dim if out is None else out, bias=False))
        nn.init.trunc_normal_(self.down.weight, std=0.02)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.down(x))
        return x + y if self.residual else y


def lorra(dim: int, heads: int, rank: int, source: str, *, causal: bool = False) -> CrossAttention:
    """A Low-Rank Residual Attention learner: :class:`CrossAttention` over one named source whose q/k/v projections are
    identity + low-rank and whose output projection is low-rank (zero at initialisation)."""
    layer = CrossAttention(dim, heads, context_dims={source: dim}, causal=causal)
    layer.q_proj = LowRank(dim, rank, residual=True)
    layer.k_proj[source] = LowRank(dim, rank, residual=True)
    layer.v_proj[source] = LowRank(dim, rank, residual=True)
    layer.o_proj = LowRank(dim, rank)
    return layer


class WingsLayer(nn.Module):
    """``x (B, N, dim)`` hidden states, ``context {"image": (B, M_i, dim), "text": (B, M_t, dim)}`` (either or both)
    -> ``(B, N, dim)``: the main causal self-attention with its residual, plus the routed learners."""

    def __init__(self, dim: int, heads: int, *, rank: int = 64, router_positions: int = 4096, bias: bool = True,
                 eps: float = 1e-6, causal_text: bool = False) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.rank = check_int("rank", rank)
        self.router_positions = check_int("router_positions", router_positions)
        self.norm = nn.RMSNorm(dim, eps=check_float("eps", eps, low=0.0, low_open=True))
        self.attn = CrossAttention(dim, heads, context_dim=dim, bias=check_bool("bias", bias), out_bias=False)
        self.router = nn.Linear(router_positions, 2)
        self.causal_text = check_bool("causal_text", causal_text)
        self.visual = lorra(dim, heads, rank, "image")
        self.textual = lorra(dim, heads, rank, "text", causal=causal_text)

    def _main(self, x: torch.Tensor, x_padding_mask: torch.Tensor | None):
        """(h = x + Attn(norm(x)) (B, N, dim), router weights (B, N, 2))."""
        B, N, _ = x.shape
        if N > self.router_positions:
            raise ValueError(f"x: the router reads attention rows of at most router_positions = "
                             f"{self.router_positions} positions, got a sequence of {N}")
        check_key_padding_mask(x_padding_mask, B, N, name="x_padding_mask", device=x.device)
        a, hd = self.attn, self.attn.head_dim
        hn = self.norm(x)
        q = a.q_proj(hn).view(B, N, a.heads, hd).transpose(1, 2)  # (B, H, N, hd)
        k, v = a.project("context", hn)  # (B, H, N, hd)
        route = self.router.weight[:, :N].t().to(v.dtype)  # (N, 2): column j of W_r per key position
        v = torch.cat([v, route.expand(B, a.heads, N, 2)], dim=-1)  # (B, H, N, hd + 2)
        pos = torch.arange(N, device=x.device)
        out = cross_attention(q, {"self": (k, v)}, q_pos=pos, kv_pos={"self": pos}, scale=a.scale,
                              masks=None if x_padding_mask is None else {"self": x_padding_mask})  # (B, H, N, hd + 2)
        h = x + a.o_proj(out[..., :hd].transpose(1, 2).reshape(B, N, a.heads * hd))  # (B, N, dim)
        weights = F.silu(out[..., hd:].sum(dim=1) + self.router.bias).softmax(dim=-1)  # (B, N, 2)
        return h, weights

    def main(self, x: torch.Tensor, *, x_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer alone: ``x + Attn(norm(x))`` (B, N, dim)."""
        check_module_input(self, x, channels=self.dim)
        return self._main(x, x_padding_mask)[0]

    def forward(self, x: torch.Tensor, context=None, *, key_padding_mask=None, x_padding_mask=None, q_pos=None,
                context_pos=None) -> torch.Tensor:
        """x (B, N, dim); context {"image": (B, M_i, dim), "text": (B, M_t, dim)}; key_padding_mask {source: (B, M)}
        bool; x_padding_mask (B, N) bool (padded hidden states as keys of the main attention); with
        ``causal_text``: q_pos (N,) or (B, N) and context_pos {"text": (M_t,) or (B, M_t)} -> (B, N, dim)."""
        check_module_input(self, x, channels=self.dim)
        if context is None or not isinstance(context, dict) or not context:
            got = type(context).__name__ if not isinstance(context, dict) else "an empty mapping"
            raise TypeError(f"context: expected the learners' features {{'image': (B, M_i, {self.dim}), 'text': "
                            f"(B, M_t, {self.dim})}} (either or both), got {got}")
        unknown = [n for n in context if n not in SOURCES]
        if unknown:
            raise ValueError(f"context: unknown source {unknown[0]!r}; the learners' sources are {list(SOURCES)}")
        kpm = {} if key_padding_mask is None else key_padding_mask
        if not isinstance(kpm, dict) or any(n not in context for n in kpm):
            raise ValueError(f"key_padding_mask: expected a mapping over the given sources {list(context)}, got "
                             f"{kpm if not isinstance(kpm, dict) else list(kpm)}")
        if (q_pos is not None or context_pos is not None) and not ("text" in context and self.causal_text):
            raise ValueError("q_pos, context_pos: positions are for the causal textual learner (causal_text=True) "
                             "and its 'text' features")
        h, weights = self._main(x, x_padding_mask)
        outs = {}
        if "image" in context:
            outs["image"] = self.visual(h, {"image": context["image"]}, key_padding_mask=(
                {"image": kpm["image"]} if "image" in kpm else None))
        if "text" in context:
            pos = {}
            if self.causal_text:
                if q_pos is None or context_pos is None:
                    raise ValueError("q_pos, context_pos: the textual learner is causal by position (causal_text="
                                     "True); pass q_pos (N,) and context_pos={'text': (M_t,)}")
                pos = {"q_pos": q_pos, "context_pos": context_pos}
            outs["text"] = self.textual(h, {"text": context["text"]}, key_padding_mask=(
                {"text": kpm["text"]} if "text" in kpm else None), **pos)
        if len(outs) == 1:
            return h + next(iter(outs.values()))  # one learner: added without the router
        return h + weights[..., :1] * outs["image"] + weights[..., 1:] * outs["text"]


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("wings", kv_heads, causal)
    return WingsLayer(dim, heads, **WINGS.resolve_options(options))


WINGS = register(Mechanism(
    name="wings",
    aliases=("lorra", "low_rank_residual_attention"),
    family="cross",
    catalog="P101",
    title="Wings: Learning Multimodal LLMs without Text-only Forgetting",
    arxiv="2406.03496",
    code="https://github.com/AIDC-AI/Wings",
    summary="Visual and textual low-rank residual cross-attention learners beside a causal self-attention layer, mixed "
            "per token by a router reading the main attention's weights; zero-initialised, so the base layer at start.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N^2 d + N (M_i + M_t) d), memory O(N + M) fused (the router needs no N x N matrix)",
    module=_module,
    options=(
        Option("rank", 64, int, low=1, doc="rank of the learners' projections (official lora_dim 64)"),
        Option("router_positions", 4096, int, low=1, doc="router input width: longest attention row (official 4096)"),
        Option("bias", True, bool, doc="q/k/v biases of the main attention (Qwen: yes)"),
        Option("eps", 1e-6, float, low=0.0, doc="RMSNorm epsilon of the main attention's pre-norm"),
        Option("causal_text", False, bool, doc="the textual learner is causal by position (q_pos, context_pos)"),
    ),
    test_options={"rank": 3, "router_positions": 16},
    cross=CrossSpec(sources=SOURCES, context_permutation_invariant=True, query_independent=False, mode="separate"),
    notes="zero-initialised learners give the base causal layer exactly; the router equals the official ReweightLinear "
          "on explicit attention weights; (?) RoPE of the learners left to the host model, see the header.",
))
