"""Wings: visual and textual learners (low-rank residual cross-attention) beside an MLLM layer's causal attention, mixed
by a router that reads the main attention's weights.

Paper: "Wings: Learning Multimodal LLMs without Text-only Forgetting", arXiv 2406.03496.
Official code: https://github.com/AIDC-AI/Wings (wings/model/base_module.py ``WingsAttention``, ``ReweightLinear``;
wings/model/modeling_wings_qwen2.py ``wings_layer_forward``). CATALOG P101.
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
layer (width 4096, 32 heads, RMSNorm eps 1e-6, qkv bias), rank 64 (the official scripts' ``lora_dim``); ``kv_heads``
makes the host attention grouped-query (LLaMA-3.1), the learners keep every head as the official does.
Deviations, each a choice: (1) the official layer adds each weighted learner output twice (the explicit sum and then a
loop over the same terms, i.e. a factor 2 absorbed by the learners' zero-initialised output factors); here once, as the
paper writes it. (2) The official applies the model's RoPE (rotate-half, ``rope_theta`` of the LLM: 1e6 for Qwen1.5) to
the learners' q/k with the tokens' sequence positions (queries at their positions, image and text features at theirs);
``rope_theta`` does that here with ``q_pos`` and ``context_pos``; the default (None) keeps the learners position-free
(their output invariant to the order of the features), positions being the host model's. (3) The official masks the
textual learner with the causal mask sliced to the text length (by index, not by position); ``causal_text=True`` gives
causal cross by position (``q_pos``, ``context_pos={"text": ...}``), the default lets every token see every text feature
(as for the image).
The main attention's router term is computed on the contract without the N x N weights: ``sum_h A_h W_r^T`` is the
attention output of values ``W_r[:, :N]^T`` appended to the value channels of the same fused call.

Example:
    >>> import torch, attnzoo
    >>> wings = attnzoo.build("wings", 32, 4, rank=4, router_positions=64)
    >>> x = torch.randn(2, 10, 32)                                   # the layer's hidden states
    >>> feats = {"image": torch.randn(2, 6, 32), "text": torch.randn(2, 3, 32)}   # [BOS, 6 image, 3 text] tokens
    >>> torch.allclose(wings(x, feats), wings.main(x))              # zero-initialised learners: the base layer
    True
    >>> qwen = attnzoo.build("wings", 32, 4, rank=4, router_positions=64, rope_theta=1e6)   # RoPE on the learners
    >>> pos = {"image": torch.arange(1, 7), "text": torch.arange(7, 10)}     # the features' sequence positions
    >>> qwen(x, feats, q_pos=torch.arange(10), context_pos=pos).shape
    torch.Size([2, 10, 32])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...cross import CrossAttention, cross_attention
from ...errors import check_bool, check_float, check_int, check_key_padding_mask, check_module_input, check_positions
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import zero_

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


def rotary(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE in the rotate-half layout (LLaMA, Qwen): x (B, H, N, d) rotated by positions pos (N,) or (B, N)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)  # (d/2,)
    ang = (pos.to(torch.float64)[..., None] * inv).to(x.dtype)  # (B|1.., N, d/2)
    ang = torch.cat([ang, ang], dim=-1)
    ang = ang.unsqueeze(0) if ang.dim() == 2 else ang
    cos, sin = ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)  # (B|1, 1, N, d)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class WingsLayer(nn.Module):
    """``x (B, N, dim)`` hidden states, ``context {"image": (B, M_i, dim), "text": (B, M_t, dim)}`` (either or both)
    -> ``(B, N, dim)``: the main causal self-attention with its residual, plus the routed learners."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, rank: int = 64,
                 router_positions: int = 4096, bias: bool = True, eps: float = 1e-6, causal_text: bool = False,
                 rope_theta: float | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.rank = check_int("rank", rank)
        self.router_positions = check_int("router_positions", router_positions)
        self.norm = nn.RMSNorm(dim, eps=check_float("eps", eps, low=0.0, low_open=True))
        self.attn = CrossAttention(dim, heads, context_dim=dim, kv_heads=kv_heads, bias=check_bool("bias", bias),
                                   out_bias=False)  # the host layer's attention (grouped-query with kv_heads)
        self.router = nn.Linear(router_positions, 2)
        self.causal_text = check_bool("causal_text", causal_text)
        self.rope_theta = None if rope_theta is None else check_float("rope_theta", rope_theta, low=1.0)
        self.visual = lorra(dim, heads, rank, "image")
        self.textual = lorra(dim, heads, rank, "text", causal=causal_text)
        if self.rope_theta is not None and self.attn.head_dim % 2:
            raise ValueError(f"rope_theta: RoPE rotates pairs of channels; head_dim {self.attn.head_dim} is odd")

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
        k, v = a.project("context", hn)  # (B, Hk, N, hd)
        route = self.router.weight[:, :N].t().to(v.dtype)  # (N, 2): column j of W_r per key position
        v = torch.cat([v, route.expand(B, a.kv_heads, N, 2)], dim=-1)  # (B, Hk, N, hd + 2)
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

    def _learner(self, layer: CrossAttention, source: str, h: torch.Tensor, f: torch.Tensor, mask, q_pos, f_pos,
                 causal: bool) -> torch.Tensor:
        """One LoRRA learner: queries from h (B, N, dim), keys/values from f (B, M, dim) -> (B, N, dim)."""
        B, N, _ = h.shape
        q = layer.q_proj(h).view(B, N, layer.heads, layer.head_dim).transpose(1, 2)  # (B, H, N, hd)
        k, v = layer.project(source, f)  # (B, H, M, hd)
        if self.rope_theta is not None:
            q, k = rotary(q, q_pos, self.rope_theta), rotary(k, f_pos, self.rope_theta)
        out = cross_attention(q, {source: (k, v)}, masks=None if mask is None else {source: mask},
                              q_pos=q_pos if causal else None, kv_pos={source: f_pos} if causal else None,
                              scale=layer.scale)  # (B, H, N, hd)
        return layer.o_proj(out.transpose(1, 2).reshape(B, N, layer.heads * layer.head_dim))

    def forward(self, x: torch.Tensor, context=None, *, key_padding_mask=None, x_padding_mask=None, q_pos=None,
                context_pos=None) -> torch.Tensor:
        """x (B, N, dim); context {"image": (B, M_i, dim), "text": (B, M_t, dim)}; key_padding_mask {source: (B, M)}
        bool; x_padding_mask (B, N) bool (padded hidden states as keys of the main attention); q_pos (N,) or (B, N)
        and context_pos {source: (M,) or (B, M)}: sequence positions, for ``rope_theta`` (every given source) and
        ``causal_text`` (the text) -> (B, N, dim)."""
        check_module_input(self, x, channels=self.dim)
        B, N, _ = x.shape
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
        need = [n for n in context if self.rope_theta is not None or (n == "text" and self.causal_text)]
        pos = {} if context_pos is None else context_pos
        if not need and (q_pos is not None or context_pos is not None):
            raise ValueError("q_pos, context_pos: positions are for rope_theta or the causal textual learner "
                             "(causal_text=True); this layer takes none")
        if need:
            if q_pos is None or not isinstance(pos, dict) or any(n not in pos for n in need):
                raise ValueError(f"q_pos, context_pos: expected q_pos (N,) and context_pos for {need} (sequence "
                                 f"positions, for {'rope_theta' if self.rope_theta is not None else 'causal_text'})")
            check_positions("q_pos", q_pos, B, N, device=x.device)
            extra = [n for n in pos if n not in need]
            if extra:
                raise ValueError(f"context_pos: given for {extra[0]!r}, which takes no positions here")
        h, weights = self._main(x, x_padding_mask)
        outs = {}
        for name, layer in (("image", self.visual), ("text", self.textual)):
            if name not in context:
                continue
            f = context[name]
            check_module_input(self, f, name=f"context[{name!r}]", channels=self.dim)
            if f.shape[0] != B:
                raise ValueError(f"context[{name!r}]: batch {f.shape[0]} does not match x's batch {B}")
            check_key_padding_mask(kpm.get(name), B, f.shape[1], name=f"key_padding_mask[{name!r}]", device=x.device)
            check_positions(f"context_pos[{name!r}]", pos.get(name), B, f.shape[1], device=x.device)
            outs[name] = self._learner(layer, name, h, f, kpm.get(name), q_pos, pos.get(name),
                                       causal=name == "text" and self.causal_text)
        if len(outs) == 1:
            return h + next(iter(outs.values()))  # one learner: added without the router
        return h + weights[..., :1] * outs["image"] + weights[..., 1:] * outs["text"]


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    if check_bool("causal", causal):
        raise ValueError("causal: the learners' cross-attention is non-causal (the host attention is always causal); "
                         "build wings with causal=False")
    return WingsLayer(dim, heads, kv_heads=kv_heads, **WINGS.resolve_options(options))


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
        Option("rope_theta", None, float, low=1.0, allow_none=True,
               doc="RoPE base on the learners' q/k (Qwen1.5: 1e6); None: position-free learners"),
    ),
    test_options={"rank": 3, "router_positions": 16},
    cross=CrossSpec(sources=SOURCES, context_permutation_invariant=True, query_independent=False, mode="separate"),
    notes="zero-initialised learners give the base causal layer exactly; the router equals the official "
          "ReweightLinear on explicit attention weights; RoPE on the learners with rope_theta (caller's positions).",
))
