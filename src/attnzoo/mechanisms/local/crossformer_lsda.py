"""CrossFormer long-short distance attention (LSDA) with the dynamic position bias (DPB).

Paper: "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention", Wang et al.,
arXiv 2108.00154 (catalog P056). Official code: https://github.com/cheerss/CrossFormer
Tokens of an H x W grid are split into groups and attend only inside their group: short-distance
attention (SDA) uses adjacent G x G blocks; long-distance attention (LDA) groups the tokens whose
coordinates are congruent modulo the interval I (a dilated (H/I) x (W/I) grid spanning the image).
Each head adds the dynamic position bias B_ij = MLP(dy_ij, dx_ij) of the in-group offset.

Following the official ``models/crossformer.py``:
- ``qkv`` Linear(dim, 3 dim, bias), scale head_dim^-0.5 on q, ``proj`` Linear(dim, dim).
- DPB (residual=False): Linear(2, p) -> [LayerNorm, ReLU, Linear(p, p)] x 2 -> LayerNorm, ReLU,
  Linear(p, heads), evaluated on the (2Gh-1)(2Gw-1) integer offsets (query minus key, in group coordinates)
  and gathered per pair. The official code uses p = dim // 16 (``DynamicPosBias(dim // 4)`` with
  ``pos_dim = dim // 4``); here ``dpb_dim`` defaults to max(dim // 16, 4).
- LDA: the official block fixes the group size G and derives the interval I = H // G; ``interval`` may be
  given instead (then the group is (H/I) x (W/I)). G = H = W (SDA) or I = 1 (LDA) is full attention.
- Any grid size, as the official detection/segmentation backbones do: the grid is zero-padded at the bottom and
  right to a multiple of the group size (SDA, and LDA with ``group_size``) or of the interval (LDA with
  ``interval``), the geometry is taken on the padded grid, the padded keys are masked out of every group's softmax
  (the official code adds a large negative number to them) and the padded queries are cropped. A divisible grid is
  unchanged.
- The block around the attention (LayerNorm, MLP, residuals) and the cross-scale embedding layer are not
  part of this module.

Forms: ``reference`` = dense softmax over all H*W tokens with the group mask (``attnzoo.masks.document`` on
group ids) and the DPB scattered into a dense bias; ``fast`` = grouped attention on (groups, G*G) tiles with
:func:`attnzoo.kernels.grid.tile_attention` (recomputing backward). Never builds the HW x HW matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import check_backend, check_bool, check_choice, check_heads, check_int, check_module_input
from ...kernels.grid import tile_attention
from ...masks import document, materialize
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register


def lsda_geometry(height: int, width: int, mode: str, group_size: int, interval: int | None):
    """(Gh, Gw, Ih, Iw): group extent and interval per axis. SDA groups are Gh x Gw blocks (Ih = Iw = 1 is
    meaningless there and returned as H/Gh, W/Gw block counts); LDA groups take every Ih-th row, Iw-th column."""
    if mode == "sda":
        G = group_size
        if height % G or width % G:
            raise ValueError(f"group_size: the grid {height}x{width} must be divisible into {G}x{G} groups (SDA), "
                             f"got group_size={G}")
        return G, G, height // G, width // G
    if interval is None:
        G = group_size
        if height % G or width % G:
            raise ValueError(f"group_size: the grid {height}x{width} must be divisible by group_size={G} (LDA "
                             "takes interval = H // group_size); pass interval= instead")
        return G, G, height // G, width // G
    I = interval
    if height % I or width % I:
        raise ValueError(f"interval: the grid {height}x{width} must be divisible by interval={I} (LDA)")
    return height // I, width // I, I, I


def lsda_padded_size(height: int, width: int, mode: str, group_size: int, interval: int | None) -> tuple[int, int]:
    """(Hp, Wp): the grid padded to a multiple of the interval (LDA with ``interval``) or of the group size."""
    div = interval if (mode == "lda" and interval is not None) else group_size
    return -(-height // div) * div, -(-width // div) * div


def group_ids_and_coords(height: int, width: int, mode: str, Gh: int, Gw: int, Ih: int, Iw: int, device=None):
    """Per token (row-major): group id (N,), in-group row (N,), in-group column (N,)."""
    r = torch.arange(height, device=device).view(height, 1).expand(height, width).reshape(-1)
    c = torch.arange(width, device=device).view(1, width).expand(height, width).reshape(-1)
    if mode == "sda":
        gid = torch.div(r, Gh, rounding_mode="floor") * (width // Gw) + torch.div(c, Gw, rounding_mode="floor")
        return gid, torch.remainder(r, Gh), torch.remainder(c, Gw)
    gid = torch.remainder(r, Ih) * Iw + torch.remainder(c, Iw)
    return gid, torch.div(r, Ih, rounding_mode="floor"), torch.div(c, Iw, rounding_mode="floor")


class DynamicPosBias(nn.Module):
    """DPB: an MLP from a 2-D offset (dy, dx) to one bias per head (official residual=False variant)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.pos_proj = nn.Linear(2, hidden)
        self.pos1 = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.pos2 = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.pos3 = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        """offsets (M, 2) float -> (M, heads)."""
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))

    def table(self, Gh: int, Gw: int, dtype, device) -> torch.Tensor:
        """(heads, 2Gh-1, 2Gw-1): the bias of every in-group offset (query minus key)."""
        dy = torch.arange(1 - Gh, Gh, device=device, dtype=dtype)
        dx = torch.arange(1 - Gw, Gw, device=device, dtype=dtype)
        grid = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).reshape(-1, 2)  # ((2Gh-1)(2Gw-1), 2)
        return self(grid).t().reshape(-1, 2 * Gh - 1, 2 * Gw - 1)


