"""Multi-layer trainable pooling: learned latent queries cross-attend to the hidden states of all of an LLM's layers.

Paper: "Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?", Tang, Yang,
arXiv 2409.02727. Official code: https://github.com/yixuantt/PoolingAndAttn (``PerceiverResampler`` in
``pooling_layers/MultiLayersTrainablePooling.py``, used by ``model_loaders/model3.py``). CATALOG P124.
The last token's hidden state of every layer l (an (L, C) memory, plus a trainable layer embedding) is the key/value
set of a cross-attention whose queries are trainable latents; a feed-forward follows; the latents are averaged and
L2-normalised into the text embedding. Unlike last-layer pooling (NV-Embed's latent attention) every layer's view of
the text contributes, weighted by the latents.

Confirmed from the official code: memory = hidden states of layers 1..L at the last position + ``Embedding(L, C)``;
pre-norms (one LayerNorm on the memory, one on the latents), queries from the latents, keys/values from the memory,
projections without bias, a residual to the latents; a GEGLU feed-forward (x4, with biases) behind a LayerNorm and a
residual; mean over latents, L2 normalisation. Official sizes: 768 latents, 32 heads of width 2048 (options here;
``head_dim`` defaults to dim / heads). Built on the shared resampler block (:class:`attnzoo.cross.ResamplerLayer`).
``reduce="none"`` returns the latents (B, num_latents, dim) instead of the embedding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...cross import LatentResampler
from ...errors import check_choice, check_int, check_key_padding_mask, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register

REDUCE = ("mean", "none")


class MultiLayerTrainablePooling(nn.Module):
    """``x (B, L, dim)``: one hidden state per layer (e.g. the last token of each of L layers) -> ``(B, dim)``
    L2-normalised embedding (``reduce="mean"``) or the latents ``(B, num_latents, dim)`` (``reduce="none"``).

    ``key_padding_mask (B, L)`` drops layers. ``num_layers`` sizes the layer-embedding table (L <= num_layers).
    """

    def __init__(self, dim: int, heads: int, *, num_latents: int = 768, num_layers: int = 32,
                 head_dim: int | None = None, ff_mult: int = 4, reduce: str = "mean") -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        self.num_layers = check_int("num_layers", num_layers)
        self.reduce = check_choice("reduce", reduce, REDUCE)
        self.layer_embedding = nn.Embedding(self.num_layers, dim)
        self.resampler = LatentResampler(dim, heads, num_latents=num_latents, head_dim=head_dim, ff_mult=ff_mult)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_layers={self.num_layers}, reduce={self.reduce!r}"

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_module_input(self, x, layout="(B, L, C)", channels=self.dim)
        B, L, _ = x.shape
        if L > self.num_layers:
            raise ValueError(f"x: {L} layers, but the layer embedding has num_layers={self.num_layers}")
        check_key_padding_mask(key_padding_mask, B, L, device=x.device)
        memory = x + self.layer_embedding(torch.arange(L, device=x.device))  # (B, L, dim)
        z = self.resampler(memory, key_padding_mask=key_padding_mask)  # (B, num_latents, dim)
        if self.reduce == "none":
            return z
        return F.normalize(z.mean(dim=1), dim=-1)  # (B, dim)


def hidden_states_memory(hidden_states, *, position: int = -1) -> torch.Tensor:
    """(B, L, C) from a Hugging Face ``output_hidden_states`` tuple (embeddings, layer 1, ..., layer L): the token at
    ``position`` of every layer (the official code takes layers 1..L at the last position)."""
    if not isinstance(hidden_states, (tuple, list)) or len(hidden_states) < 2:
        raise TypeError("hidden_states: expected the (embeddings, layer 1, ..., layer L) tuple of a model run with "
                        "output_hidden_states=True")
    return torch.stack([h[:, position] for h in hidden_states[1:]], dim=1)


def _module(dim: int, heads: int, **options: Any):
    return MultiLayerTrainablePooling(dim, heads, **MULTILAYER_POOLING.resolve_options(options))


MULTILAYER_POOLING = register(Mechanism(
    name="multilayer_pooling",
    aliases=("multi_layers_trainable_pooling", "all_layer_pool"),
    family="cross",
    kind="pooling",
    catalog="P124",
    title="Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?",
    arxiv="2409.02727",
    code="https://github.com/yixuantt/PoolingAndAttn",
    summary="Trainable latents cross-attend to every layer's last-token hidden state (+ layer embeddings); a GEGLU "
            "feed-forward; mean over latents, L2-normalised: the text embedding.",
    patterns=("noncausal_cross",),
    exact=False,
    complexity="time O(num_latents L d), memory O(num_latents + L) fused",
    module=_module,
    options=(
        Option("num_latents", 768, int, low=1, doc="trainable latent queries (official 768)"),
        Option("num_layers", 32, int, low=1, doc="size of the layer-embedding table (the LLM's layers)"),
        Option("head_dim", None, int, low=1, allow_none=True, doc="per-head width (official 2048; None: dim/heads)"),
        Option("ff_mult", 4, int, low=0, doc="GEGLU feed-forward width multiple (0: none)"),
        Option("reduce", "mean", str, choices=REDUCE, doc="mean + L2 norm (the embedding) or the latents"),
    ),
    test_options={"num_latents": 5, "num_layers": 12},
    cross=CrossSpec(),
    notes="layers carry embeddings by index, so their order matters; one layer and one latent without the "
          "feed-forward reduce to projecting that layer's state.",
))
