"""LightCLIP: masked text tokens cross-attend to the image tokens (MLM fusion), and words are matched one-to-one to
patches for token-level alignment.

Paper: "LightCLIP: Learning Multi-Level Interaction for Lightweight Vision-Language Models", Nie, He, Han, Tang, Guo,
Du, Wang, arXiv 2312.00674. Official code: none released (none found). CATALOG P112.
Two training-time interactions of a lightweight CLIP: (1) an auxiliary fusion module injects the unmasked image
embeddings into the masked text embeddings at several stages for masked language modelling,
``t' = t + MHA(LN(t), i, i)``; (2) a relaxed bipartite matching pairs words with patches for a token-level alignment
objective on the matched cosine similarities (:func:`token_alignment`).

Same composition as PMP (P106, ``pmp.py``): a residual cross-attention of one token stream (here the masked text) over
another (the image tokens) -- so this record is an alias of :class:`attnzoo.mechanisms.cross.pmp.PromptGuidedQueries`
with LightCLIP's defaults (pre-norm as in a CLIP text transformer, not zero-initialised); only the matching is
LightCLIP's own code here.

(?) No official code: the fusion layout (pre-norm residual, width 512 and 8 heads as CLIP's text tower) is a choice,
each an option; "relaxed" matching is not specified beyond its name -- :func:`token_alignment` computes the exact
minimum-cost one-to-one assignment (the Hungarian algorithm, each word its own patch, as many pairs as the shorter
side) on cosine distances, padded tokens excluded.

Example:
    >>> import torch, attnzoo
    >>> fuse = attnzoo.build("lightclip", 32, 4, context_dim=24)
    >>> masked_text, image = torch.randn(2, 6, 32), torch.randn(2, 10, 24)
    >>> fuse(masked_text, image).shape
    torch.Size([2, 6, 32])
    >>> from attnzoo.mechanisms.cross.lightclip import token_alignment
    >>> words, patches = torch.eye(3), torch.eye(3)[[2, 0, 1]]
    >>> token_alignment(words, patches)[0].tolist()   # word i -> the patch equal to it
    [1, 2, 0]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...errors import check_key_padding_mask, check_tensor
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import plain_heads
from .pmp import PromptGuidedQueries


def linear_assignment(cost: torch.Tensor) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one assignment of a (n, m) cost matrix: min(n, m) (row, column) pairs, each row and column
    used at most once, the total cost minimal (Hungarian algorithm with potentials, O(n^2 m), in float64 on CPU)."""
    check_tensor("cost", cost, ndim=2)
    flip = cost.shape[0] > cost.shape[1]
    a = (cost.t() if flip else cost).detach().to("cpu", torch.float64).tolist()
    n, m = len(a), len(a[0]) if a else 0
    inf = float("inf")
    u, v, p, way = [0.0] * (n + 1), [0.0] * (m + 1), [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while True:  # grow an alternating tree from row i until a free column is reached
            used[j0] = True
            i0, delta, j1 = p[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = a[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:  # augment along the path
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    pairs = sorted((p[j] - 1, j - 1) for j in range(1, m + 1) if p[j])
    return [(c, r) for r, c in pairs] if flip else pairs


def token_alignment(words: torch.Tensor, patches: torch.Tensor, *, word_mask: torch.Tensor | None = None,
                    patch_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One caption's words (T, d) and one image's patches (P, d) matched one-to-one by maximal total cosine similarity.

    Returns (match (T,) long: the patch of each word, -1 where a word got none or is padded; similarity: the mean
    cosine of the matched pairs, differentiable, the token-level alignment score)."""
    check_tensor("words", words, ndim=2)
    check_tensor("patches", patches, ndim=2)
    if words.shape[1] != patches.shape[1]:
        raise ValueError(f"words, patches: expected one width, got {tuple(words.shape)} and {tuple(patches.shape)}")
    for name, mask, n in (("word_mask", word_mask, words.shape[0]), ("patch_mask", patch_mask, patches.shape[0])):
        if isinstance(mask, torch.Tensor) and mask.dim() != 1:
            raise ValueError(f"{name}: expected a bool tensor ({n},), got shape {tuple(mask.shape)}")
        check_key_padding_mask(mask[None] if isinstance(mask, torch.Tensor) else mask, 1, n, name=name,
                               device=words.device)
    w_idx = torch.arange(words.shape[0]) if word_mask is None else word_mask.cpu().nonzero().flatten()
    p_idx = torch.arange(patches.shape[0]) if patch_mask is None else patch_mask.cpu().nonzero().flatten()
    sim = F.normalize(words, dim=-1) @ F.normalize(patches, dim=-1).t()  # (T, P) cosine
    match = torch.full((words.shape[0],), -1, dtype=torch.long)
    if len(w_idx) == 0 or len(p_idx) == 0:
        return match, sim.new_zeros(())
    pairs = linear_assignment(-sim[w_idx][:, p_idx])
    rows = torch.tensor([w_idx[r] for r, _ in pairs])
    cols = torch.tensor([p_idx[c] for _, c in pairs])
    match[rows] = cols
    return match, sim[rows.to(sim.device), cols.to(sim.device)].mean()


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("lightclip", kv_heads, causal)
    return PromptGuidedQueries(dim, heads, **LIGHTCLIP.resolve_options(options))


LIGHTCLIP = register(Mechanism(
    name="lightclip",
    aliases=("lightclip_fusion",),
    family="cross",
    catalog="P112",
    title="LightCLIP: Learning Multi-Level Interaction for Lightweight Vision-Language Models",
    arxiv="2312.00674",
    code="(none released)",
    summary="MLM fusion: masked text tokens attend to the image tokens (pre-norm residual); token_alignment matches "
            "words to patches one-to-one (Hungarian) for token-level alignment.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="fusion O(T P d), memory O(T + P) fused; matching O(T^2 P) on CPU",
    module=_module,
    options=(
        Option("context_dim", 512, int, low=1, doc="image token width (a choice: CLIP's joint width 512)"),
        Option("norm", "pre", str, choices=("none", "pre"), doc="pre-norm of the text tokens, or none"),
        Option("zero_init", False, bool, doc="zero-initialise the output projection"),
        Option("bias", True, bool, doc="biases in the projections"),
    ),
    permutation_equivariant=True,
    test_options={"context_dim": 12},
    cross=CrossSpec(context_permutation_invariant=True),
    notes="alias of PMP's residual cross-attention (pmp.py) with LightCLIP's defaults; token_alignment equals the "
          "brute-force best one-to-one matching; (?) fusion layout not published.",
))
