"""nn.Modules: the generic :class:`Attention` layer (projections + any functional mechanism) and
:func:`build`, which returns that layer or a mechanism's own module."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import registry
from .errors import check_backend, check_bool, check_heads, check_int, check_pattern_flag, check_sequence_call
from .functional import select_form


class Attention(nn.Module):
    """Multi-head attention layer whose score/normaliser is any functional attnzoo mechanism.

    ``x (B, N, dim)`` -> ``(B, N, dim)``; with ``context (B, M, context_dim)`` it is cross attention.
    Owns the q/k/v/out projections; ``kv_heads < heads`` gives grouped-query attention.

    Decoding: ``state = layer.init_state(batch)``, then ``out, state = layer(x_new, state=state)`` for
    each chunk of new tokens (a multi-token prefill first, then one token at a time); equals the causal
    forward over the whole sequence.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 mechanism: str = "softmax", causal: bool = False, context_dim: int | None = None,
                 bias: bool = False, backend: str = "auto", **options: Any) -> None:
        super().__init__()
        self.mech = registry.get(mechanism)
        if not self.mech.functional:
            raise TypeError(f"mechanism: {self.mech.name!r} has its own module; use attnzoo.build({mechanism!r}, ...)")
        dim, heads, kv_heads, head_dim = check_heads(dim, heads, kv_heads, head_dim=head_dim)
        check_bool("causal", causal)
        check_backend(backend)
        self.options = self.mech.resolve_options(options)
        check_pattern_flag(self.mech, causal)
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.causal, self.backend = causal, backend
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(self.context_dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(self.context_dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (f"mechanism={self.mech.name!r}, dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}{opts}")

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None):
        """An empty decode state for ``batch_size`` sequences (causal self attention only)."""
        if self.mech.init_state is None:
            raise TypeError(f"mechanism {self.mech.name!r} has no decode step")
        if not self.causal:
            raise ValueError("causal: decoding needs a causal layer; build it with causal=True")
        check_int("batch_size", batch_size)
        w = self.q_proj.weight
        return self.mech.init_state(batch=batch_size, kv_heads=self.kv_heads, head_dim=self.head_dim,
                                    value_dim=self.head_dim, dtype=w.dtype if dtype is None else dtype,
                                    device=w.device if device is None else device, **self.options)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state=None):
        """x (B, N, dim), context (B, M, context_dim) or None, key_padding_mask (B, M or N) bool.

        Returns (B, N, dim), or ``(out, state)`` when a decode state is given.
        """
        src = check_sequence_call(self, x, context, key_padding_mask=key_padding_mask, state=state, channels=self.dim,
                                  context_channels=self.context_dim, mech=self.mech)
        if state is not None and self.mech.step is None:
            raise TypeError(f"state: mechanism {self.mech.name!r} has no decode step")
        q = self._split(self.q_proj(x), self.heads)  # (B, Hq, N, hd)
        k = self._split(self.k_proj(src), self.kv_heads)  # (B, Hk, M, hd)
        v = self._split(self.v_proj(src), self.kv_heads)  # (B, Hk, M, hd)
        if state is not None:
            out = self.mech.step(q, k, v, state, scale=self.scale, key_padding_mask=key_padding_mask,
                                 **self.options)  # (B, Hq, N, hd)
        else:
            fn = select_form(self.mech, self.backend, q, k, v, self.causal, key_padding_mask, self.options)
            out = fn(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, scale=self.scale,
                     **self.options)  # (B, Hq, N, hd)
        B, _, N, _ = out.shape
        y = self.o_proj(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))  # (B, N, dim)
        return (y, state) if state is not None else y


def build(mechanism: str, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
          **options: Any) -> nn.Module:
    """An nn.Module computing ``mechanism`` on token features.

    Functional mechanisms get the generic :class:`Attention` layer (it owns the projections; extra
    keyword arguments are :class:`Attention`'s or the mechanism's options). Mechanisms with their own
    parameters return their own module, built with the same arguments. Sequence modules take
    ``forward(x, context=None, *, key_padding_mask=None, state=None)``; grid and channel modules take
    ``forward(x)`` on (B, H, W, C) grids or (B, C, H, W) maps. Cross mechanisms with named sources take
    ``context_dims={"text": 768, "image": 1024}`` and ``forward(x, context={...})`` (ARCHITECTURE "Cross-attention";
    the generic multi-source layer is ``build("cross_attention", ...)``).
    """
    mech = registry.get(mechanism)
    check_int("dim", dim)
    check_int("heads", heads)
    if kv_heads is not None:
        check_int("kv_heads", kv_heads)
    check_bool("causal", causal)
    if mech.module is None:
        if "context_dims" in options:
            raise TypeError(f"context_dims: mechanism {mech.name!r} attends to one context; several named contexts "
                            "are the multi-source layer attnzoo.build('cross_attention', dim, heads, context_dims=...) "
                            "or a cross mechanism's own module")
        return Attention(dim, heads, kv_heads=kv_heads, mechanism=mech.name, causal=causal, **options)
    if mech.kind == "sequence":
        return mech.module(dim, heads, kv_heads=kv_heads, causal=causal, **options)
    if mech.kind == "pooling" and any(p.startswith("causal") for p in mech.patterns):
        # learned queries over a token set that are causal by position (Video-CCAM): causal applies
        if kv_heads is not None:
            raise ValueError(f"kv_heads: does not apply to pooling mechanism {mech.name!r}; got {kv_heads!r}")
        return mech.module(dim, heads, causal=causal, **options)
    if kv_heads is not None or causal:
        raise ValueError(f"kv_heads, causal: do not apply to {mech.kind} mechanism {mech.name!r}; "
                         f"got kv_heads={kv_heads!r}, causal={causal!r}")
    return mech.module(dim, heads, **options)
