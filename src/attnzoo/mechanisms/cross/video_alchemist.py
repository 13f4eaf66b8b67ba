"""Video Alchemist's subject-binding cross-attention: video tokens attend to the text prompt, then to personalization
tokens that bind each subject's reference-image tokens to its entity word.

Paper: "Multi-subject Open-set Personalization in Video Generation", Chen, Siarohin, Menapace, Fang, Lee, Skorokhodov,
Aberman, Zhu, Yang, Tulyakov, arXiv 2501.06187 (CVPR 2025). Official code: none released (Snap; only the benchmark
code is public). CATALOG P003.
Each subject s contributes reference-image tokens R_s (one or more images) and the embedding of its entity word w_s in
the prompt; the personalization tokens bind them, ``P_s = W_b [R_s ; w_s]`` (each image token concatenated along
channels with its subject's word embedding, then projected), and a DiT block has two cross-attention layers: one over
the text prompt, a second dedicated to personalization over ``[P_1; ...; P_S]``:
``x1 = x + CA_text(LN(x), text)``, ``x2 = x1 + CA_pers(LN(x1), P)``.

(?) No official code: the two cross-attention layers and the channel-concatenation binding of image and word embeddings
follow the paper's description (CATALOG's concatenated single condition set is the personalization layer); pre-norm
residuals, biases and widths are choices (options). ``forward(x, {"text": prompt, "references": R, "words": w})`` binds
R (B, S R, reference_dim), the S subjects' reference tokens subject-major, to the S entity words w (B, S, word_dim)
(:meth:`SubjectBindingAttention.bind`) and runs the two layers; without references the block is its text cross-
attention. Each layer is :class:`attnzoo.cross.CrossAttention`; ``key_padding_mask={"text": ..., "references": ...,
"words": ...}``: a masked word removes its whole subject, a masked reference token its bound token.

Example:
    >>> import torch, attnzoo
    >>> block = attnzoo.build("video_alchemist", 32, 4, context_dims={"text": 24, "references": 20, "words": 24})
    >>> references = torch.randn(1, 2 * 5, 20)             # 2 subjects, 5 reference tokens each
    >>> words = torch.randn(1, 2, 24)                      # their entity words ("man", "dog")
    >>> video, prompt = torch.randn(1, 30, 32), torch.randn(1, 9, 24)
    >>> block(video, {"text": prompt, "references": references, "words": words}).shape
    torch.Size([1, 30, 32])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...cross import CrossAttention
from ...errors import check_int, check_key_padding_mask, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import plain_heads

SOURCES = ("text", "references", "words")
DEFAULT_WIDTHS = {"text": 4096, "references": 1024, "words": 4096}  # a choice: T5-XXL text, 1024-wide image tokens


class SubjectBindingAttention(nn.Module):
    """``x (B, N, dim)`` video tokens, ``context {"text": (B, L, text_dim), "personalization": (B, P, dim)}`` ->
    ``(B, N, dim)``: text cross-attention then personalization cross-attention, pre-norm residuals."""

    def __init__(self, dim: int, heads: int, *, context_dims: Mapping[str, int] | None = None, bias: bool = True,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        widths = dict(DEFAULT_WIDTHS if context_dims is None else context_dims)
        if set(widths) != set(SOURCES):
            raise ValueError(f"context_dims: expected the widths of {list(SOURCES)}, got {widths!r}")
        self.context_dims = {n: check_int(f"context_dims[{n!r}]", w) for n, w in widths.items()}
        self.text_dim, self.reference_dim, self.word_dim = (self.context_dims[n] for n in SOURCES)
        self.norm_text, self.norm_pers = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.text_attn = CrossAttention(dim, heads, context_dim=self.text_dim, bias=bias)
        self.pers_attn = CrossAttention(dim, heads, context_dim=dim, bias=bias)  # over the bound tokens
        self.binding = nn.Linear(self.reference_dim + self.word_dim, dim)

    def bind(self, references: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Personalization tokens: references (B, S R, reference_dim) (R tokens of each subject's reference images,
        subject-major), words (B, S, word_dim) (each subject's entity word) -> (B, S R, dim)."""
        check_module_input(self, references, name="context['references']", channels=self.reference_dim)
        check_module_input(self, words, name="context['words']", channels=self.word_dim)
        B, M, _ = references.shape
        S = words.shape[1]
        if words.shape[0] != B or M % S:
            raise ValueError(f"context['words']: {S} subjects must split the {M} reference tokens evenly "
                             f"(subject-major) with the same batch, got references {tuple(references.shape)}, words "
                             f"{tuple(words.shape)}")
        w = words.repeat_interleave(M // S, dim=1)  # (B, S R, word_dim): each token with its subject's word
        return self.binding(torch.cat([references, w], dim=-1))  # (B, S R, dim): W_b [R_s ; w_s]

    def forward(self, x: torch.Tensor, context: Mapping[str, torch.Tensor] | None = None, *,
                key_padding_mask: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        check_module_input(self, x, channels=self.dim)
        if not isinstance(context, Mapping):
            raise TypeError("context: expected {'text': (B, L, text_dim), 'references': (B, S R, reference_dim), "
                            f"'words': (B, S, word_dim)}} (the last two optional, together), got "
                            f"{type(context).__name__}")
        unknown = [n for n in context if n not in SOURCES]
        if unknown or "text" not in context or ("references" in context) != ("words" in context):
            raise ValueError(f"context: expected the sources 'text' and, together, 'references' and 'words'; got "
                             f"{list(context)}")
        if key_padding_mask is not None and not isinstance(key_padding_mask, Mapping):
            raise TypeError(f"key_padding_mask: expected a mapping {{source: (B, M)}}, got "
                            f"{type(key_padding_mask).__name__}")
        kpm = dict(key_padding_mask or {})
        extra = [n for n in kpm if n not in context]
        if extra:
            raise ValueError(f"key_padding_mask: given for {extra[0]!r}, which is not in this call's context")
        B = x.shape[0]
        for name, c in context.items():
            check_module_input(self, c, name=f"context[{name!r}]", channels=self.context_dims[name])
            if c.shape[0] != B:
                raise ValueError(f"context[{name!r}]: batch {c.shape[0]} does not match x's batch {B}")
            check_key_padding_mask(kpm.get(name), B, c.shape[1], name=f"key_padding_mask[{name!r}]", device=x.device)
        x = x + self.text_attn(self.norm_text(x), context["text"], key_padding_mask=kpm.get("text"))
        if "references" in context:
            P = self.bind(context["references"], context["words"])  # (B, S R, dim)
            mask = kpm.get("references")
            if "words" in kpm:  # a masked word removes its subject's tokens
                per_token = kpm["words"].repeat_interleave(P.shape[1] // context["words"].shape[1], dim=1)
                mask = per_token if mask is None else mask & per_token
            x = x + self.pers_attn(self.norm_pers(x), P, key_padding_mask=mask)
        return x


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("video_alchemist", kv_heads, causal)
    return SubjectBindingAttention(dim, heads, **VIDEO_ALCHEMIST.resolve_options(options))


VIDEO_ALCHEMIST = register(Mechanism(
    name="video_alchemist",
    aliases=("subject_binding_cross_attention",),
    family="cross",
    catalog="P003",
    title="Multi-subject Open-set Personalization in Video Generation",
    arxiv="2501.06187",
    code="(none released)",
    summary="Text cross-attention then personalization cross-attention over subject tokens that bind each subject's "
            "reference-image tokens to its entity word (channel concatenation + projection).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(N (L + S R) d), memory O(N + L + S R) fused",
    module=_module,
    options=(
        Option("context_dims", None, dict, allow_none=True,
               doc="{'text', 'references', 'words': width} (None: 4096, 1024, 4096, a choice)"),
        Option("bias", True, bool, doc="biases in the attention projections"),
        Option("eps", 1e-6, float, low=0.0, doc="layer-norm epsilon"),
    ),
    test_options={"context_dims": {"text": 12, "references": 10, "words": 12}},
    test_sizes={"nk": 8},  # references 8 tokens, text 6, words 4: two reference tokens per subject
    cross=CrossSpec(sources=("references", "text", "words"), query_independent=True),
    notes="permuting subjects together with their words and images changes nothing; swapping which word binds to "
          "which image does; (?) binding layout unpublished, see the header.",
))
