"""CrossViT cross-attention fusion: a branch's CLS token attends to the other branch's patch tokens.

Paper: "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification", Chen, Fan, Panda,
arXiv 2103.14899 (ICCV 2021). Official code: https://github.com/IBM/CrossViT (``models/crossvit.py``:
``CrossAttention``, ``CrossAttentionBlock``, ``MultiScaleBlock``). CATALOG P060.
Two branches (small and large patches) exchange information through their CLS tokens only: for branch L,
``x' = [f(CLS_L); patches_S]`` (f projects to S's width), ``CA = softmax(q k^T / sqrt(C/h)) v`` with ``q`` from the
CLS row only and k, v from every row of ``LN(x')``; ``CLS_L <- g(f(CLS_L) + W_o CA)`` (g projects back). One query
per branch: linear in the number of tokens.

Confirmed from the official code: f = LayerNorm, GELU, Linear(dim_L -> dim_S); g = LayerNorm, GELU,
Linear(dim_S -> dim_L); the attention runs at the other branch's width with its head count; q/k/v projections
with ``qkv_bias`` (True in the released models), the output projection with bias; the key set is [f(CLS_L);
the other branch's patch tokens] (its CLS token is not a key); the fused CLS replaces the branch's CLS (no residual
in dim_L), the branch's patch tokens pass unchanged. Fusion depth > 1 in the official code re-attends the CLS row
to itself only (the block keeps only the CLS row), so one block is built. The other branch's patches are this
module's ``context``; :class:`CrossViTMultiScaleFusion` fuses both branches as ``MultiScaleBlock`` does.
The attention is :func:`attnzoo.cross_attention` in joint mode over two sources, the CLS token and the patches
(``LN`` is token-wise, so the split is exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...cross import cross_attention
from ...errors import check_bool, check_int, check_key_padding_mask, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register


class CrossViTFusion(nn.Module):
    """One branch's CLS fusion: ``x (B, 1 + N, dim)`` ([CLS; patches] of this branch), ``context (B, M,
    context_dim)`` (the other branch's patch tokens) -> ``(B, 1 + N, dim)``, the CLS row replaced.

    ``heads`` heads at ``context_dim`` width (the other branch's). ``key_padding_mask (B, M)`` masks context
    tokens; the projected CLS token is always a key. ``last_attention`` (B, heads, 1 + M) after a forward (with
    ``keep_attention=True``): the CLS query's weights over [CLS; context].
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, qkv_bias: bool = True,
                 eps: float = 1e-6, causal: bool = False, kv_heads: int | None = None) -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        check_bool("qkv_bias", qkv_bias)
        if causal:
            raise ValueError("causal: CrossViT's fusion is non-causal (the CLS token sees every patch); "
                             "build it with causal=False")
        if kv_heads is not None:
            raise ValueError(f"kv_heads: CrossViT's fusion has as many key/value heads as query heads, got {kv_heads}")
        c = self.context_dim
        if c % heads:
            raise ValueError(f"heads: context_dim ({c}) must be divisible by heads, got {heads}")
        self.head_dim = c // heads
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.GELU(), nn.Linear(dim, c))  # f
        self.norm1 = nn.LayerNorm(c, eps=eps)
        self.wq = nn.Linear(c, c, bias=qkv_bias)
        self.wk = nn.Linear(c, c, bias=qkv_bias)
        self.wv = nn.Linear(c, c, bias=qkv_bias)
        self.out = nn.Linear(c, c)
        self.revert = nn.Sequential(nn.LayerNorm(c, eps=eps), nn.GELU(), nn.Linear(c, dim))  # g

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}, heads={self.heads}"

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, h, N, hd)

    def fuse_cls(self, cls: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """cls (B, 1, dim), context (B, M, context_dim) -> the fused CLS token (B, 1, dim)."""
        B = cls.shape[0]
        f_cls = self.proj(cls)  # (B, 1, c)
        n_cls, n_ctx = self.norm1(f_cls), self.norm1(context)  # (B, 1, c), (B, M, c)
        q = self._split(self.wq(n_cls))  # (B, h, 1, hd)
        sources = {"cls": (self._split(self.wk(n_cls)), self._split(self.wv(n_cls))),
                   "context": (self._split(self.wk(n_ctx)), self._split(self.wv(n_ctx)))}
        masks = None if key_padding_mask is None else {"context": key_padding_mask}
        ca = cross_attention(q, sources, mode="joint", masks=masks)  # (B, h, 1, hd)
        fused = f_cls + self.out(ca.transpose(1, 2).reshape(B, 1, self.context_dim))  # (B, 1, c)
        return self.revert(fused)  # (B, 1, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 1 + N, dim), context (B, M, context_dim), key_padding_mask (B, M) -> (B, 1 + N, dim)."""
        check_module_input(self, x, channels=self.dim)
        if context is None:
            raise ValueError("context: CrossViT's fusion needs the other branch's patch tokens (B, M, context_dim)")
        check_module_input(self, context, name="context", channels=self.context_dim)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context: batch {context.shape[0]} does not match x's batch {x.shape[0]}")
        check_key_padding_mask(key_padding_mask, x.shape[0], context.shape[1], device=x.device)
        return torch.cat([self.fuse_cls(x[:, :1], context, key_padding_mask), x[:, 1:]], dim=1)


class CrossViTMultiScaleFusion(nn.Module):
    """Both directions of ``MultiScaleBlock``'s fusion: ``xs = [x_0 (B, 1+N_0, dims[0]), x_1 (B, 1+N_1, dims[1])]``
    -> the list with each branch's CLS fused with the other branch's patches (heads of the receiving branch)."""

    def __init__(self, dims: Sequence[int], heads: Sequence[int], *, qkv_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if len(dims) != 2 or len(heads) != 2:
            raise ValueError(f"dims, heads: expected two branches, got {list(dims)} and {list(heads)}")
        self.fusion = nn.ModuleList([
            CrossViTFusion(dims[i], heads[1 - i], context_dim=dims[1 - i], qkv_bias=qkv_bias, eps=eps)
            for i in range(2)])

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(xs) != 2:
            raise ValueError(f"xs: expected the two branches' tokens, got {len(xs)} tensors")
        return [self.fusion[i](xs[i], xs[1 - i][:, 1:]) for i in range(2)]


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    opts = CROSSVIT.resolve_options(options)
    return CrossViTFusion(dim, heads, kv_heads=kv_heads, causal=causal, **opts)


CROSSVIT = register(Mechanism(
    name="crossvit",
    aliases=("crossvit_fusion", "cls_cross_attention"),
    family="cross",
    catalog="P060",
    title="CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification",
    arxiv="2103.14899",
    code="https://github.com/IBM/CrossViT",
    summary="A branch's CLS token (projected to the other branch's width) is the only query over [itself; the other "
            "branch's patches]; the result, projected back, replaces the CLS. Linear in tokens.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(M d + N d), memory O(M d): one query per branch",
    module=_module,
    options=(
        Option("context_dim", None, int, low=1, allow_none=True, doc="the other branch's width (None: dim)"),
        Option("qkv_bias", True, bool, doc="biases in the q/k/v projections (the released models: yes)"),
        Option("eps", 1e-6, float, low=0.0, doc="LayerNorm epsilon (the released models: 1e-6)"),
    ),
    test_options={"context_dim": 12},
    test_sizes={"heads": 3},
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="equals the CLS row of softmax attention over the concatenated [f(CLS); patches] sequence; invariant to "
          "permuting the other branch's patches; the branch's own patches pass unchanged (row 0 is the CLS token, "
          "so rows are not independent queries).",
))
