"""Hugging Face transformers integration: any functional attnzoo mechanism inside a pretrained model.

    import attnzoo.hf
    name = attnzoo.hf.register("sliding_window", window=512)          # -> "attnzoo:sliding_window(window=512)"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    # or, on a loaded model: model.set_attn_implementation(name)

What this does that a bare ``AttentionInterface.register`` does not:

- It always registers a matching *mask function* with the attention function. transformers' own mask
  functions return ``None`` for a plain causal batch and a dense (B, 1, Nq, Nk) tensor otherwise; an
  attention function that only looks at ``attention_mask`` silently loses padding or causality. attnzoo's
  mask function returns an :class:`HFMask` that keeps the padding mask and the model's mask predicate; the
  attention function turns it into attnzoo's contract (``causal`` + ``key_padding_mask``) and *checks*
  that this is exactly the mask the model asked for. A layer whose mask has more structure (a model's own
  sliding window, packed sequences, prefix blocks) raises instead of being computed wrongly -- except for
  the exact ``softmax`` mechanism, which then applies the model's dense mask as given.
- Grouped key/value heads are passed through (attnzoo handles Hq % Hk == 0 natively; no repeat_kv).
- The output is returned in the layout transformers expects, (B, Nq, Hq, Dv).

Mechanisms with their own parameters or recurrent state do not fit the function interface; they are
swapped in as modules with :func:`swap_attention`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from . import registry
from .functional import attention
from .kernels.sdpa import sdpa

PREFIX = "attnzoo:"
# Masks up to this many (query x key) entries are verified exhaustively; longer ones on sampled rows.
_VERIFY_ALL = 1 << 24
_VERIFY_ROWS = 96


class HFIntegrationError(ValueError):
    """A model/mechanism combination attnzoo cannot run faithfully."""


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("attnzoo.hf needs transformers: pip install 'attnzoo[hf]'") from e


@dataclass
class HFMask:
    """The mask transformers asked for, kept compact: padding (B, kv_offset + Nk) bool or None, the model's
    mask predicate over absolute positions, and the query/key position ranges."""

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    padding: torch.Tensor | None
    mask_function: Any
    device: torch.device

    @property
    def key_padding_mask(self) -> torch.Tensor | None:
        """(B, Nk) bool for the keys of this call, or None when nothing is padded."""
        if self.padding is None:
            return None
        kpm = self.padding[:, self.kv_offset : self.kv_offset + self.kv_length].to(torch.bool)
        return None if bool(kpm.all()) else kpm

    def dense(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, R, Nk) bool: the model's mask on query rows ``rows`` (all rows by default)."""
        b = torch.arange(self.batch_size, device=self.device).view(-1, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=self.device)
        r = torch.arange(self.q_length, device=self.device) if rows is None else rows.to(self.device)
        qi = (r + self.q_offset).view(1, 1, -1, 1)
        kj = (torch.arange(self.kv_length, device=self.device) + self.kv_offset).view(1, 1, 1, -1)
        m = self.mask_function(b, h, qi, kj)
        if self.padding is not None:
            pad = self.padding.to(torch.bool)
            m = m & pad[b, kj]
        return m.expand(self.batch_size, 1, r.numel(), self.kv_length)


def attnzoo_mask_function(batch_size: int, q_length: int | None = None, kv_length: int | None = None,
                          q_offset: int = 0, kv_offset: int = 0, mask_function=None,
                          attention_mask: torch.Tensor | None = None, device: torch.device | str | None = None,
                          cache_position: torch.Tensor | None = None, **kwargs) -> HFMask:
    """transformers mask interface: returns an :class:`HFMask` instead of materializing (B, 1, Nq, Nk).

    transformers 5.x passes ``q_length``/``q_offset``; 4.56 - 4.57 pass ``cache_position``, the (Nq,) absolute
    positions of the queries (consecutive in every call transformers makes; anything else is refused)."""
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function as mask_function
    if q_length is None:
        if cache_position is None:
            raise HFIntegrationError("mask function: transformers passed neither q_length nor cache_position")
        q_length = int(cache_position.shape[0])
        q_offset = int(cache_position[0]) if q_length else 0
        expected = torch.arange(q_offset, q_offset + q_length, device=cache_position.device)
        if not torch.equal(cache_position.to(expected.dtype), expected):
            raise HFIntegrationError(
                f"cache_position: expected consecutive query positions, got {cache_position.tolist()[:8]}...")
        device = cache_position.device if device is None else device
    padding = attention_mask
    if padding is not None:
        padding = padding.to(torch.bool)
        missing = kv_length + kv_offset - padding.shape[-1]
        if missing > 0:  # transformers pads the 2-D mask with False in the same situation
            padding = torch.nn.functional.pad(padding, (0, missing), value=False)
    return HFMask(batch_size, q_length, kv_length, q_offset, kv_offset, padding, mask_function,
                  torch.device(device if device is not None else "cpu"))


