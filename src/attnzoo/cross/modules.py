""":class:`CrossAttention`: the multi-source cross-attention module (projections per named source,
``context_dims={"text": 768, "image": 1024}``, decoding against a :class:`~attnzoo.cross.cache.ContextCache`)."""


from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import (
    BACKENDS,
    check_bool,
    check_choice,
    check_int,
    check_key_padding_mask,
    check_module_input,
)
from .cache import ContextCache
from .function import MODES, check_scale_value, cross_attention, source_mapping


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------
def per_source(arg: str, value: object, single: str | None, known: list[str]) -> dict[str, Any]:
    """A per-source argument as a dict: a mapping (names checked) or, for a single-source layer, one value."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(source_mapping(arg, value, known))
    if single is None:
        raise TypeError(f"{arg}: this layer has several sources {known}; expected a mapping from source name to "
                        f"tensor, got {type(value).__name__}")
    return {single: value}


class CrossAttention(nn.Module):
    """Multi-source cross-attention layer: ``x (B, N, dim)`` attends to named contexts -> ``(B, N, dim)``.

    ``context_dims={"text": 768, "image": 1024}`` gives each source its own key/value projections (one query and
    one output projection are shared); ``context_dim=C`` (or neither: C = dim) builds a single-source layer whose
    forward takes one tensor (its source is named ``"context"``). ``bias`` applies to the q/k/v projections and, unless
    ``out_bias`` says otherwise, the output projection (diffusers' layers: ``bias=False, out_bias=True``). ``mode``,
    ``scales`` (initial per-source output
    scales; ``learnable_scales`` makes them parameters) and the masks are those of :func:`cross_attention`.
    ``causal=True``: causal cross by position; forward then needs ``q_pos`` and ``context_pos``.

    Decoding against a fixed context: ``cache = layer.context_cache(context)`` projects it once (or pass an empty
    ``ContextCache`` as ``state`` together with the context); then ``y, cache = layer(x_t, state=cache)`` per step
    reads the cached keys/values. ``append_context=True`` adds new context tokens to cached sources (causal cross:
    new frames with later positions). One cache can serve several layers when their source names differ; the
    layer does not advance ``state.seq_len`` (the count of decoded queries belongs to the cache's owner).
    """

    def __init__(self, dim: int, heads: int, *, context_dims: Mapping[str, int] | None = None,
                 context_dim: int | None = None, mode: str = "separate", kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, out_bias: bool | None = None,
                 scales: Mapping[str, float] | None = None, learnable_scales: bool = False, causal: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        self.kv_heads = heads if kv_heads is None else check_int("kv_heads", kv_heads)
        if heads % self.kv_heads:
            raise ValueError(f"kv_heads: heads ({heads}) must be a multiple of kv_heads, got {self.kv_heads}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"heads: dim ({dim}) must be divisible by heads, got {heads}; or pass head_dim")
            head_dim = dim // heads
        self.head_dim = check_int("head_dim", head_dim)
        self.mode = check_choice("mode", mode, MODES)
        self.causal = check_bool("causal", causal)
        self.backend = check_choice("backend", backend, BACKENDS)
        check_bool("bias", bias)
        out_bias = bias if out_bias is None else check_bool("out_bias", out_bias)
        check_bool("learnable_scales", learnable_scales)
        if context_dims is not None and context_dim is not None:
            raise ValueError("context_dims, context_dim: give one (several named sources, or one source), not both")
        if context_dims is None:
            self.single: str | None = "context"
            context_dims = {"context": dim if context_dim is None else check_int("context_dim", context_dim)}
        else:
            self.single = None
            if not isinstance(context_dims, Mapping) or not context_dims:
                raise TypeError(f"context_dims: expected a non-empty mapping {{source name: width}}, got "
                                f"{context_dims!r}")
            for name, width in context_dims.items():
                if not isinstance(name, str) or not name:
                    raise TypeError(f"context_dims: source names must be non-empty str, got {name!r}")
                check_int(f"context_dims[{name!r}]", width)
        self.context_dims = dict(context_dims)
        self.names = list(context_dims)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        inner, kv_inner = heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.ModuleDict({n: nn.Linear(c, kv_inner, bias=bias) for n, c in context_dims.items()})
        self.v_proj = nn.ModuleDict({n: nn.Linear(c, kv_inner, bias=bias) for n, c in context_dims.items()})
        self.o_proj = nn.Linear(inner, dim, bias=out_bias)
        init = source_mapping("scales", scales, self.names)
        values = {n: float(check_scale_value(f"scales[{n!r}]", init.get(n, 1.0), torch.zeros(()))) for n in self.names}
        if learnable_scales:
            self.scales: Any = nn.ParameterDict({n: nn.Parameter(torch.tensor(v)) for n, v in values.items()})
        else:
            self.scales = values

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"context_dims={self.context_dims}, mode={self.mode!r}, causal={self.causal}")

    # -- projections -----------------------------------------------------------------------------------
    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

    def project(self, name: str, context: torch.Tensor, key_context: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of source ``name``: context (B, M, C_s) -> k, v (B, Hk, M, head_dim); with ``key_context``
        (B, M, C_s) the keys come from it and the values from ``context`` (DETR-style positions on keys only)."""
        if name not in self.context_dims:
            raise ValueError(f"context: unknown source {name!r}; this layer's sources are {self.names}")
        check_module_input(self, context, name=f"context[{name!r}]", channels=self.context_dims[name])
        if key_context is not None:
            check_module_input(self, key_context, name=f"key_context[{name!r}]", channels=self.context_dims[name])
            if key_context.shape != context.shape:
                raise ValueError(f"key_context[{name!r}]: expected the shape of its context {tuple(context.shape)}, "
                                 f"got {tuple(key_context.shape)}")
        return (self._heads(self.k_proj[name](context if key_context is None else key_context), self.kv_heads),
                self._heads(self.v_proj[name](context), self.kv_heads))

    @torch.no_grad()
    def load_multihead_attention(self, mha: nn.MultiheadAttention) -> CrossAttention:
        """Copy the weights of a ``torch.nn.MultiheadAttention`` (its q/k/v input projections, packed or separate, and
        its output projection) into this single-source layer; same widths, heads and biases required. Returns self."""
        if self.single is None:
            raise ValueError("mha: a torch MultiheadAttention has one key/value input; this layer has several sources "
                             f"{self.names}")
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha: expected a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        src = self.single
        if (mha.embed_dim, mha.num_heads, mha.kdim) != (self.dim, self.heads, self.context_dims[src]) or (
                self.kv_heads != self.heads or self.head_dim * self.heads != self.dim):
            raise ValueError(f"mha: embed_dim {mha.embed_dim}, heads {mha.num_heads}, kdim {mha.kdim} do not match "
                             f"this layer (dim {self.dim}, heads {self.heads}, context width {self.context_dims[src]})")
        if (mha.in_proj_bias is None) != (self.q_proj.bias is None) or (
                (mha.out_proj.bias is None) != (self.o_proj.bias is None)):
            raise ValueError("mha: its biases do not match this layer's (build it with bias/out_bias as the module)")
        if mha.in_proj_weight is not None:
            wq, wk, wv = mha.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        for lin, w, i in ((self.q_proj, wq, 0), (self.k_proj[src], wk, 1), (self.v_proj[src], wv, 2)):
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(mha.in_proj_bias.chunk(3)[i])
        self.o_proj.weight.copy_(mha.out_proj.weight)
        if self.o_proj.bias is not None:
            self.o_proj.bias.copy_(mha.out_proj.bias)
        return self

    @torch.no_grad()
    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """A batch-first ``torch.nn.MultiheadAttention`` with this single-source layer's weights (the inverse of
        :meth:`load_multihead_attention`; parity tests against torch, export). Same dtype and device."""
        if self.single is None:
            raise ValueError(f"this layer has several sources {self.names}; a torch MultiheadAttention has one")
        src, w = self.single, self.q_proj.weight
        if self.kv_heads != self.heads or self.head_dim * self.heads != self.dim:
            raise ValueError("a torch MultiheadAttention needs kv_heads == heads and head_dim * heads == dim")
        if (self.q_proj.bias is None) != (self.o_proj.bias is None):
            raise ValueError("a torch MultiheadAttention has biases on all projections or none")
        c = self.context_dims[src]
        mha = nn.MultiheadAttention(self.dim, self.heads, bias=self.q_proj.bias is not None, kdim=c, vdim=c,
                                    batch_first=True, device=w.device, dtype=w.dtype)
        lins = (self.q_proj, self.k_proj[src], self.v_proj[src])
        if mha.in_proj_weight is not None:
            mha.in_proj_weight.copy_(torch.cat([lin.weight for lin in lins]))
        else:
            for name, lin in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), lins):
                getattr(mha, name).copy_(lin.weight)
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.copy_(torch.cat([lin.bias for lin in lins]))
        mha.out_proj.load_state_dict(self.o_proj.state_dict())
        return mha

    def context_cache(self, context, *, key_padding_mask=None, context_pos=None,
                      state: ContextCache | None = None) -> ContextCache:
        """A :class:`ContextCache` (new, or ``state``) holding the projected ``context`` of this layer."""
        state = ContextCache() if state is None else state
        self._store(state, context, key_padding_mask, context_pos, append=False)
        return state

    def extend_context(self, state: ContextCache, context, *, key_padding_mask=None, context_pos=None) -> None:
        """Append the projections of new context tokens to ``state`` (causal cross: frames arriving later)."""
        self._store(state, context, key_padding_mask, context_pos, append=True)

    def init_state(self, batch_size: int | None = None) -> ContextCache:
        """An empty :class:`ContextCache` (fill it by calling the layer with a context and ``state=``)."""
        return ContextCache()

    def _store(self, state, context, key_padding_mask, context_pos, *, append: bool) -> None:
        if not isinstance(state, ContextCache):
            raise TypeError(f"state: expected an attnzoo ContextCache, got {type(state).__name__}")
        ctx = per_source("context", context, self.single, self.names)
        if not ctx:
            raise ValueError("context: expected at least one source to store, got none")
        kpm = per_source("key_padding_mask", key_padding_mask, self.single, self.names)
        pos = per_source("context_pos", context_pos, self.single, self.names)
        self._check_extra(ctx, key_padding_mask=kpm, context_pos=pos)
        kv = {name: self.project(name, c) for name, c in ctx.items()}
        self._check_masks(kpm, {n: k.shape[2] for n, (k, _) in kv.items()}, next(iter(kv.values()))[0].shape[0],
                          next(iter(kv.values()))[0].device)
        for name, (k, v) in kv.items():
            if append:
                state.append(name, k, v, key_padding_mask=kpm.get(name), positions=pos.get(name))
            else:
                if name in state:
                    raise ValueError(f"context: source {name!r} is already in this ContextCache; decode with "
                                     "context=None, or pass append_context=True to add tokens to it")
                state.set(name, k, v, key_padding_mask=kpm.get(name), positions=pos.get(name))

    def _check_masks(self, masks: Mapping[str, Any], lengths: Mapping[str, int], batch: int, device) -> None:
        """Each source's key-padding mask: bool (B, M_s) on x's device, named as the caller passed it."""
        for n, m in masks.items():
            check_key_padding_mask(m, batch, lengths[n], device=device,
                                   name="key_padding_mask" if self.single else f"key_padding_mask[{n!r}]")

    def _check_extra(self, ctx: Mapping[str, Any], **named: Mapping[str, Any]) -> None:
        for arg, d in named.items():
            extra = [n for n in d if n not in ctx]
            if extra:
                raise ValueError(f"{arg}: given for source {extra[0]!r}, which is not in this call's context; per-"
                                 "source masks and positions travel with their source's tokens")

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, context=None, *, key_padding_mask=None, region_masks=None, pair_masks=None,
                q_pos=None, context_pos=None, scales=None, state: ContextCache | None = None,
                append_context: bool = False, return_source_mass: bool = False, query=None, key_context=None):
        """x (B, N, dim); context {name: (B, M_s, C_s)} (a tensor for a single-source layer); key_padding_mask
        {name: (B, M_s)} bool; region_masks {name: (B, N)}; pair_masks {name: (B|1, N, M_s)} bool; q_pos (N,) or
        (B, N) and context_pos {name: (M_s,) or (B, M_s)} (causal layers); scales {name: float} overrides the
        layer's. ``query`` (B, N, dim): project the queries from it instead of x, and ``key_context`` {name:
        (B, M_s, C_s)}: the keys from it instead of the context (DETR-style positional embeddings added to queries and
        keys only; the values stay x's context).

        Returns (B, N, dim); (y, mass) with ``return_source_mass`` (mass {name: (B, heads, N)}); and the state last
        when one is given: (y, state) or (y, mass, state).
        """
        check_module_input(self, x, channels=self.dim)
        check_bool("append_context", append_context)
        B, N, _ = x.shape
        if self.causal and q_pos is None:
            raise ValueError("q_pos: this layer is causal by position (causal=True); pass q_pos (N,) or (B, N) and "
                             "context_pos for the positioned sources")
        if not self.causal and (q_pos is not None or context_pos is not None):
            raise ValueError("q_pos, context_pos: positions are for causal layers; build the layer with causal=True")
        if state is not None:
            if not isinstance(state, ContextCache):
                raise TypeError(f"state: expected an attnzoo ContextCache, got {type(state).__name__}")
            if key_context is not None:
                raise ValueError("key_context: a ContextCache stores one projection of each context; project keys "
                                 "from positions-added inputs without a state")
            if context is not None:
                self._store(state, context, key_padding_mask, context_pos, append=append_context)
            elif key_padding_mask is not None or context_pos is not None:
                raise ValueError("key_padding_mask, context_pos: decoding from a ContextCache uses the cached masks "
                                 "and positions; pass them with the context when it is stored")
            names = [n for n in self.names if n in state]
            if not names:
                raise ValueError(f"state: this ContextCache holds none of this layer's sources {self.names}; pass "
                                 "the context once (with state=) to fill it")
            if state.batch != B:
                raise ValueError(f"x: batch {B} does not match the ContextCache's batch {state.batch}")
            sources = {n: (state.keys(n), state.values(n)) for n in names}
            masks = {n: state.mask(n) for n in names if state.mask(n) is not None}
            kv_pos = {n: state.positions(n) for n in names if state.positions(n) is not None}
        else:
            if append_context:
                raise ValueError("append_context: needs a ContextCache as state")
            ctx = per_source("context", context, self.single, self.names)
            if not ctx:
                raise ValueError(f"context: cross-attention needs a context (sources {self.names}), got none")
            masks = per_source("key_padding_mask", key_padding_mask, self.single, self.names)
            kv_pos = per_source("context_pos", context_pos, self.single, self.names)
            kctx = per_source("key_context", key_context, self.single, self.names)
            self._check_extra(ctx, key_padding_mask=masks, context_pos=kv_pos, key_context=kctx)
            sources = {n: self.project(n, c, kctx.get(n)) for n, c in ctx.items()}
            for n, (k, _) in sources.items():
                if k.shape[0] != B:
                    raise ValueError(f"context[{n!r}]: batch {k.shape[0]} does not match x's batch {B}")
            self._check_masks(masks, {n: k.shape[2] for n, (k, _) in sources.items()}, B, x.device)
        if self.causal and not kv_pos:
            raise ValueError("context_pos: this layer is causal by position; pass positions for the sources the "
                             "queries may see only in part")
        regions = per_source("region_masks", region_masks, self.single, self.names)
        pairs = per_source("pair_masks", pair_masks, self.single, self.names)
        self._check_extra(sources, region_masks=regions, pair_masks=pairs)
        chosen = dict(self.scales) if scales is None else {**dict(self.scales), **per_source("scales", scales, None,
                                                                                          self.names)}
        if query is not None:
            check_module_input(self, query, name="query", channels=self.dim)
            if query.shape != x.shape:
                raise ValueError(f"query: expected x's shape {tuple(x.shape)}, got {tuple(query.shape)}")
        q = self._heads(self.q_proj(x if query is None else query), self.heads)  # (B, H, N, hd)
        res = cross_attention(q, sources, mode=self.mode, masks=masks or None, region_masks=regions or None,
                              pair_masks=pairs or None, scales={n: chosen[n] for n in sources}, q_pos=q_pos,
                              kv_pos=kv_pos or None,
                              scale=self.scale, return_source_mass=return_source_mass, backend=self.backend)
        out, mass = (res if return_source_mass else (res, None))
        y = self.o_proj(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))  # (B, N, dim)
        result = (y,) + ((mass,) if return_source_mass else ()) + ((state,) if state is not None else ())
        return result[0] if len(result) == 1 else result