def lsda_reference(q, k, v, table, *, height, width, mode, Gh, Gw, Ih, Iw, scale, key_valid=None):
    """Dense masked reference: q, k, v (B, h, H*W, d); table (heads, 2Gh-1, 2Gw-1) -> (B, h, H*W, d).
    ``key_valid`` (H, W) bool: False for padded positions, never attended."""
    n = height * width
    gid, yy, xx = group_ids_and_coords(height, width, mode, Gh, Gw, Ih, Iw, device=q.device)
    mask = materialize(document(gid.view(1, n)), 1, 1, n, n, device=q.device)  # (1, 1, N, N) same group
    if key_valid is not None:
        mask = mask & key_valid.reshape(1, 1, 1, n)
    dy = (yy.view(n, 1) - yy.view(1, n) + Gh - 1).clamp(0, 2 * Gh - 2)  # (N, N) query minus key
    dx = (xx.view(n, 1) - xx.view(1, n) + Gw - 1).clamp(0, 2 * Gw - 2)
    bias = table[:, dy, dx].unsqueeze(0)  # (1, heads, N, N)
    return softmax_attention(q, k, v, attn_mask=mask, bias=bias.to(q.dtype), scale=scale)


def to_groups(x: torch.Tensor, mode: str, Gh: int, Gw: int, Ih: int, Iw: int) -> torch.Tensor:
    """(B, h, H, W, d) -> (B, h, groups, Gh*Gw, d), tokens of a group in in-group row-major order."""
    B, h, H, W, d = x.shape
    if mode == "sda":
        x = x.view(B, h, H // Gh, Gh, W // Gw, Gw, d).permute(0, 1, 2, 4, 3, 5, 6)  # (B, h, nh, nw, Gh, Gw, d)
    else:
        x = x.view(B, h, Gh, Ih, Gw, Iw, d).permute(0, 1, 3, 5, 2, 4, 6)  # (B, h, Ih, Iw, Gh, Gw, d)
    return x.reshape(B, h, -1, Gh * Gw, d)


def from_groups(x: torch.Tensor, mode: str, H: int, W: int, Gh: int, Gw: int, Ih: int, Iw: int) -> torch.Tensor:
    """Inverse of :func:`to_groups`: (B, h, groups, Gh*Gw, d) -> (B, h, H, W, d)."""
    B, h, _, _, d = x.shape
    if mode == "sda":
        x = x.view(B, h, H // Gh, W // Gw, Gh, Gw, d).permute(0, 1, 2, 4, 3, 5, 6)
    else:
        x = x.view(B, h, Ih, Iw, Gh, Gw, d).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, h, H, W, d)


def lsda_fast(q, k, v, table, *, mode, Gh, Gw, Ih, Iw, scale, key_valid=None):
    """Grouped attention: q, k, v (B, h, H, W, d) -> (B, h, H, W, d), O(HW G^2 d). ``key_valid`` (H, W) bool:
    False for padded positions, never attended."""
    B, h, H, W, d = q.shape
    yy, xx = torch.meshgrid(torch.arange(Gh, device=q.device), torch.arange(Gw, device=q.device), indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    dy = yy.view(-1, 1) - yy.view(1, -1) + Gh - 1  # (G2, G2)
    dx = xx.view(-1, 1) - xx.view(1, -1) + Gw - 1
    bias = table[:, dy, dx].unsqueeze(0).unsqueeze(2)  # (1, h, 1, G2, G2)
    mask = None
    if key_valid is not None:
        mask = to_groups(key_valid.view(1, 1, H, W, 1), mode, Gh, Gw, Ih, Iw).transpose(-1, -2)  # (1, 1, nG, 1, G2)
    out = tile_attention(to_groups(q, mode, Gh, Gw, Ih, Iw), to_groups(k, mode, Gh, Gw, Ih, Iw),
                         to_groups(v, mode, Gh, Gw, Ih, Iw), scale=scale, bias=bias, mask=mask)  # (B, h, nG, G2, d)
    return from_groups(out, mode, H, W, Gh, Gw, Ih, Iw)


class CrossFormerLSDA(nn.Module):
    """CrossFormer SDA or LDA attention with dynamic position bias; ``x (B, H, W, dim) -> (B, H, W, dim)``.

    Args:
        dim, heads: channels and heads (dim % heads == 0).
        mode: "sda" (adjacent G x G groups) or "lda" (strided groups), default "sda".
        group_size: G, default 7 (LDA: group side, interval = H // G, as the official code).
        interval: LDA interval I instead of group_size (group = (H/I) x (W/I)), default None.
        qkv_bias: default True. dpb_dim: hidden width of the DPB MLP, default max(dim // 16, 4).
        backend: "auto", "fast" or "reference".
    """

    def __init__(self, dim: int, heads: int, *, mode: str = "sda", group_size: int = 7, interval: int | None = None,
                 qkv_bias: bool = True, dpb_dim: int | None = None, backend: str = "auto") -> None:
        super().__init__()
        dim, heads, _, _ = check_heads(dim, heads)
        check_choice("mode", mode, ("sda", "lda"))
        check_int("group_size", group_size)
        if interval is not None:
            check_int("interval", interval)
            if mode != "lda":
                raise ValueError(f"interval: only applies to mode='lda', got interval={interval} with mode={mode!r}")
        check_bool("qkv_bias", qkv_bias)
        check_backend(backend)
        dpb_dim = max(dim // 16, 4) if dpb_dim is None else check_int("dpb_dim", dpb_dim)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.mode, self.group_size, self.interval, self.backend = mode, group_size, interval, backend
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.pos = DynamicPosBias(dpb_dim, heads)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, mode={self.mode!r}, group_size={self.group_size}, " \
               f"interval={self.interval}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_module_input(self, x, layout="(B, H, W, C)", channels=self.dim)
        B, H, W, C = x.shape
        check_backend(self.backend)
        Hp, Wp = lsda_padded_size(H, W, self.mode, self.group_size, self.interval)
        Gh, Gw, Ih, Iw = lsda_geometry(Hp, Wp, self.mode, self.group_size, self.interval)
        qkv = self.qkv(x).view(B, H, W, 3, self.heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)  # (3, B, h, H, W, d)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, H, W, d)
        valid = None
        if (Hp, Wp) != (H, W):
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, Wp - W, 0, Hp - H)) for t in (q, k, v))  # (B,h,Hp,Wp,d)
            valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=x.device)
            valid[:H, :W] = True
        table = self.pos.table(Gh, Gw, x.dtype, x.device)  # (heads, 2Gh-1, 2Gw-1)
        if self.backend == "reference":
            flat = lambda t: t.reshape(B, self.heads, Hp * Wp, self.head_dim)  # (B, h, N, d)
            out = lsda_reference(flat(q), flat(k), flat(v), table, height=Hp, width=Wp, mode=self.mode, Gh=Gh, Gw=Gw,
                                 Ih=Ih, Iw=Iw, scale=self.scale, key_valid=valid)
            out = out.view(B, self.heads, Hp, Wp, self.head_dim)
        else:
            out = lsda_fast(q, k, v, table, mode=self.mode, Gh=Gh, Gw=Gw, Ih=Ih, Iw=Iw, scale=self.scale,
                            key_valid=valid)
        out = out[:, :, :H, :W]  # (B, h, H, W, d)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))  # (B, H, W, dim)


