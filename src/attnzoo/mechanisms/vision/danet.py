"""DANet position and channel attention (PAM + CAM), the guided attention modules of multi-scale self-guided
attention for medical image segmentation.

Papers: "Multi-scale self-guided attention for medical image segmentation", Sinha & Dolz, arXiv 1906.02849
(catalog P015), whose attention modules are those of "Dual Attention Network for Scene Segmentation", Fu et al.,
arXiv 1809.02983. Official code: https://github.com/sinAshish/Multi-Scale-Attention (``src/models/attention.py``)
and https://github.com/junfu1115/DANet (``encoding/nn/da_att.py``): the two ``PAM_Module``/``CAM_Module`` are
identical.
- PAM (position attention): F (C, N = HW); ``B = W_b F``, ``C' = W_c F`` (C / 8 channels), ``D = W_d F`` (C); 1x1
  convolutions with bias; ``S = softmax_j(B^T C')`` (N x N, *no* 1/sqrt(d) scale, as the code); ``out = gamma D S^T
  + F``. That is single-head softmax attention over the HW positions with scale 1, plus a gated residual.
- CAM (channel attention): energy ``E = F F^T`` (C x C); the code takes ``softmax(max_j E - E)`` over each row
  (``energy="official"``), which equals ``softmax(-E)``: every channel attends most to the channels it is *least*
  similar to. ``energy="similarity"`` is the plain ``softmax(E)`` (the papers' equation as printed). ``out = beta
  X F + F``; no projections.
gamma and beta start at 0 (the modules start as the identity), as the code. The multi-scale fusion, the
encoder-decoder guidance and its reconstruction loss are the surrounding network, not the attention.

Forms: PAM's ``backend="reference"`` materialises S (N x N); ``"fast"``/``"auto"`` is one fused SDPA call (O(N C)
memory). CAM's C x C matrix is linear in N; it has one form. Layouts: (B, C, H, W), or (B, H, W, C) with
``channels_last=True``. Parameter names follow the official modules (``query_conv``, ``key_conv``, ``value_conv``,
``gamma``), so their state dicts load.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_int
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from ._common import channels_first, one_head_case, restore_layout, single_head

ENERGIES = ("official", "similarity")


class PositionAttention(nn.Module):
    """DANet PAM: ``x (B, dim, H, W) -> gamma * attention(x) + x``, one head over the H*W positions.

    Args:
        dim: channels C. heads: must be 1 (PAM is single-head). reduction: query/key channels C // reduction (8).
        backend: "reference" (explicit N x N softmax), "fast"/"auto" (fused SDPA); read at forward time.
        channels_last: take and return (B, H, W, C) maps.
    """

    def __init__(self, dim: int, heads: int = 1, *, reduction: int = 8, channels_last: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        opts = DANET_PAM.resolve_options(dict(reduction=reduction, channels_last=channels_last))
        self.dim = check_int("dim", dim)
        single_head("DANet position attention", heads)
        qk = dim // opts["reduction"]
        if qk < 1:
            raise ValueError(f"reduction: query/key channels dim // reduction must be >= 1, got {dim} // "
                             f"{opts['reduction']} = 0")
        self.qk_dim, self.channels_last, self.backend = qk, opts["channels_last"], check_backend(backend)
        self.query_conv = nn.Conv2d(dim, qk, kernel_size=1)
        self.key_conv = nn.Conv2d(dim, qk, kernel_size=1)
        self.value_conv = nn.Conv2d(dim, dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, qk_dim={self.qk_dim}, channels_last={self.channels_last}"

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (B, 1, N, C/r) and v (B, 1, N, C) of a (B, C, H, W) map, positions row-major."""
        t = lambda y: y.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, c, H, W) -> (B, 1, HW, c)
        return t(self.query_conv(x)), t(self.key_conv(x)), t(self.value_conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, H, W) -> (B, dim, H, W); (B, H, W, dim) with ``channels_last``."""
        x = channels_first(self, x, dim=self.dim, channels_last=self.channels_last)  # (B, C, H, W)
        check_backend(self.backend, "backend")
        B, C, H, W = x.shape
        q, k, v = self.qkv(x)
        if self.backend == "reference":
            out = softmax_attention(q, k, v, scale=1.0)  # (B, 1, N, C): S = softmax(B^T C'), out = S D
        else:
            out = pam_fast(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return restore_layout(self.gamma * out + x, self.channels_last)


def pam_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PAM's attention as one fused SDPA call with scale 1: q, k (B, 1, N, c), v (B, 1, N, C) -> (B, 1, N, C)."""
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


