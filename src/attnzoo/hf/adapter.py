"""A functional attnzoo mechanism as a transformers attention implementation: ``register`` (an attention function and
a mask function under ``attnzoo:<mechanism>(<options>)``), the mask objects the mask function returns, and the
verification that each layer's mask is one the mechanism computes (never dropped)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import registry
from ..functional import attention
from ..kernels.sdpa import sdpa

PREFIX = "attnzoo:"
# Masks up to this many (query x key) entries are verified exhaustively; longer ones on sampled rows.
_VERIFY_ALL = 1 << 24
_VERIFY_ROWS = 96


class HFIntegrationError(ValueError):
    """A model/mechanism combination attnzoo cannot run faithfully."""


def require_transformers():
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


def expected_mask_rows(mask, rows: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
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


def rows_to_verify(mask, heads: int = 1) -> torch.Tensor:
    n = mask.q_length
    if n * mask.kv_length * heads <= _VERIFY_ALL:
        return torch.arange(n)
    g = torch.Generator().manual_seed(n)
    k = _VERIFY_ROWS // 3
    picks = torch.cat([torch.arange(k), torch.arange(n - k, n), torch.randint(0, n, (k,), generator=g)])
    return picks.unique()


def same_mask(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal after broadcasting the head axis (a per-head mask equals a shared one only if every head does)."""
    return a.shape[-2:] == b.shape[-2:] and bool((a == b).all())


def _matches(mask, causal: bool, window: int | None) -> bool:
    rows = rows_to_verify(mask)
    return same_mask(mask.dense(rows), expected_mask_rows(mask, rows, causal, window))


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
        rows = rows_to_verify(mask, heads)
        mine, asked = _declared(mech, options, mask, causal, heads, rows), mask.dense(rows)
        if same_mask(mine, asked):
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
            state, new_kpm, decoder = decode
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            if decoder is not None and query.shape[2] == 1:  # swap_attention(compile=True): one token, compiled
                out, _ = decoder(query, key, value, state=state, scale=scale, key_padding_mask=new_kpm)
            else:  # the prompt (several tokens) and eager decoding
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
    require_transformers()
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
