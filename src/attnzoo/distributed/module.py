"""``ContextParallel``: run a model with its sequence dimension sharded over the ranks of a group.

CATALOG P025 (sharded attention), P117 (LASP-2 for the linear layers). The wrapper shards the model's input
along the sequence axis, runs the model on this rank's tokens, and makes each attnzoo attention layer inside
it attend across ranks: every :class:`attnzoo.layers.Attention` (any functional mechanism) and every
:class:`~attnzoo.mechanisms.linear.transnormer.TransNormerAttention` (its Lightning core by LASP-2). Every
other layer is token-wise (projections, MLPs, norms over channels) and runs unchanged on the shard. A layer
that mixes tokens without attnzoo (a convolution over the sequence, a sequence-wide norm) would see only its
shard: such models are not supported.

Layers keep their parameters and names: the wrapper overrides each attention layer's ``forward`` on the
instance (:meth:`ContextParallel.unwrap` restores it), and a layer called outside the wrapper's forward runs
as before. ``layout="auto"`` picks per layer: LASP-2 for the linear family (contiguous sharding), the halo
exchange for local windows (sliding_window, neighborhood_1d, sink_window), the ring for softmax and other
mask-defined mechanisms, Ulysses for everything else.

Training: each rank's loss covers its tokens; sum the losses (or divide by the global token count) and call
:meth:`ContextParallel.all_reduce_gradients` after ``backward`` so that every rank holds the full gradient of
the replicated parameters, exactly the single-process gradient.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import check_choice, check_key_padding_mask, check_tensor
from ..layers import Attention
from ..mechanisms.linear.transnormer import TransNormerAttention
from .api import LAYOUTS, attention
from .comm import DEFAULT_TIMEOUT, Comm
from .lasp2 import LASP2_MECHANISMS
from .sharding import SCHEMES, Sharding

__all__ = ["ContextParallel", "auto_layout"]

_HALO_MECHANISMS = ("sliding_window", "neighborhood_1d", "sink_window")


def auto_layout(mechanism, sharding: Sharding | str) -> str:
    """The layout ``layout="auto"`` uses for a mechanism record under a sharding scheme."""
    contiguous = (sharding.scheme if isinstance(sharding, Sharding) else sharding) == "contiguous"
    if mechanism.name in LASP2_MECHANISMS and contiguous:
        return "lasp2"
    if mechanism.name in _HALO_MECHANISMS:
        return "halo"
    if mechanism.name == "softmax" or mechanism.mask is not None:
        return "ring"
    return "ulysses"


@dataclass
class _Shard:
    group: Any
    sharding: Sharding
    rank: int
    timeout: float


_CURRENT: contextvars.ContextVar[_Shard | None] = contextvars.ContextVar("attnzoo_context_parallel", default=None)


def _attention_forward(layer: Attention, cp: ContextParallel, x, context=None, *, key_padding_mask=None, state=None):
    shard = _CURRENT.get()
    if shard is None:  # called outside the wrapper: the layer as it was
        return type(layer).forward(layer, x, context, key_padding_mask=key_padding_mask, state=state)
    if context is not None or state is not None:
        raise ValueError("context, state: a sequence-sharded attention layer is self attention over the sharded "
                         "sequence (no context, no decode state); decode with attnzoo.distributed.SplitKVCache")
    check_tensor("x", x, ndim=3)
    B, n, _ = x.shape
    check_key_padding_mask(key_padding_mask, B, n, device=x.device)

    def split(t, h):
        return t.view(B, n, h, layer.head_dim).transpose(1, 2)  # (B, h, n, head_dim)

    q = split(layer.q_proj(x), layer.heads)
    k = split(layer.k_proj(x), layer.kv_heads)
    v = split(layer.v_proj(x), layer.kv_heads)
    layout = cp.layouts.get(id(layer)) or auto_layout(layer.mech, shard.sharding)
    kw = {"backend": layer.backend} if layout in ("ulysses", "heads") else {}
    out = attention(q, k, v, mechanism=layer.mech.name, group=shard.group, layout=layout, sharding=shard.sharding,
                    causal=layer.causal, key_padding_mask=key_padding_mask, scale=layer.scale, timeout=shard.timeout,
                    **kw, **layer.options)  # (B, Hq, n, head_dim)
    return layer.o_proj(out.transpose(1, 2).reshape(B, n, layer.heads * layer.head_dim))


def _transnormer_forward(layer: TransNormerAttention, cp: ContextParallel, x, context=None, *, key_padding_mask=None,
                         state=None):
    shard = _CURRENT.get()
    if shard is None:
        return type(layer).forward(layer, x, context, key_padding_mask=key_padding_mask, state=state)
    if context is not None or state is not None:
        raise ValueError("context, state: a sequence-sharded TransNormer layer is causal self attention over the "
                         "sharded sequence (no context, no decode state)")
    if not shard.sharding.is_contiguous():
        raise ValueError(f"sharding: TransNormerLLM's layer runs by LASP-2, which needs contiguous shards, got "
                         f"{shard.sharding.scheme!r}")
    check_tensor("x", x, ndim=3)
    n = x.shape[1]
    check_key_padding_mask(key_padding_mask, x.shape[0], n, device=x.device)
    q, k, v, u = layer.qkvu(x, shard.rank * shard.sharding.local_len)  # LRPE at the global positions
    o = attention(q, k, v, mechanism="lightning", group=shard.group, layout="lasp2", sharding=shard.sharding,
                  causal=True, key_padding_mask=key_padding_mask, scale=1.0, timeout=shard.timeout,
                  decay=layer.decay, chunk=layer.chunk)
    return layer.output(o, u)


_FORWARDS = {Attention: _attention_forward, TransNormerAttention: _transnormer_forward}


class ContextParallel(nn.Module):
    """Shard ``model``'s sequence dimension over ``group`` (see the module docstring).

    Args:
        model: called as ``model(x_shard, *args, **kwargs)``; its attnzoo attention layers become sharded.
        group: the process group (None = default).
        layout: ``"auto"`` or one of :data:`attnzoo.distributed.LAYOUTS` for every attention layer;
            ``layouts={layer: layout}`` overrides single layers.
        sharding: ``"contiguous"`` or ``"zigzag"``.
        seq_dim: the sequence axis of the model's input.
        position_kwarg: if given, the model also receives this keyword with the global positions (n,) of the
            shard's tokens (padding clamped to the last position), e.g. for position embeddings.
    """

    def __init__(self, model: nn.Module, group=None, *, layout: str = "auto", sharding: str = "contiguous",
                 seq_dim: int = 1, position_kwarg: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 layouts: dict[nn.Module, str] | None = None) -> None:
        super().__init__()
        check_choice("layout", layout, ("auto", *LAYOUTS))
        check_choice("sharding", sharding, SCHEMES)
        self.model = model
        self.comm = Comm(group, timeout=timeout)
        self.group, self.layout, self.scheme, self.seq_dim = group, layout, sharding, seq_dim
        self.position_kwarg, self.timeout = position_kwarg, timeout
        self.layouts: dict[int, str] = {}
        self._wrapped: list[nn.Module] = []
        for m in model.modules():
            fwd = next((f for cls, f in _FORWARDS.items() if isinstance(m, cls)), None)
            if fwd is None:
                continue
            chosen = (layouts or {}).get(m, layout)
            check_choice("layouts", chosen, ("auto", *LAYOUTS))
            if chosen != "auto":
                self.layouts[id(m)] = chosen
            m.forward = functools.partial(fwd, m, self)
            self._wrapped.append(m)
        if not self._wrapped:
            raise ValueError("model: no attnzoo attention layer (attnzoo.layers.Attention or TransNormerAttention) "
                             "found; nothing would attend across ranks")

    def unwrap(self) -> nn.Module:
        """Restore the attention layers' own forward and return the model."""
        for m in self._wrapped:
            m.__dict__.pop("forward", None)
        self._wrapped = []
        return self.model

    def sharding(self, seq_len: int) -> Sharding:
        return Sharding(seq_len, self.comm.world, self.scheme)

    def forward(self, x: torch.Tensor, *args, key_padding_mask: torch.Tensor | None = None, **kwargs):
        """x with the *whole* sequence along ``seq_dim`` (the same on every rank) -> the model's output for this
        rank's tokens (padding included; :meth:`gather` reassembles). ``key_padding_mask`` (B, N) is sharded and
        passed on to the model as ``key_padding_mask``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
        N = x.shape[self.seq_dim]
        sh = self.sharding(N)
        rank = self.comm.rank
        x_r = sh.shard(x, rank, dim=self.seq_dim)
        if key_padding_mask is not None:
            check_key_padding_mask(key_padding_mask, x.shape[0], N, device=x.device)
            kwargs["key_padding_mask"] = sh.shard(key_padding_mask, rank, dim=1)
        if self.position_kwarg is not None:
            kwargs[self.position_kwarg] = sh.positions(rank).clamp(max=N - 1).to(x.device)
        token = _CURRENT.set(_Shard(self.group, sh, rank, self.timeout))
        try:
            return self.model(x_r, *args, **kwargs)
        finally:
            _CURRENT.reset(token)

    def shard_target(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of a per-token tensor (e.g. the labels) of the whole sequence."""
        return self.sharding(y.shape[dim]).shard(y, self.comm.rank, dim=dim)

    def valid(self, seq_len: int) -> torch.Tensor:
        """(n,) bool: which of this rank's token slots are real (not padding)."""
        return self.sharding(seq_len).valid(self.comm.rank)

    @torch.no_grad()
    def gather(self, y: torch.Tensor, seq_len: int, dim: int = 1) -> torch.Tensor:
        """The whole sequence of a per-token output from every rank's shard (no gradient)."""
        allr = self.comm.all_gather(y, what="ContextParallel.gather", kind="gather outputs")
        return self.sharding(seq_len).unshard(allr, dim=dim)

    @torch.no_grad()
    def all_reduce_gradients(self) -> None:
        """Sum every parameter's gradient over the group (one all-reduce of the flattened gradients)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        total = self.comm.all_reduce(flat, what="ContextParallel.all_reduce_gradients", kind="gradient all-reduce")
        off = 0
        for p in params:
            p.grad.copy_(total[off : off + p.grad.numel()].view_as(p.grad))
            off += p.grad.numel()

