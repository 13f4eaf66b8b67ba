"""BiFormer: bi-level routing attention (BRA) on token grids.

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention", Zhu et al., CVPR 2023,
arXiv 2303.08810. Official code: https://github.com/rayleizhu/BiFormer (``ops/torch/bra.py``).

The (H, W) grid is cut into ``n_win x n_win`` regions. Region-level queries and keys are the means of the
region's token queries/keys; every region routes to the ``topk`` regions with the largest
``q_region . k_region``; each token of a region then attends (softmax, per head) to all tokens of its
routed regions. A depthwise ``side_dwconv x side_dwconv`` convolution of V (the paper's local context
enhancement, LCE) is added before the output projection.

Choices, all following the official code (``BiLevelRoutingAttention`` as used by the released
``biformer_tiny/small/base`` models):
- one fused ``qkv`` linear with bias (q and k of width ``qk_dim``, v of width ``dim``) and an output
  linear with bias ("qkvo" parameter mode);
- the score scale is ``qk_dim ** -0.5`` -- the full q/k width, not the per-head width -- unless
  ``qk_scale`` is given (the official default, kept because pretrained BiFormer weights rely on it);
- routing is on the full-width region means, shared by all heads, and not differentiable
  (``diff_routing=False``, ``param_routing=False``, ``soft_routing=False`` in the released models): the
  region indices are a constant, gradients reach q/k/v only through the token-level attention;
- key/values are not downsampled (``kv_downsample_mode='identity'``, as released);
- LCE is a depthwise conv with bias and zero padding ``side_dwconv // 2`` on V laid out as an image;
  ``side_dwconv=0`` disables it;
- any H and W: the official ``auto_pad=True`` path. A grid that ``n_win`` does not divide is zero-padded at the
  bottom/right to multiples of ``n_win`` (regions of ceil(H / n_win) rows), and the outputs are cropped. Unlike the
  official code, which lets the padded tokens in (their q/k/v are the projection biases), the padding is masked
  out: region means average real tokens only, regions made only of padding are never routed to, padded keys are
  never attended and the LCE convolution sees zeros there. A divisible grid takes the unchanged path.
Ties in the routing top-k follow ``torch.topk``; both forms share the same routing.

Forms: ``reference`` is dense attention over all H*W tokens with the routed region-block mask
materialized (O((HW)^2)); ``fast`` gathers the routed regions' keys for every region
(:func:`attnzoo.kernels.gather.gather_attention`, hand-written backward): O(HW * topk * HW / S^2 * d).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import check_backend, check_int, check_module_input
from ...kernels.gather import gather_attention
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register


def route_regions(q_region: torch.Tensor, k_region: torch.Tensor, topk: int, scale: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Region routing: (B, S2, C) region queries/keys -> (B, S2, topk) routed region indices (no grad).
    ``valid`` (B|1, S2) bool: regions that hold real tokens (padding-only regions are routed to last)."""
    logits = torch.matmul(q_region.detach() * scale, k_region.detach().transpose(-1, -2))  # (B, S2, S2)
    if valid is not None:
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    return torch.topk(logits, k=topk, dim=-1).indices  # (B, S2, topk)


def _region_of_tokens(height: int, width: int, n_win: int, device) -> torch.Tensor:
    """(H*W,) region id of every raster-order token."""
    rh, rw = height // n_win, width // n_win
    rows = torch.arange(height, device=device) // rh
    cols = torch.arange(width, device=device) // rw
    return (rows.view(height, 1) * n_win + cols.view(1, width)).reshape(-1)  # (H*W,)


def routed_mask(r_idx: torch.Tensor, height: int, width: int, n_win: int) -> torch.Tensor:
    """Dense (B, 1, N, N) bool mask, N = H*W raster order: token i sees token j iff j's region is routed
    from i's region."""
    B, S2, _ = r_idx.shape
    allowed = torch.zeros(B, S2, S2, dtype=torch.bool, device=r_idx.device)
    allowed.scatter_(-1, r_idx, True)  # (B, S2, S2): region -> routed regions
    reg = _region_of_tokens(height, width, n_win, r_idx.device)  # (N,)
    return allowed[:, reg][:, :, reg].unsqueeze(1)  # (B, 1, N, N)


