"""MODA's modular duplex attention: the visual tokens' keys are aligned into the text modality's space through the text
keys' Gram "coordinates" before a (modality-masked) attention.

Paper: "MODA: MOdular Duplex Attention for Multimodal Perception, Cognition, and Emotion Understanding", Zhang, Xia,
Zhao, Zhou, Liu, Zhu, Qin, Wan, Zhang, Yang, arXiv 2507.04635 (ICML 2025). Official code:
https://github.com/KwaiVGI/MODA (moda/model/language_model/modeling_llama_local_moda.py, ``LlamaAttention``).
CATALOG P017.
Align: per head, with L2-normalised keys k̂, the text modality's coordinates ``G_t = norm_rows(k̂_t^T v_t)`` (d x d)
map each visual key into the text space, ``k_v <- W_v (k_v + r_v * k̂_v G_t)`` (r_v a learned per-channel ratio, W_v a
d x d fuser); duplex: the text keys likewise through the visual coordinates. Correct: softmax attention with the host's
(modality-aware) mask over the aligned keys.

Confirmed against the official eager attention (CATALOG's "(?)"): ``phi`` is the identity plus 1e-6 before the L2
norm, the Gram is ``key_t^T @ value_t`` normalised over its last axis, ``aligned = key_v_n @ gram_t``, ``fused =
pfuser_v(res_v + ratio_v * aligned)`` written back at the visual positions, per query head after ``repeat_kv``; the
text-side alignment (``aligned_t``, ``pfuser_t``) is commented out in that code -- ``duplex=False`` (default) follows
it, ``duplex=True`` is the paper's both-ways form; ``ratio_v`` starts at zero. Choice: ``pfuser`` starts as the
identity (the official ``nn.Linear`` default init would transform the visual keys of an untrained model), so the
untrained module is plain attention; the mask is the host's (``attn_mask``, True = attend). The text Gram spans every
text key of the call, later ones included, so with a causal mask this is a prefill-time operation (the official too):
the record is non-causal and a causal host mask goes in through ``attn_mask``. Visual positions: ``visual_mask`` (B,
N) per call or the ``visual_start``/``visual_end`` span options. LLaMA layout: no projection biases.

Example:
    >>> import torch, attnzoo
    >>> moda = attnzoo.build("moda", 32, 4, visual_start=1, visual_end=5)
    >>> x = torch.randn(2, 12, 32)
    >>> causal = torch.ones(12, 12, dtype=torch.bool).tril()[None]    # the host LLM's mask
    >>> moda(x, attn_mask=causal).shape
    torch.Size([2, 12, 32])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...cross import cross_attention
from ...errors import check_bool, check_heads, check_int, check_key_padding_mask, check_module_input
from ...registry import Mechanism, Option, register
from ._blocks import check_bool_mask, plain_heads


class ModalityFuser(nn.Module):
    """``W (k + r * k̂ G)`` for one direction: ratio r (1, 1, hd) at zero, fuser W (hd x hd) at the identity."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.ratio = nn.Parameter(torch.zeros(1, 1, head_dim))
        self.fuser = nn.Linear(head_dim, head_dim, bias=False)
        with torch.no_grad():
            self.fuser.weight.copy_(torch.eye(head_dim))

    def forward(self, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Keys k (B, H, N, hd) with the ``target`` (B, N) positions aligned through the coordinates of the
        ``source`` (B, N) positions' keys and values v."""
        kn = k + 1e-6
        kn = kn / kn.norm(dim=-1, keepdim=True)  # (B, H, N, hd)
        sel = source[:, None, :, None].to(k.dtype)
        gram = torch.einsum("bhnd,bhne->bhde", kn * sel, v * sel)  # (B, H, hd, hd): the source's coordinates
        norms = gram.norm(dim=-1, keepdim=True)
        gram = gram / torch.where(norms > 0, norms, torch.ones_like(norms))  # rows normalised (no source: zeros)
        fused = self.fuser(k + self.ratio * torch.matmul(kn, gram))  # (B, H, N, hd)
        return torch.where(target[:, None, :, None], fused, k)


class DuplexAlignedAttention(nn.Module):
    """``x (B, N, dim)`` a multimodal sequence -> ``(B, N, dim)``: keys of the visual positions aligned to the text
    modality (and, with ``duplex``, text keys to the visual one), then softmax attention under ``attn_mask``
    (B or 1, N, N) bool and ``key_padding_mask`` (B, N)."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, visual_start: int = 0, visual_end: int = 0,
                 duplex: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.dim, self.heads, self.kv_heads, self.head_dim = check_heads(dim, heads, kv_heads)
        self.visual_start = check_int("visual_start", visual_start, low=0)
        self.visual_end = check_int("visual_end", visual_end, low=0)
        self.duplex = check_bool("duplex", duplex)
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=bias)
        self.align_v = ModalityFuser(self.head_dim)  # visual keys -> text space
        self.align_t = ModalityFuser(self.head_dim) if duplex else None  # text keys -> visual space (duplex)

    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, visual_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_module_input(self, x, channels=self.dim)
        B, N, _ = x.shape
        check_key_padding_mask(key_padding_mask, B, N, device=x.device)
        if visual_mask is None:
            pos = torch.arange(N, device=x.device)
            visual = ((pos >= self.visual_start) & (pos < self.visual_end)).expand(B, N)
        else:
            visual = check_bool_mask("visual_mask", visual_mask, (B, N), x.device)
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor) or attn_mask.dim() != 3 or attn_mask.shape[0] not in (1, B):
                raise ValueError(f"attn_mask: expected a bool tensor (B or 1, N, N) = ({B} or 1, {N}, {N})")
            check_bool_mask("attn_mask", attn_mask, (attn_mask.shape[0], N, N), x.device)
        real = torch.ones_like(visual) if key_padding_mask is None else key_padding_mask
        text = ~visual & real
        q = self._split(self.q_proj(x), self.heads)  # (B, H, N, hd)
        k = self._split(self.k_proj(x), self.kv_heads)  # (B, Hk, N, hd)
        v = self._split(self.v_proj(x), self.kv_heads)
        aligned = self.align_v(k, v, text, visual & real)
        if self.align_t is not None:  # duplex: text keys into the visual space (from the unaligned keys)
            aligned = torch.where((visual & real)[:, None, :, None], aligned,
                                  self.align_t(k, v, visual & real, text))
        out = cross_attention(q, {"tokens": (aligned, v)}, masks=None if key_padding_mask is None else {
            "tokens": key_padding_mask}, pair_masks=None if attn_mask is None else {"tokens": attn_mask})
        return self.o_proj(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("moda", None, causal)
    return DuplexAlignedAttention(dim, heads, kv_heads=kv_heads, **MODA.resolve_options(options))


MODA = register(Mechanism(
    name="moda",
    aliases=("modular_duplex_attention",),
    family="cross",
    catalog="P017",
    title="MODA: MOdular Duplex Attention for Multimodal Perception, Cognition, and Emotion Understanding",
    arxiv="2507.04635",
    code="https://github.com/KwaiVGI/MODA",
    summary="Duplex alignment: visual keys mapped into the text space through the text keys' normalised Gram "
            "coordinates (and vice versa with duplex), then softmax attention under the host's modality mask.",
    patterns=("noncausal_self",),
    exact=True,
    complexity="time O(N^2 d + N d^2 / H), memory O(N d + H d_h^2) fused (plus the host's N x N mask if given)",
    module=_module,
    options=(
        Option("visual_start", 0, int, low=0, doc="first visual position (when no visual_mask is passed)"),
        Option("visual_end", 0, int, low=0, doc="one past the last visual position"),
        Option("duplex", False, bool, doc="also align text keys to the visual space (the paper; the code: no)"),
        Option("bias", False, bool, doc="projection biases (LLaMA: none)"),
    ),
    test_options={"visual_start": 1, "visual_end": 4},
    notes="zero ratio and identity fuser: plain attention; parity with the official eager attention written out; "
          "the visual keys depend on every text key of the call (prefill-time, as the official).",
))
