"""PyTorch's fused ``scaled_dot_product_attention`` with attnzoo's conventions.

SDPA's ``is_causal`` is aligned top-left; attnzoo's causal is bottom-right, so for Nq != Nk an explicit
mask is built. SDPA returns NaN on rows with no visible key; attnzoo returns zeros there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import dense_mask


def has_visible_key(nq: int, nk: int, causal: bool, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, Nq, 1) bool: whether query row i sees at least one key, or None when all rows do."""
    if key_padding_mask is None:
        return None if (not causal or nk >= nq) else (torch.arange(nq) + (nk - nq) >= 0).view(1, 1, nq, 1)
    B = key_padding_mask.shape[0]
    if not causal:
        return key_padding_mask.any(dim=1).view(B, 1, 1, 1).expand(B, 1, nq, 1)
    # The first visible key of each row is the first True of the mask; row i sees keys j <= i + nk - nq.
    idx = torch.arange(nk, device=key_padding_mask.device).expand(B, nk)
    first = torch.where(key_padding_mask, idx, torch.full_like(idx, nk)).amin(dim=1)  # (B,)
    rows = torch.arange(nq, device=key_padding_mask.device) + (nk - nq)  # (Nq,)
    return (first.view(B, 1) <= rows.view(1, nq)).view(B, 1, nq, 1)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
    key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None, scale: float,
) -> torch.Tensor:
    """q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) -> (B, Hq, Nq, Dv); bool masks True = attend."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    gqa = Hq != Hk
    if key_padding_mask is None and attn_mask is None and (not causal or Nq == Nk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    mask = dense_mask(B, Hq, Nq, Nk, causal=causal, key_padding_mask=key_padding_mask,
                      attn_mask=attn_mask, device=q.device)  # (B|1, Hq|1, Nq, Nk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if attn_mask is not None:
        visible = mask.any(dim=-1, keepdim=True)  # (B|1, Hq|1, Nq, 1)
    else:
        visible = has_visible_key(Nq, Nk, causal, key_padding_mask)
    if visible is not None:
        out = torch.where(visible.to(out.device), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def sdpa_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
    key_padding_mask: torch.Tensor | None = None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention that also returns the log-sum-exp of each query row's scaled scores.

    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) -> out (B, Hq, Nq, Dv), lse (B, Hq, Nq) (float32 for
    float32/bf16 inputs, float64 for float64; -inf and out 0 on rows that see no key). CPU: PyTorch's flash kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu``), which computes the LSE anyway and returns it; the
    key-padding mask goes in as a (B, 1, 1, Nk) additive bias, so no (Nq, Nk) tensor is formed unless causal
    with Nq != Nk (bottom-right alignment needs an explicit mask). Other devices: the exact reference."""
    from ..reference import repeat_kv, softmax_attention

    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if q.device.type != "cpu":
        return softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                 return_lse=True)
    k, v = repeat_kv(k, Hq // Hk), repeat_kv(v, Hq // Hk)  # (B, Hq, Nk, D|Dv)
    bias = None
    if key_padding_mask is not None:
        bias = torch.zeros(B, 1, 1, Nk, dtype=q.dtype, device=q.device).masked_fill(
            ~key_padding_mask.view(B, 1, 1, Nk), float("-inf"))  # (B, 1, 1, Nk)
    top_left = causal and Nq == Nk
    if causal and Nq != Nk:
        allowed = dense_mask(B, Hq, Nq, Nk, causal=True, key_padding_mask=key_padding_mask, device=q.device)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, top_left, attn_mask=bias, scale=scale)
    visible = has_visible_key(Nq, Nk, causal, key_padding_mask)
    if visible is not None:
        out = torch.where(visible.to(out.device), out, torch.zeros((), dtype=out.dtype, device=out.device))
        lse = torch.where(visible.squeeze(-1).to(lse.device), lse, torch.full_like(lse, float("-inf")))
    return out, lse
