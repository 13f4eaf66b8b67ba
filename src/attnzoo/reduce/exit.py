"""P081 DyVTE -- "Accelerating Multimodal Large Language Models via Dynamic Visual-Token Exit and the Empirical
Findings", arXiv 2411.19628, https://github.com/DoubtedSteam/DyVTE.

After each candidate layer l, a lightweight hyper-network reads the text tokens' states and decides whether the text
has absorbed enough visual information; if so, all visual tokens (and their KV) are removed for the layers after l.
Official code: one router per layer, an MLP (2 C -> hidden -> GELU -> 2 logits, no biases) on
concat(mean of the text states, the last token's state); exit when logit[1] > logit[0]; on exit the visual tokens
are dropped from the hidden states, the positions and the mask. Choice: the hidden width is an option (the official
2048 for a 13B LLM); the training labels (exit when the answer is unchanged) are the caller's.

:func:`exit_forward` runs a stack of layers with an exit; each layer is a callable ``layer(h, key_mask)`` on
(B, N, C) with key_mask bool (B, N) (True = attend), so the same stack also runs the masking reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import check_int, check_module_input
from .registry import Reduction, register_reduction


class VisualExitGate(nn.Module):
    """forward(h (B, N, C), text: slice) -> (B, 2) logits; exit where logits[:, 1] > logits[:, 0]."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.w1 = nn.Linear(2 * dim, check_int("hidden", hidden), bias=False)
        self.w2 = nn.Linear(hidden, 2, bias=False)

    def forward(self, h: torch.Tensor, text: slice) -> torch.Tensor:
        check_module_input(self, h, channels=self.dim)
        t = h[:, text]  # (B, T, C)
        if t.shape[1] == 0:
            raise ValueError(f"text: expected a non-empty slice of the {h.shape[1]} tokens, got {text}")
        feat = torch.cat([t[:, :-1].mean(dim=1) if t.shape[1] > 1 else t[:, 0], t[:, -1]], dim=-1)  # (B, 2C)
        return self.w2(nn.functional.gelu(self.w1(feat)))

    def should_exit(self, h: torch.Tensor, text: slice) -> torch.Tensor:
        logits = self.forward(h, text)
        return logits[:, 1] > logits[:, 0]  # (B,)


def drop_visual(h: torch.Tensor, visual: slice) -> torch.Tensor:
    """(B, N - Nv, C): h without the visual tokens."""
    keep = torch.ones(h.shape[1], dtype=torch.bool, device=h.device)
    keep[visual] = False
    return h[:, keep]


def exit_forward(layers: Sequence[Callable], h: torch.Tensor, visual: slice, *, exit_layer: int | None = None,
                 gates: Sequence[VisualExitGate | None] | None = None, text: slice | None = None
                 ) -> tuple[torch.Tensor, int | None]:
    """Run ``layers`` on h (B, N, C); after layer ``exit_layer`` (fixed; -1 = before the first layer) or after the
    first layer whose gate says exit for the whole batch (``gates``, one per layer or None; ``text`` = the text
    tokens' slice in the full sequence, read by the gates), the visual tokens are removed for the layers after.
    Returns (h, the exit layer or None)."""
    if exit_layer is not None and gates is not None:
        raise ValueError("exit_layer, gates: give one of them")
    L = len(layers)
    if exit_layer is not None:
        check_int("exit_layer", exit_layer, low=-1, high=L - 1)
    exited = None
    if exit_layer == -1:
        h, exited = drop_visual(h, visual), -1
    for i, layer in enumerate(layers):
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        h = layer(h, mask)
        if exited is None:
            go = exit_layer == i if exit_layer is not None else (
                gates is not None and gates[i] is not None and bool(gates[i].should_exit(h, text).all()))
            if go:
                h, exited = drop_visual(h, visual), i
    return h, exited


def masked_reference_forward(layers: Sequence[Callable], h: torch.Tensor, visual: slice, exit_layer: int
                             ) -> torch.Tensor:
    """The oracle: all tokens kept, but the visual keys masked in every layer after ``exit_layer``; returns the
    non-visual tokens' states (equal to :func:`exit_forward`'s output)."""
    for i, layer in enumerate(layers):
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if i > exit_layer:
            mask[:, visual] = False
        h = layer(h, mask)
    return drop_visual(h, visual)


register_reduction(Reduction(
    name="dyvte", catalog="P081",
    title="Accelerating Multimodal Large Language Models via Dynamic Visual-Token Exit and the Empirical Findings",
    arxiv="2411.19628", code="https://github.com/DoubtedSteam/DyVTE", step="exit",
    scores="a per-layer MLP gate on (mean text state, last token state): has the text absorbed the image?",
    keeps="all tokens up to the exit layer, then only the text tokens (visual tokens and their KV removed)",
    training_free=False, entry=VisualExitGate,
))