def _expected(mask: HFMask, rows: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """What attnzoo will compute for ``rows``: causal (bottom-right) & padding (& the model's window)."""
    nq, nk = mask.q_length, mask.kv_length
    i = rows.view(1, 1, -1, 1).to(mask.device)
    j = torch.arange(nk, device=mask.device).view(1, 1, 1, -1)
    ok = torch.ones(1, 1, rows.numel(), nk, dtype=torch.bool, device=mask.device)
    if causal:
        ok = ok & (j <= i + (nk - nq))
    if window is not None:
        ok = ok & (i + (nk - nq) - j < window)
    kpm = mask.key_padding_mask
    if kpm is not None:
        ok = ok & kpm.view(mask.batch_size, 1, 1, nk)
    return ok.expand(mask.batch_size, 1, rows.numel(), nk)


def _rows_to_verify(mask: HFMask) -> torch.Tensor:
    n = mask.q_length
    if n * mask.kv_length <= _VERIFY_ALL:
        return torch.arange(n)
    g = torch.Generator().manual_seed(n)
    k = _VERIFY_ROWS // 3
    picks = torch.cat([torch.arange(k), torch.arange(n - k, n), torch.randint(0, n, (k,), generator=g)])
    return picks.unique()


def _matches(mask: HFMask, causal: bool, window: int | None) -> bool:
    rows = _rows_to_verify(mask)
    return bool(torch.equal(mask.dense(rows), _expected(mask, rows, causal, window)))


def _make_attention_function(mechanism: str, options: dict[str, Any]):
    mech = registry.get(mechanism)

    def attnzoo_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """query (B, Hq, Nq, D), key (B, Hk, Nk, D), value (B, Hk, Nk, Dv) -> ((B, Nq, Hq, Dv), None)."""
        if dropout and module.training:
            raise HFIntegrationError(
                f"dropout: attnzoo mechanisms do not apply attention dropout, got dropout={dropout} in training; "
                "set the model's attention_dropout to 0")
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))  # the model's own window
        if attention_mask is None:
            kpm, ok = None, window is None  # no mask object: plain causal/bidirectional, nothing padded
        elif isinstance(attention_mask, HFMask):
            kpm = attention_mask.key_padding_mask
            ok = _matches(attention_mask, causal, None)
            if not ok and window is not None and _matches(attention_mask, causal, window):
                ok = "window"
        else:
            raise HFIntegrationError(
                f"attention_mask: expected the attnzoo mask object (register the mechanism with "
                f"attnzoo.hf.register so the mask function is registered too), got {type(attention_mask).__name__}")
        inside_window = ok == "window" and mech.name in ("sliding_window", "sink_window") and options.get(
            "window", registry.get(mech.name).resolve_options({})["window"]) <= window  # ours lies inside the model's
        decode = getattr(module, "_attnzoo_decode", None)
        if decode is not None:  # inside SwappedAttention: q/k/v are the new tokens; the state holds the past
            if not (ok is True or inside_window):
                raise _mask_error(mech.name, module, causal, window)
            state, new_kpm = decode
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = mech.step(query, key, value, state, scale=scale, key_padding_mask=new_kpm,
                            **mech.resolve_options(options))
        elif ok is True or inside_window:
            out = attention(query, key, value, mechanism=mech.name, causal=causal, key_padding_mask=kpm,
                            scale=scaling, **options)
        elif mech.name == "softmax" and isinstance(attention_mask, HFMask):
            dense = attention_mask.dense()  # (B, 1, Nq, Nk): exact attention honours any mask as given
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = sdpa(query, key, value, attn_mask=dense, scale=scale)
        else:
            raise _mask_error(mech.name, module, causal, window)
        return out.transpose(1, 2).contiguous(), None

    attnzoo_attention.__name__ = f"attnzoo_{mech.name}"
    return attnzoo_attention


