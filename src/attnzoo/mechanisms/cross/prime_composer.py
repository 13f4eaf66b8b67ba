"""PrimeComposer's attention steering: Region-constrained Cross-Attention (subject tokens reach only the object
region) and self-attention steering (the object's rows and columns of the self-attention scores taken from a
Correlation Diffuser).

Paper: "PrimeComposer: Faster Progressively Combined Diffusion for Image Composition with Attention Steering", Wang,
Zhang, Zheng, Jin, arXiv 2403.05053 (ACM MM 2024). Official code: https://github.com/CodeGoat24/PrimeComposer
(ptp_scripts/ptp_utils.py, ``prompt_ca_forward`` and the injecting self-attention forward). CATALOG P095.
RCA: for the subject-related text tokens S, the cross-attention logits of pixels outside the object region R are
masked before the softmax, ``P = softmax(QK^T/sqrt(d) + M)``, ``M_{ij} = -inf`` if ``j in S`` and ``i not in R``; other
tokens and pixels are untouched. Steering: in the generator's self-attention, the logits between every pixel and the
object pixels are replaced by those of the Correlation Diffuser, ``S[:, R] = S_c`` and ``S[R, :] = S_c^T``.

Confirmed against the official code: RCA fills the masked logits with ``-finfo.max`` before a plain softmax, so the
remaining logits of a pixel are renormalised (the CATALOG's "(?) renormalised": yes); unmasked text tokens and
in-region pixels keep the plain cross-attention; the mask is applied to the conditional half of the guidance batch only
(the caller's choice here: pass no region for the unconditional half). A pixel outside R whose every token is a
subject token would see nothing: zeros here (attnzoo's convention; the official -max fill would give a uniform row).
Steering copies the stored logits into the object's columns then rows (``steer_scores``). Stable Diffusion's
cross-attention layout: no q/k/v biases, output bias, text width 768. RCA runs on the contract's pair masks (one fused
SDPA call); steering needs the explicit score matrix it edits (O(N^2), as the official training-free edit).

Example:
    >>> import torch, attnzoo
    >>> rca = attnzoo.build("prime_composer", 32, 4, context_dim=24)
    >>> pixels, text = torch.randn(1, 16, 32), torch.randn(1, 6, 24)
    >>> region = torch.zeros(1, 16, dtype=torch.bool); region[:, :4] = True    # the object's pixels
    >>> subject = torch.zeros(1, 6, dtype=torch.bool); subject[:, 2] = True    # its word in the prompt
    >>> rca(pixels, text, region=region, subject_tokens=subject).shape
    torch.Size([1, 16, 32])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...cross import CrossAttention
from ...errors import check_int, check_qkv, check_scale, check_tensor
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import check_bool_mask, check_pair, plain_heads


def region_pair_mask(region: torch.Tensor, subject_tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, L) bool, True where pixel i may attend to token j: every token, except subject tokens for pixels
    outside the object region. region (B, N) bool, subject_tokens (B, L) bool."""
    return ~(subject_tokens[:, None, :] & ~region[:, :, None])  # (B, N, L)


def steer_scores(scores: torch.Tensor, injected: torch.Tensor, region_index: torch.Tensor) -> torch.Tensor:
    """Self-attention logits ``scores`` (B, H, N, N) with the object's columns set to ``injected`` (B, H, N, K) and
    then its rows to ``injected^T`` (the official order), K = ``region_index.numel()`` object pixels."""
    check_tensor("scores", scores, ndim=4)
    check_tensor("injected", injected, ndim=4)
    if not isinstance(region_index, torch.Tensor) or region_index.dim() != 1 or (
            region_index.dtype == torch.bool or region_index.is_floating_point()):
        raise TypeError("region_index: expected a 1-D integer tensor of object pixel indices")
    B, H, N, _ = scores.shape
    K = region_index.numel()
    if tuple(injected.shape) != (B, H, N, K):
        raise ValueError(f"injected: expected (B, H, N, K) = ({B}, {H}, {N}, {K}), got {tuple(injected.shape)}")
    if K and (int(region_index.min()) < 0 or int(region_index.max()) >= N):
        raise ValueError(f"region_index: expected indices in [0, {N}), got {region_index.tolist()}")
    out = scores.clone()
    out[..., region_index] = injected  # column injection
    out[..., region_index, :] = injected.transpose(-2, -1)  # row injection
    return out


