"""Exact softmax attention, written out: the oracle every mechanism is tested against.

    out = softmax(scale * q k^T + bias, masked) v

computed with explicit matmul and softmax in the dtype of the inputs (pass float64 tensors for
oracles). Supports grouped-query attention (Hq % Hk == 0; query head ``h`` reads key/value head
``h // (Hq // Hk)``, as SDPA's ``enable_gqa`` and Hugging Face's ``repeat_kv``), cross lengths,
bottom-right causal alignment, a key-padding mask, an arbitrary boolean mask and an additive bias.

A query row whose keys are all masked returns zeros (and log-sum-exp ``-inf``), rather than the NaN a
naive softmax gives: a fully padded row carries no information, and zeros merge correctly with other
partial results in :func:`attnzoo.kernels.merge.merge_attention`.
"""

from __future__ import annotations

import math

import torch

from .errors import check_attn_mask, check_key_padding_mask, check_qkv, check_scale, check_tensor

__all__ = ["softmax_attention", "softmax_weights", "one_hot_values", "dense_mask", "repeat_kv"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: low precision (bfloat16, float16) is computed in float32; float32/float64 stay."""
    return torch.promote_types(dtype, torch.float32)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hk, N, D) -> (B, Hk * groups, N, D), each key/value head repeated for its query group."""
    if groups == 1:
        return x
    return x.repeat_interleave(groups, dim=1)  # (B, Hq, N, D)


def dense_mask(
    batch: int, heads: int, nq: int, nk: int, *, causal: bool = False,
    key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """The combined bool mask (B or 1, H or 1, Nq, Nk), True = attend, or None when nothing is masked.

    ``causal`` is bottom-right aligned: query i sees key j iff j <= i + (nk - nq).
    """
    mask = None
    if causal:
        qi = torch.arange(nq, device=device).view(nq, 1)
        kj = torch.arange(nk, device=device).view(1, nk)
        mask = (kj <= qi + (nk - nq)).view(1, 1, nq, nk)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(batch, 1, 1, nk)
        mask = kpm if mask is None else mask & kpm
    if attn_mask is not None:
        am = attn_mask if attn_mask.dim() == 4 else attn_mask.view(1, 1, nq, nk)
        mask = am if mask is None else mask & am
    return mask


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hk, Nk, D); v: (B, Hk, Nk, Dv), Hq % Hk == 0.
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Nk - Nq).
        key_padding_mask: bool (B, Nk), True = attend.
        attn_mask: bool (Nq, Nk) or (B or 1, Hq or 1, Nq, Nk), True = attend.
        bias: additive float scores, same shapes as ``attn_mask``.
        scale: score scale, default 1 / sqrt(D).
        return_lse: also return the log-sum-exp of the scaled scores, (B, Hq, Nq), in float32 or
            the input dtype if wider; ``-inf`` on fully masked rows.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, and lse if asked.
    """
    B, Hq, Hk, Nq, Nk, D, _ = check_qkv(q, k, v)
    check_key_padding_mask(key_padding_mask, B, Nk)
    check_attn_mask(attn_mask, (B, Hq, Nq, Nk))
    check_scale(scale)
    check_attn_mask(bias, (B, Hq, Nq, Nk), name="bias", additive=True)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    # Low-precision inputs are accumulated in float32; float32/float64 stay as they are.
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(acc), repeat_kv(k, Hq // Hk).to(acc), repeat_kv(v, Hq // Hk).to(acc)

    probs, row_max, denom = _probabilities(qf, kf, causal=causal, key_padding_mask=key_padding_mask,
                                           attn_mask=attn_mask, bias=bias, scale=scale)  # (B, Hq, Nq, Nk)
    out = torch.matmul(probs, vf).to(q.dtype)  # (B, Hq, Nq, Dv)
    if not return_lse:
        return out
    lse = (row_max + torch.log(denom)).squeeze(-1)  # (B, Hq, Nq); log(0) = -inf on masked rows
    return out, lse


def _probabilities(qf, kf, *, causal, key_padding_mask, attn_mask, bias, scale):
    """The masked softmax of ``scale q k^T + bias`` on validated, head-repeated tensors in the accumulation dtype:
    (probs (B, Hq, Nq, Nk), row max (B, Hq, Nq, 1), row sum (B, Hq, Nq, 1)); zero rows where every key is masked."""
    B, Hq, Nq, _ = qf.shape
    Nk = kf.shape[2]
    scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale  # (B, Hq, Nq, Nk)
    if bias is not None:
        scores = scores + bias.to(qf.dtype)  # (B, Hq, Nq, Nk)
    mask = dense_mask(B, Hq, Nq, Nk, causal=causal, key_padding_mask=key_padding_mask,
                      attn_mask=attn_mask, device=qf.device)  # (B|1, Hq|1, Nq, Nk) or None
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))

    row_max = scores.amax(dim=-1, keepdim=True)  # (B, Hq, Nq, 1)
    # A fully masked row has max -inf; subtract 0 instead so exp gives exact zeros, not NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)  # (B, Hq, Nq, Nk)
    denom = weights.sum(dim=-1, keepdim=True)  # (B, Hq, Nq, 1)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return weights / safe, row_max, denom  # rows of zeros where everything is masked


def softmax_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The attention matrix :func:`softmax_attention` applies to v: (B, Hq, Nq, Nk) probabilities in float32 or
    q's dtype if wider, same arguments (``softmax_attention(q, k, v, ...) == softmax_weights(q, k, ...) @ v``);
    zero rows where every key is masked. The effective operator of exact and masked-softmax mechanisms
    (:mod:`attnzoo.analysis.operator`). O(Nq Nk) memory: for small inputs."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"k: expected (B, Hk, Nk, D) = ({B}, Hk, Nk, {D}) with Hq={Hq} a multiple of Hk, "
                         f"got {tuple(k.shape)}")
    Hk, Nk = k.shape[1], k.shape[2]
    check_key_padding_mask(key_padding_mask, B, Nk)
    check_attn_mask(attn_mask, (B, Hq, Nq, Nk))
    check_scale(scale)
    check_attn_mask(bias, (B, Hq, Nq, Nk), name="bias", additive=True)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    probs, _, _ = _probabilities(q.to(acc), repeat_kv(k, Hq // Hk).to(acc), causal=causal,
                                 key_padding_mask=key_padding_mask, attn_mask=attn_mask, bias=bias, scale=scale)
    return probs  # (B, Hq, Nq, Nk)


def one_hot_values(k: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, Hk, Nk, Nk) identity values for keys k (B, Hk, Nk, D): value j is the j-th unit vector.

    A form ``out = W(q, k) v`` that is linear in v with weights from q and k only returns its weight matrix W
    (B, Hq, Nq, Nk) when run on these values: the effective operator of a mechanism whose reference forms W
    inline (:mod:`attnzoo.analysis.operator`). O(Nk^2) values: for small inputs."""
    B, Hk, Nk, _ = k.shape
    eye = torch.eye(Nk, dtype=dtype or k.dtype, device=k.device)  # (Nk, Nk)
    return eye.expand(B, Hk, Nk, Nk)
