"""Multi-source cross-attention: one query stream attends to several named context streams.

This is the contract of ARCHITECTURE.md, section "Cross-attention". A query stream q (B, Hq, Nq, D) attends to
``sources = {"text": (k_t, v_t), "image": (k_i, v_i), ...}``, each k (B, Hk_s, M_s, D), v (B, Hk_s, M_s, Dv)
(grouped-query heads per source: Hq % Hk_s == 0), each with

- a key-padding mask ``masks[name]`` (B, M_s) bool, True = attend (never dropped: an unknown name raises);
- a region mask ``region_masks[name]`` over the queries, (B, Nq): bool (query i receives source s only where
  True; a spatial mask is flattened to Nq) or, with ``mode="separate"`` only, a floating weight in q's dtype
  that multiplies the source's output per query (diffusers' IP-Adapter masks after bicubic downsampling);
- a scale ``scales[name]`` (a number or a 0-d tensor, learnable; default 1) multiplying its output;
- an additive bias ``biases[name]`` added to its scores: per key (B or 1, Hq or 1, M_s) (FcaFormer's cross-token
  bias, ALiBi-like per-key terms) or per query-key pair (B or 1, Hq or 1, Nq, M_s) (RelationNet++'s relative-position
  term);
- a pair mask ``pair_masks[name]`` (B or 1, Nq, M_s) bool: query i sees key j of the source only where True (a
  per-query subset of its keys: TCPA's assigned prompts, IR-Diffusion's subject isolation, PrimeComposer's
  region-constrained subject tokens);
- positions ``kv_pos[name]`` (M_s,) or (B, M_s) with ``q_pos`` (Nq,) or (B, Nq): causal cross by position, a
  query sees a context token iff ``kv_pos <= q_pos`` (Video-CCAM's frame order, Flamingo's "media before this
  text"). Sources without positions are fully visible.

``mode="separate"``: one softmax per source, outputs summed with their scales (IP-Adapter):
    out = sum_s scale_s * region_s * softmax(q k_s^T * scale + bias_s) v_s
``mode="joint"``: one softmax over the concatenated keys (FcaFormer, DCAL's PWCA):
    out = sum_s scale_s * P[:, s] v_s,  P = softmax(q [k_1; k_2; ...]^T * scale + [bias_1; ...])

``return_source_mass=True`` also returns, per source, the share of the joint softmax normaliser its keys hold
for every query, ``mass_s = exp(lse_s - logsumexp_s' lse_s')`` (B, Hq, Nq), computed from per-source
log-sum-exps in query blocks (never an Nq x M matrix; differentiable). With ``mode="joint"`` it is exactly the
attention mass the source received (sums to 1 over sources where the query sees any key); with ``"separate"``
it is the mass the source would receive if the sources competed in one softmax (each separate softmax has
mass 1 by construction; its weight in the output is its scale).

Rows that see no key of a source get zeros from it (attnzoo's convention). Both modes run on PyTorch's fused
SDPA: separate = one call per source; joint = one call over the concatenated keys (scales folded into the
values). Causal-by-position with positions shared by the batch sorts keys and queries by position and runs
one SDPA call per block of queries over the key prefix they may see (a block of equal prefixes needs no mask;
mixed prefixes get a block-local mask): no Nq x M mask. Positions that differ across the batch, and joint mode
with positions or bool region masks over several sources, use a dense (B, 1, Nq, M) bool mask.

Modules: :class:`CrossAttention` (projections per source, ``context_dims={"text": 768, "image": 1024}``,
decoding against a :class:`~attnzoo.cross.cache.ContextCache`) and :class:`LatentResampler` (learned latent
queries over a token set: the resampler path of Video-CCAM, TextHawk and multi-layer trainable pooling).

Modules of this package: :mod:`.function` (:func:`cross_attention`: validation, visibility, reference, fast form,
source mass), :mod:`.cache` (:class:`ContextCache`, the family's decode state: the context's keys/values computed
once), :mod:`.modules` (:class:`CrossAttention`), :mod:`.resampler` (:class:`LatentResampler`).
"""

from .cache import ContextCache
from .function import MODES, cross_attention, position_visibility
from .modules import CrossAttention
from .resampler import LatentResampler, ResamplerLayer

__all__ = ["MODES", "ContextCache", "CrossAttention", "LatentResampler", "ResamplerLayer", "cross_attention",
           "position_visibility"]
