"""DMMI: dual multi-modal interaction -- a text-to-image and an image-to-text transformer decoder.

Paper: "Beyond One-to-One: Rethinking the Referring Image Segmentation", Hu, Wang, Shao, Xie, Li, Han, Luo,
arXiv 2308.13853 (ICCV 2023). Official code: https://github.com/toggle1995/RIS-DMMI (lib/mask_predictor.py).
CATALOG P043.
Two decoder branches let information flow both ways: in the text-to-image decoder the visual tokens query the text
(``Transformer_Fusion``: visual tokens are the decoder target, the text its memory) to localise the referred target;
in the image-to-text decoder the text with its entity phrase erased queries the visual features (``Language_
Transformer``) to reconstruct that phrase. Each is one ``nn.TransformerDecoderLayer``: ``x = LN1(x + SA(x))``,
``x = LN2(x + CA(x, memory))``, ``x = LN3(x + FF(x))``, width 768, 8 heads, FF 2048 with ReLU.

Confirmed against the official code: both branches are torch's post-norm decoder layer with those sizes and no
masks (the text memory includes its padding there; ``key_padding_mask`` masks padded text tokens here, all True
reproduces the official call); the official image-to-text branch first maps the visual map with a 3x3 conv + BN +
ReLU to the text width (outside the attention: give the visual tokens at ``context_dim``). Dropout is omitted.
Built from :class:`attnzoo.mechanisms.cross._blocks.DecoderBlock` (``load_torch`` copies a torch layer's weights).

Each branch is one instance of this record: build two (the paper's pair); ``x`` = the decoder's target, ``context`` =
its memory.

Example:
    >>> import torch, attnzoo
    >>> text_to_image = attnzoo.build("dmmi", 32, 4, ffn=64)
    >>> image_to_text = attnzoo.build("dmmi", 32, 4, ffn=64)
    >>> visual, erased_text = torch.randn(2, 9, 32), torch.randn(2, 6, 32)
    >>> text_to_image(visual, erased_text).shape, image_to_text(erased_text, visual).shape
    (torch.Size([2, 9, 32]), torch.Size([2, 6, 32]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import check_int
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import DecoderBlock, check_pair, plain_heads


class DMMIDecoder(nn.Module):
    """One DMMI branch: ``x (B, N, dim)`` target tokens, ``context (B, M, dim)`` memory tokens -> ``(B, N, dim)``
    (text-to-image: x = visual tokens, context = text; image-to-text: x = the erased text, context = visual tokens)."""

    def __init__(self, dim: int, heads: int, *, ffn: int = 2048, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = self.context_dim = check_int("dim", dim)
        self.decoder = DecoderBlock(dim, heads, ffn=ffn, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, x_padding_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, N, dim) target, context (B, M, dim) memory; key_padding_mask (B, M) masks padded memory tokens,
        x_padding_mask (B, N) padded target tokens (as self-attention keys)."""
        x, context = check_pair(self, x, context, channels=self.dim, context_channels=self.dim)
        return self.decoder(x, context, key_padding_mask=key_padding_mask, x_padding_mask=x_padding_mask)


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("dmmi", kv_heads, causal)
    return DMMIDecoder(dim, heads, **DMMI.resolve_options(options))


DMMI = register(Mechanism(
    name="dmmi",
    aliases=("dual_multimodal_interaction",),
    family="cross",
    catalog="P043",
    title="Beyond One-to-One: Rethinking the Referring Image Segmentation",
    arxiv="2308.13853",
    code="https://github.com/toggle1995/RIS-DMMI",
    summary="A DMMI branch: a post-norm transformer decoder layer; visual tokens query the text (text-to-image), the "
            "erased text queries the visual tokens (image-to-text).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O((N^2 + N M) d + N d ffn), memory O(N + M) fused",
    module=_module,
    options=(
        Option("ffn", 2048, int, low=1, doc="feed-forward width (torch's default 2048, as the official layers)"),
        Option("eps", 1e-5, float, low=0.0, doc="layer-norm epsilon"),
    ),
    permutation_equivariant=True,
    test_options={"ffn": 24},
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="equals torch.nn.TransformerDecoderLayer (post-norm, dropout 0) with copied weights; target tokens are "
          "permutation-equivariant, memory tokens permutation-invariant; build one per direction.",
))
