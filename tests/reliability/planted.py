"""Broken mechanisms for tests/reliability/test_reliability_planted.py: each has one bug a reliability probe must
catch. Not a test module (registers nothing on import): call ``register_all()`` / ``unregister_all()``."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import torch
from torch import nn

from attnzoo import registry
from attnzoo.mechanisms.core.softmax import init_kv_cache, softmax_reference, softmax_step
from attnzoo.state import KVCache


def nan_rows_reference(q, k, v, *, causal, key_padding_mask, scale):
    """Plain softmax with -inf masking and no guard: a row with no visible key is 0/0 = NaN."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk), Hq == Hk in these tests
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def nan_hiding_reference(q, k, v, *, causal, key_padding_mask, scale):
    """Correct softmax attention, then NaNs replaced by zeros: a NaN in the input disappears."""
    return softmax_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale).nan_to_num()


def loose_step(q, k, v, state, *, scale, key_padding_mask=None):
    """A step without check_step: it reads any mask as 0/1 weights on the new keys (a float mask passes)."""
    w = None if key_padding_mask is None else key_padding_mask.to(k.dtype)
    keys, values, _ = state.append(k if w is None else k * w[:, None, :, None], v)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=scale, is_causal=False,
                                                            enable_gqa=True)


class ForgetfulCache(KVCache):
    """A KV cache whose crop moves the position back but keeps the dropped keys."""

    def crop(self, length: int) -> None:
        self.seq_len = self._check_crop(length)


def forgetful_init(*, batch, kv_heads, head_dim, value_dim, dtype, device):
    return ForgetfulCache(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)


class FPELayer(nn.Module):
    """A module that validates nothing and dies with SIGFPE on an empty sequence (as an integer division by zero
    in a C kernel does)."""

    def __init__(self, dim, heads, *, kv_heads=None, causal=False):
        super().__init__()
        self.dim, self.causal = dim, causal
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, *, key_padding_mask=None, state=None):
        if x.shape[1] == 0:
            os.kill(os.getpid(), signal.SIGFPE)
        return self.proj(x)


class LooseSourcesLayer(nn.Module):
    """A two-source cross-attention layer that validates nothing of its sources: a float per-source mask is read as
    0/1 weights (accepted silently), a list source crashes inside."""

    def __init__(self, dim, heads, *, kv_heads=None, causal=False):
        super().__init__()
        self.dim = dim
        self.proj = nn.ModuleDict({n: nn.Linear(dim, dim) for n in ("text", "image")})

    def forward(self, x, context=None, *, key_padding_mask=None, state=None):
        out = x
        for name, c in context.items():
            kv = self.proj[name](c)  # (B, M, dim)
            s = x @ kv.transpose(1, 2)  # (B, N, M)
            m = (key_padding_mask or {}).get(name)
            if m is not None:
                s = s.masked_fill(~m.bool()[:, None, :], float("-inf"))
            out = out + torch.softmax(s, -1) @ kv
        return out


def _record(name, **kw):
    base = dict(name=name, family="core", title="planted bug", arxiv="0000.00000", code="-", summary="test only",
                patterns=registry.PATTERNS, exact=True, complexity="-", reference=softmax_reference)
    return registry.Mechanism(**{**base, **kw})


RECORDS = [
    _record("_planted_nan_rows", patterns=("noncausal_self",), reference=nan_rows_reference,
            test_sizes={"kv_heads": 4}),
    _record("_planted_hides_nan", reference=nan_hiding_reference),
    _record("_planted_loose_step", step=loose_step, init_state=init_kv_cache, state="kv"),
    _record("_planted_forgetful", step=softmax_step, init_state=forgetful_init, state="kv"),
    _record("_planted_fpe", patterns=("noncausal_self",), reference=None, module=FPELayer, exact=False),
    _record("_planted_loose_sources", patterns=("noncausal_cross",), reference=None, module=LooseSourcesLayer,
            exact=False, cross=registry.CrossSpec(sources=("text", "image"))),
    # Croc without its decode_prefill: the probes then decode its visual span token by token, which Croc refuses
    replace(registry.get("croc"), name="_planted_croc_no_prefill", aliases=(), decode_prefill=None),
]


def register_all() -> None:
    for rec in RECORDS:
        if rec.name not in registry._REGISTRY:
            registry.register(rec)


def unregister_all() -> None:
    for rec in RECORDS:
        if rec.name in registry._REGISTRY:
            registry.unregister(rec.name)
