"""Attention inside real models: every attention call of a transformers model as q, k, v, its output and its
effective operator, with hooks that read it (statistics) or edit it (head gates, masking, calibration).

    from attnzoo.analysis.capture import Analyzer
    with Analyzer(model, "softmax") as az:            # or "sink_window", window=256, sinks=4; "hip", ...
        az.hooks.append(lambda call: print(call.layer, call.stats(rows=[-1]).entropy))
        model(ids)

:class:`Analyzer` registers the mechanism through :mod:`attnzoo.hf` (its mask function and mask verification:
the model's mask must be causal + key padding, or the call raises) and wraps the attention function it registered:
each call runs the mechanism, then builds an :class:`AttentionCall` and passes it to every hook in order. A hook
returning a tensor (B, Hq, Nq, Dv) replaces the output (gates, head masks, ACT/VAR calibration); the next hook sees
the replaced output. On exit the model's previous attention implementation is restored. Works with every model that
dispatches attention through transformers' ``ALL_ATTENTION_FUNCTIONS`` (Llama/SmolLM2, BERT/MiniLM, DINOv2, Whisper).

Layers are numbered in the order the model calls them in its first forward under the analyzer (the transformer's
depth order), and each module keeps its number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import registry
from .operator import effective_operator
from .stats import HeadStats, head_statistics, weight_statistics

__all__ = ["AttentionCall", "Analyzer", "head_gate_hook", "head_mask_hook", "HeadGates"]

_COUNTER = itertools.count()


@dataclass
class AttentionCall:
    """One attention call: q (B, Hq, Nq, D) (RoPE applied), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), the bottom-right
    ``causal`` flag, the key-padding mask (B, Nk) or None, the score scale, and the output (B, Hq, Nq, Dv) of
    ``mechanism`` with ``options``. ``module`` is the model's attention module, ``layer`` its index."""

    layer: int
    module: torch.nn.Module
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    key_padding_mask: torch.Tensor | None
    scale: float
    out: torch.Tensor
    mechanism: str
    options: dict[str, Any] = field(default_factory=dict)
    _weights: torch.Tensor | None = None

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    def weights(self) -> torch.Tensor:
        """(B, Hq, Nq, Nk) effective operator of the mechanism on this call (dense: short contexts), cached."""
        if self._weights is None:
            with torch.no_grad():
                self._weights = effective_operator(self.mechanism, self.q, self.k, self.v, causal=self.causal,
                                                   key_padding_mask=self.key_padding_mask, scale=self.scale,
                                                   **self.options)
        return self._weights

    def streams(self) -> bool:
        """True when this call's rows are masked-softmax rows (softmax, or a declared static mask): statistics then
        stream from q, k and the LSE; otherwise they come from the dense effective operator."""
        mech = registry.get(self.mechanism)
        if mech.name == "softmax":
            return True
        return mech.operator is None and mech.mask is not None

    def predicate(self):
        mech = registry.get(self.mechanism)
        if mech.name == "softmax" or mech.mask is None:
            return None
        nq, nk = self.q.shape[2], self.k.shape[2]
        return mech.mask(nq, nk, causal=self.causal, heads=self.heads, kv_heads=self.k.shape[1],
                         **mech.resolve_options(self.options))

    def stats(self, rows: Sequence[int] | torch.Tensor | None = None, **kwargs: Any) -> HeadStats:
        """Head statistics of query rows ``rows`` (default all; negative indices count from the end), keywords of
        :func:`attnzoo.analysis.stats.head_statistics` (sink, sets, topk, positions, distance_bins)."""
        nq = self.q.shape[2]
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
            rows = torch.where(rows < 0, rows + nq, rows)
        with torch.no_grad():
            if self.streams():
                idx = torch.arange(nq) if rows is None else rows
                return head_statistics(self.q[:, :, idx], self.k, rows=idx, nq=nq, scale=self.scale,
                                       causal=self.causal, key_padding_mask=self.key_padding_mask,
                                       predicate=self.predicate(), **kwargs)
            return weight_statistics(self.weights(), rows=rows, **kwargs)


