"""Module swapping: ``swap_attention`` replaces a model's self-attention modules so that ``generate()`` keeps attnzoo's
own decode states (bounded caches, recurrent states) inside transformers' cache object."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from .. import registry
from ..errors import check_bool
from ..state import CompiledDecode, StepModule, compile_decode
from .adapter import HFIntegrationError, HFMask, register, require_transformers

# ----------------------------------------------------------------------------------------------------------
# Module swapping: attnzoo decode states inside generate(), and mechanisms with their own parameters
# ----------------------------------------------------------------------------------------------------------
# transformers renamed the cache argument of attention modules and models: ``past_key_value`` (< 4.56),
# ``past_key_values`` (4.56 - 5.23), ``cache`` (5.24 on; the older names are deprecated aliases until 5.40).
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def cache_argument(model) -> str:
    """The name under which ``model.forward`` (a transformers model or module) takes its key/value cache in the
    installed transformers: ``"cache"`` (5.24 on) or ``"past_key_values"`` (older)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in params), "past_key_values")


def _given_cache(kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """(argument name, cache) of the cache passed to an attention module, whatever transformers calls it."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def _positive_crop_is_a_length(layer_cls) -> bool:
    """transformers < 5 reads ``crop(n >= 0)`` as "keep n tokens"; 5.x only removes tokens (``crop(-n)``,
    ``crop(0)`` removes none) and refuses n > 0. Asked of the installed DynamicLayer, not of its version."""
    layer, t = layer_cls(), torch.zeros(1, 1, 2, 1)
    layer.update(t, t)
    try:
        layer.crop(1)
    except ValueError:
        return False
    return True


@functools.cache
def _cache_layer_class():
    from transformers.cache_utils import DynamicLayer

    legacy_crop = _positive_crop_is_a_length(DynamicLayer)

    class AttnzooCacheLayer(DynamicLayer):
        """A transformers cache layer that holds an attnzoo decode state instead of the full keys/values.

        ``update`` returns only the new keys/values (the mechanism's ``step`` appends them to its state);
        lengths, mask sizes, beam reorders, batch selection and crops are answered by / applied to the
        state, so ``generate`` (greedy, sampling, beam search) works unchanged. Written against the layer API
        of transformers 4.56 and of 5.x (``get_mask_sizes`` takes the query length or, before 5, the cache
        positions; ``crop`` follows the installed convention)."""

        is_sliding = False

        def __init__(self, state) -> None:
            super().__init__()
            self.state = state
            self.is_initialized = True

        def lazy_initialization(self, *args, **kwargs) -> None:  # nothing to allocate
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            return key_states, value_states

        def get_seq_length(self, *args) -> int:
            return self.state.seq_len

        def get_mask_sizes(self, query) -> tuple[int, int]:
            # 5.x passes the query length; 4.56 - 4.57 the (Nq,) cache positions
            n = int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)
            return self.state.seq_len + n, 0

        def reorder_cache(self, beam_idx) -> None:
            self.state.reorder(beam_idx)

        def batch_select_indices(self, indices) -> None:
            self.state.reorder(indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.state.reorder(torch.arange(_batch_of(self.state)).repeat_interleave(repeats))

        def crop(self, tokens: int) -> None:
            if tokens < 0:  # every version: remove that many tokens (all of them when it holds fewer)
                self.state.crop(max(0, self.state.seq_len + tokens))
            elif legacy_crop:  # transformers < 5: keep that many tokens
                self.state.crop(min(tokens, self.state.seq_len))
            elif tokens > 0:
                raise ValueError(f"crop: transformers {_transformers_version()} removes tokens with a negative "
                                 f"count, got {tokens}")
            # 5.x crop(0): nothing to remove

        def offload(self) -> None:  # the state stays on its device
            pass

        def prefetch(self) -> None:
            pass

        def reset(self) -> None:
            raise HFIntegrationError("this cache holds attnzoo decode states; start a new cache instead of reset()")

    return AttnzooCacheLayer


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _batch_of(state) -> int:
    return int(state.batch) if hasattr(state, "batch") else int(state.tensors()[0].shape[0])


def _new_token_padding(mask, t: int) -> torch.Tensor | None:
    if not isinstance(mask, HFMask) or mask.padding is None:
        return None
    end = mask.kv_offset + mask.kv_length
    kpm = mask.padding[:, end - t : end].to(torch.bool)  # (B, T)
    return None if bool(kpm.all()) else kpm


class SwappedAttention(torch.nn.Module):
    """Wraps a model's attention module so that decoding runs the attnzoo mechanism's own decode state
    (bounded or recurrent) instead of the model's full key/value cache. Training and prefill-free calls
    go through the model's projections, positional encoding and the attnzoo attention function.

    ``decoder``: this layer's :class:`~attnzoo.state.CompiledDecode` of the one-token step
    (``swap_attention(..., compile=True)``; the layers' wrappers share one step module, its graphs and its
    fallback), else None."""

    def __init__(self, original: torch.nn.Module, mechanism: str, options: dict[str, Any],
                 decoder: CompiledDecode | None = None) -> None:
        super().__init__()
        self.original = original
        self.mech = registry.get(mechanism)
        self.options = self.mech.resolve_options(options)
        # not a submodule: the shared step would otherwise appear once per layer in the model's modules()
        self.__dict__["decoder"] = decoder
        self.layer_idx = getattr(original, "layer_idx", None)
        cfg = original.config
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(original, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def forward(self, hidden_states, *args, attention_mask=None, **kwargs):
        name, cache = _given_cache(kwargs)
        if cache is None:
            return self.original(hidden_states, *args, attention_mask=attention_mask, **kwargs)
        layer_cls = _cache_layer_class()
        layers = cache.layers
        while len(layers) <= self.layer_idx:
            layers.append(layer_cls.__base__())
        layer = layers[self.layer_idx]
        if not isinstance(layer, layer_cls):
            if layer.get_seq_length() > 0:
                raise HFIntegrationError(
                    f"{name}: layer {self.layer_idx} already holds keys from another attention implementation")
            p = next(self.original.parameters())
            state = self.mech.init_state(batch=hidden_states.shape[0], kv_heads=self.kv_heads, head_dim=self.head_dim,
                                         value_dim=self.head_dim, dtype=hidden_states.dtype, device=p.device,
                                         **self.options)
            layer = layers[self.layer_idx] = layer_cls(state)
        self.original._attnzoo_decode = (layer.state, _new_token_padding(attention_mask, hidden_states.shape[1]),
                                         self.decoder)
        try:
            return self.original(hidden_states, *args, attention_mask=attention_mask, **kwargs)
        finally:
            self.original._attnzoo_decode = None


def _attention_modules(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) of every self-attention module of a decoder (has ``layer_idx`` and
    ``q_proj``)."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if hasattr(child, "layer_idx") and hasattr(child, "q_proj") and not isinstance(child, SwappedAttention):
                found.append((parent, attr, child))
    return found


def swap_attention(model, mechanism: str, *, compile: bool | dict[str, Any] = False, **options: Any):
    """Run ``mechanism`` in every self-attention layer of a transformers decoder, with its own decode state.

    Functional mechanisms with a decode step (``sliding_window``, ``sink_window``, linear attention, ...)
    keep the model's pretrained projections and positional encoding; during ``generate`` their state (a
    bounded window cache, a recurrent state) replaces the model's full KV cache: each layer of the model's
    cache object becomes an ``AttnzooCacheLayer`` holding the state, which answers lengths and mask sizes
    and takes beam reorders and crops. Mechanisms without a causal decode form raise.

    ``compile=True`` (or a dict of :func:`attnzoo.state.compile_decode`'s keyword arguments: ``mode``,
    ``backend``, ``max_recompiles``, ...): each one-token decode call of the mechanism's step runs through
    ``torch.compile`` (checked against eager on each layer's first two tokens, eager fallback with a
    RuntimeWarning when it fails or keeps recompiling); the prompt's prefill stays eager. One
    step module serves every layer, so the layers share the compiled graphs. :func:`compile_report` says what
    compiled. Only the attention step is compiled, not the model's projections and MLPs.
    Returns the implementation name set on the model.
    """
    require_transformers()
    if isinstance(compile, dict):
        compile_options = dict(compile)
        known = set(inspect.signature(compile_decode).parameters) - {"module"}
        bad = sorted(set(compile_options) - known)
        if bad:
            raise TypeError(f"compile: unknown compile_decode options {bad}; expected some of {sorted(known)}")
    else:
        check_bool("compile", compile)
        compile_options = {} if compile else None
    mech = registry.get(mechanism)
    if not getattr(model.config, "is_decoder", True) and not getattr(model.config, "is_causal", True):
        raise HFIntegrationError("model: swap_attention targets causal decoders")
    if "causal_self" not in mech.patterns:
        raise HFIntegrationError(
            f"mechanism {mech.name!r} has no causal form (patterns {list(mech.patterns)}); a decoder needs causal_self")
    if not mech.functional or mech.step is None:
        raise HFIntegrationError(
            f"mechanism {mech.name!r} cannot be swapped into a pretrained decoder: "
            + ("it has its own parameters (train it with attnzoo.build instead)" if not mech.functional
               else "it has no decode step"))
    layers = _attention_modules(model)
    if not layers:
        raise HFIntegrationError(
            f"model: found no attention modules with q_proj and layer_idx in {type(model).__name__}")
    name = register(mech.name, **options)
    first = None
    if compile_options is not None:  # built (and its options validated) now, not at the first decoded token
        first = compile_decode(StepModule(mech.step, mech.resolve_options(options)), **compile_options)
    for i, (parent, attr, module) in enumerate(layers):
        decoder = first if i == 0 or first is None else compile_decode(first.module, share_with=first,
                                                                       **compile_options)
        setattr(parent, attr, SwappedAttention(module, mech.name, options, decoder))
    model.set_attn_implementation(name)
    return name


def compile_report(model) -> dict[str, Any]:
    """What ``swap_attention(model, ..., compile=True)`` compiled, once ``generate`` (or a forward with a cache) ran:
    ``layers`` (swapped layers), ``compiled`` (layers decoding through the compiled step), ``compile_time_s``
    (summed over the layers; dynamo compiles at the first layers' first tokens and the rest reuse the graphs),
    ``graphs``, ``recompiles`` (after the checked calls), ``max_rel_err`` (compiled vs eager in the checked calls)
    and ``fallback_reason`` (None while compiled; the layers share their graphs and fall back together)."""
    swapped = [m for m in model.modules() if isinstance(m, SwappedAttention)]
    if not swapped:
        raise HFIntegrationError(f"model: no swapped attention layers in {type(model).__name__}; call "
                                 "swap_attention(model, mechanism, compile=True) first")
    decs = [(m.layer_idx, m.decoder) for m in swapped if m.decoder is not None]  # one shared group
    if not decs:
        raise HFIntegrationError("model: its attention was swapped without compile=True; nothing was compiled")
    return {"layers": len(swapped), "compiled": sum(d.compiled for _, d in decs),
            "compile_time_s": sum(d.compile_time_s for _, d in decs), "graphs": sum(d.graphs for _, d in decs),
            "recompiles": decs[0][1].recompiles,  # shared by the layers' wrappers
            "max_rel_err": max(d.max_rel_err for _, d in decs),
            "fallback_reason": decs[0][1].fallback_reason}
