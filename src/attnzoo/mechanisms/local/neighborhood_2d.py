"""Neighborhood attention in 2-D (NAT / DiNAT; NATTEN semantics).

Papers: "Neighborhood Attention Transformer", Hassani et al., arXiv 2204.07143; "Dilated Neighborhood
Attention Transformer", Hassani & Shi, arXiv 2209.15001; "Faster Neighborhood Attention: Reducing the O(n^2)
Cost of Self Attention at the Threadblock Level", Hassani et al., arXiv 2403.04690 (catalog P066).
Official code: https://github.com/SHI-Labs/NATTEN
Each query of an H x W grid attends to exactly kh x kw keys: the window centred on it inside its dilation
group, shifted inwards at the borders (never zero-padded), plus an optional relative position bias
``rpb (heads, 2kh-1, 2kw-1)``. O(HW k^2 d) time and O(HW d) memory.

Forms:
- ``na2d(q, k, v, kernel_size, dilation, rpb, scale, backend)``: the functional op on (B, heads, H, W, D)
  tensors, like NATTEN's ``na2d``, for users who bring their own projections.
- :class:`NeighborhoodAttention2d`: NATTEN's ``NeighborhoodAttention2D`` module: ``qkv`` Linear (bias by
  default), learnable ``rpb`` (trunc-normal std 0.02), scale head_dim^-0.5 applied to q, ``proj`` Linear.
- ``reference``: dense softmax over all H*W tokens with the neighborhood mask built from
  :func:`attnzoo.kernels.grid.neighborhood_2d` (the product of two :func:`attnzoo.masks.neighborhood_1d`).
- ``fast``: :func:`attnzoo.kernels.grid.neighborhood_attention_2d`: query tiles against the key regions that
  hold their neighborhoods, hand-written backward with recomputation; trains on CPU.

Choices where the papers are silent or NATTEN differs by version:
- A grid smaller than ``kernel_size * dilation`` on an axis raises (old NATTEN modules zero-padded the input
  before the projections; the 0.17+ functional API rejects it). Even kernel sizes follow the same window
  rule (start ``i - k // 2``); the relative position bias then still has 2k - 1 entries per axis.
- FlexAttention is not used: on CPU it compiles only a forward pass, and that compiled forward (block mask
  of the same neighborhood, BLOCK_SIZE 128) was measured about 6x slower than the tiled forward for 7 x 7 on
  a 64 x 64 grid (torch 2.13, 2 cores), slower even than dense SDPA; the tiled path serves inference and
  training alike.
- Grouped-query attention in ``na2d`` (kv heads < heads) repeats each key/value head for its group.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import check_backend, check_tensor
from ...kernels.grid import (
    check_grid_qkv,
    check_neighborhood,
    neighborhood_2d_reference,
    neighborhood_attention_2d,
    pair,
)
from ...registry import Mechanism, Option, register


def _check_backend(backend: str) -> str:
    check_backend(backend)
    return backend


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size, dilation=1,
         rpb: torch.Tensor | None = None, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """2-D neighborhood attention on (B, heads, H, W, D) tensors, as NATTEN's ``na2d``.

    Args:
        q: (B, heads, H, W, D); k: (B, kv_heads, H, W, D); v: (B, kv_heads, H, W, Dv); heads % kv_heads == 0.
        kernel_size: int or (kh, kw); kh * dh <= H and kw * dw <= W.
        dilation: int or (dh, dw).
        rpb: optional relative position bias (heads, 2kh-1, 2kw-1).
        scale: multiplies q . k, default D ** -0.5.
        backend: "auto"/"fast" (tiled, no HW x HW matrix) or "reference" (dense masked softmax).

    Returns:
        (B, heads, H, W, Dv).
    """
    _check_backend(backend)
    if backend == "reference":
        check_grid_qkv(q, k, v)
        if k.shape[1] != q.shape[1]:
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return neighborhood_2d_reference(q, k, v, kernel_size=kernel_size, dilation=dilation, rpb=rpb, scale=scale)
    return neighborhood_attention_2d(q, k, v, kernel_size=kernel_size, dilation=dilation, rpb=rpb, scale=scale)


def na2d_reference(q, k, v, *, kernel_size, dilation=1, rpb=None, scale=None):
    """Dense masked reference of :func:`na2d` (O((HW)^2) memory)."""
    return na2d(q, k, v, kernel_size=kernel_size, dilation=dilation, rpb=rpb, scale=scale, backend="reference")


def na2d_fast(q, k, v, *, kernel_size, dilation=1, rpb=None, scale=None):
    """Tiled :func:`na2d` with a hand-written backward (O(HW d) memory)."""
    return na2d(q, k, v, kernel_size=kernel_size, dilation=dilation, rpb=rpb, scale=scale, backend="fast")


class NeighborhoodAttention2d(nn.Module):
    """2-D neighborhood self attention on channels-last grids ``x (B, H, W, dim) -> (B, H, W, dim)``.

    Args:
        dim: channels; heads: attention heads (dim % heads == 0).
        kernel_size: int or (kh, kw), default 7. dilation: int or (dh, dw), default 1.
        rel_pos_bias: learnable relative position bias (heads, 2kh-1, 2kw-1), default True (NAT/DiNAT).
        qkv_bias: bias of the qkv projection, default True.
        backend: "auto", "fast" or "reference" (read at forward time).
    """

    def __init__(self, dim: int, heads: int, *, kernel_size=7, dilation=1, rel_pos_bias: bool = True,
                 qkv_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
        if dim % heads:
            raise ValueError(f"heads: dim ({dim}) must be divisible by heads, got heads={heads}")
        for name, val in (("rel_pos_bias", rel_pos_bias), ("qkv_bias", qkv_bias)):
            if not isinstance(val, bool):
                raise TypeError(f"{name}: expected a bool, got {val!r}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.kernel_size = pair("kernel_size", kernel_size)
        self.dilation = pair("dilation", dilation)
        self.backend = _check_backend(backend)
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_pos_bias:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.empty(heads, 2 * kh - 1, 2 * kw - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rel_pos_bias={self.rpb is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=4)
        B, H, W, C = x.shape
        if C != self.dim:
            raise ValueError(f"x: expected (B, H, W, {self.dim}) channels-last, got {tuple(x.shape)}")
        check_neighborhood(H, W, self.kernel_size, self.dilation)
        _check_backend(self.backend)
        qkv = self.qkv(x).view(B, H, W, 3, self.heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)  # (3, B, h, H, W, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, H, W, hd)
        out = na2d(q, k, v, kernel_size=self.kernel_size, dilation=self.dilation, rpb=self.rpb, scale=self.scale,
                   backend=self.backend)  # (B, h, H, W, hd)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))  # (B, H, W, dim)


NEIGHBORHOOD_2D = register(Mechanism(
    name="neighborhood_2d",
    aliases=("na2d", "nat", "dinat", "neighborhood_attention_2d"),
    family="local",
    kind="grid",
    catalog="P066",
    title="Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
    arxiv="2403.04690",
    code="https://github.com/SHI-Labs/NATTEN",
    summary="Each grid query attends to its k x k nearest neighbours (dilated; window shifted inwards at "
            "borders) with a relative position bias.",
    patterns=("noncausal_self",),
    exact=True,
    complexity="time O(HW k^2 d), memory O(HW d)",
    reference=na2d_reference,
    fast=na2d_fast,
    module=NeighborhoodAttention2d,
    options=(
        Option("kernel_size", 7, int, low=1, doc="neighbours per axis (every query sees kernel_size^2 keys); "
                                                 "a pair (kh, kw) is accepted by the module"),
        Option("dilation", 1, int, low=1, doc="dilation per axis (DiNAT); a pair is accepted by the module"),
        Option("rel_pos_bias", True, bool, doc="learnable relative position bias (heads, 2k-1, 2k-1)"),
        Option("qkv_bias", True, bool, doc="bias of the qkv projection"),
    ),
    test_options={"kernel_size": 3, "dilation": 2},
    test_sizes={"height": 7, "width": 6},
    notes="kind 'grid': x (B, H, W, C) -> (B, H, W, C). The functional op `na2d` (attnzoo.mechanisms.local."
          "neighborhood_2d) takes (B, heads, H, W, D). kernel_size = grid and dilation 1 is exact attention "
          "over all tokens.",
))