class ChannelAttention(nn.Module):
    """DANet CAM: ``x (B, dim, H, W) -> beta * softmax(energy) F + x`` with a C x C attention over channels.

    ``energy="official"``: softmax(max E - E) = softmax(-E) as the official code; ``"similarity"``: softmax(E).
    ``attention(x)`` returns the (B, C, C) matrix (rows sum to 1).
    """

    def __init__(self, dim: int, heads: int = 1, *, energy: str = "official", channels_last: bool = False) -> None:
        super().__init__()
        opts = DANET_CAM.resolve_options(dict(energy=energy, channels_last=channels_last))
        self.dim = check_int("dim", dim)
        single_head("DANet channel attention", heads)
        self.energy, self.channels_last = opts["energy"], opts["channels_last"]
        self.gamma = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, energy={self.energy!r}, channels_last={self.channels_last}"

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, C) channel attention of a (B, C, H, W) map."""
        f = x.flatten(2)  # (B, C, N)
        e = torch.bmm(f, f.transpose(1, 2))  # (B, C, C) energy F F^T
        if self.energy == "official":
            e = e.amax(dim=-1, keepdim=True) - e  # the official max(E) - E (a row constant: softmax(-E))
        return torch.softmax(e, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, H, W) -> (B, dim, H, W); (B, H, W, dim) with ``channels_last``."""
        x = channels_first(self, x, dim=self.dim, channels_last=self.channels_last)  # (B, C, H, W)
        B, C, H, W = x.shape
        out = torch.bmm(self.attention(x), x.flatten(2)).view(B, C, H, W)  # (B, C, N) -> (B, C, H, W)
        return restore_layout(self.gamma * out + x, self.channels_last)


def _pam_module(dim: int, heads: int, **options: Any) -> PositionAttention:
    return PositionAttention(dim, heads, **options)


def _cam_module(dim: int, heads: int, **options: Any) -> ChannelAttention:
    return ChannelAttention(dim, heads, **options)


_TITLE = "Multi-scale self-guided attention for medical image segmentation"
_CODE = "https://github.com/sinAshish/Multi-Scale-Attention"

DANET_PAM = register(Mechanism(
    name="danet_pam",
    aliases=("position_attention", "pam"),
    family="vision",
    kind="channel",
    catalog="P015",
    title=_TITLE,
    arxiv="1906.02849",
    code=_CODE,
    summary="DANet position attention: single-head softmax over the HW positions (1x1 conv q/k at C/8, v at C, "
            "scale 1), gamma-gated residual (gamma = 0 at init); (B, C, H, W) maps.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O((HW)^2 C), memory O((HW)^2) reference, O(HW C) fused",
    module=_pam_module,
    fast=pam_fast,
    case_options=one_head_case,
    options=(
        Option("reduction", 8, int, low=1, doc="query/key channels = C // reduction"),
        Option("channels_last", False, bool, doc="take and return (B, H, W, C) maps"),
    ),
    test_options={"reduction": 4},
    test_sizes={"heads": 1, "dim": 16, "height": 5, "width": 6},
    notes="With the projections taken out it is softmax attention over the flattened pixels with scale 1; "
          "gamma = 0 is the identity. Equivariant to permuting the positions.",
))

DANET_CAM = register(Mechanism(
    name="danet_cam",
    aliases=("channel_attention_module", "cam"),
    family="vision",
    kind="channel",
    catalog="P015",
    title=_TITLE,
    arxiv="1906.02849",
    code=_CODE,
    summary="DANet channel attention: C x C softmax of the channel energies F F^T (the code's max(E) - E, i.e. "
            "softmax(-E)), applied to the channels, beta-gated residual; no projections; (B, C, H, W) maps.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(HW C^2), memory O(C^2)",
    module=_cam_module,
    case_options=one_head_case,
    options=(
        Option("energy", "official", str, choices=ENERGIES,
               doc="'official': softmax(max E - E) as the code; 'similarity': softmax(E) as the equation"),
        Option("channels_last", False, bool, doc="take and return (B, H, W, C) maps"),
    ),
    test_sizes={"heads": 1, "dim": 16, "height": 5, "width": 6},
    notes="Rows of the channel attention sum to 1; beta = 0 is the identity; permuting the positions permutes "
          "the output (the energies are sums over positions).",
))