def steered_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, injected: torch.Tensor,
                           region_index: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Self-attention q, k, v (B, H, N, D) whose logits ``scale q k^T`` have the object's rows and columns replaced by
    the Correlation Diffuser's ``injected`` (B, H, N, K) logits (:func:`steer_scores`), then softmax: (B, H, N, Dv)."""
    check_qkv(q, k, v)
    check_scale(scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = steer_scores(torch.matmul(q, k.transpose(-2, -1)) * scale, injected, region_index)  # (B, H, N, N)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class RegionConstrainedCrossAttention(nn.Module):
    """``x (B, N, dim)`` latent pixels, ``context (B, L, context_dim)`` prompt tokens -> ``(B, N, dim)``; with
    ``region`` (B, N) bool and ``subject_tokens`` (B, L) bool, subject tokens reach only the region's pixels."""

    def __init__(self, dim: int, heads: int, *, context_dim: int = 768, bias: bool = False,
                 out_bias: bool = True) -> None:
        super().__init__()
        self.dim, self.context_dim = check_int("dim", dim), check_int("context_dim", context_dim)
        self.attn = CrossAttention(dim, heads, context_dim=self.context_dim, bias=bias, out_bias=out_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, region: torch.Tensor | None = None,
                subject_tokens: torch.Tensor | None = None) -> torch.Tensor:
        x, context = check_pair(self, x, context, channels=self.dim, context_channels=self.context_dim)
        if (region is None) != (subject_tokens is None):
            raise ValueError("region, subject_tokens: give both (the object's pixels and its words) or neither")
        pairs = None
        if region is not None:
            B, N, L = x.shape[0], x.shape[1], context.shape[1]
            pairs = region_pair_mask(check_bool_mask("region", region, (B, N), x.device),
                                     check_bool_mask("subject_tokens", subject_tokens, (B, L), x.device))
        return self.attn(x, context, key_padding_mask=key_padding_mask, pair_masks=pairs)


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("prime_composer", kv_heads, causal)
    return RegionConstrainedCrossAttention(dim, heads, **PRIME_COMPOSER.resolve_options(options))


PRIME_COMPOSER = register(Mechanism(
    name="prime_composer",
    aliases=("region_constrained_cross_attention", "rca"),
    family="cross",
    catalog="P095",
    title="PrimeComposer: Faster Progressively Combined Diffusion for Image Composition with Attention Steering",
    arxiv="2403.05053",
    code="https://github.com/CodeGoat24/PrimeComposer",
    summary="Region-constrained cross-attention: subject tokens reach only the object region's pixels (renormalised "
            "softmax); steer_scores / steered_self_attention inject the Correlation Diffuser's object logits.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="RCA time O(N L d), memory O(N L) for the pair mask; steering O(N^2) (explicit scores, as official)",
    module=_module,
    options=(
        Option("context_dim", 768, int, low=1, doc="prompt token width (Stable Diffusion 1.x: 768)"),
        Option("bias", False, bool, doc="q/k/v biases (Stable Diffusion: none)"),
        Option("out_bias", True, bool, doc="output projection bias (Stable Diffusion: yes)"),
    ),
    permutation_equivariant=True,
    test_options={"context_dim": 12},
    cross=CrossSpec(context_permutation_invariant=True),
    notes="a region covering every pixel is plain cross-attention; subject tokens get zero weight outside the region "
          "and the rest renormalises; steering with an empty region is plain self-attention.",
))
