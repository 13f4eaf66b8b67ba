"""DCAL: global-local cross-attention on the top rollout tokens, and pair-wise cross-attention with distractor keys.

Paper: "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification", Zhu, Ke,
Li, Jiang, Zhang, Zhou, Ma, Wang, arXiv 2205.02151 (CVPR 2022). Official code: none released. CATALOG P058.
- Attention rollout: ``S_hat_i = S_bar_i S_bar_{i-1} ... S_bar_1`` with ``S_bar = 0.5 S + 0.5 I`` (head-averaged
  attention of each self-attention block, the identity standing for the residual connection).
- GLCA: the top R tokens of the rollout's CLS row (R = 10% of the tokens for fine-grained classification, 30% for
  re-identification) give the local queries Q^l; ``f = softmax(Q^l K_g^T / sqrt(d)) V_g`` over every token's keys:
  O(R N d). One GLCA block, with its own weights (not shared with self-attention).
- PWCA (training only): for an image pair, the target image's queries attend to the keys/values of both images in
  one softmax, ``softmax(Q_1 [K_1; K_2]^T / sqrt(d)) [V_1; V_2]``; the second image is a distractor, the weights are
  the self-attention block's own, and it is removed at inference (call the layer without a pair).

Confirmed from the paper's text (Sec. 3.2, 3.3, 4.1): rollout formula and order, top-R of the CLS row, R ratios,
weight sharing. Choices where it is silent: the GLCA queries are the CLS token plus the top R patch tokens
(``keep_cls``; the paper concatenates the GLCA branch's final class token for re-ID, so the branch has one), R =
ceil(ratio x patches); padded tokens are never selected (a row with fewer real tokens than R returns zeros in the
surplus slots) and never keys; without a given rollout, GLCA ranks tokens by its own attention's one-layer rollout.
PWCA runs on :func:`attnzoo.cross_attention` in joint mode over the sources "self" and "pair".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...cross import cross_attention
from ...errors import check_bool, check_float, check_int, check_key_padding_mask, check_module_input, check_tensor
from ...registry import CrossSpec, Mechanism, Option, register


def attention_rollout(attention_maps: Sequence[torch.Tensor], *, residual: float = 0.5) -> torch.Tensor:
    """Accumulated attention ``S_bar_L ... S_bar_1`` with ``S_bar = (1 - residual) * mean_heads(S) + residual * I``.

    attention_maps: each (B, H, N, N) or (B, N, N), the first block's first. Returns (B, N, N); row 0 of it is the
    CLS token's accumulated attention."""
    if not attention_maps:
        raise ValueError("attention_maps: expected at least one (B, H, N, N) attention map, got none")
    check_float("residual", residual, low=0.0, high=1.0)
    out = None
    for i, a in enumerate(attention_maps):
        check_tensor(f"attention_maps[{i}]", a)
        if a.dim() not in (3, 4) or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attention_maps[{i}]: expected (B, H, N, N) or (B, N, N), got {tuple(a.shape)}")
        s = a.mean(dim=1) if a.dim() == 4 else a  # (B, N, N)
        eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
        s_bar = (1 - residual) * s + residual * eye  # (B, N, N)
        if out is not None and out.shape != s_bar.shape:
            raise ValueError(f"attention_maps[{i}]: shape {tuple(a.shape)} does not match the earlier maps")
        out = s_bar if out is None else torch.matmul(s_bar, out)
    assert out is not None
    return out


