""":class:`LatentResampler`: learned latent queries over a token set (the resampler path of Video-CCAM, TextHawk and
multi-layer trainable pooling), its layers and feed-forwards."""


from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import (
    check_bool,
    check_choice,
    check_int,
    check_tensor,
)
from .cache import ContextCache
from .modules import CrossAttention, per_source


class GEGLU(nn.Module):
    """x -> a * gelu(b) with [a, b] = x split in two along the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return a * F.gelu(b)


def feed_forward(dim: int, mult: int, kind: str) -> nn.Module:
    """Pre-norm-free feed-forward of width ``mult * dim``: ``"geglu"`` (Perceiver/Flamingo resamplers) or
    ``"gelu"`` (ViT MLP)."""
    if kind == "geglu":
        return nn.Sequential(nn.Linear(dim, 2 * mult * dim), GEGLU(), nn.Linear(mult * dim, dim))
    return nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))


class ResamplerLayer(nn.Module):
    """One resampler block over a token set: ``z = z + Attn(LN(z), LN_c(x))``, then ``z = z + FF(LN(z))``.

    z (B, Nq, dim) latent queries; x (B, M, context_dim) tokens (keys and values only: the latents do not attend
    to each other, so each latent is computed independently, which causal-by-position decoding relies on).
    ``norm=False`` drops the layer norms, ``ff_mult=0`` the feed-forward. ``source`` names its context in a shared
    :class:`ContextCache`.
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, head_dim: int | None = None,
                 ff_mult: int = 4, ff: str = "geglu", norm: bool = True, bias: bool = False, causal: bool = False,
                 source: str = "context", backend: str = "auto") -> None:
        super().__init__()
        cdim = dim if context_dim is None else check_int("context_dim", context_dim)
        check_int("ff_mult", ff_mult, low=0)
        check_choice("ff", ff, ("geglu", "gelu"))
        check_bool("norm", norm)
        self.source, self.norm = source, norm
        self.norm_q = nn.LayerNorm(dim) if norm else nn.Identity()
        self.norm_c = nn.LayerNorm(cdim) if norm else nn.Identity()
        self.attn = CrossAttention(dim, heads, context_dims={source: cdim}, head_dim=head_dim, bias=bias,
                                   causal=causal, backend=backend)
        self.norm_ff = nn.LayerNorm(dim) if (norm and ff_mult) else nn.Identity()
        self.ff = feed_forward(dim, ff_mult, ff) if ff_mult else None

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None, *, key_padding_mask=None, q_pos=None,
                context_pos=None, state: ContextCache | None = None, append_context: bool = False) -> torch.Tensor:
        """z (B, Nq, dim), x (B, M, context_dim) (None: read from ``state``) -> (B, Nq, dim)."""
        ctx = None if x is None else {self.source: self.norm_c(x)}
        kpm = None if key_padding_mask is None else {self.source: key_padding_mask}
        pos = None if context_pos is None else {self.source: context_pos}
        res = self.attn(self.norm_q(z), ctx, key_padding_mask=kpm, q_pos=q_pos, context_pos=pos, state=state,
                        append_context=append_context)
        z = z + (res[0] if state is not None else res)
        if self.ff is not None:
            z = z + self.ff(self.norm_ff(z))
        return z


class LatentResampler(nn.Module):
    """Learned latent queries cross-attend to a token set: ``x (B, M, context_dim)`` -> ``(B, num_latents, dim)``.

    The resampler path shared by Video-CCAM's projector (with causal positions), TextHawk's ReSA (with levels
    routed to layers) and multi-layer trainable pooling (latents over the hidden states of all layers): ``depth``
    :class:`ResamplerLayer` blocks applied to ``latents`` (``nn.Parameter`` (num_latents, dim), or per-call
    ``latents=`` (B, Nq, dim), e.g. proposed by a network). ``routing`` (one level name per layer) makes ``x`` a
    mapping {level: (B, M_l, context_dim[level])}: layer i reads level ``routing[i]`` (multi-level cross-attention).
    ``causal=True``: latents have positions ``q_pos`` and tokens ``context_pos``; a latent sees tokens at positions
    <= its own. ``state``: a :class:`ContextCache` holding every layer's projected tokens (sources "layer0", ...).
    """

    def __init__(self, dim: int, heads: int, *, num_latents: int, context_dim: int | Mapping[str, int] | None = None,
                 depth: int = 1, routing: tuple[str, ...] | None = None, head_dim: int | None = None,
                 ff_mult: int = 4, ff: str = "geglu", norm: bool = True, bias: bool = False, causal: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        self.num_latents, self.depth = check_int("num_latents", num_latents), check_int("depth", depth)
        if routing is not None:
            if not isinstance(context_dim, Mapping):
                raise TypeError("context_dim: with routing, expected a mapping {level: width}, got "
                                f"{context_dim!r}")
            routing = tuple(routing)
            if len(routing) != depth or any(r not in context_dim for r in routing):
                raise ValueError(f"routing: expected {depth} level names from {list(context_dim)}, got {routing}")
            widths = [context_dim[r] for r in routing]
        else:
            if isinstance(context_dim, Mapping):
                raise TypeError("context_dim: a mapping of levels needs routing (the level each layer reads)")
            widths = [dim if context_dim is None else check_int("context_dim", context_dim)] * depth
        self.routing, self.causal = routing, check_bool("causal", causal)
        self.latents = nn.Parameter(torch.randn(num_latents, dim) / math.sqrt(dim))
        self.layers = nn.ModuleList([
            ResamplerLayer(dim, heads, context_dim=w, head_dim=head_dim, ff_mult=ff_mult, ff=ff, norm=norm,
                           bias=bias, causal=causal, source=f"layer{i}", backend=backend)
            for i, w in enumerate(widths)])

    def forward(self, x=None, *, key_padding_mask=None, context_pos=None, q_pos=None,
                latents: torch.Tensor | None = None, state: ContextCache | None = None,
                append_context: bool = False) -> torch.Tensor:
        """x (B, M, context_dim) or {level: (B, M_l, C_l)} with routing (None: decode from ``state``);
        key_padding_mask / context_pos likewise per level; q_pos (Nq,) latent positions (causal) ->
        (B, Nq, dim)."""
        if latents is None:
            if x is None:
                raise ValueError("latents: decoding from a state needs the latents to compute, (B, Nq, dim)")
            B = (next(iter(x.values())) if isinstance(x, Mapping) else x).shape[0]
            z = self.latents.unsqueeze(0).expand(B, -1, -1)  # (B, Nq, dim)
        else:
            check_tensor("latents", latents, ndim=3)
            if latents.shape[-1] != self.dim:
                raise ValueError(f"latents: expected (B, Nq, {self.dim}), got {tuple(latents.shape)}")
            z = latents
        for i, layer in enumerate(self.layers):
            level = None if self.routing is None else self.routing[i]
            xi, kpm, pos = x, key_padding_mask, context_pos
            if level is not None:
                xi = None if x is None else per_source("x", x, None, list(dict.fromkeys(self.routing)))[level]
                kpm = None if kpm is None else per_source("key_padding_mask", kpm, None, list(self.routing)).get(level)
                pos = None if pos is None else per_source("context_pos", pos, None, list(self.routing)).get(level)
            z = layer(z, xi, key_padding_mask=kpm, q_pos=q_pos, context_pos=pos, state=state,
                      append_context=append_context)
        return z
