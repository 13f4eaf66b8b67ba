"""iLLaMA soft mask: attention that moves from bidirectional to causal during training.

Paper: "Adapting LLaMA Decoder to Vision Transformer", Wang, Shao, Chen, Wu, Liu, Wu, Zhang, Zhang, Chen,
Luo, arXiv 2404.06773. Official code: https://github.com/techmonsterwang/iLLaMA
A causal ViT (post-sequence class token, read from the last row) is trained with a mask
``M = rate * 1 + (1 - rate) * T`` (T the lower triangle) whose ``rate`` is scheduled from 1
(bidirectional) to 0 (causal) over the first epochs (constant-then-0 or linear; ``soft_mask_schedule``).

Confirmed against the official code (``models/illama.py``, ``mask_scheduler.py``): the mask multiplies the
attention probabilities AFTER a softmax over all keys and rows are not renormalised,
``A = softmax(S) * M`` (``form="official"``, the default). Consequence, stated plainly: at rate 0 this
is softmax(S) * T, NOT causal softmax attention -- the normaliser still sums over future keys, so outputs
depend on future tokens (harmless for the classifier, whose last row sees everything, but it is not a
causal mechanism and cannot decode with a KV cache). ``form="mixture"`` is the renormalised reading,
``A = rate * softmax(S) + (1 - rate) * softmax(S + causal mask)``, whose rate-0 end is exact causal
attention. Both forms give the bidirectional row on the last (class-token) row for every rate.

``causal=True`` composes the hard causal mask with the soft mask: the soft mask only differs from the
causal one on future keys, which the hard mask removes, so every rate then gives exact causal softmax
attention (the trained causal model); that is the decodable pattern (KV cache). Triangles are
bottom-right aligned (query i sits at key position i + Nk - Nq). Key padding removes keys from every
softmax; rows with no visible key return zeros.

Forms: reference = dense probabilities; fast = fused kernels: ``mixture`` as two SDPA calls, ``official``
as PyTorch's CPU flash-attention kernel run with and without the causal mask and combined through the
two rows' log-sum-exps, ``rate * O_full + (1 - rate) * exp(lse_causal - lse_full) * O_causal``, with a
hand-written backward (no N x N tensor is stored).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import check_int, check_step
from ...kernels.sdpa import has_visible_key, sdpa
from ...reference import acc_dtype, dense_mask, repeat_kv
from ...registry import Mechanism, Option, register
from ...state import KVCache
from ._common import masked_softmax

FORMS = ("official", "mixture")


def soft_mask_probs(scores: torch.Tensor, *, rate: float, form: str, causal: bool,
                    key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """The soft-masked attention matrix from scaled scores (B, H, Nq, Nk) (readable definition)."""
    B, H, Nq, Nk = scores.shape
    full = dense_mask(B, H, Nq, Nk, causal=causal, key_padding_mask=key_padding_mask, device=scores.device)
    tri = dense_mask(B, H, Nq, Nk, causal=True, key_padding_mask=key_padding_mask, device=scores.device)
    p_full = masked_softmax(scores, full)  # (B, H, Nq, Nk)
    if form == "official":
        T = dense_mask(1, 1, Nq, Nk, causal=True, device=scores.device).to(scores.dtype)  # (1, 1, Nq, Nk)
        return p_full * (rate + (1 - rate) * T)  # post-softmax multiplicative mask, rows not renormalised
    return rate * p_full + (1 - rate) * masked_softmax(scores, tri)  # (B, H, Nq, Nk)


def illama_soft_mask_reference(q, k, v, *, causal, key_padding_mask, scale, rate, form):
    """Explicit scores, both softmaxes and the soft mask. q (B,Hq,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv)."""
    Hq, Hk = q.shape[1], k.shape[1]
    acc = acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), repeat_kv(k, Hq // Hk).to(acc), repeat_kv(v, Hq // Hk).to(acc)
    scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale  # (B, Hq, Nq, Nk)
    probs = soft_mask_probs(scores, rate=rate, form=form, causal=causal, key_padding_mask=key_padding_mask)
    return torch.matmul(probs, vf).to(q.dtype)  # (B, Hq, Nq, Dv)


# -------------------------------------------------------------------------------------------------------
# Fast forms
# -------------------------------------------------------------------------------------------------------
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _PostSoftmaxSoftMask(torch.autograd.Function):
    """O = rate * P_full V + (1 - rate) * (P_full * T) V without materialising P.

    (P_full * T) V = w * O_causal with w = exp(lse_causal - lse_full). q, k, v (B, H, N, S) share head
    count and head size S; v's column ``dv`` is zero (used to carry the log-sum-exp gradient).
    """

    @staticmethod
    def forward(ctx, q, k, v, rate, full_mask, tri_mask, vis_tri, dv, scale):
        o_f, l_f = _flash(q, k, v, 0.0, False, attn_mask=full_mask, scale=scale)  # (B,H,N,S), (B,H,N)
        tri_causal = tri_mask is None
        o_c, l_c = _flash(q, k, v, 0.0, tri_causal, attn_mask=tri_mask, scale=scale)
        w = torch.exp(l_c - l_f)  # (B, H, N) float32/64
        if vis_tri is not None:
            w = torch.where(vis_tri, w, torch.zeros((), dtype=w.dtype))  # rows that see no earlier key
        w = w.to(q.dtype).unsqueeze(-1)  # (B, H, N, 1)
        out = rate * o_f + (1 - rate) * w * o_c  # (B, H, N, S)
        ctx.save_for_backward(q, k, v, out, l_f, l_c, w, full_mask, tri_mask)
        ctx.rate, ctx.dv, ctx.scale, ctx.tri_causal = rate, dv, scale, tri_causal
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, l_f, l_c, w, full_mask, tri_mask = ctx.saved_tensors
        rate, dv, scale = ctx.rate, ctx.dv, ctx.scale
        g = g.contiguous()
        # dS = P_f * M * (g v_j) - P_f (g . O_i). Full part: P_f (rate g v_j - g . O_i), sent through the flash
        # backward with grad_out = [rate g | c] and out = [0 | 1] in the spare value column, so D_i = c_i.
        c = (g * out).sum(-1)  # (B, H, N)
        g_full = rate * g
        g_full[..., dv] = c
        fake_out = torch.zeros_like(out)
        fake_out[..., dv] = 1
        dq, dk, dvv = _flash_bwd(g_full, q, k, v, fake_out, l_f, 0.0, False, attn_mask=full_mask, scale=scale)
        # Causal part: (1 - rate) w P_c (g v_j), i.e. grad_out (1 - rate) w g with D_i = 0.
        g_tri = ((1 - rate) * w * g).contiguous()
        dq2, dk2, dv2 = _flash_bwd(g_tri, q, k, v, torch.zeros_like(out), l_c, 0.0, ctx.tri_causal,
                                   attn_mask=tri_mask, scale=scale)
        return dq + dq2, dk + dk2, dvv + dv2, None, None, None, None, None, None


def _official_fast(q, k, v, *, key_padding_mask, scale, rate):
    B, Hq, N, D = q.shape
    if k.shape[2] != N:
        raise ValueError(f"k: the official soft mask is self attention (Nk == Nq = {N}), got Nk = {k.shape[2]}")
    Dv = v.shape[-1]
    k, v = repeat_kv(k, Hq // k.shape[1]), repeat_kv(v, Hq // v.shape[1])  # (B, Hq, N, .)
    S = max(D, Dv + 1)
    qp = F.pad(q, (0, S - D)).contiguous()  # (B, Hq, N, S); zero columns leave scores unchanged
    kp = F.pad(k, (0, S - D)).contiguous()
    vp = F.pad(v, (0, S - Dv)).contiguous()  # column Dv stays zero
    full_mask = tri_mask = vis_tri = None
    if key_padding_mask is not None:
        neg = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        full_mask = torch.where(key_padding_mask.view(B, 1, 1, N), zero, neg).expand(B, 1, N, N).contiguous()
        tri = dense_mask(B, 1, N, N, causal=True, key_padding_mask=key_padding_mask, device=q.device)
        tri_mask = torch.where(tri, zero, neg).contiguous()  # (B, 1, N, N)
        vis_tri = has_visible_key(N, N, True, key_padding_mask).view(B, 1, N)  # (B, 1, N)
    out = _PostSoftmaxSoftMask.apply(qp, kp, vp, float(rate), full_mask, tri_mask, vis_tri, Dv, scale)
    return out[..., :Dv]


def illama_soft_mask_fast(q, k, v, *, causal, key_padding_mask, scale, rate, form):
    """Fused kernels: exact causal attention under ``causal=True``; otherwise two fused passes."""
    if causal or (rate == 0.0 and form == "mixture"):
        return sdpa(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale)
    if rate == 1.0:
        return sdpa(q, k, v, causal=False, key_padding_mask=key_padding_mask, scale=scale)
    if form == "mixture":
        o_f = sdpa(q, k, v, causal=False, key_padding_mask=key_padding_mask, scale=scale)
        o_c = sdpa(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale)
        return rate * o_f + (1 - rate) * o_c
    return _official_fast(q, k, v, key_padding_mask=key_padding_mask, scale=scale, rate=rate)


def illama_fast_supports(q, k, v, causal, key_padding_mask, options):
    if causal or options["form"] == "mixture" or options["rate"] == 1.0:
        return None
    if _flash is None or _flash_bwd is None:
        return "this PyTorch has no CPU flash-attention op (needed for the official post-softmax mask)"
    if q.device.type != "cpu":
        return f"the official-form fast path uses the CPU flash kernel; got device {q.device.type}"
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return f"the CPU flash kernel does not take dtype {q.dtype}"
    return None


# -------------------------------------------------------------------------------------------------------
# Decoding and the training schedule
# -------------------------------------------------------------------------------------------------------
def init_kv_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device, rate, form):
    return KVCache(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device)


def illama_soft_mask_step(q, k, v, state: KVCache, *, scale, rate, form, key_padding_mask=None):
    """Decode T >= 1 tokens: causal softmax attention over the cache (the trained causal model)."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=KVCache)
    keys, values, mask = state.append(k, v, key_padding_mask)  # (B, Hk, L, D), (B, Hk, L, Dv), (B, L)
    return sdpa(q, keys, values, causal=True, key_padding_mask=mask, scale=scale)