def bra_reference(q, k, v, r_idx, *, height, width, n_win, scale, key_valid=None):
    """Token attention with the routed mask materialized. q, k (B, heads, N, dq), v (B, heads, N, dv) in
    raster order; r_idx (B, S2, topk); ``key_valid`` (N,) bool (False: padding, never attended) -> (B, heads, N, dv)."""
    mask = routed_mask(r_idx, height, width, n_win)  # (B, 1, N, N)
    if key_valid is not None:
        mask = mask & key_valid.view(1, 1, 1, -1)
    return softmax_attention(q, k, v, attn_mask=mask, scale=scale)


def _to_regions(x: torch.Tensor, height: int, width: int, n_win: int) -> torch.Tensor:
    """(B, h, N, c) raster -> (B, h, S2, w2, c) region-major."""
    B, Hh, N, c = x.shape
    rh, rw = height // n_win, width // n_win
    x = x.view(B, Hh, n_win, rh, n_win, rw, c).permute(0, 1, 2, 4, 3, 5, 6)  # (B, h, S, S, rh, rw, c)
    return x.reshape(B, Hh, n_win * n_win, rh * rw, c)


def _from_regions(x: torch.Tensor, height: int, width: int, n_win: int) -> torch.Tensor:
    """Inverse of :func:`_to_regions`: (B, h, S2, w2, c) -> (B, h, N, c)."""
    B, Hh, S2, w2, c = x.shape
    rh, rw = height // n_win, width // n_win
    x = x.view(B, Hh, n_win, n_win, rh, rw, c).permute(0, 1, 2, 4, 3, 5, 6)  # (B, h, S, rh, S, rw, c)
    return x.reshape(B, Hh, height * width, c)


def bra_fast(q, k, v, r_idx, *, height, width, n_win, scale, key_valid=None):
    """Gathered routed attention, same signature as :func:`bra_reference`; never builds N x N scores."""
    B, heads, N, _ = q.shape
    S2 = n_win * n_win
    w2 = N // S2
    qr = _to_regions(q, height, width, n_win)  # (B, heads, S2, w2, dq)
    kr = _to_regions(k, height, width, n_win).reshape(B, heads, N, -1)  # (B, heads, N, dq) region-major
    vr = _to_regions(v, height, width, n_win).reshape(B, heads, N, -1)  # (B, heads, N, dv) region-major
    index = r_idx.view(B, 1, S2, -1)  # routed regions = runs of w2 consecutive region-major keys
    kpm = None
    if key_valid is not None:  # raster (N,) -> region-major (B, N)
        kpm = _to_regions(key_valid.view(1, 1, N, 1), height, width, n_win).reshape(1, N).expand(B, N)
    out, _ = gather_attention(qr, kr, vr, index, scale=scale, run=w2,
                              key_padding_mask=kpm)  # (B, heads, S2, w2, dv)
    return _from_regions(out, height, width, n_win)  # (B, heads, N, dv)


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention on (B, H, W, dim) grids -> (B, H, W, dim).

    ``backend``: "fast" (gathered routed regions), "reference" (dense masked attention) or "auto"
    (= "fast"). Options: see the ``biformer`` registry record (``attnzoo info biformer``).
    """

    def __init__(self, dim: int, heads: int, *, backend: str = "auto", **options: Any) -> None:
        super().__init__()
        opts = BIFORMER.resolve_options(options)
        dim, heads = check_int("dim", dim), check_int("heads", heads)
        qk_dim = dim if opts["qk_dim"] is None else opts["qk_dim"]
        if qk_dim % heads or dim % heads:
            raise ValueError(f"heads: dim ({dim}) and qk_dim ({qk_dim}) must be divisible by heads, got heads={heads}")
        check_backend(backend)
        self.dim, self.heads, self.qk_dim = dim, heads, qk_dim
        self.n_win, self.topk, self.side_dwconv = opts["n_win"], opts["topk"], opts["side_dwconv"]
        self.scale = qk_dim ** -0.5 if opts["qk_scale"] is None else opts["qk_scale"]
        self.backend = backend
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        self.wo = nn.Linear(dim, dim)
        ks = self.side_dwconv
        self.lepe = nn.Conv2d(dim, dim, kernel_size=ks, padding=ks // 2, groups=dim) if ks > 0 else None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, qk_dim={self.qk_dim}, n_win={self.n_win}, topk={self.topk}, "
                f"side_dwconv={self.side_dwconv}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, dim) channels-last -> (B, H, W, dim)."""
        check_module_input(self, x, layout="(B, H, W, C)", channels=self.dim)
        B, H, W, C = x.shape
        S = self.n_win
        if self.topk > S * S:
            raise ValueError(f"topk: {self.topk} routed regions requested but the grid has only {S * S}")
        check_backend(self.backend)
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)  # (B, H, W, .)
        Hp, Wp = -(-H // S) * S, -(-W // S) * S  # auto_pad: multiples of n_win
        valid = region_valid = None
        if (Hp, Wp) != (H, W):
            pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, Wp - W, 0, Hp - H))  # (B, Hp, Wp, c)
            q, k, vp = pad(q), pad(k), pad(v)
            valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=x.device)
            valid[:H, :W] = True
        else:
            vp = v
        N, hd, vd = Hp * Wp, self.qk_dim // self.heads, self.dim // self.heads
        rh, rw = Hp // S, Wp // S
        region_sum = lambda t: t.view(B, S, rh, S, rw, -1).sum(dim=(2, 4)).reshape(B, S * S, t.shape[-1])
        count = torch.full((1, S * S, 1), float(rh * rw), dtype=x.dtype, device=x.device)
        if valid is not None:  # means over the real tokens of each region
            count = region_sum(valid.to(x.dtype).view(1, Hp, Wp, 1))  # (1, S2, 1)
            region_valid = count.view(1, S * S) > 0
        q_region = region_sum(q) / count.clamp_min(1)  # (B, S2, qk_dim)
        k_region = region_sum(k) / count.clamp_min(1)
        r_idx = route_regions(q_region, k_region, self.topk, self.scale, region_valid)  # (B, S2, topk)
        qh = q.reshape(B, N, self.heads, hd).transpose(1, 2)  # (B, heads, N, hd)
        kh = k.reshape(B, N, self.heads, hd).transpose(1, 2)  # (B, heads, N, hd)
        vh = vp.reshape(B, N, self.heads, vd).transpose(1, 2)  # (B, heads, N, vd)
        fn = bra_reference if self.backend == "reference" else bra_fast
        out = fn(qh, kh, vh, r_idx, height=Hp, width=Wp, n_win=S, scale=self.scale,
                 key_valid=None if valid is None else valid.reshape(-1))  # (B, heads, N, vd)
        out = out.transpose(1, 2).reshape(B, Hp, Wp, self.dim)[:, :H, :W]  # (B, H, W, dim)
        if self.lepe is not None:
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # LCE on V, (B, H, W, dim)
        return self.wo(out)


