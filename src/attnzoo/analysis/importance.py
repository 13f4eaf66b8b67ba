"""Head importance and per-head attention-distance profiles (CATALOG P019), on any model the analyzer runs.

Paper: "How Does Attention Work in Vision Transformers? A Visual Analytics Attempt", Li, Wang, Zhang, Shen, Zhou,
Chen, IEEE TVCG 2023 (arXiv 2303.13731); no official code found. Head importance by pruning: every head has a gate
g_h multiplying its output (all gates 1 = the unmodified model); ``ablation`` importance is the change of the loss
when g_h = 0 (one forward per head), ``gradient`` importance is |dL/dg_h| at g = 1 (one backward for all heads,
the Taylor score of Michel et al.'s "Are Sixteen Heads Really Better than One?"). The spatial profile of a head is
how its attention mass spreads over distance: mean attention distance and a histogram of the mass per distance bin
(token distance for text, Euclidean patch distance for images), streamed from q, k and the LSE for softmax heads
(:mod:`attnzoo.analysis.stats`), from the effective operator otherwise. The paper's autoencoder clustering of
attention patterns is not implemented.

A loss is any function ``loss(model) -> scalar tensor`` that runs the model; :func:`lm_loss`, :func:`pair_loss`
and :func:`view_loss` are the ones the report uses (next-token NLL for SmolLM2, paraphrase cosine for MiniLM,
flip invariance of the [CLS] embedding for DINOv2 -- choices: none of them has a labelled task here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .capture import Analyzer, AttentionCall, HeadGates
from .stats import weight_statistics

__all__ = ["ablation_importance", "gradient_importance", "distance_profiles", "lm_loss", "pair_loss", "view_loss"]

Loss = Callable[[torch.nn.Module], torch.Tensor]


def _shape(model, mechanism: str, options: dict[str, Any], loss: Loss) -> tuple[int, int]:
    heads: dict[int, int] = {}
    with torch.no_grad(), Analyzer(model, mechanism, **options) as az:
        az.hooks.append(lambda c: heads.__setitem__(c.layer, c.heads))
        loss(model)
    return az.num_layers, max(heads.values())


def ablation_importance(model, loss: Loss, *, mechanism: str = "softmax", options: dict[str, Any] | None = None,
                        progress=None) -> dict[str, Any]:
    """{"base": L(all gates 1), "delta": (L, H) L(g_h = 0) - L(all gates 1)}: one forward per head."""
    options = dict(options or {})
    layers, heads = _shape(model, mechanism, options, loss)
    gates = HeadGates(layers, heads)
    delta = torch.zeros(layers, heads, dtype=torch.float64)
    with torch.no_grad(), Analyzer(model, mechanism, hooks=[gates], **options):
        base = float(loss(model))
        if progress is not None:
            progress.total(layers * heads)
        for layer in range(layers):
            for h in range(heads):
                gates.values[layer, h] = 0.0
                delta[layer, h] = float(loss(model)) - base
                gates.values[layer, h] = 1.0
                if progress is not None:
                    progress.tick()
    return {"base": base, "delta": delta}


def gradient_importance(model, loss: Loss, *, mechanism: str = "softmax", options: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """{"base": L, "grad": (L, H) dL/dg_h at g = 1, "score": |grad|}: one forward and one backward."""
    options = dict(options or {})
    layers, heads = _shape(model, mechanism, options, loss)
    gates = HeadGates(layers, heads, requires_grad=True, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with Analyzer(model, mechanism, hooks=[gates], **options):
            value = loss(model)
            value.backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    g = gates.values.grad.detach().double()
    return {"base": float(value.detach()), "grad": g, "score": g.abs()}


def distance_profiles(model, run: Callable[[torch.nn.Module], Any], *, bins: Sequence[float],
                      positions: torch.Tensor | None = None, rows: Sequence[int] | None = None, skip: int = 0,
                      mechanism: str = "softmax", options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Per layer and head: mean attention distance (L, H) (averaged over the rows) and the attention-mass histogram
    over distance ``bins`` (L, H, len(bins) - 1), normalised to sum to 1 over the bins covered. ``positions``
    (N - skip, P) gives token coordinates (patch rows/columns; None: 1-D positions). ``skip`` leading tokens with no
    position (a ViT's [CLS]) are left out as queries and as keys, and each row renormalised over the others (from the
    effective operator: short sequences)."""
    mean: dict[int, torch.Tensor] = {}
    hist: dict[int, torch.Tensor] = {}

    def hook(call: AttentionCall) -> None:
        if skip:
            w = call.weights()[..., skip:, skip:]
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
            s = weight_statistics(w, rows=rows, topk=0, positions=positions, distance_bins=bins)
        else:
            s = call.stats(rows=rows, topk=0, positions=positions, distance_bins=bins)
        mean[call.layer] = s.mean_distance[0].mean(-1)  # (H,)
        h = s.distance_histogram[0]  # (H, bins)
        hist[call.layer] = h / h.sum(-1, keepdim=True).clamp_min(1e-300)

    with torch.no_grad(), Analyzer(model, mechanism, hooks=[hook], **(options or {})) as az:
        run(model)
    return {"mean_distance": torch.stack([mean[i] for i in range(az.num_layers)]).double(),
            "histogram": torch.stack([hist[i] for i in range(az.num_layers)]).double(),
            "bins": torch.as_tensor(bins, dtype=torch.float64)}


# --------------------------------------------------------------------------------------------------------
# Losses of the report
# --------------------------------------------------------------------------------------------------------
def lm_loss(ids: torch.Tensor) -> Loss:
    """Mean next-token NLL of the (1, N) token window (causal LMs)."""
    def loss(model) -> torch.Tensor:
        logits = model(ids, use_cache=False).logits[0, :-1]  # (N - 1, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return loss


def pair_loss(batch_a: dict, batch_b: dict) -> Loss:
    """Mean (1 - cosine) between mean-pooled embeddings of paraphrase pairs (sentence encoders: MiniLM)."""
    def embed(model, batch):
        h = model(**batch).last_hidden_state  # (S, N, d)
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)

    def loss(model) -> torch.Tensor:
        return (1 - (embed(model, batch_a) * embed(model, batch_b)).sum(-1)).mean()
    return loss


def view_loss(pixels: torch.Tensor) -> Loss:
    """Mean (1 - cosine) between the [CLS] embeddings of images and their horizontal flips (ViTs: DINOv2)."""
    def loss(model) -> torch.Tensor:
        a = model(pixel_values=pixels).last_hidden_state[:, 0]
        b = model(pixel_values=pixels.flip(-1)).last_hidden_state[:, 0]
        return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean()
    return loss
