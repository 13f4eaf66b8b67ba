"""Lightning Attention-2: decayed linear attention computed block by block, no cumsum.

Paper: "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention", Qin, Sun,
Li, Shen, Sun, Zhong, arXiv 2405.17381 (the algorithm first appeared as "Lightning Attention-2",
arXiv 2401.04658). Official code: https://github.com/OpenNLPLab/lightning-attention
Computes ``o_t = q_t sum_{s<=t} lambda^(t-s) k_s^T v_s`` with a fixed decay lambda per head, on already
activated q, k, with no softmax and no denominator (TransNormerLLM normalises later with SRMSNorm).
The fast form is the paper's: intra-block ``[(Q_i K_i^T) (.) M] V_i`` plus inter-block ``(Lambda Q_i) KV``,
``KV <- lambda^B KV + (lambda^B Lambda^-1 K_i)^T V_i``, forward and backward by block
(:mod:`attnzoo.kernels.chunked`); decoding keeps the d x d state ``KV``.

Choices where the paper is silent (each an option or a documented convention):
- ``decay``: one float for every head, a sequence of Hk floats in (0, 1] (one per key/value head: the
  decay acts on the key/value state, which grouped-query heads share), or None for the official default
  ``lambda_h = exp(-slope_h)`` with ALiBi's slopes ``slope_h = 2^(-8 (h + 1) / H)`` (H = Hk; the
  non-power-of-two rule of ``_build_slope_tensor``). TransNormerLLM additionally scales the slopes by
  ``1 - l / (L - 1) + 1e-5`` for layer l of L (see ``transnormer``).
- ``scale`` (attnzoo's score scale, default 1/sqrt(D)) multiplies every score q.k; the official kernel has
  none: pass ``scale=1.0`` to reproduce ``lightning_attn_func`` exactly.
- Non-causal patterns exist only at decay 1 (the paper: "noncausal trivial: lambda = 1, no mask"), where
  the result is the global summary ``Q (K^T V)``; a decay < 1 raises there.
- A masked key contributes nothing (its k is zeroed; the official code zeroes v, the same result);
  positions, and so decay distances, still count masked tokens.
- The decay is a constant: the fast form has no gradient for it (a decay tensor that requires grad
  makes ``backend="auto"`` use the reference, which differentiates it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...errors import check_step
from ...reference import acc_dtype, repeat_kv
from ...registry import PATTERNS, Mechanism, Option, register
from ...state import RecurrentState
from .linear_attention import (
    CHUNK_OPTION,
    decay_matrix,
    fast_linear_attention,
    init_linear_state,
    linear_state_step,
)


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes (arXiv 2108.12409), as Lightning Attention and TransNormerLLM build them:
    ``2^(-8 (h + 1) / H)`` for a power-of-two H, interleaved from 2H otherwise."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def default_decay(heads: int) -> torch.Tensor:
    """(heads,) float64: lambda_h = exp(-slope_h) with ALiBi slopes (the official default)."""
    return torch.exp(-torch.tensor(alibi_slopes(heads), dtype=torch.float64))


def resolve_decay(decay, kv_heads: int) -> torch.Tensor | None:
    """The (Hk,) decay tensor for an option value, or None when every head's decay is exactly 1.

    Accepts None (the ALiBi-slope default), a float, a sequence of Hk floats or an (Hk,) tensor, each in
    (0, 1]. A tensor keeps its autograd graph (the reference form differentiates it)."""
    if decay is None:
        return default_decay(kv_heads)
    if isinstance(decay, torch.Tensor):
        t = decay
        if t.dim() == 0:
            t = t.reshape(1).expand(kv_heads)
    elif isinstance(decay, (int, float)) and not isinstance(decay, bool):
        t = torch.full((kv_heads,), float(decay), dtype=torch.float64)
    elif isinstance(decay, Sequence) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in decay):
        t = torch.tensor([float(x) for x in decay], dtype=torch.float64)
    else:
        raise TypeError(f"decay: expected None, a float, a sequence of floats or a tensor, got {decay!r}")
    if t.shape != (kv_heads,):
        raise ValueError(f"decay: expected one value per key/value head ({kv_heads}), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"decay: expected floating-point values, got dtype {t.dtype}")
    d = t.detach()
    if not bool(((d > 0) & (d <= 1)).all()):
        raise ValueError(f"decay: expected values in (0, 1], got {d.tolist()}")
    if bool((d == 1).all()) and not t.requires_grad:
        return None
    return t


def _check_noncausal(causal: bool, decay: torch.Tensor | None) -> None:
    if not causal and decay is not None:
        raise ValueError(
            f"decay: a non-causal lightning attention is defined only at decay 1 (the global summary Q (K^T V)); "
            f"got decay {decay.detach().tolist()}. Pass decay=1.0, or causal=True"
        )


def lightning_reference(q, k, v, *, causal, key_padding_mask, scale, decay, chunk):
    """The readable parallel form, ``O = [(scale Q K^T) (.) D] V`` with ``D_ij = lambda^(p_i - j)`` for keys
    j <= p_i = i + Nk - Nq (bottom-right causal) and 0 after; non-causal only at lambda = 1 (D = 1).

    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) -> (B, Hq, Nq, Dv); O(Nq Nk) memory. A decay tensor
    that requires grad is differentiated through D.
    """
    lam = resolve_decay(decay, k.shape[1])  # (Hk,) or None when every lambda is 1
    _check_noncausal(causal, lam)
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype)
    kk = repeat_kv(k, Hq // Hk).to(acc)  # (B, Hq, Nk, D): query head h reads key/value head h // G
    vv = repeat_kv(v, Hq // Hk).to(acc)  # (B, Hq, Nk, Dv)
    scores = torch.matmul(q.to(acc) * scale, kk.transpose(-1, -2))  # (B, Hq, Nq, Nk): no softmax
    D = decay_matrix(lam, Hq, Nq, Nk, causal, acc, q.device)  # (1, Hq or 1, Nq, Nk)
    scores = scores * D  # (B, Hq, Nq, Nk)
    if key_padding_mask is not None:
        scores = scores * key_padding_mask.view(B, 1, 1, Nk).to(acc)  # a masked key contributes nothing
    return torch.matmul(scores, vv).to(q.dtype)  # (B, Hq, Nq, Dv): no denominator


def lightning_fast(q, k, v, *, causal, key_padding_mask, scale, decay, chunk):
    """Intra-block quadratic + inter-block state, forward and backward by block (no N x N, no cumsum)."""
    lam = resolve_decay(decay, k.shape[1])
    _check_noncausal(causal, lam)
    out = fast_linear_attention(q * scale, k, v, causal=causal, decay=lam, normalize=False, eps=0.0,
                                key_padding_mask=key_padding_mask, chunk=chunk)
    return out.to(q.dtype)


def lightning_fast_supports(q, k, v, causal, key_padding_mask, opts):
    decay = opts.get("decay")
    if isinstance(decay, torch.Tensor) and decay.requires_grad:
        return "the decay requires grad; the chunked kernel treats it as a constant"
    return None


def lightning_init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, decay, chunk):
    return init_linear_state(batch, kv_heads, head_dim, value_dim, normalize=False, dtype=dtype, device=device,
                             head_dim=head_dim)


def lightning_step(q, k, v, state, *, scale, key_padding_mask=None, decay, chunk):
    """``KV <- lambda KV + k^T v``, ``o = q KV`` (one token); a prefill runs the block algorithm."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=RecurrentState)
    lam = resolve_decay(decay, k.shape[1])
    out = linear_state_step(q * scale, k, v, state, decay=lam, normalize=False, eps=0.0,
                            key_padding_mask=key_padding_mask, chunk=chunk)
    return out.to(q.dtype)


