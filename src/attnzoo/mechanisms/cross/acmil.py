"""ACMIL: multiple-branch gated attention pooling with stochastic top-K instance masking.

Paper: "Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification", Zhang, Xu, Wu, Yang,
Li, Wang, arXiv 2311.07125 (ECCV 2024). Official code: https://github.com/dazhangyu123/ACMIL (``ACMIL_GA`` in
``architecture/transformer.py``, the loss in ``Step3_WSI_classification_ACMIL.py``). CATALOG P013.
A bag of instances h_i (B, N, C) is pooled by M branches of gated attention (ABMIL): the score of instance i in
branch m is ``w_m^T (tanh(V h_i) * sigmoid(U h_i))``, ``a^m = softmax_i``, ``z_m = sum_i a^m_i h_i``; each branch feeds
its own classifier and the bag feature is pooled with the branches' mean attention. Stochastic top-K instance
masking (STKIM, training only): in each branch, a fraction ``mask_drop`` of its top-K instances, chosen at random,
gets score -inf before the softmax, so no branch can rely on a few salient instances. A diversity regulariser
(the mean pairwise cosine similarity of the branches' attention) pushes the branches apart.

Confirmed from the official code: one shared V, U (Linear(C, D) with bias; D = 128) and per-branch w_m (Linear(D, M));
masked instances get -1e9 (here -inf: the same softmax, exact zeros); exactly ``int(K * mask_drop)`` of the top K are
masked; the bag attention is the mean over branches of the (masked) branch softmaxes; the diversity loss uses the
masked scores; defaults M = 5, K = 10, mask_drop = 0.6 (the README's command line). The instance projection before
the pooling (``DimReduction``) and the classifiers are outside the mechanism. Here bags are batched with a key-padding
mask (the official code takes one bag): padded instances are never attended and never counted among the top K.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import check_float, check_int, check_key_padding_mask, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register


def stochastic_top_k_mask(scores: torch.Tensor, top_k: int, drop: float, *, generator: torch.Generator | None = None
                          ) -> torch.Tensor:
    """Bool (B, M, N), True = keep: in each row of ``scores`` (B, M, N) a random ``int(top_k * drop)`` of its ``top_k``
    highest-scoring finite entries are dropped (STKIM)."""
    B, M, N = scores.shape
    k = min(top_k, N)
    n_drop = int(k * drop)
    keep = torch.ones(B, M, N, dtype=torch.bool, device=scores.device)
    if n_drop == 0:
        return keep
    top = torch.topk(scores, k, dim=-1)
    rand = torch.rand(B, M, k, generator=generator, device=scores.device)
    chosen = torch.argsort(rand, dim=-1)[..., :n_drop]  # which of the top k to drop
    idx = top.indices.gather(-1, chosen)  # (B, M, n_drop)
    finite = torch.isfinite(top.values.gather(-1, chosen))  # never "drop" padding (already -inf)
    return keep.scatter(-1, idx, ~finite)


def diversity_loss(attention: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the M branches' attention (B, M, N) over instances: () (0 for M = 1)."""
    M = attention.shape[1]
    if M < 2:
        return attention.new_zeros(())
    a = torch.nn.functional.normalize(attention, dim=-1)
    sim = a @ a.transpose(-2, -1)  # (B, M, M)
    iu = torch.triu_indices(M, M, offset=1, device=attention.device)
    return sim[:, iu[0], iu[1]].mean()


class MultiBranchAttentionPooling(nn.Module):
    """ACMIL pooling: ``x (B, N, dim)`` instances (``key_padding_mask (B, N)``) -> ``(B, branches, dim)`` branch
    features. After a forward: ``last_bag`` (B, 1, dim) the bag feature, ``last_attention`` (B, branches, N) the
    attention, ``aux_loss`` the diversity regulariser (add it to the training loss)."""

    def __init__(self, dim: int, heads: int | None = None, *, branches: int | None = None, gate_dim: int = 128,
                 top_k: int = 10, mask_drop: float = 0.6) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        if branches is None:  # build(name, dim, heads): the heads are the branches unless branches is given
            branches = 5 if heads is None else heads
        self.branches = check_int("branches", branches)
        self.top_k = check_int("top_k", top_k, low=0)
        self.mask_drop = check_float("mask_drop", mask_drop, low=0.0, high=1.0)
        gate_dim = check_int("gate_dim", gate_dim)
        self.attention_v = nn.Linear(dim, gate_dim)
        self.attention_u = nn.Linear(dim, gate_dim)
        self.attention_w = nn.Linear(gate_dim, self.branches)
        self.last_bag: torch.Tensor | None = None
        self.last_attention: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, branches={self.branches}, top_k={self.top_k}, mask_drop={self.mask_drop}"

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Gated attention scores (B, branches, N): w_m^T (tanh(V h) * sigmoid(U h))."""
        gate = torch.tanh(self.attention_v(x)) * torch.sigmoid(self.attention_u(x))  # (B, N, D)
        return self.attention_w(gate).transpose(1, 2)  # (B, M, N)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, N, dim) -> (B, branches, dim); STKIM only in training mode (``generator`` seeds its draws)."""
        check_module_input(self, x, channels=self.dim)
        B, N, _ = x.shape
        check_key_padding_mask(key_padding_mask, B, N, device=x.device)
        s = self.scores(x)  # (B, M, N)
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
        if self.training and self.top_k and self.mask_drop:
            keep = stochastic_top_k_mask(s.detach(), self.top_k, self.mask_drop, generator=generator)
            s = s.masked_fill(~keep, float("-inf"))
        has = torch.isfinite(s).any(dim=-1, keepdim=True)  # a bag with no real instance pools to zeros
        a = torch.softmax(torch.where(has, s, torch.zeros_like(s)), dim=-1) * has  # (B, M, N)
        self.last_attention = a
        self.last_bag = a.mean(dim=1, keepdim=True) @ x  # (B, 1, dim)
        self.aux_loss = diversity_loss(a)
        return a @ x  # (B, M, dim)


def _module(dim: int, heads: int, **options: Any):
    return MultiBranchAttentionPooling(dim, heads, **ACMIL.resolve_options(options))


ACMIL = register(Mechanism(
    name="acmil",
    aliases=("multi_branch_attention", "stkim"),
    family="cross",
    kind="pooling",
    catalog="P013",
    title="Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification",
    arxiv="2311.07125",
    code="https://github.com/dazhangyu123/ACMIL",
    summary="M branches of gated attention pooling over a bag of instances (one learned query each); in training a "
            "random share of each branch's top-K instances is masked; (B, N, C) -> (B, M, C).",
    patterns=("noncausal_cross",),
    exact=False,
    complexity="time O(N C D + N D M), memory O(N (D + M))",
    module=_module,
    options=(
        Option("branches", None, int, low=1, allow_none=True,
               doc="attention branches M (None: build's heads; the paper uses 5)"),
        Option("gate_dim", 128, int, low=1, doc="width D of the gated attention"),
        Option("top_k", 10, int, low=0, doc="STKIM: instances ranked per branch (0: off)"),
        Option("mask_drop", 0.6, float, low=0.0, high=1.0, doc="STKIM: fraction of the top K masked in training"),
    ),
    test_options={"gate_dim": 6, "top_k": 4, "mask_drop": 0.0},  # STKIM is random in training: its own tests
    test_sizes={"heads": 3},
    cross=CrossSpec(context_permutation_invariant=True),
    notes="branch weights sum to 1 over real instances; masked instances get exactly 0; eval mode is deterministic "
          "(no masking) and invariant to instance order.",
))