def soft_mask_schedule(epochs: int, steps_per_epoch: int, cutoff_epochs: int, schedule: str = "linear",
                       start: float = 1.0) -> np.ndarray:
    """Per-step soft-mask rate, as the official ``mask_scheduler`` ("soft" mode): for the first
    ``cutoff_epochs`` the rate is ``start`` (``"constant"``) or falls linearly from ``start`` to 0
    (``"linear"``); afterwards it is 0 (causal). Official recipes: tiny constant/50 epochs, base linear/25."""
    for name, val, low in (("epochs", epochs, 1), ("steps_per_epoch", steps_per_epoch, 1),
                           ("cutoff_epochs", cutoff_epochs, 0)):
        check_int(name, val, low=low)
    if cutoff_epochs > epochs:
        raise ValueError(f"cutoff_epochs: expected <= epochs ({epochs}), got {cutoff_epochs}")
    if schedule not in ("constant", "linear"):
        raise ValueError(f"schedule: expected 'constant' or 'linear', got {schedule!r}")
    if not 0.0 <= float(start) <= 1.0:
        raise ValueError(f"start: expected a float in [0, 1], got {start!r}")
    early = cutoff_epochs * steps_per_epoch
    late = (epochs - cutoff_epochs) * steps_per_epoch
    head = np.full(early, float(start)) if schedule == "constant" else np.linspace(float(start), 0.0, early)
    return np.concatenate([head, np.zeros(late)])