def top_tokens(cls_scores: torch.Tensor, r: int, *, key_padding_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r`` highest-scoring patch tokens (index >= 1) of ``cls_scores`` (B, N): (indices (B, r) in descending
    score order, valid (B, r) bool: False where a row had fewer than r real tokens)."""
    scores = cls_scores[:, 1:]
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, 1:], float("-inf"))
    top = torch.topk(scores, r, dim=1)
    valid = torch.isfinite(top.values) if key_padding_mask is not None else torch.ones_like(top.indices,
                                                                                              dtype=torch.bool)
    return top.indices + 1, valid


class _Heads(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"heads: dim ({dim}) must be divisible by heads, got {heads}")
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=check_bool("qkv_bias", qkv_bias))
        self.proj = nn.Linear(dim, dim)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, h, N, hd)

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        B, _, N, _ = t.shape
        return self.proj(t.transpose(1, 2).reshape(B, N, self.dim))  # (B, N, dim)


class GlobalLocalCrossAttention(_Heads):
    """GLCA: ``x (B, 1 + N, dim)`` ([CLS; patches]) -> ``(B, 1 + R, dim)`` (or ``(B, R, dim)`` without ``keep_cls``):
    the CLS token and the R patch tokens the rollout's CLS row ranks highest, as queries over every token.

    ``rollout`` (B, 1+N, 1+N) from :func:`attention_rollout` over the self-attention blocks below (or ``cls_scores``
    (B, 1+N), its CLS row); without either, the layer's own attention map ranks the tokens. ``last_indices`` (B, R')
    after a forward: the selected token of each output row.
    """

    def __init__(self, dim: int, heads: int, *, ratio: float = 0.1, keep_cls: bool = True,
                 qkv_bias: bool = True) -> None:
        super().__init__(dim, heads, qkv_bias)
        self.ratio = check_float("ratio", ratio, low=0.0, high=1.0, low_open=True)
        self.keep_cls = check_bool("keep_cls", keep_cls)
        self.last_indices: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, ratio={self.ratio}, keep_cls={self.keep_cls}"

    def forward(self, x: torch.Tensor, *, rollout: torch.Tensor | None = None, cls_scores: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_module_input(self, x, channels=self.dim)
        B, N, _ = x.shape
        if N < 2:
            raise ValueError(f"x: expected a CLS token and at least one patch, (B, 1 + N, dim), got {tuple(x.shape)}")
        check_key_padding_mask(key_padding_mask, B, N, device=x.device)
        if rollout is not None and cls_scores is not None:
            raise ValueError("rollout, cls_scores: give one (cls_scores is the rollout's CLS row)")
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))  # (B, h, N, hd) each
        if rollout is not None:
            check_tensor("rollout", rollout, ndim=3)
            if tuple(rollout.shape) != (B, N, N):
                raise ValueError(f"rollout: expected (B, N, N) = ({B}, {N}, {N}), got {tuple(rollout.shape)}")
            cls_scores = rollout[:, 0]
        elif cls_scores is not None:
            check_tensor("cls_scores", cls_scores, ndim=2)
            if tuple(cls_scores.shape) != (B, N):
                raise ValueError(f"cls_scores: expected (B, N) = ({B}, {N}), got {tuple(cls_scores.shape)}")
        else:  # the CLS row of this layer's own one-layer rollout, 0.5 A + 0.5 I: O(N d), only to rank tokens
            with torch.no_grad():
                s = (q[:, :, :1] @ k.transpose(-2, -1)) * self.scale  # (B, h, 1, N)
                if key_padding_mask is not None:
                    s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
                probs = torch.softmax(s, dim=-1).mean(dim=1)[:, 0]  # (B, N)
                cls_scores = 0.5 * probs + 0.5 * (torch.arange(N, device=x.device) == 0).to(probs.dtype)
        r = max(1, math.ceil(self.ratio * (N - 1)))
        idx, valid = top_tokens(cls_scores.detach(), min(r, N - 1), key_padding_mask=key_padding_mask)  # (B, r)
        if self.keep_cls:
            idx = torch.cat([idx.new_zeros(B, 1), idx], dim=1)
            valid = torch.cat([valid.new_ones(B, 1), valid], dim=1)
        self.last_indices = idx
        gather = idx[:, None, :, None].expand(B, self.heads, idx.shape[1], self.head_dim)
        q_local = q.gather(2, gather)  # (B, h, R', hd): the local queries
        masks = None if key_padding_mask is None else {"global": key_padding_mask}
        out = cross_attention(q_local, {"global": (k, v)}, masks=masks, scale=self.scale)  # (B, h, R', hd)
        y = self.merge(out)  # (B, R', dim)
        return y * valid.unsqueeze(-1).to(y.dtype)


class PairWiseCrossAttention(_Heads):
    """PWCA = the self-attention block's attention with an optional distractor: ``x (B, N, dim)`` -> ``(B, N, dim)``.

    Without ``context``: plain self-attention (the SA branch, and PWCA at inference). With ``context (B, M, dim)``
    (the paired image's tokens, a distractor during training): the queries of x attend to [x; context] in one softmax.
    ``key_padding_mask``: a tensor masks the context's tokens (B, M) when a context is given, else x's (B, N); a
    mapping {"self": (B, N), "pair": (B, M)} masks both. ``return_source_mass`` gives the mass each image received.
    """

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True) -> None:
        super().__init__(dim, heads, qkv_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
                return_source_mass: bool = False):
        check_module_input(self, x, channels=self.dim)
        B, N, _ = x.shape
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))  # (B, h, N, hd) each
        sources = {"self": (k, v)}
        if isinstance(key_padding_mask, Mapping):
            masks = dict(key_padding_mask)
        elif key_padding_mask is None:
            masks = {}
        else:
            masks = {"pair" if context is not None else "self": key_padding_mask}
        if context is not None:
            check_module_input(self, context, name="context", channels=self.dim)
            if context.shape[0] != B:
                raise ValueError(f"context: batch {context.shape[0]} does not match x's batch {B}")
            _, k2, v2 = (self.split(t) for t in self.qkv(context).chunk(3, dim=-1))  # the distractor's keys/values
            sources["pair"] = (k2, v2)
        elif "pair" in masks:
            raise ValueError("key_padding_mask: a mask for 'pair' needs the pair's tokens as context")
        for name, mk in masks.items():
            if name not in sources:
                raise ValueError(f"key_padding_mask: unknown part {name!r}; expected 'self' or 'pair'")
            check_key_padding_mask(mk, B, sources[name][0].shape[2], device=x.device, name="key_padding_mask" if (
                not isinstance(key_padding_mask, Mapping)) else f"key_padding_mask[{name!r}]")
        res = cross_attention(q, sources, mode="joint", masks=masks or None, scale=self.scale,
                              return_source_mass=return_source_mass)
        if return_source_mass:
            out, mass = res
            return self.merge(out), mass
        return self.merge(res)


def _glca_module(dim: int, heads: int, **options: Any):
    return GlobalLocalCrossAttention(dim, heads, **DCAL_GLCA.resolve_options(options))


def _pwca_module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    if kv_heads is not None or causal:
        raise ValueError(f"kv_heads, causal: PWCA is non-causal multi-head self-attention with a distractor; got "
                         f"kv_heads={kv_heads!r}, causal={causal!r}")
    return PairWiseCrossAttention(dim, heads, **DCAL_PWCA.resolve_options(options))


_COMMON = dict(
    family="cross",
    catalog="P058",
    title="Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification",
    arxiv="2205.02151",
    code="(none released)",
)

DCAL_GLCA = register(Mechanism(
    name="dcal_glca",
    aliases=("glca", "global_local_cross_attention"),
    kind="pooling",
    summary="DCAL global-local cross-attention: the CLS token and the top-R tokens of the attention rollout's CLS row "
            "are the queries over every token's keys/values; (B, 1+N, C) -> (B, 1+R, C).",
    patterns=("noncausal_self",),
    exact=True,
    complexity="time O(R N d) given the rollout (O(N d) more to rank by the layer's own CLS row), memory O(N d)",
    module=_glca_module,
    options=(
        Option("ratio", 0.1, float, low=0.0, high=1.0,
               doc="R as a fraction of the patch tokens (0.1 FGVC, 0.3 re-ID)"),
        Option("keep_cls", True, bool, doc="the CLS token is the first local query"),
        Option("qkv_bias", True, bool, doc="biases in the q/k/v projection"),
    ),
    test_options={"ratio": 0.3},
    notes="rows equal full self-attention's rows at the selected indices; the rollout of identity attention is I; "
          "selection is by rank (no gradient through it), as top-k.",
    **_COMMON,
))

DCAL_PWCA = register(Mechanism(
    name="dcal_pwca",
    aliases=("pwca", "pair_wise_cross_attention"),
    summary="DCAL pair-wise cross-attention: during training the queries of an image attend to its own and a "
            "distractor image's keys in one softmax; without the pair it is the self-attention block.",
    patterns=("noncausal_self", "noncausal_cross"),
    exact=True,
    complexity="time O(N (N + M) d), memory O(N + M) fused",
    module=_pwca_module,
    options=(Option("qkv_bias", True, bool, doc="biases in the q/k/v projection"),),
    permutation_equivariant=True,
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False, source_mass=True, mode="joint"),
    notes="training only (the distractor is dropped at inference); with the pair's keys masked it is plain "
          "self-attention; the weights are the self-attention block's.",
    **_COMMON,
))