def _mask_error(name: str, module, causal: bool, window) -> HFIntegrationError:
    return HFIntegrationError(
        f"mechanism {name!r}: layer {getattr(module, 'layer_idx', '?')} of this model asks for a mask that is not "
        f"causal={causal} + key padding (its sliding_window is {window}); attnzoo will not compute it with a "
        "different mask. Use a mechanism whose pattern contains the model's, or 'softmax'.")


def implementation_name(mechanism: str, **options: Any) -> str:
    mech = registry.get(mechanism)
    opts = mech.resolve_options(options)
    given = {k: v for k, v in opts.items() if k in options}
    suffix = "(" + ",".join(f"{k}={v}" for k, v in sorted(given.items())) + ")" if given else ""
    return f"{PREFIX}{mech.name}{suffix}"


def register(mechanism: str, **options: Any) -> str:
    """Register ``mechanism`` (with ``options``) and its mask function with transformers.

    Returns the ``attn_implementation`` name to use, ``"attnzoo:<name>"`` or
    ``"attnzoo:<name>(opt=value,...)"`` when options are given. Only functional mechanisms (no own
    parameters) fit; others raise and point to :func:`swap_attention`.
    """
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    mech = registry.get(mechanism)
    if not mech.functional:
        raise HFIntegrationError(
            f"mechanism {mech.name!r} has its own parameters (kind {mech.kind!r}); use "
            f"attnzoo.hf.swap_attention(model, {mech.name!r}, ...) instead of an attention function")
    mech.resolve_options(options)  # validate now, not at the first forward
    name = implementation_name(mech.name, **options)
    AttentionInterface.register(name, _make_attention_function(mech.name, dict(options)))
    AttentionMaskInterface.register(name, attnzoo_mask_function)
    return name


def register_all() -> list[str]:
    """Register every functional mechanism with its default options; returns their names."""
    return [register(m.name) for m in registry.mechanisms() if m.functional]


# ----------------------------------------------------------------------------------------------------------
# Module swapping: attnzoo decode states inside generate(), and mechanisms with their own parameters
# ----------------------------------------------------------------------------------------------------------
# transformers renamed the cache argument of attention modules and models: ``past_key_value`` (< 4.56),
# ``past_key_values`` (4.56 - 5.23), ``cache`` (5.24 on; the older names are deprecated aliases until 5.40).
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def cache_argument(model) -> str:
    """The name under which ``model.forward`` (a transformers model or module) takes its key/value cache in the
    installed transformers: ``"cache"`` (5.24 on) or ``"past_key_values"`` (older)."""
    import inspect

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
    go through the model's projections, positional encoding and the attnzoo attention function."""

    def __init__(self, original: torch.nn.Module, mechanism: str, options: dict[str, Any]) -> None:
        super().__init__()
        self.original = original
        self.mech = registry.get(mechanism)
        self.options = self.mech.resolve_options(options)
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
        self.original._attnzoo_decode = (layer.state, _new_token_padding(attention_mask, hidden_states.shape[1]))
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


def swap_attention(model, mechanism: str, **options: Any):
    """Run ``mechanism`` in every self-attention layer of a transformers decoder, with its own decode state.

    Functional mechanisms with a decode step (``sliding_window``, ``sink_window``, linear attention, ...)
    keep the model's pretrained projections and positional encoding; during ``generate`` their state (a
    bounded window cache, a recurrent state) replaces the model's full KV cache: each layer of the model's
    cache object becomes an ``AttnzooCacheLayer`` holding the state, which answers lengths and mask sizes
    and takes beam reorders and crops. Mechanisms without a causal decode form raise.
    Returns the implementation name set on the model.
    """
    _require_transformers()
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
    for parent, attr, module in layers:
        setattr(parent, attr, SwappedAttention(module, mech.name, options))
    model.set_attn_implementation(name)
    return name