def set_soft_mask_rate(model: torch.nn.Module, rate: float) -> int:
    """Set ``rate`` on every :class:`attnzoo.Attention` layer of ``model`` that uses this mechanism (call
    it each step with the schedule's value). Returns how many layers were updated."""
    rate = ILLAMA_SOFT_MASK.resolve_options({"rate": rate})["rate"]
    from ...layers import Attention

    n = 0
    for mod in model.modules():
        if isinstance(mod, Attention) and mod.mech.name == ILLAMA_SOFT_MASK.name:
            mod.options["rate"] = rate
            n += 1
    return n


ILLAMA_SOFT_MASK = register(Mechanism(
    name="illama_soft_mask",
    aliases=("illama", "soft_mask"),
    family="dense",
    catalog="P090",
    title="Adapting LLaMA Decoder to Vision Transformer",
    arxiv="2404.06773",
    code="https://github.com/techmonsterwang/iLLaMA",
    summary="Softmax attention with a soft mask rate*1 + (1-rate)*tril scheduled from bidirectional (1) "
            "to causal (0); official form multiplies the probabilities after the softmax.",
    patterns=("noncausal_self", "causal_self", "causal_cross"),
    exact=False,
    state="kv",
    complexity="time O(N^2 d), memory O(N) fused (two passes; O(N^2) additive mask with key padding); "
               "decode state O(N)",
    reference=illama_soft_mask_reference,
    fast=illama_soft_mask_fast,
    fast_supports=illama_fast_supports,
    step=illama_soft_mask_step,
    init_state=init_kv_cache,
    options=(
        Option("rate", 0.0, float, low=0.0, high=1.0, doc="soft-mask rate: 1 bidirectional, 0 causal end"),
        Option("form", "official", str, choices=FORMS,
               doc="official: softmax(S) * mask (not renormalised); mixture: rate*bi + (1-rate)*causal"),
    ),
    permutation_equivariant=False,
    test_options={"rate": 0.35, "form": "official"},
    notes="causal=True gives exact causal softmax for every rate (the decodable, trained model). "
          "Official form at rate 0 is softmax(S)*tril: not causal (future keys in the normaliser).",
))
