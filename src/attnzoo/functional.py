"""``attnzoo.attention``: every functional mechanism behind one call."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import registry
from .errors import BACKENDS, check_backend, check_bool, check_key_padding_mask, check_qkv, check_scale

__all__ = ["BACKENDS", "attention", "pattern_of", "select_form"]


def pattern_of(nq: int, nk: int, causal: bool) -> str:
    """The CAB pattern of a functional call: ``self`` when Nq == Nk, ``cross`` otherwise.

    A causal call with Nq < Nk (KV-cache decoding, chunked prefill) is therefore ``causal_cross``: with
    bottom-right alignment the two are the same computation.
    """
    return ("causal_" if causal else "noncausal_") + ("self" if nq == nk else "cross")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mechanism: str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    **options: Any,
) -> torch.Tensor:
    """Attention of ``mechanism`` on SDPA-layout tensors.

    Args:
        q: (B, Hq, Nq, D) queries; k: (B, Hk, Nk, D) keys; v: (B, Hk, Nk, Dv) values; Hq % Hk == 0
            (grouped-query attention: query head h reads key/value head h // (Hq // Hk)).
        mechanism: a registered name or alias (``attnzoo list``); must be functional (no own parameters;
            mechanisms with parameters are built with :func:`attnzoo.build`).
        causal: bottom-right aligned causal mask, query i sees key j iff j <= i + (Nk - Nq).
        key_padding_mask: bool (B, Nk), True = attend. Rows with no visible key return zeros.
        scale: score scale, default 1 / sqrt(D).
        backend: ``"auto"`` (the fast form where it supports the input, else the reference),
            ``"reference"`` or ``"fast"`` (error if the fast form is missing or does not apply).
        **options: the mechanism's options (``attnzoo info NAME`` lists them with their ranges).

    Returns:
        (B, Hq, Nq, Dv) in q's dtype; the empty result for B = 0 or Nq = 0. Nk, D, Dv and the head counts must be
        >= 1 (``ValueError`` otherwise); scale finite and positive; q, k, v and the mask on one device.
    """
    mech = registry.get(mechanism)
    if not mech.functional:
        raise TypeError(
            f"mechanism: {mech.name!r} has its own parameters (kind {mech.kind!r}) and is not a function of "
            f"q, k, v; build it with attnzoo.build({mech.name!r}, dim, heads, ...)"
        )
    B, Hq, Hk, Nq, Nk, D, Dv = check_qkv(q, k, v)
    check_bool("causal", causal)
    check_key_padding_mask(key_padding_mask, B, Nk, device=q.device)
    check_scale(scale)
    check_backend(backend)
    mech.check_pattern(pattern_of(Nq, Nk, causal))
    opts = mech.resolve_options(options)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if B == 0 or Nq == 0:  # nothing to compute: the empty result, as SDPA gives (still differentiable)
        return _empty_result(q, k, v, Dv)
    fn = select_form(mech, backend, q, k, v, causal, key_padding_mask, opts)
    return fn(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **opts)


def _empty_result(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dv: int) -> torch.Tensor:
    """(B, Hq, Nq, Dv) zeros for B = 0 or Nq = 0, connected to q, k, v's graphs (their gradients are zeros)."""
    out = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], dv)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = out + 0 * (q.sum() + k.sum() + v.sum()).nan_to_num()
    return out


def select_form(mech: registry.Mechanism, backend: str, q, k, v, causal, key_padding_mask, opts):
    """The function ``backend`` resolves to for these inputs (see :func:`attention`)."""
    if backend == "reference":
        return mech.reference
    reason = "it has no fast form" if mech.fast is None else None
    if reason is None and mech.fast_supports is not None:
        reason = mech.fast_supports(q, k, v, causal, key_padding_mask, opts)
    if reason is None:
        return mech.fast
    if backend == "fast":
        raise ValueError(f"backend: 'fast' is not available for mechanism {mech.name!r} here: {reason}")
    return mech.reference
