"""EMMA: instruction-aware visual tokens from a learned token-mixing fusion of image tokens and instruction tokens.

Paper: "EMMA: Efficient Visual Alignment in Multi-Modal LLMs", Ghazanfari, Araujo, Krishnamurthy, Garg, Khorrami,
arXiv 2410.02080. Official code: https://github.com/SaraGhazanfari/EMMA
(llava/model/multimodal_encoder/clip_encoder.py, ``CLIPVisionTower.image_text_infusion``). CATALOG P108.
The instruction is encoded by CLIP's text encoder (aligned with its vision encoder), projected to the visual width,
``T' = GELU(W_t T)`` (B, N_t, d), appended to the visual tokens V (B, N_v, d) along the token axis, and a learned
linear map over the token axis mixes them back to N_v tokens: ``V' = A [V; T'] + b`` with A (N_v, N_v + N_t). A is
initialised to ``[I | 0]`` and b to 0, so the untrained module returns the visual tokens unchanged (< 0.2 % extra
parameters).

Confirmed against the official code (CATALOG's "(?)" resolved): ``image_text_infusion`` is ``nn.Linear(num_image_tokens
+ num_text_tokens, num_image_tokens)`` applied to the token axis with weight ``[I | 0]`` and zero bias, the text goes
through ``GELU(text_projection(...))`` (encoder versions v1/v3; v3 also adds learnable tokens, not here); 576 image
tokens (CLIP ViT-L/14-336) and 77 text tokens. It is not softmax attention: a fixed-size token mixer, so the token
counts are options. Padded instruction tokens: the official mixes them in; ``key_padding_mask`` (B, N_t) zeroes their
projected features here (all True reproduces the official).

Example:
    >>> import torch, attnzoo
    >>> emma = attnzoo.build("emma", 32, 1, context_dim=24, num_image_tokens=16, num_text_tokens=5)
    >>> image, instruction = torch.randn(2, 16, 32), torch.randn(2, 5, 24)
    >>> torch.equal(emma(image, instruction), image)   # [I | 0] initialisation: the visual tokens unchanged
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_int, check_key_padding_mask
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import check_pair


class InstructionVisualFusion(nn.Module):
    """``x (B, num_image_tokens, dim)`` visual tokens, ``context (B, num_text_tokens, context_dim)`` instruction
    tokens -> ``(B, num_image_tokens, dim)`` instruction-aware visual tokens."""

    def __init__(self, dim: int, heads: int | None = None, *, context_dim: int = 768, num_image_tokens: int = 576,
                 num_text_tokens: int = 77) -> None:
        super().__init__()
        self.dim, self.context_dim = check_int("dim", dim), check_int("context_dim", context_dim)
        self.num_image_tokens = check_int("num_image_tokens", num_image_tokens)
        self.num_text_tokens = check_int("num_text_tokens", num_text_tokens)
        self.text_projection = nn.Linear(self.context_dim, dim)
        self.infusion = nn.Linear(num_image_tokens + num_text_tokens, num_image_tokens)
        with torch.no_grad():
            self.infusion.weight.zero_()
            self.infusion.weight[:, :num_image_tokens] = torch.eye(num_image_tokens)  # [I | 0]
            self.infusion.bias.zero_()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, context = check_pair(self, x, context, channels=self.dim, context_channels=self.context_dim)
        for name, t, n in (("x", x, self.num_image_tokens), ("context", context, self.num_text_tokens)):
            if t.shape[1] != n:
                raise ValueError(f"{name}: the token mixer is built for {n} tokens, got shape {tuple(t.shape)}")
        check_key_padding_mask(key_padding_mask, x.shape[0], context.shape[1], device=x.device)
        text = F.gelu(self.text_projection(context))  # (B, N_t, dim)
        if key_padding_mask is not None:
            text = text * key_padding_mask.unsqueeze(-1).to(text.dtype)
        tokens = torch.cat([x, text], dim=1)  # (B, N_v + N_t, dim)
        return self.infusion(tokens.transpose(1, 2)).transpose(1, 2)  # (B, N_v, dim): A [V; T'] + b


def _module(dim: int, heads: int, **options: Any):
    return InstructionVisualFusion(dim, heads, **EMMA.resolve_options(options))


EMMA = register(Mechanism(
    name="emma",
    aliases=("instruction_visual_fusion",),
    family="cross",
    kind="fusion",
    catalog="P108",
    title="EMMA: Efficient Visual Alignment in Multi-Modal LLMs",
    arxiv="2410.02080",
    code="https://github.com/SaraGhazanfari/EMMA",
    summary="Instruction-aware visual tokens: projected instruction tokens are appended to the image tokens and a "
            "learned linear map over the token axis ([I | 0]-initialised) mixes them back (not softmax attention).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N_v (N_v + N_t) d), memory O((N_v + N_t) d)",
    module=_module,
    options=(
        Option("context_dim", 768, int, low=1, doc="instruction token width (CLIP ViT-L text encoder: 768)"),
        Option("num_image_tokens", 576, int, low=1, doc="visual tokens (CLIP ViT-L/14-336: 576)"),
        Option("num_text_tokens", 77, int, low=1, doc="instruction tokens (CLIP context: 77)"),
    ),
    test_options={"context_dim": 12, "num_image_tokens": 5, "num_text_tokens": 9},
    cross=CrossSpec(query_independent=False),
    notes="[I | 0] initialisation returns the visual tokens exactly; parity with the official infusion written "
          "out; the text block of the mixing matrix is what makes the tokens instruction-aware.",
))