DECAY_OPTION = Option(
    "decay", None, (float, list, tuple, torch.Tensor), allow_none=True,
    doc="per key/value-head decay in (0, 1]: a float, Hk floats or an (Hk,) tensor; None = exp(-ALiBi slope)",
)

def _case_options(*, n, side, heads, causal):
    """Benchmark/training cases: non-causal lightning attention exists only without decay (the global summary)."""
    return {} if causal else {"decay": 1.0}

LIGHTNING = register(Mechanism(
    name="lightning",
    case_options=_case_options,
    aliases=("lightning_attention", "lightning_attention_2", "lightning2"),
    family="linear",
    catalog="P028",
    title="Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
    arxiv="2405.17381",
    code="https://github.com/OpenNLPLab/lightning-attention",
    summary="Decayed linear attention q_t sum_s lambda^(t-s) k_s^T v_s by intra-block quadratic + inter-block state.",
    patterns=PATTERNS,
    exact=False,
    state="recurrent",
    complexity="time O(N B d + N d^2), memory O(N (B + d)); decode state O(d^2) per head",
    reference=lightning_reference,
    fast=lightning_fast,
    fast_supports=lightning_fast_supports,
    step=lightning_step,
    init_state=lightning_init_state,
    options=(DECAY_OPTION, CHUNK_OPTION),
    permutation_equivariant=True,
    test_options={"decay": 1.0, "chunk": 3},
    notes="no denominator (normalise afterwards, e.g. SRMSNorm); scores are scale * q.k (scale=1.0 = official kernel); "
          "non-causal patterns need decay 1; conformance runs at decay 1 (the non-causal patterns need it), "
          "tests/mechanisms/linear/test_lightning.py runs the causal checks with decays < 1.",
))
