"""RCAR: region-word cross-attention whose temperature and per-dimension query weights are re-estimated over recurrent
steps from the alignments they produce (RCR), with recurrently re-weighted aggregation of the alignments (RAR).

Paper: "Plug-and-Play Regulators for Image-Text Matching", Diao, Zhang, Liu, Ruan, Lu, arXiv 2303.13371 (IEEE TIP
2023). Official code: https://github.com/Paranioar/RCAR (lib/encoders.py: ``cross_attention``, ``Alignment_vector``,
``Correpondence_regulator``, ``Aggregation_regulator``, ``EncoderSimilarity``). CATALOG P087.
SCAN-style attention of queries x_i (words for t2i) over context c_j (regions), with per-dimension query weights m
(the "matrix") and an inverse temperature lambda (the "smooth"), both per query after the first step:
``s_ij = LeakyReLU_0.1(c_j . (m_i * x_i))``, ``s_ij <- s_ij / ||s_:j||_2`` (normalised over the *queries*),
``a_i = softmax_j(lambda_i s_ij)``, ``attended_i = l2norm(sum_j a_ij c_j)``. Alignment vectors
``h_i = l2norm(W_a (x_i - attended_i)^2)`` feed the RCR: ``m_i <- clamp(m_i + tanh(MLP_m(h_i)), -1, 1)``,
``lambda_i <- relu(lambda_i + MLP_l(h_i))`` (one regulator and one alignment map per step); RAR re-weights the
aggregation ``g <- l2norm(sum_i softmax_i(w^T (tanh(W_k h_i) * tanh(W_q g))) h_i)`` from ``g = mean_i h_i``, and the
image-text score is ``sigmoid(w_e^T g)``.

Confirmed against the official code (CATALOG's oracle "T = 1 with neutral factors" holds in the form: zero regulator
steps, m = 1 and lambda = ``smooth``, is exactly SCAN's attention): the score normalisation runs over the query axis
(``l2norm(attn, dim=-1)`` on (B, M, N)), ``l2norm`` is ``x / (sqrt(sum x^2) + 1e-8)``; ``regulator="rcr"`` with
``steps`` S is the official ``only_rcr`` (S regulator updates, then the attention; score: mean cosine of x_i and
attended_i), ``"rcar"`` is ``coop_rcar`` (S alignment/RAR steps, S - 1 regulator updates; score ``sigmoid(w_e g)``).
Defaults of the official scripts: joint width 1024 (``dim``), ``sim_dim`` 256, t2i ``smooth`` 10 (i2t: 3), 2 steps.
The record's default is ``"rcr"``, the attention component (every parameter shapes ``forward``); with ``"rcar"`` the
last alignment map and the RAR maps serve :meth:`similarity` only (the official trains them through the score).
The dropout (0.4) inside the RAR maps is a training detail, not here; single head (the paper's). Padded queries (the
official slices each caption to its length): ``x_padding_mask`` (B, N) keeps them out of the query-axis norm and of
the aggregation; padded context tokens: ``key_padding_mask`` (B, M).
On the contract: the scores are computed explicitly (the query-axis norm needs every query's score of a key; N x M is
small: words x regions) and enter :func:`attnzoo.cross_attention` as a pairwise bias, which does the masked softmax
and the weighted sum.

Example:
    >>> import torch, attnzoo
    >>> rcar = attnzoo.build("rcar", 32, 1, sim_dim=8, regulator="rcar")
    >>> words, regions = torch.randn(2, 7, 32), torch.randn(2, 12, 32)
    >>> rcar(words, regions).shape                        # the attended regions of each word
    torch.Size([2, 7, 32])
    >>> rcar.similarity(words, regions).shape             # one image-text score per pair
    torch.Size([2])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...cross import cross_attention
from ...errors import check_choice, check_float, check_int, check_key_padding_mask
from ...registry import CrossSpec, Mechanism, Option, register
from ._blocks import check_pair, plain_heads

EPS = 1e-8  # the official l2norm's epsilon


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x / (||x||_2 + 1e-8)`` along ``dim`` (the official normalisation, epsilon outside the root)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


class _Regulator(nn.Module):
    """RCR: alignment vectors (B, N, sim_dim) -> updated (weights (B, N, dim), inverse temperature (B, N, 1))."""

    def __init__(self, dim: int, sim_dim: int) -> None:
        super().__init__()
        self.smooth = nn.Sequential(nn.Linear(sim_dim, sim_dim // 2), nn.Tanh(), nn.Linear(sim_dim // 2, 1))
        self.matrix = nn.Sequential(nn.Linear(sim_dim, 2 * sim_dim), nn.Tanh(), nn.Linear(2 * sim_dim, dim))

    def forward(self, h, matrix, smooth):
        return (torch.tanh(self.matrix(h)) + matrix).clamp(-1, 1), F.relu(self.smooth(h) + smooth)


class _Aggregator(nn.Module):
    """RAR: alignment vectors (B, N, sim_dim) and the current aggregate (B, sim_dim) -> the re-weighted aggregate."""

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(sim_dim, sim_dim)
        self.k = nn.Linear(sim_dim, sim_dim)
        self.v = nn.Linear(sim_dim, 1)

    def forward(self, h, g, valid):
        logits = self.v(torch.tanh(self.k(h)) * torch.tanh(self.q(g)).unsqueeze(1)).squeeze(-1)  # (B, N)
        if valid is not None:
            logits = logits.masked_fill(~valid, float("-inf"))
        w = logits.softmax(dim=-1)  # (B, N) over the queries
        return l2norm((w.unsqueeze(-1) * h).sum(dim=1))  # (B, sim_dim)


class RegulatedCrossAttention(nn.Module):
    """``x (B, N, dim)`` queries (words), ``context (B, M, dim)`` (regions) -> ``(B, N, dim)``: each query's attended
    context (l2-normalised) under the regulated factors. :meth:`similarity` gives the image-text score (B,)."""

    def __init__(self, dim: int, heads: int = 1, *, sim_dim: int = 256, steps: int = 2, regulator: str = "rcr",
                 smooth: float = 10.0, negative_slope: float = 0.1) -> None:
        super().__init__()
        self.dim = self.context_dim = check_int("dim", dim)
        if check_int("heads", heads) != 1:
            raise ValueError(f"heads: RCAR's attention is single-head; expected 1, got {heads}")
        self.sim_dim = check_int("sim_dim", sim_dim, low=2)
        self.regulator = check_choice("regulator", regulator, ("rcr", "rcar"))
        self.steps = check_int("steps", steps, low=1 if regulator == "rcar" else 0)
        self.smooth = check_float("smooth", smooth, low=0.0, low_open=True)
        self.negative_slope = check_float("negative_slope", negative_slope, low=0.0)
        updates = steps if regulator == "rcr" else steps - 1
        self.align = nn.ModuleList([nn.Linear(dim, sim_dim) for _ in range(steps)])
        self.regulators = nn.ModuleList([_Regulator(dim, sim_dim) for _ in range(updates)])
        self.aggregators = nn.ModuleList([_Aggregator(sim_dim) for _ in range(steps if regulator == "rcar" else 0)])
        self.score = nn.Linear(sim_dim, 1) if regulator == "rcar" else None
        for m in self.modules():  # the official init: Xavier-uniform weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    # -- the attention ---------------------------------------------------------------------------------------
    def attend(self, x: torch.Tensor, context: torch.Tensor, matrix: torch.Tensor | float = 1.0,
               smooth: torch.Tensor | float | None = None, *, key_padding_mask: torch.Tensor | None = None,
               x_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One regulated attention: weights ``matrix`` ((dim,) or (B, N, dim)), inverse temperature ``smooth``
        (a number or (B, N, 1); None: the option) -> (B, N, dim) l2-normalised attended context."""
        B, N, M = x.shape[0], x.shape[1], context.shape[1]
        s = F.leaky_relu((x * matrix) @ context.transpose(1, 2), self.negative_slope)  # (B, N, M)
        if x_padding_mask is not None:
            s = s.masked_fill(~x_padding_mask.unsqueeze(-1), 0.0)  # padded queries take no part in the norm
        s = l2norm(s, dim=1) * (self.smooth if smooth is None else smooth)  # (B, N, M) norm over the queries
        q = x.new_zeros(B, 1, N, 1)  # the scores are all in the bias
        k = x.new_zeros(B, 1, M, 1)
        out = cross_attention(q, {"context": (k, context.unsqueeze(1))}, biases={"context": s.unsqueeze(1)},
                              masks=None if key_padding_mask is None else {"context": key_padding_mask}, scale=1.0)
        return l2norm(out.squeeze(1))  # (B, N, dim)

    def _check(self, x, context, key_padding_mask, x_padding_mask):
        x, context = check_pair(self, x, context, channels=self.dim, context_channels=self.dim)
        check_key_padding_mask(key_padding_mask, x.shape[0], context.shape[1], device=x.device)
        check_key_padding_mask(x_padding_mask, x.shape[0], x.shape[1], name="x_padding_mask", device=x.device)
        return x, context

    def _run(self, x, context, kpm, xpm):
        """Yields (step, alignment vectors, attended) and leaves the final factors; returns the alignments."""
        matrix: torch.Tensor | float = 1.0
        smooth: torch.Tensor | float = self.smooth
        aligned = []
        for m, align in enumerate(self.align):
            att = self.attend(x, context, matrix, smooth, key_padding_mask=kpm, x_padding_mask=xpm)
            h = l2norm(align((x - att).pow(2)))  # (B, N, sim_dim) alignment vectors
            aligned.append(h)
            if m < len(self.regulators):
                matrix, smooth = self.regulators[m](h, matrix, smooth)
        return aligned, matrix, smooth

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, x_padding_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, N, dim), context (B, M, dim), key_padding_mask (B, M) bool, x_padding_mask (B, N) bool ->
        (B, N, dim)."""
        x, context = self._check(x, context, key_padding_mask, x_padding_mask)
        _, matrix, smooth = self._run(x, context, key_padding_mask, x_padding_mask)
        return self.attend(x, context, matrix, smooth, key_padding_mask=key_padding_mask,
                           x_padding_mask=x_padding_mask)

    def similarity(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                   key_padding_mask: torch.Tensor | None = None, x_padding_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """The matching score (B,): RCR, the mean cosine of each query and its attended context; RCAR,
        ``sigmoid(w_e g)`` of the RAR aggregate."""
        x, context = self._check(x, context, key_padding_mask, x_padding_mask)
        aligned, matrix, smooth = self._run(x, context, key_padding_mask, x_padding_mask)
        valid = x_padding_mask
        w = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if valid is None else valid.to(x.dtype)
        if self.score is None:
            att = self.attend(x, context, matrix, smooth, key_padding_mask=key_padding_mask, x_padding_mask=valid)
            cos = F.cosine_similarity(x, att, dim=-1, eps=EPS)  # (B, N)
            return (cos * w).sum(1) / w.sum(1)
        g = (aligned[0] * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)  # (B, sim_dim) mean of the first step
        for h, rar in zip(aligned, self.aggregators):
            g = rar(h, g, valid)
        return torch.sigmoid(self.score(g)).squeeze(-1)


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("rcar", kv_heads, causal)
    return RegulatedCrossAttention(dim, heads, **RCAR.resolve_options(options))


RCAR = register(Mechanism(
    name="rcar",
    aliases=("recurrent_correspondence_regulator",),
    family="cross",
    catalog="P087",
    title="Plug-and-Play Regulators for Image-Text Matching",
    arxiv="2303.13371",
    code="https://github.com/Paranioar/RCAR",
    summary="SCAN region-word cross-attention (LeakyReLU scores normalised over the queries) whose per-dimension query "
            "weights and temperature are re-estimated from the alignments over recurrent steps (RCR), with RAR "
            "aggregation for the matching score.",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(S N M d), memory O(N M) scores (S steps)",
    module=_module,
    options=(
        Option("sim_dim", 256, int, low=2, doc="alignment vector width (official 256)"),
        Option("steps", 2, int, low=0, doc="recurrent steps (official scripts: 2; 'rcr' with 0 is SCAN)"),
        Option("regulator", "rcr", str, choices=("rcr", "rcar"),
               doc="'rcr': the correspondence regulator (the attention); 'rcar': with RAR for similarity()"),
        Option("smooth", 10.0, float, low=0.0, doc="initial inverse temperature (official t2i 10, i2t 3)"),
        Option("negative_slope", 0.1, float, low=0.0, doc="LeakyReLU slope of the scores (official 0.1)"),
    ),
    permutation_equivariant=True,
    test_options={"sim_dim": 6},
    test_sizes={"heads": 1, "kv_heads": 1},
    cross=CrossSpec(context_permutation_invariant=True, query_independent=False),
    notes="regulator='rcr', steps=0 is SCAN's attention (m = 1, lambda = smooth); official forward parity; the "
          "query-axis norm couples the queries (not decodable query by query).",
))
