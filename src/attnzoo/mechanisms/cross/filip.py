"""FILIP token-wise late interaction: each token finds its most similar token of the other modality (no softmax).

Paper: "FILIP: Fine-grained Interactive Language-Image Pre-Training", Yao, Huang, Hou, Lu, Niu, Xu, Liang, Li, Jiang,
Xu, arXiv 2111.07783 (ICLR 2022). Official code: none released. CATALOG P059.
With L2-normalised image tokens x^I_i (n1, d) and text tokens x^T_j (n2, d), the image-to-text similarity of image i
and text j is ``s^I(i, j) = (1 / n1) sum_k max_r <x^I_{i,k}, x^T_{j,r}>`` (every image token's best text token,
averaged) and the text-to-image one ``s^T(i, j) = (1 / n2) sum_r max_k <x^I_{i,k}, x^T_{j,r}>``; both feed an
InfoNCE loss over the batch (i2t over texts, t2i over images).

Choices: padded tokens (``image_mask``/``text_mask``, True = real) are excluded from both the max and the mean (the
paper averages over the non-padded text tokens); tokens are L2-normalised here (``normalize=False`` if they already
are). The batch similarity matrix is computed in chunks of image tokens with a running max for the text side, so
memory is O(chunk x n2 + n2) per image-text pair, never the (B1, B2, n1, n2) tensor at once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_bool, check_float, check_int, check_key_padding_mask, check_module_input, check_tensor
from ...registry import CrossSpec, Mechanism, Option, register


def _check_tokens(name: str, x: torch.Tensor, mask: torch.Tensor | None, mask_name: str) -> None:
    check_tensor(name, x, ndim=3)
    if x.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one token, got shape {tuple(x.shape)}")
    check_key_padding_mask(mask, x.shape[0], x.shape[1], name=mask_name, device=x.device)


def filip_similarity(image: torch.Tensor, text: torch.Tensor, *, image_mask: torch.Tensor | None = None,
                     text_mask: torch.Tensor | None = None, normalize: bool = True, chunk: int = 64
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise similarities of every image with every text of a batch.

    image (B1, n1, d), text (B2, n2, d); masks (B1, n1), (B2, n2) bool, True = real token. Returns
    (s_i2t (B1, B2), s_t2i (B1, B2)). Image tokens go ``chunk`` at a time: memory O(B1 B2 chunk n2).
    """
    _check_tokens("image", image, image_mask, "image_mask")
    _check_tokens("text", text, text_mask, "text_mask")
    check_bool("normalize", normalize)
    check_int("chunk", chunk)
    if image.shape[-1] != text.shape[-1] or image.dtype != text.dtype:
        raise ValueError(f"image, text: expected the same width and dtype, got {tuple(image.shape)} {image.dtype} "
                         f"and {tuple(text.shape)} {text.dtype}")
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    B1, n1, _ = image.shape
    B2, n2, _ = text.shape
    neg = torch.finfo(image.dtype).min
    t_real = None if text_mask is None else text_mask[None, :, None, :]  # (1, B2, 1, n2)
    i2t_sum = image.new_zeros(B1, B2)
    t2i_max = image.new_full((B1, B2, n2), neg)
    for a in range(0, n1, chunk):
        b = min(n1, a + chunk)
        sim = torch.einsum("ikd,jrd->ijkr", image[:, a:b], text)  # (B1, B2, c, n2)
        best_text = (sim if t_real is None else sim.masked_fill(~t_real, neg)).amax(dim=-1)  # (B1, B2, c)
        if image_mask is not None:
            real = image_mask[:, None, a:b]  # (B1, 1, c)
            best_text = best_text * real
            sim = sim.masked_fill(~real[..., None], neg)
        i2t_sum = i2t_sum + best_text.sum(dim=-1)
        t2i_max = torch.maximum(t2i_max, sim.amax(dim=2))  # (B1, B2, n2)
    n_img = image.new_full((B1, 1), n1) if image_mask is None else image_mask.sum(1, keepdim=True).to(image.dtype)
    s_i2t = i2t_sum / n_img.clamp_min(1)
    if text_mask is None:
        s_t2i = t2i_max.mean(dim=-1)
    else:
        real = text_mask[None].to(image.dtype)  # (1, B2, n2)
        s_t2i = (t2i_max * real).sum(-1) / real.sum(-1).clamp_min(1)
    return s_i2t, s_t2i


