"""GAAM: multi-head Gaussian adaptive attention (feature re-weighting by learned Gaussians of z-scores).

Paper: "Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple
Modalities", Ioannides, Chadha, Elkins, arXiv 2401.11143 (later versions: "Density Adaptive Attention",
DAAM). Official code (pure PyTorch, PyPI ``gaussian-adaptive-attention``):
https://github.com/gioannides/Gaussian-Adaptive-Attention
Along a normalisation axis, each element's z-score is scored by a product of G Gaussians with learned
mean offsets delta_g and scales c_g; the scores are normalised to sum to one along the axis and multiply
the input: ``y = x * w``. Not a dot-product attention: no queries, keys or values.

Formula, as in the official ``GaussianBlock.py`` (HEAD): mu = mean(x), s2 = var(x) (unbiased) + eps,
``w = prod_g exp(-((x - (mu + delta_g)) / sqrt(s2))^2 / (2 c_g^2)) / sqrt(2 pi c_g^2)``,
``w = w / max(sum_axis w, eps)``; heads are contiguous chunks of the channels (the last chunk takes the
remainder), each with its own G offsets (init 0) and scales (init exp(N(0, 1))).

Choices (options):
- ``axis="features"`` (default): statistics and normalisation over each head's channels, token by token
  (the official code's ``norm_axis=-1``; the catalog reading). This never mixes tokens, so it is causal
  and decodes with no memory (:class:`PositionState`).
- ``axis="tokens"``: statistics and normalisation over the sequence, per channel (the official
  experiments normalise over a sequence-like axis). Heads are still channel chunks with their own
  Gaussians; the official code would instead cut the normalised axis itself into chunks, which is not
  defined for sequences of varying length. Non-causal only (``causal=True`` raises).
- Padding: the official code passes padded elements through unchanged but still counts them (as zeros)
  in the mean and variance. Here a padded token (key_padding_mask False) passes through unchanged and is
  excluded from the statistics and the normaliser (axis="tokens"), so padding never changes real tokens.
  With one visible token the unbiased variance uses denominator max(n - 1, 1).
- ``eps`` (default 1e-8 as official) and ``unbiased`` (default True as ``torch.var``) are options.
- ``normalizer="official"`` (default) divides by max(sum w, eps) as the code does. Products of G normalised
  densities easily fall below eps (e.g. c = 0.3 and |z| = 2 gives ~1e-10), and then the weights no longer
  sum to one and shrink the token towards zero. ``normalizer="softmax"`` computes the same ratio in log
  space, so the weights always sum to one (identical to the official form whenever sum w >= eps).

Invariance (tested): the weights depend on x only through (x - mu) / sigma and delta_g / sigma, so they are
invariant to translations x -> x + b always, and to affine maps x -> a x + b (a != 0) exactly when every
delta_g = 0 and eps = 0 (approximately for small eps). The output y = x * w is not invariant.

Forms: the reference multiplies the G Gaussians as the paper writes; the fast form merges them first
(a product of Gaussians in z is one Gaussian: sum_g (z - d_g)^2 / (2 c_g^2) = A z^2 - 2 B z + C), so each
element costs one exponential instead of G.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import check_backend, check_int, check_pattern_flag, check_sequence_call
from ...reference import acc_dtype
from ...registry import Mechanism, Option, register
from ...state.base import DecodeState


def _moments(x: torch.Tensor, dim: int, mask: torch.Tensor | None, unbiased: bool):
    """Mean and variance of x along ``dim`` over the elements where ``mask`` (broadcastable) is True."""
    if mask is None:
        return x.mean(dim=dim, keepdim=True), x.var(dim=dim, keepdim=True, unbiased=unbiased)
    m = mask.to(x.dtype)
    n = m.sum(dim=dim, keepdim=True)
    mean = (x * m).sum(dim=dim, keepdim=True) / n.clamp(min=1)
    denom = (n - 1).clamp(min=1) if unbiased else n.clamp(min=1)
    var = ((x - mean) ** 2 * m).sum(dim=dim, keepdim=True) / denom
    return mean, var


def _normalize(w_or_logw: torch.Tensor, dim: int, mask, eps: float, normalizer: str, is_log: bool) -> torch.Tensor:
    if normalizer == "softmax":  # log-space: always sums to one over the unmasked elements
        logw = w_or_logw if is_log else torch.log(w_or_logw)
        if mask is not None:
            logw = logw.masked_fill(~mask, float("-inf"))
        return torch.softmax(logw, dim=dim)
    w = torch.exp(w_or_logw) if is_log else w_or_logw
    if mask is not None:
        w = w * mask.to(w.dtype)
    return w / w.sum(dim=dim, keepdim=True).clamp(min=eps)  # official: the sum is floored at eps


def gaussian_weights(x: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, *, dim: int,
                     mask: torch.Tensor | None = None, eps: float = 1e-8, unbiased: bool = True,
                     normalizer: str = "official") -> torch.Tensor:
    """Reference GAAM weights along ``dim``: product of G normalised Gaussians of the z-scores, then
    normalised over the (unmasked) elements. offsets, scales: (G,). Returns x's shape."""
    mean, var = _moments(x, dim, mask, unbiased)
    var = var + eps
    if normalizer == "softmax":  # the same product, accumulated as a sum of log-densities
        logw = torch.zeros_like(x)
        for g in range(offsets.shape[0]):
            z = (x - (mean + offsets[g])) / torch.sqrt(var)
            logw = logw - z**2 / (2.0 * scales[g] ** 2) - 0.5 * torch.log(2 * math.pi * scales[g] ** 2)
        return _normalize(logw, dim, mask, eps, normalizer, is_log=True)
    w = torch.ones_like(x)
    for g in range(offsets.shape[0]):
        z = (x - (mean + offsets[g])) / torch.sqrt(var)  # z-score against the shifted mean
        w = w * torch.exp(-(z**2) / (2.0 * scales[g] ** 2)) / torch.sqrt(2 * math.pi * scales[g] ** 2)
    return _normalize(w, dim, mask, eps, normalizer, is_log=False)