Hook = Callable[[AttentionCall], "torch.Tensor | None"]


class Analyzer:
    """Context manager running ``model``'s attention through ``mechanism`` (a registered functional mechanism,
    default exact ``softmax``) with hooks on every call (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, mechanism: str = "softmax", *, hooks: Sequence[Hook] = (),
                 **options: Any) -> None:
        from .. import hf

        self.model = model
        self.mech = registry.get(mechanism)
        if not self.mech.functional:
            raise ValueError(f"mechanism: {self.mech.name!r} is not a functional mechanism; the analyzer runs a "
                             "model's attention through attnzoo.hf, which needs one")
        self.options = dict(options)
        self.hooks: list[Hook] = list(hooks)
        self.layers: dict[int, int] = {}  # id(module) -> layer index
        self.calls = 0
        self._hf = hf
        self._name = f"attnzoo-analysis-{next(_COUNTER)}:{self.mech.name}"
        self._previous: str | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _layer(self, module) -> int:
        return self.layers.setdefault(id(module), len(self.layers))

    def __enter__(self) -> Analyzer:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        base_name = self._hf.register(self.mech.name, **self.options)
        base = ALL_ATTENTION_FUNCTIONS[base_name]
        analyzer = self

        def analysis_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            out, _ = base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
            kpm = getattr(attention_mask, "key_padding_mask", None)
            scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            call = AttentionCall(analyzer._layer(module), module, query, key, value, causal, kpm, float(scale),
                                 out.transpose(1, 2), analyzer.mech.name, analyzer.options)
            analyzer.calls += 1
            for hook in analyzer.hooks:
                new = hook(call)
                if new is not None:
                    if new.shape != call.out.shape:
                        raise ValueError(f"hook {hook!r}: returned shape {tuple(new.shape)}, expected the output's "
                                         f"{tuple(call.out.shape)}")
                    call.out = new
            return call.out.transpose(1, 2).contiguous(), None

        AttentionInterface.register(self._name, analysis_attention)
        AttentionMaskInterface.register(self._name, self._hf.attnzoo_mask_function)
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(self._name)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            self.model.set_attn_implementation(self._previous)


# --------------------------------------------------------------------------------------------------------
# Editing hooks: head gates and head masks (P019, P045)
# --------------------------------------------------------------------------------------------------------
class HeadGates:
    """One gate per (layer, head), multiplying that head's attention output (P019's g_h): all ones leaves the model
    unchanged; 0 prunes the head (== zeroing its output before the output projection). ``values`` (L, H) may
    require grad: ``values.grad`` after a backward is dL/dg, the gradient importance score."""

    def __init__(self, layers: int, heads: int, *, requires_grad: bool = False, dtype=torch.float32) -> None:
        self.values = torch.ones(layers, heads, dtype=dtype, requires_grad=requires_grad)

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        g = self.values[call.layer].to(call.out.dtype).view(1, -1, 1, 1)  # (1, Hq, 1, 1)
        return call.out * g


def head_gate_hook(gates: torch.Tensor) -> Hook:
    """A hook multiplying head h of layer l by ``gates[l, h]`` ((L, H) tensor, differentiable)."""
    hg = HeadGates(1, 1)
    hg.values = gates
    return hg


def head_mask_hook(heads: Sequence[tuple[int, int]]) -> Hook:
    """A hook zeroing the output of the given (layer, head) pairs (the retrieval-head ablation of P045)."""
    chosen: dict[int, list[int]] = {}
    for layer, head in heads:
        chosen.setdefault(int(layer), []).append(int(head))

    def mask(call: AttentionCall) -> torch.Tensor | None:
        hs = chosen.get(call.layer)
        if not hs:
            return None
        keep = torch.ones(call.heads, dtype=call.out.dtype, device=call.out.device)
        keep[hs] = 0
        return call.out * keep.view(1, -1, 1, 1)

    return mask