def _case_options(*, n, side, heads, causal):
    """Benchmark/training cases: the largest region count <= 7 that divides the grid side (others pad)."""
    side = side or int(n ** 0.5)
    n_win = max(d for d in range(1, min(7, side) + 1) if side % d == 0)
    return {"n_win": n_win, "topk": min(4, n_win * n_win)}

BIFORMER = register(Mechanism(
    name="biformer",
    case_options=_case_options,
    aliases=("bra", "bi_level_routing"),
    family="sparse",
    kind="grid",
    catalog="P061",
    title="BiFormer: Vision Transformer with Bi-Level Routing Attention",
    arxiv="2303.08810",
    code="https://github.com/rayleizhu/BiFormer",
    summary="Region-to-region top-k routing on region means, then token attention inside the routed "
            "regions, plus a depthwise-conv local context term on V.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(HW * topk * HW/S^2 * d) + O(S^4 d) routing; memory O(HW * topk * HW/S^2) per tile group",
    module=BiLevelRoutingAttention,
    fast=bra_fast,
    options=(
        Option("n_win", 7, int, low=1, doc="regions per side (S); the grid (padded to multiples of S) is split "
                                           "into S x S regions"),
        Option("topk", 4, int, low=1, doc="routed regions per region (k); k = S^2 is dense attention"),
        Option("qk_dim", None, int, low=1, allow_none=True, doc="query/key width (default: dim)"),
        Option("qk_scale", None, float, low=1e-12, allow_none=True,
               doc="score scale (default qk_dim**-0.5, the official choice)"),
        Option("side_dwconv", 5, int, low=0, doc="LCE depthwise conv kernel on V (0 disables)"),
    ),
    test_options={"n_win": 3, "topk": 2},
    test_sizes={"height": 6, "width": 6, "dim": 8, "heads": 2},
    notes="topk = n_win^2 (every region routed) is dense softmax attention over the grid plus LCE; routing "
          "is shared by heads and not differentiable (the official default).",
))
