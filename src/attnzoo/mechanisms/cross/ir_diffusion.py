"""IR-Diffusion's Isolation Attention: extended self-attention over target and reference tokens in which a subject's
tokens never attend to another subject's tokens.

Paper: "Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation and Reposition Attention",
He, Wang, Zhou, Cai, Chao, Yin, Yang, arXiv 2411.19261. Official code: none released (none found). CATALOG P038.
Training-free: in a self-attention layer of the denoising UNet the target image's tokens attend to
``[target; reference]`` tokens (extended self-attention, the layer's own projections for both). Isolation: with subject
ids s(.) (from segmentation masks), a target token of subject a may attend only to keys of subject a and of the
background, in the target and in the reference, so subjects do not converge into one another:
``O_a = softmax(Q_a [K_a^ref; K_a^tgt; K_bg]^T / sqrt(d)) [V_a^ref; V_a^tgt; V_bg]``.

(?) No official code; choices, each an option: background tokens (id ``background``, default -1) attend to every key,
and subject tokens also see background keys (``background_visible=True``; False confines a subject to its own
tokens). Reposition Attention (scaling and placing the reference subjects at their target positions before the
features are taken) acts on the reference image/features before this layer and is not part of it. The layer is Stable
Diffusion's self-attention layout (no q/k/v biases, output bias); the isolation is the contract's pair mask over the
concatenated keys (one fused SDPA call).

Example:
    >>> import torch, attnzoo
    >>> iso = attnzoo.build("ir_diffusion", 32, 4)
    >>> target, reference = torch.randn(1, 6, 32), torch.randn(1, 6, 32)
    >>> ids = torch.tensor([[0, 0, 1, 1, -1, -1]])             # two subjects and background
    >>> iso(target, reference, subject_ids=ids, context_subject_ids=ids).shape
    torch.Size([1, 6, 32])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...cross import CrossAttention
from ...errors import check_bool, check_int, check_key_padding_mask
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import check_ids, check_pair, plain_heads


def isolation_mask(query_ids: torch.Tensor, key_ids: torch.Tensor, *, background: int = -1,
                   background_visible: bool = True) -> torch.Tensor:
    """(B, N, M) bool: query i (subject ``query_ids[b, i]``) may see key j (subject ``key_ids[b, j]``): background
    queries see every key; subject queries see keys of their own subject (and background keys if
    ``background_visible``)."""
    same = query_ids[:, :, None] == key_ids[:, None, :]  # (B, N, M)
    bg_query = (query_ids == background)[:, :, None]
    allowed = same | bg_query
    if background_visible:
        allowed = allowed | (key_ids == background)[:, None, :]
    return allowed


class IsolationAttention(nn.Module):
    """``x (B, N, dim)`` target tokens, ``context (B, M, dim)`` reference tokens -> ``(B, N, dim)``: extended
    self-attention over [x; context] with the layer's own projections; ``subject_ids`` (B, N) and
    ``context_subject_ids`` (B, M) integer (``background`` for none) isolate the subjects; without them it is plain
    extended self-attention. ``key_padding_mask`` (B, M) masks reference tokens."""

    def __init__(self, dim: int, heads: int, *, background: int = -1, background_visible: bool = True,
                 bias: bool = False, out_bias: bool = True) -> None:
        super().__init__()
        self.dim = self.context_dim = check_int("dim", dim)
        self.background = check_int("background", background, low=None)
        self.background_visible = check_bool("background_visible", background_visible)
        self.attn = CrossAttention(dim, heads, context_dim=dim, bias=bias, out_bias=out_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, subject_ids: torch.Tensor | None = None,
                context_subject_ids: torch.Tensor | None = None) -> torch.Tensor:
        x, ref = check_pair(self, x, context, channels=self.dim, context_channels=self.dim)
        B, N, M = x.shape[0], x.shape[1], ref.shape[1]
        check_key_padding_mask(key_padding_mask, B, M, device=x.device)
        keys = torch.cat([x, ref], dim=1)  # (B, N + M, dim): extended self-attention
        kpm = None if key_padding_mask is None else torch.cat([x.new_ones(B, N, dtype=torch.bool), key_padding_mask], 1)
        pairs = None
        if (subject_ids is None) != (context_subject_ids is None):
            raise ValueError("subject_ids, context_subject_ids: give both (target and reference subject ids) or "
                             "neither")
        if subject_ids is not None:
            q_ids = check_ids("subject_ids", subject_ids, (B, N), x.device)
            k_ids = torch.cat([q_ids, check_ids("context_subject_ids", context_subject_ids, (B, M), x.device)], 1)
            pairs = isolation_mask(q_ids, k_ids, background=self.background,
                                   background_visible=self.background_visible)  # (B, N, N + M)
        return self.attn(x, keys, key_padding_mask=kpm, pair_masks=pairs)


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("ir_diffusion", kv_heads, causal)
    return IsolationAttention(dim, heads, **IR_DIFFUSION.resolve_options(options))


IR_DIFFUSION = register(Mechanism(
    name="ir_diffusion",
    aliases=("isolation_attention",),
    family="cross",
    catalog="P038",
    title="Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation and Reposition Attention",
    arxiv="2411.19261",
    code="(none released)",
    summary="Isolation attention: extended self-attention over [target; reference] where a subject's tokens see only "
            "their own subject's (and background) keys.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N (N + M) d), memory O(N (N + M)) for the subject pair mask",
    module=_module,
    options=(
        Option("background", -1, int, doc="subject id of background tokens"),
        Option("background_visible", True, bool, doc="subject tokens also see background keys"),
        Option("bias", False, bool, doc="q/k/v biases (Stable Diffusion: none)"),
        Option("out_bias", True, bool, doc="output projection bias (Stable Diffusion: yes)"),
    ),
    permutation_equivariant=True,
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="subject-a queries give exactly zero weight to subject-b keys; one subject (or no ids) is plain extended "
          "self-attention; (?) background handling is a choice (no code).",
))
