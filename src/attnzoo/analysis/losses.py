"""Training losses on attention maps: adversarial training of attention (CATALOG P052) and DisenDiff's cross-attention
calibration (CATALOG P027).

**Attention AT / iAT** -- "Attention Meets Perturbations: Robust and Interpretable Attention with Adversarial
Training", Kitada & Iyatomi, IEEE Access 2021 (arXiv 2009.12064). Official code:
https://github.com/shunk031/attention-meets-perturbation (``amep/modules/attention_layer/bc/advt.py``,
``amep/models/bc/at_advt.py``). The attention logits a (before the softmax) get a perturbation: a first forward with
a zero perturbation d gives g = dL/dd; the second forward uses ``a + eps * r`` with ``r = g / ||g||`` (AT: the
direction that increases the loss most) or ``r = -g / ||g||`` (iAT, as its official ``_advt_step``, whose difference-
direction construction multiplies zero coefficients and leaves exactly this), the norm taken over the sequence of
each example; the training loss is ``L(a) + lambda * L(a + eps r)`` with r held constant.
:func:`adversarial_attention_loss` takes any forward ``f(perturbation) -> loss`` that adds the perturbation to its
attention logits: attnzoo's softmax attention takes it as its additive ``bias`` (:func:`attnzoo.softmax_attention`).

**DisenDiff** -- "Attention Calibration for Disentangled Text-to-Image Personalization", Zhang et al., CVPR 2024
(arXiv 2403.18551). Official code: https://github.com/Monalissaa/DisenDiff (``src/model.py``, ``p_losses``). A token's
map is its column of the cross-attention probabilities (image queries over text tokens), averaged over heads (and
layers / steps by the caller), min-max normalised. Each learnable modifier token is bound to its class token,
``1 - IoU(class.detach(), modifier)``, and the class maps of different subjects are pushed apart by adding their
IoU (official ``IoU_between_subject``: the mean over pairs); soft IoU = (sum m1 m2 + s) / (sum m1 + m2 - m1 m2 + s)
with smoothing s = 1. Written against plain cross-attention weights (``source_operators`` / ``softmax_weights``
of image queries over text keys): the cross family's modules give the same (B, H, N_img, T) weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import check_float, check_tensor

__all__ = ["adversarial_perturbation", "adversarial_attention_loss", "token_maps", "soft_iou", "disendiff_loss"]


def adversarial_perturbation(grad: torch.Tensor, eps: float, *, mode: str = "at", dim: int = -1) -> torch.Tensor:
    """``eps * g / ||g||`` (AT) or ``-eps * g / ||g||`` (iAT), the norm over ``dim`` (the sequence); zero where g is
    zero. Detached."""
    check_tensor("grad", grad)
    check_float("eps", eps, low=0.0)
    if mode not in ("at", "iat"):
        raise ValueError(f"mode: expected 'at' or 'iat', got {mode!r}")
    g = grad.detach()
    r = torch.nn.functional.normalize(g, dim=dim)  # g / max(||g||, 1e-12)
    return (eps if mode == "at" else -eps) * r


def adversarial_attention_loss(forward: Callable[[torch.Tensor | None], torch.Tensor], shape: Sequence[int], *,
                               eps: float, mode: str = "at", weight: float = 1.0, dtype=torch.float32, device=None,
                               dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, clean loss, adversarial loss): ``total = L(a) + weight * L(a + r_adv)``.

    ``forward(perturbation)`` adds ``perturbation`` (``shape``, e.g. (B, H, Nq, Nk) logits or (B, N) pooling
    scores) to the attention logits and returns the loss. The first call (a zero perturbation that requires grad)
    is the clean loss; its gradient wrt the perturbation (taken with ``torch.autograd.grad``: model gradients are
    left alone) gives r_adv."""
    check_float("weight", weight, low=0.0)
    d = torch.zeros(tuple(shape), dtype=dtype, device=device, requires_grad=True)
    clean = forward(d)
    (g,) = torch.autograd.grad(clean, d, retain_graph=True)
    r = adversarial_perturbation(g, eps, mode=mode, dim=dim)
    adv = forward(r)
    return clean + weight * adv, clean, adv


# --------------------------------------------------------------------------------------------------------
# DisenDiff
# --------------------------------------------------------------------------------------------------------
def token_maps(weights: torch.Tensor, tokens: Sequence[int], *, normalize: bool = True) -> torch.Tensor:
    """Maps of text tokens from cross-attention weights (B, H, N_img, T) (softmax over the T text tokens): the
    columns ``tokens`` averaged over heads, (B, len(tokens), N_img), min-max normalised per map (official
    ``process_output`` with ``absolute=False``) when ``normalize``."""
    check_tensor("weights", weights, ndim=4)
    idx = torch.as_tensor(tokens, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= weights.shape[-1]):
        raise ValueError(f"tokens: expected text positions in [0, {weights.shape[-1]}), got {idx.tolist()}")
    maps = weights[..., idx].mean(1).transpose(1, 2)  # (B, C, N_img)
    if not normalize:
        return maps
    lo = maps.amin(-1, keepdim=True)
    hi = maps.amax(-1, keepdim=True)
    return (maps - lo) / (hi - lo + 1e-8)


def soft_iou(m1: torch.Tensor, m2: torch.Tensor, *, smooth: float = 1.0, detach_first: bool = False) -> torch.Tensor:
    """Soft IoU of maps (..., N): (sum m1 m2 + s) / (sum (m1 + m2) - sum m1 m2 + s); ``detach_first`` stops the
    gradient through m1 (the official binding term)."""
    a = m1.detach() if detach_first else m1
    inter = (a * m2).sum(-1)
    union = (a + m2).sum(-1) - inter
    return (inter + smooth) / (union + smooth)


def disendiff_loss(class_maps: torch.Tensor, modifier_maps: torch.Tensor, *, smooth: float = 1.0,
                   separate: bool = True) -> dict[str, torch.Tensor]:
    """DisenDiff's attention calibration of C subjects: class_maps, modifier_maps (B, C, N) (:func:`token_maps`).

    ``bind`` = sum_c (1 - IoU(class_c.detach(), modifier_c)) (mean over the batch); ``separate`` = mean over pairs
    c < c' of IoU(class_c, class_c') (no detach: both maps move apart); ``loss`` = bind + separate."""
    check_tensor("class_maps", class_maps, ndim=3)
    check_tensor("modifier_maps", modifier_maps, ndim=3)
    if class_maps.shape != modifier_maps.shape:
        raise ValueError(f"modifier_maps: expected the shape of class_maps {tuple(class_maps.shape)}, "
                         f"got {tuple(modifier_maps.shape)}")
    bind = (1 - soft_iou(class_maps, modifier_maps, smooth=smooth, detach_first=True)).sum(-1).mean()
    C = class_maps.shape[1]
    sep = class_maps.new_zeros(())
    if separate and C > 1:
        pairs = [(i, j) for i in range(C) for j in range(i + 1, C)]
        sep = torch.stack([soft_iou(class_maps[:, i], class_maps[:, j], smooth=smooth) for i, j in pairs]).mean()
    return {"bind": bind, "separate": sep, "loss": bind + sep}
