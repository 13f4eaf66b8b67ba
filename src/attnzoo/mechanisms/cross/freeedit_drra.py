"""FreeEdit DRRA: a self-attention layer plus a decoupled, scaled attention to reference-image features.

Paper: "FreeEdit: Mask-free Reference-based Image Editing with Multi-modal Instruction", He, Ma, Huang, Huang, Gao,
Wei, Dai, Han, Liu, arXiv 2409.18071. Official code: announced at https://freeedit.github.io (not released).
CATALOG P005.
Decoupled Residual ReferAttention (DRRA): inside a self-attention layer of the denoising UNet, with Q = X W_q,
``out = softmax(Q (X W_k)^T / sqrt(d)) X W_v + lambda softmax(Q (R W'_k)^T / sqrt(d)) R W'_v`` where R are
fine-grained reference features from a detail extractor and W'_k, W'_v are new trainable projections; the original
self-attention path is untouched (the reference term is a residual added to it).

The same path as IP-Adapter's decoupled cross-attention (P069) with the text source replaced by the layer's own
tokens: :class:`attnzoo.cross.CrossAttention` in separate mode over the sources "self" (x itself, the frozen W_k,
W_v) and "reference" (R, the new W'_k, W'_v), lambda its scale; lambda = 0 skips the reference term, so the layer is
then exactly the original self-attention. Choices: W'_k, W'_v can start from W_k, W_v (``init_reference_from_self``,
as IP-Adapter initialises its new projections); the detail extractor producing R is outside the mechanism.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...cross import CrossAttention
from ...errors import check_float, check_int, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register


class DecoupledReferenceAttention(nn.Module):
    """DRRA: ``x (B, N, dim)`` self-attends and, decoupled, attends to ``context (B, M, context_dim)`` (the
    reference features) with weight ``scale`` (lambda) -> ``(B, N, dim)``. ``key_padding_mask`` (B, M) masks
    reference tokens; ``return_source_mass`` gives the {"self", "reference"} shares."""

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, scale: float = 1.0,
                 head_dim: int | None = None, bias: bool = False, out_bias: bool = True, causal: bool = False,
                 kv_heads: int | None = None) -> None:
        super().__init__()
        if causal:
            raise ValueError("causal: DRRA lives in a UNet's non-causal self-attention; build it with causal=False")
        self.dim = check_int("dim", dim)
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        lam = check_float("scale", scale)
        self.attn = CrossAttention(dim, heads, context_dims={"self": dim, "reference": self.context_dim},
                                   kv_heads=kv_heads, head_dim=head_dim, bias=bias, out_bias=out_bias,
                                   scales={"reference": lam}, mode="separate")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}, scale={self.attn.scales['reference']}"

    def set_scale(self, scale: float) -> None:
        self.attn.scales["reference"] = check_float("scale", scale)

    @torch.no_grad()
    def init_reference_from_self(self) -> None:
        """W'_k, W'_v := W_k, W_v (needs context_dim == dim)."""
        if self.context_dim != self.dim:
            raise ValueError(f"context_dim: {self.context_dim} differs from dim {self.dim}; the reference "
                             "projections cannot start from the self-attention's")
        for proj in (self.attn.k_proj, self.attn.v_proj):
            proj["reference"].load_state_dict(proj["self"].state_dict())

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, return_source_mass: bool = False):
        check_module_input(self, x, channels=self.dim)
        if context is None:
            raise ValueError("context: DRRA needs the reference features (B, M, context_dim); without them the "
                             "layer is the original self-attention")
        masks = None if key_padding_mask is None else {"reference": key_padding_mask}
        return self.attn(x, {"self": x, "reference": context}, key_padding_mask=masks,
                         return_source_mass=return_source_mass)


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    return DecoupledReferenceAttention(dim, heads, kv_heads=kv_heads, causal=causal,
                                       **FREEEDIT_DRRA.resolve_options(options))


FREEEDIT_DRRA = register(Mechanism(
    name="freeedit_drra",
    aliases=("drra", "decoupled_residual_refer_attention"),
    family="cross",
    catalog="P005",
    title="FreeEdit: Mask-free Reference-based Image Editing with Multi-modal Instruction",
    arxiv="2409.18071",
    code="https://freeedit.github.io",
    summary="Self-attention plus lambda times a decoupled softmax over reference-image features with new k/v "
            "projections (IP-Adapter's path with the layer's own tokens as the first source).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N (N + M) d), memory O(N + M) fused",
    module=_module,
    options=(
        Option("context_dim", None, int, low=1, allow_none=True,
               doc="width of the reference features (None: dim)"),
        Option("scale", 1.0, float, doc="lambda of the reference term"),
        Option("head_dim", None, int, low=1, allow_none=True, doc="per-head width (None: dim / heads)"),
        Option("bias", False, bool, doc="biases in the q/k/v projections (UNet attention: none)"),
        Option("out_bias", True, bool, doc="bias in the output projection (UNet attention: yes)"),
    ),
    permutation_equivariant=True,
    test_options={"context_dim": 12, "scale": 0.7},
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False, source_mass=True,
                    mode="separate"),
    notes="lambda = 0 is exactly the original self-attention; equals the sum of two separate softmax attentions.",
))