def filip_loss(s_i2t: torch.Tensor, s_t2i: torch.Tensor, *, temperature: float = 0.07) -> torch.Tensor:
    """The symmetric InfoNCE of FILIP over a batch of matching pairs (image i with text i): the mean of the i2t
    cross-entropy over texts (rows of s_i2t) and the t2i one over images (columns of s_t2i)."""
    check_float("temperature", temperature, low=0.0, low_open=True)
    if s_i2t.shape != s_t2i.shape or s_i2t.dim() != 2 or s_i2t.shape[0] != s_i2t.shape[1]:
        raise ValueError(f"s_i2t, s_t2i: expected two (B, B) similarity matrices, got {tuple(s_i2t.shape)} and "
                         f"{tuple(s_t2i.shape)}")
    target = torch.arange(s_i2t.shape[0], device=s_i2t.device)
    return 0.5 * (F.cross_entropy(s_i2t / temperature, target) + F.cross_entropy(s_t2i.t() / temperature, target))


class FILIPLateInteraction(nn.Module):
    """Projections of both modalities into a shared space, then token-wise late interaction per pair:
    ``x (B, n1, dim)`` image tokens, ``context (B, n2, context_dim)`` text tokens -> ``(B, 2)`` the pair's
    [s_i2t, s_t2i]. :meth:`similarity` gives the (B1, B2) matrices of a batch (for :func:`filip_loss`)."""

    def __init__(self, dim: int, heads: int | None = None, *, context_dim: int | None = None,
                 embed_dim: int | None = None, chunk: int = 64) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        self.embed_dim = dim if embed_dim is None else check_int("embed_dim", embed_dim)
        self.chunk = check_int("chunk", chunk)
        self.image_proj = nn.Linear(self.dim, self.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.context_dim, self.embed_dim, bias=False)

    def _embed(self, x, context, image_mask, text_mask):
        check_module_input(self, x, channels=self.dim)
        if context is None:
            raise ValueError("context: FILIP pairs image tokens x with text tokens; got no text")
        check_module_input(self, context, name="context", channels=self.context_dim)
        return self.image_proj(x), self.text_proj(context)

    def similarity(self, x: torch.Tensor, context: torch.Tensor, *, image_mask: torch.Tensor | None = None,
                   text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_i2t, s_t2i), each (B1, B2): every image of x with every text of context."""
        xi, xt = self._embed(x, context, image_mask, text_mask)
        return filip_similarity(xi, xt, image_mask=image_mask, text_mask=text_mask, chunk=self.chunk)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                image_mask: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, n1, dim), context (B, n2, context_dim) -> (B, 2): [s_i2t, s_t2i] of each image-text pair."""
        xi, xt = self._embed(x, context, image_mask, text_mask)
        if xi.shape[0] != xt.shape[0]:
            raise ValueError(f"context: batch {xt.shape[0]} does not match x's batch {xi.shape[0]} (pairs)")
        rows = []
        for b in range(xi.shape[0]):  # each pair alone: O(chunk x n2) memory, no B x B matrix
            s1, s2 = filip_similarity(xi[b : b + 1], xt[b : b + 1], chunk=self.chunk,
                                      image_mask=None if image_mask is None else image_mask[b : b + 1],
                                      text_mask=None if text_mask is None else text_mask[b : b + 1])
            rows.append(torch.cat([s1.view(1), s2.view(1)]))
        return torch.stack(rows)  # (B, 2)


def _module(dim: int, heads: int, **options: Any):
    return FILIPLateInteraction(dim, heads, **FILIP.resolve_options(options))


FILIP = register(Mechanism(
    name="filip",
    aliases=("token_wise_late_interaction",),
    family="cross",
    kind="fusion",
    catalog="P059",
    title="FILIP: Fine-grained Interactive Language-Image Pre-Training",
    arxiv="2111.07783",
    code="(none released)",
    summary="Token-wise late interaction: every image token's best-matching text token (and vice versa), similarities "
            "averaged; no softmax; chunked so a pair never holds its n1 x n2 matrix at once.",
    patterns=("noncausal_cross",),
    exact=False,
    complexity="time O(n1 n2 d) per pair, memory O(chunk n2 + n2) per pair",
    module=_module,
    options=(
        Option("context_dim", None, int, low=1, allow_none=True, doc="text token width (None: dim)"),
        Option("embed_dim", None, int, low=1, allow_none=True, doc="shared embedding width (None: dim)"),
        Option("chunk", 64, int, low=1, doc="image tokens per chunk"),
    ),
    test_options={"context_dim": 12, "chunk": 3},
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="equals the brute-force double loop; invariant to token permutations; one token each is the cosine "
          "similarity; output (B, 2) = [s_i2t, s_t2i] per pair.",
))
