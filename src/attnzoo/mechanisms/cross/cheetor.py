"""Cheetor's controllable knowledge re-injection: instruction-conditioned queries re-read the image through the Q-Former
and are added back into the LLM's hidden states at the image positions.

Paper: "Empowering Vision-Language Models to Follow Interleaved Vision-Language Instructions" (Cheetor), Li, Tang,
Ge, Wu, Feng, Zhang, Li, Zhuang, Zhang, Wang, Tian, Zheng, Chua, arXiv 2308.04152. Official code:
https://github.com/DCDmllm/Cheetah (Cheetah/cheetah/models/modeling_llama.py, ``LlamaModel.forward`` at
``update_layer``; cheetah_vicuna.py). CATALOG P099.
At decoder layer L of the LLM, the hidden state h of the last instruction token conditions the visual prompt
generator: ``Q = Q_0 + W_p h`` (learned queries plus a projection of h), the Q-Former re-reads each image's ViT features
with these queries, and the result is added to the hidden states at that image's positions:
``H[img] += W_o QFormer(Q, image)``; W_p and W_o are zero-initialised, so the untrained module changes nothing.

Confirmed against the official code: ``qformer_proj`` (LLM width -> Q-Former width) and ``llm_proj`` (back) are
zero-initialised linears, the conditioning is ``hidden_outputs + query_tokens`` with the hidden state of the last
instruction token of each row (``input_part_targets_len``), the injection is ``hidden_states[:, start:end] +=`` at
layer ``update_layer`` (16), prefill only (``past_key_values is None``); BLIP-2's Q-Former (width 768, 12 heads, 32
queries, cross-attention every 2nd of 12 BERT layers) re-reads ViT-g features (width 1408). Here the Q-Former is
attnzoo's post-norm BERT-style block stack (self-attention among queries, cross-attention to the image every
``cross_every`` layers, GELU feed-forward, eps 1e-12) built from the family's blocks; loading BLIP-2 weights into it is
outside this recipe. A prefill-time edit: the image positions come before the instruction, so it is non-causal.

Example:
    >>> import torch, attnzoo
    >>> ckr = attnzoo.build("cheetor", 32, 2, context_dim=24, num_queries=3, qformer_dim=16, qformer_layers=2, ffn=32)
    >>> hidden, image = torch.randn(2, 12, 32), torch.randn(2, 10, 24)
    >>> torch.equal(ckr(hidden, image), hidden)   # zero-initialised projections: the LLM is unchanged
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import check_int
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import MLP, AttentionSublayer, check_pair, plain_heads, zero_


class QFormerLayer(nn.Module):
    """A BERT-style post-norm layer of learned queries: self-attention, optionally cross-attention to the image, and a
    GELU feed-forward, each ``LN(x + f(x))``."""

    def __init__(self, dim: int, heads: int, context_dim: int, ffn: int, cross: bool, eps: float = 1e-12) -> None:
        super().__init__()
        self.self_attn = AttentionSublayer(dim, heads, self_attention=True, eps=eps)
        self.cross_attn = AttentionSublayer(dim, heads, context_dim=context_dim, eps=eps) if cross else None
        self.ff = MLP(dim, ffn, activation="gelu")
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, q: torch.Tensor, image: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        q = self.self_attn(q)
        if self.cross_attn is not None:
            q = self.cross_attn(q, image, key_padding_mask=key_padding_mask)
        return self.norm(q + self.ff(q))


class KnowledgeReinjection(nn.Module):
    """``x (B, N, dim)`` LLM hidden states at the update layer, ``context (B, M, context_dim)`` one image's ViT features
    -> ``x`` with ``W_o QFormer(Q_0 + W_p h)`` added at positions ``image_start .. image_start + num_queries``.

    ``instruction_index`` (int or (B,) integer tensor; default N - 1): where the last instruction token sits;
    ``image_start`` (int or (B,)): where the image's query tokens sit in x (default: the ``image_start`` option)."""

    def __init__(self, dim: int, heads: int, *, context_dim: int = 1408, num_queries: int = 32, qformer_dim: int = 768,
                 qformer_layers: int = 12, cross_every: int = 2, ffn: int = 3072, image_start: int = 1) -> None:
        super().__init__()
        self.dim, self.context_dim = check_int("dim", dim), check_int("context_dim", context_dim)
        self.num_queries = check_int("num_queries", num_queries)
        self.image_start = check_int("image_start", image_start, low=0)
        qformer_dim, layers = check_int("qformer_dim", qformer_dim), check_int("qformer_layers", qformer_layers)
        cross_every = check_int("cross_every", cross_every)
        self.query_tokens = nn.Parameter(torch.randn(num_queries, qformer_dim) * 0.02)  # BLIP-2's init std
        self.qformer_proj = zero_(nn.Linear(dim, qformer_dim))
        self.llm_proj = zero_(nn.Linear(qformer_dim, dim))
        self.layers = nn.ModuleList(QFormerLayer(qformer_dim, heads, context_dim, check_int("ffn", ffn),
                                                 cross=i % cross_every == 0) for i in range(layers))

    def _rows(self, name: str, value: int | torch.Tensor, batch: int, low: int, high: int, device) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bool or value.is_floating_point() or tuple(value.shape) != (batch,):
                raise TypeError(f"{name}: expected an int or an integer tensor ({batch},), got dtype {value.dtype} "
                                f"and shape {tuple(value.shape)}")
            rows = value.to(device)
        else:
            rows = torch.full((batch,), check_int(name, value, low=None), device=device)
        if bool((rows < low).any()) or bool((rows > high).any()):
            raise ValueError(f"{name}: expected values in [{low}, {high}] for this x, got {rows.tolist()}")
        return rows

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, instruction_index: int | torch.Tensor | None = None,
                image_start: int | torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, M, context_dim) image features, key_padding_mask (B, M) bool -> (B, N, dim)."""
        x, image = check_pair(self, x, context, channels=self.dim, context_channels=self.context_dim)
        B, N, _ = x.shape
        instr = self._rows("instruction_index", N - 1 if instruction_index is None else instruction_index, B, 0, N - 1,
                           x.device)
        start = self._rows("image_start", self.image_start if image_start is None else image_start, B, 0,
                           N - self.num_queries, x.device)
        h = x[torch.arange(B, device=x.device), instr]  # (B, dim): the last instruction token's state
        q = self.query_tokens.unsqueeze(0) + self.qformer_proj(h).unsqueeze(1)  # (B, Nq, qformer_dim)
        for layer in self.layers:
            q = layer(q, image, key_padding_mask)
        inject = self.llm_proj(q)  # (B, Nq, dim)
        pos = start.view(B, 1) + torch.arange(self.num_queries, device=x.device)  # (B, Nq) image positions
        pos = pos.unsqueeze(-1).expand(-1, -1, self.dim)
        return x + torch.zeros_like(x).scatter_add(1, pos, inject)  # H[img] += W_o QFormer(...)


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("cheetor", kv_heads, causal)
    return KnowledgeReinjection(dim, heads, **CHEETOR.resolve_options(options))


CHEETOR = register(Mechanism(
    name="cheetor",
    aliases=("knowledge_reinjection", "ckr"),
    family="cross",
    catalog="P099",
    title="Empowering Vision-Language Models to Follow Interleaved Vision-Language Instructions",
    arxiv="2308.04152",
    code="https://github.com/DCDmllm/Cheetah",
    summary="Controllable knowledge re-injection: queries conditioned on the LLM's instruction state re-read the image "
            "through a Q-Former; the result is added at the image positions (zero-initialised, prefill-time).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(L (q^2 + q M) d_q) for q queries over M image tokens, plus O(q d) projections",
    module=_module,
    options=(
        Option("context_dim", 1408, int, low=1, doc="ViT feature width (EVA ViT-g: 1408)"),
        Option("num_queries", 32, int, low=1, doc="Q-Former queries (= image tokens in the LLM)"),
        Option("qformer_dim", 768, int, low=1, doc="Q-Former width (BLIP-2: 768)"),
        Option("qformer_layers", 12, int, low=1, doc="Q-Former layers (BLIP-2: 12)"),
        Option("cross_every", 2, int, low=1, doc="cross-attention in every k-th layer (BLIP-2: 2)"),
        Option("ffn", 3072, int, low=1, doc="Q-Former feed-forward width"),
        Option("image_start", 1, int, low=0, doc="default position of the first image token (after BOS)"),
    ),
    test_options={"context_dim": 12, "num_queries": 2, "qformer_dim": 8, "qformer_layers": 2, "ffn": 16},
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="zero-initialised projections: identity at start; with W_p = 0 the queries are the learned ones; changing "
          "the instruction state changes the injection; positions outside the image span are untouched.",
))