def gaussian_weights_fast(x: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, *, dim: int,
                          mask: torch.Tensor | None = None, eps: float = 1e-8, unbiased: bool = True,
                          normalizer: str = "official") -> torch.Tensor:
    """Fast GAAM weights: the G Gaussians merged into one quadratic in z, A z^2 - 2 B z / s + C / s^2."""
    mean, var = _moments(x, dim, mask, unbiased)
    s = torch.sqrt(var + eps)
    z = (x - mean) / s
    prec = 1.0 / (2.0 * scales**2)  # (G,)
    A, Bc, C = prec.sum(), (prec * offsets).sum(), (prec * offsets**2).sum()
    log_norm = -0.5 * torch.log(2 * math.pi * scales**2).sum()
    logw = -(A * z * z - 2 * Bc * z / s + C / (s * s)) + log_norm
    return _normalize(logw, dim, mask, eps, normalizer, is_log=True)


class GaussianAdaptiveAttention(nn.Module):
    """Multi-head GAAM: x (B, N, dim) -> x * w (B, N, dim). Parameters ``offsets`` and ``scales``
    (heads, gaussians). Decoding (axis="features"): ``state = m.init_state(batch)``, ``y, state = m(x, state=state)``.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 gaussians: int = 4, axis: str = "features", eps: float = 1e-8, unbiased: bool = True,
                 normalizer: str = "official", backend: str = "auto") -> None:
        super().__init__()
        mech = GAAM
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        if kv_heads is not None:
            raise ValueError(f"kv_heads: GAAM has no keys or values; expected None, got {kv_heads!r}")
        if heads > dim:
            raise ValueError(f"heads: each head needs at least one channel; got heads={heads} > dim={dim}")
        self.causal = check_pattern_flag(mech, causal)
        opts = mech.resolve_options({"gaussians": gaussians, "axis": axis, "eps": eps, "unbiased": unbiased,
                                     "normalizer": normalizer})
        self.axis, self.eps, self.unbiased = opts["axis"], opts["eps"], opts["unbiased"]
        self.normalizer = opts["normalizer"]
        if self.axis == "tokens" and self.causal:
            raise ValueError("causal: axis='tokens' normalises over the whole sequence, which sees future tokens; "
                             "use axis='features' for a causal GAAM")
        chunk = dim // heads
        self.sizes = [chunk] * (heads - 1) + [dim - chunk * (heads - 1)]  # last head takes the remainder
        if self.axis == "features" and self.unbiased and chunk < 2:
            raise ValueError(f"heads: axis='features' with unbiased variance needs >= 2 channels per head; "
                             f"got dim={dim}, heads={heads}")
        self.backend = check_backend(backend)
        G = opts["gaussians"]
        self.offsets = nn.Parameter(torch.zeros(heads, G))  # delta_g, official init 0
        self.scales = nn.Parameter(torch.exp(torch.randn(heads, G)))  # c_g, official init exp(N(0, 1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, gaussians={self.offsets.shape[1]}, axis={self.axis!r}"

    def weights(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention weights w (B, N, dim): each head's weights sum to one along the axis."""
        fn = gaussian_weights if self.backend == "reference" else gaussian_weights_fast
        acc = acc_dtype(x.dtype)
        out = []
        for h, xh in enumerate(torch.split(x.to(acc), self.sizes, dim=-1)):  # (B, N, C_h)
            off, sc = self.offsets[h].to(acc), self.scales[h].to(acc)
            if self.axis == "features":
                out.append(fn(xh, off, sc, dim=-1, eps=self.eps, unbiased=self.unbiased, normalizer=self.normalizer))
            else:
                mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(-1)  # (B, N, 1)
                out.append(fn(xh, off, sc, dim=1, mask=mask, eps=self.eps, unbiased=self.unbiased,
                              normalizer=self.normalizer))
        return torch.cat(out, dim=-1)  # (B, N, dim)

    def init_state(self, batch_size: int, **_: object) -> PositionState:
        if not self.causal:
            raise ValueError("causal: decoding needs a causal module; build it with causal=True")
        return PositionState(batch_size)

    def forward(self, x, context=None, *, key_padding_mask=None, state=None):
        if context is not None:
            raise ValueError("context: GAAM re-weights one token stream (self only); got a context")
        check_sequence_call(self, x, None, key_padding_mask=key_padding_mask, state=state, state_type=PositionState,
                            mech=GAAM)
        y = (x.to(acc_dtype(x.dtype)) * self.weights(x, key_padding_mask)).to(x.dtype)  # (B, N, dim)
        if key_padding_mask is not None:
            y = torch.where(key_padding_mask.unsqueeze(-1), y, x)  # padded tokens pass through
        if state is not None:
            state.advance(x.shape[1])
            return y, state
        return y


