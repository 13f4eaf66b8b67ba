"""Selective Self-Attention (SSA): softmax attention with a per-query temperature.

Paper: "Selective Attention: Enhancing Transformer through Principled Context Control", Zhang, Chang,
Li, Roy-Chowdhury, Chen, Oymak (NeurIPS 2024), arXiv 2411.12892.
Official code: https://github.com/umich-sota/selective_attention
Each query row's logits are multiplied by an inverse temperature tau_i,
``softmax(tau_i * q_i . k_j / sqrt(d)) v``, so that queries control how sparse their attention is.

Position temperature (confirmed against the official code, ``lit_gpt/gpt_2_PTS.py`` and
``lit_gpt/model_finetune_att.py``): ``tau_pos(i) = 1 + exp(-exp(beta)) * log(i)`` where ``i`` is the
1-based row index and ``beta`` one learned scalar per attention layer (initialised to 1.5 for
pretraining, 2.0 for fine-tuning in the official code).

Choices where the paper/code is silent or unconfirmed (each is an option):
- ``i`` is the number of key positions the query can see, bottom-right aligned: ``q_idx + (Nk - Nq) + 1``
  under ``causal=True`` (so decoding with a KV cache uses the absolute position; the official code
  uses the row index of the current chunk, which is 1 for every decoded token) and ``Nk`` for
  non-causal queries. Padded keys are counted: the temperature depends on position, not content.
- ``per_head``: one beta per head instead of the official one per layer (default False = official).
- ``token_temperature`` (default False; the token-aware part is not in the official code and its exact
  form is unconfirmed): ``tau_tok(x_i) = 1 + tanh(u_h . q_i)``, a weight-shared function of the
  query (d extra parameters per head, zero-initialised so it starts at 1); tau_i = tau_pos * tau_tok.
- ``value_temperature`` (default False, unconfirmed form): values scaled by ``1 + tanh(w_h . v_j)``
  (zero-initialised), which lets a token shrink its own value.

Forms: the reference multiplies the logits by tau explicitly; the fast form feeds ``tau_i * q_i`` to
PyTorch's fused SDPA (identical scores). Decoding keeps a :class:`~attnzoo.state.KVCache` of the
(value-tempered) keys/values. :func:`selective_attention` is the parameter-free core, usable on any
q/k/v with a temperature of your own (e.g. in a pretrained model).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import (
    check_backend,
    check_heads,
    check_key_padding_mask,
    check_pattern_flag,
    check_qkv,
    check_scale,
    check_sequence_call,
)
from ...kernels.sdpa import sdpa
from ...reference import acc_dtype, dense_mask, repeat_kv
from ...registry import PATTERNS, Mechanism, Option, register
from ...state import KVCache
from ._common import masked_softmax, merge_heads, projection_kv_cache, split_heads


def visible_keys(nq: int, nk: int, causal: bool, device=None, dtype=torch.float64) -> torch.Tensor:
    """(Nq,) number of key positions query ``i`` sees: ``i + (Nk - Nq) + 1`` (causal, bottom-right) or
    ``Nk``; clamped to >= 1 (rows that see nothing return zeros anyway)."""
    if causal:
        i = torch.arange(nq, device=device, dtype=dtype) + (nk - nq) + 1  # (Nq,)
        return i.clamp(min=1)
    return torch.full((nq,), float(nk), device=device, dtype=dtype)  # (Nq,)


def position_temperature(strength: torch.Tensor, nq: int, nk: int, causal: bool) -> torch.Tensor:
    """tau_pos = 1 + strength * log(i): strength (H,) or (1,) -> (H or 1, Nq)."""
    i = visible_keys(nq, nk, causal, device=strength.device, dtype=strength.dtype)  # (Nq,)
    return 1 + strength.view(-1, 1) * torch.log(i).view(1, nq)  # (H|1, Nq)


def _check_tau(tau: torch.Tensor, q: torch.Tensor) -> None:
    B, H, N = q.shape[:3]
    if not isinstance(tau, torch.Tensor) or tau.dim() != 3 or tau.shape[0] not in (1, B) or \
            tau.shape[1] not in (1, H) or tau.shape[2] != N:
        got = tuple(tau.shape) if isinstance(tau, torch.Tensor) else type(tau).__name__
        raise ValueError(f"tau: expected per-query temperatures (B or 1, Hq or 1, Nq) = ({B}, {H}, {N}), got {got}")


def selective_attention(q, k, v, *, tau, causal=False, key_padding_mask=None, scale=None):
    """Reference: softmax(tau_i * scale * q_i . k_j) v with the logits multiplied explicitly.

    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), tau (B|1, Hq|1, Nq) -> (B, Hq, Nq, Dv).
    ``causal`` is bottom-right aligned; key_padding_mask (B, Nk) bool, True = attend.
    """
    B, Hq, Hk, Nq, Nk, D, _ = check_qkv(q, k, v)
    check_key_padding_mask(key_padding_mask, B, Nk)
    check_scale(scale)
    _check_tau(tau, q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), repeat_kv(k, Hq // Hk).to(acc), repeat_kv(v, Hq // Hk).to(acc)
    scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale  # (B, Hq, Nq, Nk)
    scores = scores * tau.to(acc).unsqueeze(-1)  # (B, Hq, Nq, Nk): row i scaled by tau_i
    mask = dense_mask(B, Hq, Nq, Nk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    probs = masked_softmax(scores, mask)  # (B, Hq, Nq, Nk)
    return torch.matmul(probs, vf).to(q.dtype)  # (B, Hq, Nq, Dv)


def selective_attention_fast(q, k, v, *, tau, causal=False, key_padding_mask=None, scale=None):
    """Fast form: the temperature folded into the queries, ``sdpa(tau_i q_i, k, v)`` (fused kernel)."""
    B, Hq, Hk, Nq, Nk, D, _ = check_qkv(q, k, v)
    check_key_padding_mask(key_padding_mask, B, Nk)
    check_scale(scale)
    _check_tau(tau, q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qt = q * tau.to(q.dtype).unsqueeze(-1)  # (B, Hq, Nq, D)
    return sdpa(qt, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


class SelectiveAttention(nn.Module):
    """Multi-head attention with SSA temperatures. x (B, N, dim) [, context (B, M, dim)] -> (B, N, dim).

    Parameters: q/k/v/out projections (no bias), ``beta`` (1,) or (heads,) for the position temperature,
    and with the optional token/value temperatures ``u`` (heads, head_dim) and ``w`` (kv_heads, head_dim).
    Decoding: ``state = m.init_state(batch)``; ``out, state = m(x_new, state=state)``.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 position_temperature: bool = True, token_temperature: bool = False,
                 value_temperature: bool = False, per_head: bool = False, beta_init: float = 1.5,
                 backend: str = "auto") -> None:
        super().__init__()
        mech = SELECTIVE_ATTENTION
        self.dim, self.heads, self.kv_heads, self.head_dim = check_heads(
            dim, heads, kv_heads, gqa=True, what=f"mechanism {mech.name!r}")
        self.causal = check_pattern_flag(mech, causal)
        opts = mech.resolve_options(dict(position_temperature=position_temperature,
                                         token_temperature=token_temperature, value_temperature=value_temperature,
                                         per_head=per_head, beta_init=beta_init))
        self.use_position, self.use_token = opts["position_temperature"], opts["token_temperature"]
        self.use_value, self.per_head = opts["value_temperature"], opts["per_head"]
        self.backend = check_backend(backend)
        d, H, Hk = self.head_dim, self.heads, self.kv_heads
        self.q_proj = nn.Linear(self.dim, H * d, bias=False)
        self.k_proj = nn.Linear(self.dim, Hk * d, bias=False)
        self.v_proj = nn.Linear(self.dim, Hk * d, bias=False)
        self.o_proj = nn.Linear(H * d, self.dim, bias=False)
        if self.use_position:
            self.beta = nn.Parameter(torch.full((H if self.per_head else 1,), float(opts["beta_init"])))
        if self.use_token:
            self.u = nn.Parameter(torch.zeros(H, d))  # zero: tau_tok starts at 1
        if self.use_value:
            self.w = nn.Parameter(torch.zeros(Hk, d))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, causal={self.causal}, "
                f"position={self.use_position}, token={self.use_token}, value={self.use_value}")

    def temperature(self, q: torch.Tensor, nk: int, causal: bool) -> torch.Tensor:
        """tau (B|1, H|1, Nq) for queries q (B, H, Nq, d) against Nk keys."""
        B, H, Nq, _ = q.shape
        tau = torch.ones(1, 1, Nq, dtype=q.dtype, device=q.device)  # (1, 1, Nq)
        if self.use_position:
            strength = torch.exp(-torch.exp(self.beta)).to(q.dtype)  # (H|1,)
            tau = tau * position_temperature(strength, Nq, nk, causal).unsqueeze(0)  # (1, H|1, Nq)
        if self.use_token:
            tau = tau * (1 + torch.tanh(torch.einsum("bhnd,hd->bhn", q, self.u.to(q.dtype))))  # (B, H, Nq)
        return tau

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences (causal modules only)."""
        return projection_kv_cache(self, batch_size, dtype, device)

    def forward(self, x, context=None, *, key_padding_mask=None, state=None):
        src = check_sequence_call(self, x, context, key_padding_mask=key_padding_mask, state=state,
                                  state_type=KVCache, mech=SELECTIVE_ATTENTION)
        q = split_heads(self.q_proj(x), self.heads)  # (B, H, N, d)
        k = split_heads(self.k_proj(src), self.kv_heads)  # (B, Hk, M, d)
        v = split_heads(self.v_proj(src), self.kv_heads)  # (B, Hk, M, d)
        if self.use_value:
            v = v * (1 + torch.tanh(torch.einsum("bhnd,hd->bhn", v, self.w.to(v.dtype)))).unsqueeze(-1)
        kpm = key_padding_mask
        if state is not None:
            k, v, kpm = state.append(k, v, key_padding_mask)  # whole cache (B, Hk, L, d)
        causal = self.causal
        tau = self.temperature(q, k.shape[2], causal)  # (B|1, H|1, N)
        fn = selective_attention if self.backend == "reference" else selective_attention_fast
        out = fn(q, k, v, tau=tau, causal=causal, key_padding_mask=kpm, scale=1.0 / math.sqrt(self.head_dim))
        y = self.o_proj(merge_heads(out))  # (B, N, dim)
        return (y, state) if state is not None else y


def build_selective_attention(dim, heads, *, kv_heads=None, causal=False, **options):
    return SelectiveAttention(dim, heads, kv_heads=kv_heads, causal=causal, **options)


SELECTIVE_ATTENTION = register(Mechanism(
    name="selective_attention",
    aliases=("ssa", "selective_self_attention"),
    family="dense",
    catalog="P079",
    title="Selective Attention: Enhancing Transformer through Principled Context Control",
    arxiv="2411.12892",
    code="https://github.com/umich-sota/selective_attention",
    summary="Softmax attention with a learned per-query inverse temperature: 1 + exp(-exp(beta)) log(i) "
            "by position (optional token and value temperatures).",
    patterns=PATTERNS,
    exact=False,
    state="kv",
    complexity="time O(Nq Nk d), memory O(Nq + Nk) fused (O(Nq Nk) reference); decode state O(N)",
    module=build_selective_attention,
    fast=selective_attention_fast,
    options=(
        Option("position_temperature", True, bool, doc="tau_pos(i) = 1 + exp(-exp(beta)) log(i) (official)"),
        Option("token_temperature", False, bool, doc="tau_tok = 1 + tanh(u_h . q_i) (form unconfirmed)"),
        Option("value_temperature", False, bool, doc="v_j *= 1 + tanh(w_h . v_j) (form unconfirmed)"),
        Option("per_head", False, bool, doc="one beta per head (official: one per layer)"),
        Option("beta_init", 1.5, float, low=-20.0, high=20.0,
               doc="initial beta (official: 1.5 pretrain, 2.0 finetune)"),
    ),
    test_options={"token_temperature": True, "value_temperature": True, "per_head": True, "beta_init": -1.0},
    notes="exact=False: equals softmax attention only with every temperature at 1 (beta -> inf). "
          "i counts the key positions a query sees (bottom-right causal), so KV-cache decoding is consistent.",
))
