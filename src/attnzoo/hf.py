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
  that this is exactly the mask the model asked for.
- Structured masks are accepted, never dropped: an explicit 4-D ``attention_mask`` (bool, or eager's additive
  0 / -inf) and model-built masks with more structure than causal + padding (a model's own sliding window,
  packed sequences, image blocks). A mechanism that declares its mask (``Mechanism.mask``: ``croc``, ``aki``,
  ``ee_mllm``, ``sliding_window``, ...) runs where the model's mask equals its mask & padding (checked row by row)
  or, on a plain causal/bidirectional model, where its mask lies inside the model's (an approximation that never
  sees a hidden key). The exact ``softmax`` runs any mask exactly: causal + padding fused, the model's own causal
  sliding window through attnzoo's ``sliding_window`` (Gemma-3's local layers), anything else as the dense mask.
  Every other combination raises instead of being computed with a different mask.

      mask = attnzoo.masks.hf_mask(attnzoo.masks.croc(5, 69), 1, n, n)   # (1, 1, n, n) bool
      model.set_attn_implementation(attnzoo.hf.register("croc", visual_start=5, visual_end=69))
      model(input_ids, attention_mask=mask)                                # verified, then three fused calls
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


@dataclass
class DenseMask:
    """An explicit 4-D mask a model handed to the attention function, as bool (B, 1 or H, Nq, Nk), True = attend,
    in the frame of this call's queries and keys (transformers passes a user's 4-D mask through unchanged)."""

    mask: torch.Tensor

    @classmethod
    def of(cls, mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> DenseMask:
        B, nq, nk = q.shape[0], q.shape[2], k.shape[2]
        if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, q.shape[1]) \
                or tuple(mask.shape[2:]) != (nq, nk):
            raise HFIntegrationError(
                f"attention_mask: expected a 4-D mask (B or 1, 1 or heads, Nq, Nk) = ({B}, 1, {nq}, {nk}) for this "
                f"layer's queries and keys, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if not mask.is_floating_point():
                raise HFIntegrationError(
                    f"attention_mask: expected a bool or additive float 4-D mask, got dtype {mask.dtype}")
            keep = mask == 0
            blocked = mask <= torch.finfo(mask.dtype).min / 2  # -inf or the dtype's minimum (transformers' eager form)
            if not bool((keep | blocked).all()):
                raise HFIntegrationError(
                    "attention_mask: this float 4-D mask holds values other than 0 and -inf / the dtype's minimum: it "
                    "is an additive bias, not a mask, and attnzoo will not drop it")
            mask = keep
        return cls(mask.to(q.device).expand(B, *mask.shape[1:]))

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def q_length(self) -> int:
        return self.mask.shape[2]

    @property
    def kv_length(self) -> int:
        return self.mask.shape[3]

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def key_padding_mask(self) -> torch.Tensor | None:
        """(B, Nk): keys no query of the batch row may see, taken as padding (None when every key is seen)."""
        kpm = self.mask.any(dim=1).any(dim=1)  # (B, Nk)
        return None if bool(kpm.all()) else kpm

    def dense(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 or H, R, Nk) bool on query rows ``rows`` (all by default)."""
        return self.mask if rows is None else self.mask[:, :, rows.to(self.mask.device)]


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


def _expected(mask, rows: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
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


def _rows_to_verify(mask, heads: int = 1) -> torch.Tensor:
    n = mask.q_length
    if n * mask.kv_length * heads <= _VERIFY_ALL:
        return torch.arange(n)
    g = torch.Generator().manual_seed(n)
    k = _VERIFY_ROWS // 3
    picks = torch.cat([torch.arange(k), torch.arange(n - k, n), torch.randint(0, n, (k,), generator=g)])
    return picks.unique()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal after broadcasting the head axis (a per-head mask equals a shared one only if every head does)."""
    return a.shape[-2:] == b.shape[-2:] and bool((a == b).all())


def _matches(mask, causal: bool, window: int | None) -> bool:
    rows = _rows_to_verify(mask)
    return _same(mask.dense(rows), _expected(mask, rows, causal, window))


def _declared(mech, options, mask, causal: bool, heads: int, rows: torch.Tensor) -> torch.Tensor:
    """(B, H, R, Nk): the mechanism's declared mask (``Mechanism.mask``) & the padding on query rows ``rows``."""
    pred = mech.mask(mask.q_length, mask.kv_length, causal=causal, heads=heads, kv_heads=None,
                     **mech.resolve_options(options))
    dev = mask.device
    b = torch.arange(mask.batch_size, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=dev).view(1, -1, 1, 1)
    qi = rows.to(dev).view(1, 1, -1, 1)
    kj = torch.arange(mask.kv_length, device=dev).view(1, 1, 1, -1)
    m = pred(b, h, qi, kj).expand(mask.batch_size, heads, rows.numel(), mask.kv_length)
    kpm = mask.key_padding_mask
    return m if kpm is None else m & kpm.view(mask.batch_size, 1, 1, -1)


def _implicit(q: torch.Tensor, k: torch.Tensor, causal: bool) -> HFMask:
    """The mask a model asks for by passing none: causal (bottom-right) or full attention, nothing padded."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    nq, nk = q.shape[2], k.shape[2]
    fn = causal_mask_function if causal else bidirectional_mask_function
    return HFMask(q.shape[0], nq, nk, nk - nq, 0, None, fn, q.device)


def _plan(mech, options, mask, causal: bool, window: int | None, heads: int, layer: object = "?"):
    """(mechanism, options) that computes this layer faithfully, or None for the exact dense mask (softmax only).

    Raises when the mechanism would compute attention under a mask other than the model's."""
    plain = _matches(mask, causal, None)
    windowed = window is not None and not plain and causal and _matches(mask, causal, window)
    if mech.mask is not None and mech.name != "softmax":  # exact softmax honours any mask (below)
        rows = _rows_to_verify(mask, heads)
        mine, asked = _declared(mech, options, mask, causal, heads, rows), mask.dense(rows)
        if _same(mine, asked):
            return mech.name, options  # the model asked for exactly the mechanism's mask (Croc on a Croc mask)
        if (plain or windowed) and not bool((mine & ~asked).any()):
            return mech.name, options  # an approximation inside a plain model's mask: never sees a hidden key
        what = "inside" if plain or windowed else "equal to"
        raise HFIntegrationError(
            f"mechanism {mech.name!r} with options {options}: its mask is not {what} the mask layer {layer} of this "
            f"model asks for (causal={causal}, the model's sliding_window {window}); attnzoo will not compute it with "
            "a different mask. Give the mechanism the options of the model's mask (or pass its 4-D mask), or use "
            "'softmax'.")
    if plain:
        return mech.name, options
    if mech.name == "softmax":
        if windowed:
            return "sliding_window", {"window": window}  # the model's own causal window, exactly, on attnzoo's kernel
        return None
    raise HFIntegrationError(
        f"mechanism {mech.name!r}: layer {layer} of this model asks for a mask that is not causal={causal} + key "
        f"padding (its sliding_window is {window}); attnzoo will not compute it with a different mask. Use a "
        "mechanism whose mask equals or lies inside the model's (attnzoo.masks has the modality masks), or 'softmax'.")


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
        if kwargs.get("softcap") is not None:
            raise HFIntegrationError(
                f"softcap: this model caps attention logits (softcap={kwargs['softcap']}); attnzoo mechanisms do not, "
                "and will not drop it")
        if attention_mask is None:
            if window is not None:
                raise HFIntegrationError(
                    f"attention_mask: layer {getattr(module, 'layer_idx', '?')} has a sliding_window of {window} but "
                    "no mask object; register the mechanism with attnzoo.hf.register so its mask function is used")
            attention_mask = _implicit(query, key, causal)  # no mask: plain causal/bidirectional, nothing padded
        else:
            if isinstance(attention_mask, torch.Tensor):
                attention_mask = DenseMask.of(attention_mask, query, key)
            elif not isinstance(attention_mask, HFMask):
                raise HFIntegrationError(
                    f"attention_mask: expected the attnzoo mask object (register the mechanism with "
                    f"attnzoo.hf.register so the mask function is registered too) or a 4-D mask, got "
                    f"{type(attention_mask).__name__}")
        kpm = attention_mask.key_padding_mask
        plan = _plan(mech, options, attention_mask, causal, window, query.shape[1], getattr(module, "layer_idx", "?"))
        decode = getattr(module, "_attnzoo_decode", None)
        if decode is not None:  # inside SwappedAttention: q/k/v are the new tokens; the state holds the past
            if plan is None or plan[0] != mech.name:  # the model's mask is not the one the state will apply
                raise _mask_error(mech.name, module, causal, window)
            state, new_kpm = decode
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = mech.step(query, key, value, state, scale=scale, key_padding_mask=new_kpm,
                            **mech.resolve_options(options))
        elif plan is None:  # exact softmax under a structured mask: the model's dense mask as given
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = sdpa(query, key, value, attn_mask=attention_mask.dense(), scale=scale)
        else:
            name, opts = plan
            out = attention(query, key, value, mechanism=name, causal=causal, key_padding_mask=kpm, scale=scaling,
                            **opts)
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


# ----------------------------------------------------------------------------------------------------------
# Decoder cross-attention of encoder-decoder models (Whisper, Bart-style): an attnzoo mechanism over the encoder
# output, whose keys/values are projected once into a ContextCache
# ----------------------------------------------------------------------------------------------------------
ENCODER_SOURCE = "encoder"


@functools.cache
def _context_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ContextCacheLayer(DynamicLayer):
        """A transformers cross-attention cache layer holding an attnzoo ``ContextCache``: the encoder output's keys
        and values, projected once; beam reorders and batch selections are applied to it."""

        is_sliding = False

        def __init__(self, context) -> None:
            super().__init__()
            self.context = context
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            raise HFIntegrationError("this cross-attention cache layer holds an attnzoo ContextCache; the swapped "
                                     "cross-attention reads it, nothing appends keys to it")

        def get_seq_length(self) -> int:
            return self.context.length(ENCODER_SOURCE)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.context.length(ENCODER_SOURCE), 0

        def reorder_cache(self, beam_idx) -> None:
            self.context.reorder(beam_idx)

        def batch_select_indices(self, indices) -> None:
            self.context.reorder(indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            b = self.context.batch or 0
            self.context.reorder(torch.arange(b).repeat_interleave(repeats))

        def crop(self, tokens_to_remove: int) -> None:  # the context does not depend on the decoded tokens
            pass

        def reset(self) -> None:
            raise HFIntegrationError("this cache holds attnzoo context caches; start a new cache instead of reset()")

    return ContextCacheLayer


def _encoder_padding(mask, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The key-padding mask of a cross-attention mask (None, an HFMask or a 4-D tensor), refusing any structure
    other than padding (cross-attention masks of these models are padding only)."""
    if mask is None:
        return None
    mask = DenseMask.of(mask, q, k) if isinstance(mask, torch.Tensor) else mask
    if not isinstance(mask, (HFMask, DenseMask)):
        raise HFIntegrationError(f"attention_mask: expected None, a 4-D mask or the attnzoo mask object for "
                                 f"cross-attention, got {type(mask).__name__}")
    kpm = mask.key_padding_mask
    rows = _rows_to_verify(mask)
    if not _same(mask.dense(rows), _expected(mask, rows, False, None)):
        raise HFIntegrationError("attention_mask: this cross-attention mask has more structure than key padding; "
                                 "attnzoo will not drop it")
    return kpm


class SwappedCrossAttention(torch.nn.Module):
    """Wraps a decoder cross-attention module (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``num_heads``,
    ``head_dim``, ``scaling``: Whisper, Bart and kin) so that attention over the encoder output runs an attnzoo
    mechanism. The encoder's keys/values are projected once per encoder output into an attnzoo ``ContextCache``
    kept in the model's cross-attention cache (``EncoderDecoderCache``), and read at every decoding step; without a
    cache (training, one-shot forwards) they are projected for the call."""

    def __init__(self, original: torch.nn.Module, mechanism: str, options: dict[str, Any]) -> None:
        super().__init__()
        self.original = original
        self.mech = registry.get(mechanism)
        self.options = dict(options)
        self.mech.resolve_options(self.options)
        self.layer_idx = getattr(original, "layer_idx", None)

    def _project(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.original
        shape = (states.shape[0], states.shape[1], -1, o.head_dim)
        k = o.k_proj(states).view(shape).transpose(1, 2)  # (B, Hk, M, D)
        v = o.v_proj(states).view(shape).transpose(1, 2)  # (B, Hk, M, D)
        return k, v

    def _context(self, key_value_states, cache, kpm_of):
        from transformers.cache_utils import EncoderDecoderCache

        from .state import ContextCache

        if not isinstance(cache, EncoderDecoderCache):
            if key_value_states is None:
                raise HFIntegrationError("key_value_states: cross-attention needs the encoder output or a cache")
            ctx = ContextCache()
            k, v = self._project(key_value_states)
            ctx.set(ENCODER_SOURCE, k, v, key_padding_mask=kpm_of(k))
            return ctx
        layer_cls = _context_layer_class()
        layers = cache.cross_attention_cache.layers
        while len(layers) <= self.layer_idx:
            layers.append(layer_cls.__base__())
        layer = layers[self.layer_idx]
        if not isinstance(layer, layer_cls):
            if key_value_states is None:
                raise HFIntegrationError(f"cache: layer {self.layer_idx} has no cached context and no encoder output")
            ctx = ContextCache()
            k, v = self._project(key_value_states)  # once per encoder output: every later step reads the cache
            ctx.set(ENCODER_SOURCE, k, v, key_padding_mask=kpm_of(k))
            layers[self.layer_idx] = layer_cls(ctx)
            cache.is_updated[self.layer_idx] = True
            return ctx
        return layer.context

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        o = self.original
        B, T = hidden_states.shape[:2]
        # the module's own order: project, scale the queries, then attend with scale 1 (Whisper keeps this order)
        q = (o.q_proj(hidden_states) * o.scaling).view(B, T, -1, o.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        ctx = self._context(key_value_states, cache, lambda k: _encoder_padding(attention_mask, q, k))
        if ctx.batch != B:
            raise HFIntegrationError(f"cache: its context holds batch {ctx.batch}, the queries batch {B}")
        out = attention(q, ctx.keys(ENCODER_SOURCE), ctx.values(ENCODER_SOURCE), mechanism=self.mech.name,
                        causal=False, key_padding_mask=ctx.mask(ENCODER_SOURCE), scale=1.0,
                        **self.options)  # (B, Hq, T, D)
        ctx.seq_len += T
        out = o.out_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)
        return out, None


def swap_cross_attention(model, mechanism: str = "softmax", **options: Any) -> int:
    """Run ``mechanism`` in every decoder cross-attention (``encoder_attn``) of a transformers encoder-decoder,
    against an attnzoo ``ContextCache`` of the encoder's keys/values (projected once per encoder output, kept in the
    model's ``EncoderDecoderCache``, reordered with beams). ``mechanism`` must be functional and support
    ``noncausal_cross``; ``softmax`` reproduces the model. Returns the number of swapped layers."""
    _require_transformers()
    mech = registry.get(mechanism)
    if not mech.functional or "noncausal_cross" not in mech.patterns:
        raise HFIntegrationError(f"mechanism {mech.name!r}: cross-attention needs a functional mechanism with the "
                                 f"noncausal_cross pattern (it has {list(mech.patterns)})")
    mech.resolve_options(options)
    found = [(parent, child) for parent in model.modules()
             for name, child in parent.named_children() if name == "encoder_attn"]
    if not found:
        raise HFIntegrationError(f"model: found no decoder cross-attention (encoder_attn) in {type(model).__name__}")
    for parent, child in found:
        original = child.original if isinstance(child, SwappedCrossAttention) else child
        for attr in ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scaling", "layer_idx"):
            if not hasattr(original, attr):
                raise HFIntegrationError(f"model: {type(original).__name__} has no {attr}; swap_cross_attention "
                                         "expects Whisper/Bart-style attention modules")
        parent.encoder_attn = SwappedCrossAttention(original, mech.name, options)
    return len(found)