def build_gaam(dim, heads, *, kv_heads=None, causal=False, **options):
    return GaussianAdaptiveAttention(dim, heads, kv_heads=kv_heads, causal=causal, **options)


class PositionState(DecodeState):
    """The number of tokens decoded so far and nothing else (token-wise mechanisms)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.built_for(batch=batch)
        self.device = None  # holds no tensor: serves any device

    def advance(self, tokens: int) -> None:
        self.seq_len += tokens

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        self.seq_len = self._check_crop(length)


GAAM = register(Mechanism(
    name="gaam",
    aliases=("gaussian_adaptive_attention", "daam"),
    family="dense",
    catalog="P011",
    title="Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple "
          "Modalities",
    arxiv="2401.11143",
    code="https://github.com/gioannides/Gaussian-Adaptive-Attention",
    summary="Per-head product of G learned Gaussians of the z-scores along an axis, normalised to sum to one, "
            "multiplies the input (x * w); no dot products.",
    patterns=("noncausal_self", "causal_self"),
    exact=False,
    state="position",
    complexity="time O(N D G) reference, O(N D) fast; memory O(N D); decode state O(1)",
    module=build_gaam,
    fast=gaussian_weights_fast,
    options=(
        Option("gaussians", 4, int, low=1, doc="Gaussians per head (G)"),
        Option("axis", "features", str, choices=("features", "tokens"),
               doc="normalise over each head's channels (per token, causal) or over the sequence"),
        Option("eps", 1e-8, float, low=0.0, doc="added to the variance; floor of the normaliser"),
        Option("unbiased", True, bool, doc="unbiased (n - 1) variance, as torch.var in the official code"),
        Option("normalizer", "official", str, choices=("official", "softmax"),
               doc="official: w / max(sum w, eps); softmax: the same ratio in log space (always sums to 1)"),
    ),
    permutation_equivariant=True,
    test_options={"gaussians": 3, "axis": "features"},
    notes="axis='tokens' is non-causal (causal=True raises). Weights are translation invariant; affine "
          "invariant only with zero mean offsets.",
))