def _case_options(*, n, side, heads, causal):
    """Benchmark/training cases: the largest group side <= 7 that divides the grid side (any other pads)."""
    side = side or int(n ** 0.5)
    return {"group_size": max(d for d in range(1, min(7, side) + 1) if side % d == 0)}

CROSSFORMER_LSDA = register(Mechanism(
    name="crossformer_lsda",
    case_options=_case_options,
    aliases=("crossformer", "lsda"),
    family="local",
    kind="grid",
    catalog="P056",
    title="CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention",
    arxiv="2108.00154",
    code="https://github.com/cheerss/CrossFormer",
    summary="Attention inside adjacent G x G groups (SDA) or strided interval-I groups (LDA), with a "
            "dynamic position bias MLP of the in-group offset.",
    patterns=("noncausal_self",),
    exact=True,
    complexity="SDA O(HW G^2 d); LDA O(HW (HW / I^2) d)",
    fast=lsda_fast,
    module=CrossFormerLSDA,
    options=(
        Option("mode", "sda", str, choices=("sda", "lda"), doc="short-distance (blocks) or long-distance (strided)"),
        Option("group_size", 7, int, low=1, doc="group side G (LDA: interval = Hp // G); grids padded to multiples"),
        Option("interval", None, int, low=1, allow_none=True, doc="LDA interval I instead of group_size"),
        Option("qkv_bias", True, bool, doc="bias of the qkv projection"),
        Option("dpb_dim", None, int, low=1, allow_none=True, doc="DPB hidden width, default max(dim // 16, 4)"),
    ),
    test_options={"mode": "lda", "group_size": 3, "dpb_dim": 4},
    test_sizes={"height": 6, "width": 9},
    notes="kind 'grid': x (B, H, W, C) -> (B, H, W, C); exact softmax attention inside each group. Alternate "
          "mode='sda' and mode='lda' blocks as the paper does.",
))
