"""HunyuanVideo-Avatar's Face-Aware Audio Adapter: each frame's video tokens attend to that frame's audio tokens of
each character, and the result is added only inside that character's face mask.

Paper: "HunyuanVideo-Avatar: High-Fidelity Audio-Driven Human Animation for Multiple Characters", Chen, Wang, Zhang,
Zhou, Shen, Ye, Lin, Yu, Li, Zhou, Chen, Wang, Chen, Feng, Jiang, Guo, Zhong, et al., arXiv 2505.20156. Official code:
https://github.com/Tencent-Hunyuan/HunyuanVideo-Avatar (hymm_sp/modules/audio_adapters.py ``PerceiverAttentionCA``,
hymm_sp/modules/models_audio.py). CATALOG P004.
Video latents X (B, T x L, d) (T latent frames of L tokens), audio tokens A_c (B, T x A, d_a) per character c aligned to
the frames: frame t's tokens attend only to frame t's audio, ``X' = X + sum_c M_c * W_o softmax(q(LN(X)) k(LN(A_c))^T /
sqrt(d_h)) v(LN(A_c))``, M_c the latent-level face mask of character c.

Confirmed against the official code: ``PerceiverAttentionCA`` normalises audio and latents with their own LayerNorms,
has bias-free q / kv / out projections with ``to_out`` zero-initialised, one head of width ``dim_head`` 1024 (its
``heads=33`` argument is unused), the scale ``1/sqrt(dim_head)`` split over q and k; it is called per latent frame
(``view(bsz, ot, -1, 3072)`` with 16 audio tokens per frame, the first frame's audio repeated as padding upstream) and
its output is multiplied by the face mask before the residual add (reference frames get zero). The official code drives
one character; several characters (the paper's setting) share the adapter's weights here, each a named source with its
own face mask (``region_masks``, bool or float weights -- the official pipeline scales the mask by 0.6 in some guidance
branches). Frames are folded into the batch, so each frame runs one fused SDPA call per character.

Example:
    >>> import torch, attnzoo
    >>> faa = attnzoo.build("hunyuan_avatar", 32, 1, dim_head=16, characters=("alice", "bob"))
    >>> video = torch.randn(1, 3 * 8, 32)                        # 3 latent frames of 8 tokens
    >>> audio = {"alice": torch.randn(1, 3 * 4, 32), "bob": torch.randn(1, 3 * 4, 32)}
    >>> faces = {"alice": torch.zeros(1, 24, dtype=torch.bool), "bob": torch.zeros(1, 24, dtype=torch.bool)}
    >>> torch.equal(faa(video, audio, region_masks=faces, num_frames=3), video)   # outside every face: unchanged
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...cross import cross_attention
from ...errors import check_int, check_key_padding_mask, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import plain_heads, zero_


class FaceAwareAudioAdapter(nn.Module):
    """``x (B, T L, dim)`` video tokens, ``context {character: (B, T A, context_dim)}`` (or one tensor: a single
    character) audio tokens -> ``(B, T L, dim)``. ``region_masks {character: (B, T L)}`` face masks (bool, or float
    weights in x's dtype; None = everywhere), ``key_padding_mask {character: (B, T A)}``, ``num_frames`` T."""

    def __init__(self, dim: int, heads: int = 1, *, dim_head: int = 1024, context_dim: int | None = None,
                 characters: tuple[str, ...] = ("speaker",), eps: float = 1e-5) -> None:
        super().__init__()
        if not isinstance(characters, tuple) or not characters or not all(
                isinstance(c, str) and c for c in characters) or len(set(characters)) != len(characters):
            raise TypeError(f"characters: expected a tuple of distinct non-empty names, got {characters!r}")
        self.characters = characters
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        self.dim_head = check_int("dim_head", dim_head)
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(self.context_dim, eps=eps)  # audio
        self.norm2 = nn.LayerNorm(dim, eps=eps)  # video latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(self.context_dim, 2 * inner, bias=False)
        self.to_out = zero_(nn.Linear(inner, dim, bias=False))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.heads, self.dim_head).transpose(1, 2)  # (B, h, N, dim_head)

    def _frames(self, name: str, t: torch.Tensor, T: int) -> torch.Tensor:
        """(B, T n, ...) -> (B T, n, ...): frames folded into the batch."""
        if t.shape[1] % T:
            raise ValueError(f"{name}: {t.shape[1]} tokens do not split into num_frames={T} frames, got shape "
                             f"{tuple(t.shape)}")
        return t.reshape(t.shape[0] * T, t.shape[1] // T, *t.shape[2:])

    def forward(self, x: torch.Tensor, context: torch.Tensor | Mapping[str, torch.Tensor] | None = None, *,
                region_masks: Mapping[str, torch.Tensor] | None = None,
                key_padding_mask: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
                num_frames: int = 1) -> torch.Tensor:
        check_module_input(self, x, channels=self.dim)
        T = check_int("num_frames", num_frames)
        if context is None:
            raise ValueError("context: the adapter needs each character's audio tokens {character: (B, T A, "
                             f"{self.context_dim})}}; got none")
        single = not isinstance(context, Mapping)
        ctx = {self.characters[0]: context} if single else dict(context)
        if not ctx:
            raise ValueError("context: expected at least one character's audio, got an empty mapping")
        unknown = [n for n in ctx if n not in self.characters]
        if unknown:
            raise ValueError(f"context: unknown character {unknown[0]!r}; this adapter's characters are "
                             f"{list(self.characters)} (option characters)")
        for arg, d in (("key_padding_mask", None if single else key_padding_mask), ("region_masks", region_masks)):
            if d is not None and not isinstance(d, Mapping):
                raise TypeError(f"{arg}: expected a mapping {{character: tensor}}, got {type(d).__name__}")
        if single and region_masks:
            raise TypeError("region_masks: a single-character call takes no face masks; pass the context as "
                            "{character: audio} to give them")
        kpm = ({} if key_padding_mask is None else {self.characters[0]: key_padding_mask}) if single else dict(
            key_padding_mask or {})
        regions = dict(region_masks or {})
        for arg, d in (("key_padding_mask", kpm), ("region_masks", regions)):
            extra = [n for n in d if n not in ctx]
            if extra:
                raise ValueError(f"{arg}: given for {extra[0]!r}, which is not in this call's context {list(ctx)}")
        B, N, _ = x.shape
        q = self._split(self.to_q(self.norm2(self._frames("x", x, T))))  # (B T, h, L, dim_head)
        sources, masks, weights = {}, {}, {}
        for name, audio in ctx.items():
            label = "context" if single else f"context[{name!r}]"
            check_module_input(self, audio, name=label, channels=self.context_dim)
            if audio.shape[0] != B:
                raise ValueError(f"{label}: batch {audio.shape[0]} does not match x's batch {B}")
            k, v = self.to_kv(self.norm1(self._frames(label, audio, T))).chunk(2, dim=-1)  # (B T, A, inner) each
            sources[name] = (self._split(k), self._split(v))
            if name in kpm:
                mname = "key_padding_mask" if single else f"key_padding_mask[{name!r}]"
                check_key_padding_mask(kpm[name], B, audio.shape[1], name=mname, device=x.device)
                masks[name] = self._frames(mname, kpm[name], T)
            if name in regions:
                r = regions[name]
                if not isinstance(r, torch.Tensor) or tuple(r.shape) != (B, N):
                    got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                    raise ValueError(f"region_masks[{name!r}]: expected a face mask (B, T L) = ({B}, {N}), got {got}")
                weights[name] = self._frames(f"region_masks[{name!r}]", r, T)
        out = cross_attention(q, sources, masks=masks or None, region_masks=weights or None,
                              scale=1.0 / math.sqrt(self.dim_head))  # (B T, h, L, dim_head), summed over characters
        out = out.transpose(1, 2).reshape(B * T, N // T, self.heads * self.dim_head)
        return x + self.to_out(out).reshape(B, N, self.dim)


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("hunyuan_avatar", kv_heads, causal)
    return FaceAwareAudioAdapter(dim, heads, **HUNYUAN_AVATAR.resolve_options(options))


HUNYUAN_AVATAR = register(Mechanism(
    name="hunyuan_avatar",
    aliases=("face_aware_audio_adapter", "faa"),
    family="cross",
    catalog="P004",
    title="HunyuanVideo-Avatar: High-Fidelity Audio-Driven Human Animation for Multiple Characters",
    arxiv="2505.20156",
    code="https://github.com/Tencent-Hunyuan/HunyuanVideo-Avatar",
    summary="Face-aware audio adapter: each latent frame attends to its own audio tokens per character; the result is "
            "added inside that character's face mask only (zero-initialised output).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(T L A d_h) per character (frame-aligned), memory O(L + A) per frame fused",
    module=_module,
    options=(
        Option("dim_head", 1024, int, low=1, doc="head width (official: one head of 1024)"),
        Option("context_dim", None, int, low=1, allow_none=True, doc="audio token width (None: dim)"),
        Option("characters", ("speaker",), tuple, doc="names of the characters (context sources); a single tensor "
               "context is the first"),
        Option("eps", 1e-5, float, low=0.0, doc="layer-norm epsilon"),
    ),
    permutation_equivariant=True,
    test_options={"dim_head": 8, "characters": ("alice", "bob")},
    cross=CrossSpec(sources=("alice", "bob"), context_permutation_invariant=True, mode="separate"),
    notes="outside every face mask the output is x exactly; an all-ones mask is the plain residual cross-attention; "
          "characters with disjoint masks do not reach each other's regions; frame t reads only frame t's audio.",
))
