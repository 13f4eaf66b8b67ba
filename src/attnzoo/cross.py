"""Multi-source cross-attention: one query stream attends to several named context streams.

This is the contract of ARCHITECTURE.md, section "Cross-attention". A query stream q (B, Hq, Nq, D) attends to
``sources = {"text": (k_t, v_t), "image": (k_i, v_i), ...}``, each k (B, Hk_s, M_s, D), v (B, Hk_s, M_s, Dv)
(grouped-query heads per source: Hq % Hk_s == 0), each with

- a key-padding mask ``masks[name]`` (B, M_s) bool, True = attend (never dropped: an unknown name raises);
- a region mask ``region_masks[name]`` over the queries, (B, Nq): bool (query i receives source s only where
  True; a spatial mask is flattened to Nq) or, with ``mode="separate"`` only, a floating weight in q's dtype
  that multiplies the source's output per query (diffusers' IP-Adapter masks after bicubic downsampling);
- a scale ``scales[name]`` (a number or a 0-d tensor, learnable; default 1) multiplying its output;
- an additive key bias ``biases[name]`` (B or 1, Hq or 1, M_s) added to its scores (FcaFormer's cross-token
  bias, ALiBi-like per-key terms);
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
decoding against a :class:`~attnzoo.state.context.ContextCache`) and :class:`LatentResampler` (learned latent
queries over a token set: the resampler path of Video-CCAM, TextHawk and multi-layer trainable pooling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import (
    BACKENDS,
    check_bool,
    check_choice,
    check_int,
    check_key_padding_mask,
    check_module_input,
    check_qkv,
    check_scale,
    check_tensor,
)
from .reference import repeat_kv
from .state.context import ContextCache, check_positions

__all__ = ["MODES", "cross_attention", "CrossAttention", "LatentResampler", "ResamplerLayer", "position_visibility"]

MODES: tuple[str, ...] = ("separate", "joint")
_MIN_BLOCK_ROWS = 64  # causal-by-position: query blocks of at least this many rows share one SDPA call
_LSE_BLOCK = 256  # query rows per block when computing per-source log-sum-exps


@dataclass
class _Source:
    name: str
    k: torch.Tensor  # (B, Hk, M, D)
    v: torch.Tensor  # (B, Hk, M, Dv)
    mask: torch.Tensor | None  # (B, M) bool
    region: torch.Tensor | None  # (B, Nq) bool or floating
    scale: float | torch.Tensor
    bias: torch.Tensor | None  # (B|1, Hq|1, M)
    pos: torch.Tensor | None  # (M,) or (B, M)

    @property
    def m(self) -> int:
        return self.k.shape[2]


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------
def _mapping(name: str, value: object, known: list[str]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a mapping from source name to value (or None), got "
                        f"{type(value).__name__}")
    unknown = [k for k in value if k not in known]
    if unknown:
        raise ValueError(f"{name}: unknown source {unknown[0]!r}; the sources are {known} (a per-source "
                         "argument is never silently dropped)")
    return value


def _check_scale_value(name: str, value: object, q: torch.Tensor) -> float | torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{name}: expected a number or a 0-d floating tensor, got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        if value.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (q's), got {value.device}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name}: expected a finite number or a 0-d tensor, got {value!r}")
    return float(value)


def _prepare(q, sources, *, mode, masks, region_masks, scales, biases, q_pos, kv_pos) -> list[_Source]:
    check_tensor("q", q, ndim=4)
    check_choice("mode", mode, MODES)
    if not isinstance(sources, Mapping) or not sources:
        got = type(sources).__name__ if not isinstance(sources, Mapping) else "an empty mapping"
        raise TypeError(f"sources: expected a non-empty mapping {{name: (k, v)}}, got {got}")
    names = list(sources)
    masks = _mapping("masks", masks, names)
    region_masks = _mapping("region_masks", region_masks, names)
    scales = _mapping("scales", scales, names)
    biases = _mapping("biases", biases, names)
    kv_pos = _mapping("kv_pos", kv_pos, names)
    B, Hq, Nq, _ = q.shape
    if kv_pos and q_pos is None:
        raise ValueError(f"q_pos: kv_pos is given for {list(kv_pos)}; causal cross by position needs q_pos "
                         f"(Nq,) or (B, Nq) too")
    check_positions("q_pos", q_pos, B, Nq, device=q.device)
    out: list[_Source] = []
    dv = None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"sources: expected str source names, got {name!r}")
        pair = sources[name]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"sources[{name!r}]: expected a pair (k, v), got {type(pair).__name__}")
        k, v = pair
        try:
            check_qkv(q, k, v)
        except (TypeError, ValueError) as e:
            raise type(e)(f"sources[{name!r}]: {e}") from None
        if dv is None:
            dv = v.shape[3]
        elif v.shape[3] != dv:
            raise ValueError(f"sources[{name!r}]: value dim {v.shape[3]} differs from the first source's {dv}; "
                             "outputs of all sources are summed, so Dv must agree")
        M = k.shape[2]
        mask = masks.get(name)
        check_key_padding_mask(mask, B, M, name=f"masks[{name!r}]", device=q.device)
        region = region_masks.get(name)
        if region is not None:
            if not isinstance(region, torch.Tensor) or tuple(region.shape) != (B, Nq):
                got = tuple(region.shape) if isinstance(region, torch.Tensor) else type(region).__name__
                raise ValueError(f"region_masks[{name!r}]: expected a tensor (B, Nq) = ({B}, {Nq}), got {got}")
            if region.device != q.device:
                raise ValueError(f"region_masks[{name!r}]: expected device {q.device} (q's), got {region.device}")
            if region.dtype != torch.bool:
                if not region.is_floating_point():
                    raise TypeError(f"region_masks[{name!r}]: expected bool, or floating weights, got {region.dtype}")
                if mode != "separate":
                    raise TypeError(f"region_masks[{name!r}]: floating region weights multiply a source's output "
                                    "and exist only for mode='separate'; joint mode takes bool region masks")
                if region.dtype != q.dtype:
                    raise TypeError(f"region_masks[{name!r}]: floating weights must have q's dtype {q.dtype}, got "
                                    f"{region.dtype}")
        scale_s = _check_scale_value(f"scales[{name!r}]", scales.get(name, 1.0), q)
        bias = biases.get(name)
        if bias is not None:
            check_tensor(f"biases[{name!r}]", bias, ndim=3)
            if bias.shape[0] not in (1, B) or bias.shape[1] not in (1, Hq) or bias.shape[2] != M:
                raise ValueError(f"biases[{name!r}]: expected (B or 1, Hq or 1, M) = ({B} or 1, {Hq} or 1, {M}), "
                                 f"got {tuple(bias.shape)}")
            if bias.dtype != q.dtype or bias.device != q.device:
                raise TypeError(f"biases[{name!r}]: expected q's dtype {q.dtype} and device {q.device}, got "
                                f"{bias.dtype} on {bias.device}")
        pos = kv_pos.get(name)
        check_positions(f"kv_pos[{name!r}]", pos, B, M, device=q.device)
        out.append(_Source(name, k, v, mask, region, scale_s, bias, pos))
    return out


# --------------------------------------------------------------------------------------------------------
# Visibility
# --------------------------------------------------------------------------------------------------------
def position_visibility(q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
    """Causal cross by position as a dense bool mask: (B|1, 1, Nq, M), True where ``kv_pos <= q_pos``.

    q_pos (Nq,) or (B, Nq), kv_pos (M,) or (B, M). The mask predicate of Video-CCAM (group t sees frames <= t)
    and Flamingo (text sees media placed before it)."""
    qp = q_pos if q_pos.dim() == 2 else q_pos.unsqueeze(0)  # (B|1, Nq)
    kp = kv_pos if kv_pos.dim() == 2 else kv_pos.unsqueeze(0)  # (B|1, M)
    return (kp.unsqueeze(1) <= qp.unsqueeze(2)).unsqueeze(1)  # (B|1, 1, Nq, M)


def _visible(s: _Source, q_pos: torch.Tensor | None, a: int, b: int, *, region: bool) -> torch.Tensor | None:
    """Bool (B|1, 1, b-a|1, M) of the keys of ``s`` query rows a..b may see (key padding, positions, and with
    ``region`` the bool region mask), or None when every key is visible."""
    vis = None
    if s.mask is not None:
        vis = s.mask[:, None, None, :]  # (B, 1, 1, M)
    if s.pos is not None:
        assert q_pos is not None
        p = position_visibility(q_pos[..., a:b], s.pos)  # (B|1, 1, b-a, M)
        vis = p if vis is None else vis & p
    if region and s.region is not None and s.region.dtype == torch.bool:
        r = s.region[:, None, a:b, None]  # (B, 1, b-a, 1)
        vis = r if vis is None else vis & r
    return vis


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------
def _masked_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with exact zeros on rows where every score is -inf."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    w = torch.exp(scores - row_max)
    denom = w.sum(dim=-1, keepdim=True)
    return w / torch.where(denom > 0, denom, torch.ones_like(denom))


def _reference(q, srcs: list[_Source], *, mode, q_pos, scale, want_mass):
    """Explicit scores and softmax per source: O(Nq * M) memory. The oracle of the fast path."""
    B, Hq, Nq, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc)
    scores, values = [], []
    for s in srcs:
        G = Hq // s.k.shape[1]
        k = repeat_kv(s.k, G).to(acc)  # (B, Hq, M, D)
        sc = torch.matmul(qf, k.transpose(-2, -1)) * scale  # (B, Hq, Nq, M)
        if s.bias is not None:
            sc = sc + s.bias.to(acc).unsqueeze(-2)  # (B|1, Hq|1, 1, M)
        vis = _visible(s, q_pos, 0, Nq, region=True)  # (B|1, 1, Nq|1, M)
        if vis is not None:
            sc = sc.masked_fill(~vis, float("-inf"))
        scores.append(sc)
        values.append(repeat_kv(s.v, G).to(acc))  # (B, Hq, M, Dv)
    out = None
    if mode == "separate":
        for s, sc, v in zip(srcs, scores, values):
            o = torch.matmul(_masked_softmax(sc), v)  # (B, Hq, Nq, Dv)
            if s.region is not None and s.region.dtype != torch.bool:
                o = o * s.region.to(acc)[:, None, :, None]
            o = o * (s.scale.to(acc) if isinstance(s.scale, torch.Tensor) else s.scale)
            out = o if out is None else out + o
        joint_p = _masked_softmax(torch.cat(scores, dim=-1)) if want_mass else None
    else:
        joint_p = _masked_softmax(torch.cat(scores, dim=-1))  # (B, Hq, Nq, sum M)
        for s, p, v in zip(srcs, joint_p.split([s.m for s in srcs], dim=-1), values):
            o = torch.matmul(p, v) * (s.scale.to(acc) if isinstance(s.scale, torch.Tensor) else s.scale)
            out = o if out is None else out + o
    assert out is not None
    out = out.to(q.dtype)
    if not want_mass:
        return out
    assert joint_p is not None
    mass = {s.name: p.sum(dim=-1) for s, p in zip(srcs, joint_p.split([s.m for s in srcs], dim=-1))}
    return out, mass


# --------------------------------------------------------------------------------------------------------
# Fast path (fused SDPA)
# --------------------------------------------------------------------------------------------------------
def _sdpa(q, k, v, *, scale: float, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """Fused SDPA: q (B, Hq, Nq, D), k (B, Hk, M, D), v (B, Hk, M, Dv); ``mask`` bool (B|1, 1, Nq|1, M),
    ``bias`` additive (B|1, Hq|1, M). Rows with no visible key are zeros."""
    gqa = q.shape[1] != k.shape[1]
    if bias is None:
        am = mask
    else:
        am = bias.unsqueeze(-2)  # (B|1, Hq|1, 1, M)
        if mask is not None:
            am = am.masked_fill(~mask, float("-inf"))  # (B|1, Hq|1, Nq|1, M)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=scale, enable_gqa=gqa)
    if mask is not None:
        visible = mask.any(dim=-1, keepdim=True)  # (B|1, 1, Nq|1, 1)
        if not bool(visible.all()):
            out = torch.where(visible, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _shared_positions(pos: torch.Tensor | None) -> torch.Tensor | None:
    """(N,) positions when ``pos`` is (N,) or (B, N) with every row equal; None otherwise."""
    if pos is None:
        return None
    if pos.dim() == 1:
        return pos
    if pos.shape[0] == 1 or bool((pos == pos[:1]).all()):
        return pos[0]
    return None


def _is_sorted(p: torch.Tensor) -> bool:
    return p.numel() < 2 or bool((p[1:] >= p[:-1]).all())


def _prefix_blocks(counts: list[int], min_rows: int) -> list[tuple[int, int, int, int]]:
    """Query blocks (a, b, lo, hi) over nondecreasing visible-key counts: rows a..b see at least ``lo`` and at most
    ``hi`` leading keys. Runs of equal counts are merged until a block has ``min_rows`` rows."""
    n, a, blocks = len(counts), 0, []
    while a < n and counts[a] == 0:
        a += 1
    if a:
        blocks.append((0, a, 0, 0))
    while a < n:
        b = a
        while b < n and b - a < min_rows:
            run = counts[b]
            while b < n and counts[b] == run:
                b += 1
        blocks.append((a, b, counts[a], counts[b - 1]))
        a = b
    return blocks


def _attend_by_position(q, s: _Source, qp: torch.Tensor, kp: torch.Tensor, *, scale: float) -> torch.Tensor:
    """One source, causal by shared positions qp (Nq,), kp (M,): keys and queries sorted by position, one SDPA
    call per block of queries over the key prefix it may see (block-local mask only where prefixes differ)."""
    k, v, mask, bias = s.k, s.v, s.mask, s.bias
    if not _is_sorted(kp):
        order = torch.argsort(kp, stable=True)
        k, v, kp = k.index_select(2, order), v.index_select(2, order), kp.index_select(0, order)
        mask = None if mask is None else mask.index_select(1, order)
        bias = None if bias is None else bias.index_select(2, order)
    inverse = None
    if not _is_sorted(qp):
        qorder = torch.argsort(qp, stable=True)
        q, qp = q.index_select(2, qorder), qp.index_select(0, qorder)
        inverse = torch.argsort(qorder)
    common = torch.promote_types(qp.dtype, kp.dtype)
    counts = torch.searchsorted(kp.to(common).contiguous(), qp.to(common).contiguous(), right=True)  # (Nq,)
    B, Hq, Nq, _ = q.shape
    outs = []
    for a, b, lo, hi in _prefix_blocks(counts.tolist(), _MIN_BLOCK_ROWS):
        if hi == 0:
            outs.append(q.new_zeros(B, Hq, b - a, v.shape[3]))
            continue
        blk = None if mask is None else mask[:, None, None, :hi]  # (B, 1, 1, hi)
        if lo < hi:
            pm = (torch.arange(hi, device=q.device).view(1, hi) < counts[a:b].view(-1, 1)).view(1, 1, b - a, hi)
            blk = pm if blk is None else blk & pm
        outs.append(_sdpa(q[:, :, a:b], k[:, :, :hi], v[:, :, :hi], scale=scale, mask=blk,
                          bias=None if bias is None else bias[..., :hi]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, Hq, Nq, Dv)
    return out if inverse is None else out.index_select(2, inverse)


def _attend_one(q, s: _Source, q_pos, *, scale: float) -> torch.Tensor:
    """softmax attention of q over one source's keys (padding, positions; not region or scale)."""
    if s.pos is not None:
        qp, kp = _shared_positions(q_pos), _shared_positions(s.pos)
        if qp is not None and kp is not None:
            return _attend_by_position(q, s, qp, kp, scale=scale)
    return _sdpa(q, s.k, s.v, scale=scale, mask=_visible(s, q_pos, 0, q.shape[2], region=False), bias=s.bias)


def _apply_scale(o: torch.Tensor, s: _Source) -> torch.Tensor:
    if isinstance(s.scale, torch.Tensor):
        return o * s.scale.to(o.dtype)
    return o if s.scale == 1.0 else o * s.scale


def _fast(q, srcs: list[_Source], *, mode, q_pos, scale) -> torch.Tensor:
    B, Hq, Nq, _ = q.shape
    if mode == "separate" or len(srcs) == 1:
        out = None
        for s in srcs:
            if mode == "separate" and not isinstance(s.scale, torch.Tensor) and s.scale == 0.0:
                continue  # contributes exactly nothing; skipping keeps scale 0 bit-identical to its absence
            o = _attend_one(q, s, q_pos, scale=scale)  # (B, Hq, Nq, Dv)
            if s.region is not None:
                o = o * s.region.to(o.dtype)[:, None, :, None]
            o = _apply_scale(o, s)
            out = o if out is None else out + o
        return q.new_zeros(B, Hq, Nq, srcs[0].v.shape[3]) if out is None else out
    # joint over several sources: one SDPA call over the concatenated keys; scales fold into the values
    hk = {s.k.shape[1] for s in srcs}
    H = hk.pop() if len(hk) == 1 else Hq

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[1] == H else repeat_kv(t, H // t.shape[1])

    k = torch.cat([heads(s.k) for s in srcs], dim=2)  # (B, H, M, D)
    v = torch.cat([_apply_scale(heads(s.v), s) for s in srcs], dim=2)  # (B, H, M, Dv)
    dense = any(s.pos is not None or (s.region is not None) for s in srcs)
    if dense:
        parts = []
        for s in srcs:
            vis = _visible(s, q_pos, 0, Nq, region=True)
            parts.append(torch.ones(1, 1, 1, s.m, dtype=torch.bool, device=q.device) if vis is None else vis)
        mask = torch.cat([p.expand(B, 1, Nq, s.m) for p, s in zip(parts, srcs)], dim=-1)  # (B, 1, Nq, M)
    elif any(s.mask is not None for s in srcs):
        mask = torch.cat([s.mask if s.mask is not None else s.k.new_ones(B, s.m, dtype=torch.bool)
                          for s in srcs], dim=1)[:, None, None, :]  # (B, 1, 1, M)
    else:
        mask = None
    bias = None
    if any(s.bias is not None for s in srcs):
        bias = torch.cat([(s.bias if s.bias is not None else q.new_zeros(1, 1, s.m)).expand(
            B, Hq, s.m) for s in srcs], dim=-1)  # (B, Hq, M)
    return _sdpa(q, k, v, scale=scale, mask=mask, bias=bias)


# --------------------------------------------------------------------------------------------------------
# Source mass: per-source log-sum-exp in query blocks, with a recomputing backward
# --------------------------------------------------------------------------------------------------------
class _SourceLSE(torch.autograd.Function):
    """lse (B, Hq, Nq) = logsumexp_j(scale * q k_j + bias_j over visible j), computed and differentiated in query
    blocks of ``block`` rows: memory O(block * M), never Nq x M."""

    @staticmethod
    def forward(ctx, q, k, bias, scale, visible_fn, block):
        B, Hq, Nq, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        G = Hq // k.shape[1]
        kr = repeat_kv(k, G).to(acc)  # (B, Hq, M, D)
        lse = torch.empty(B, Hq, Nq, dtype=acc, device=q.device)
        for a in range(0, Nq, block):
            b = min(Nq, a + block)
            lse[:, :, a:b] = torch.logsumexp(_block_scores(q, kr, bias, scale, visible_fn, a, b, acc), dim=-1)
        ctx.save_for_backward(q, k, lse, *([] if bias is None else [bias]))
        ctx.scale, ctx.visible_fn, ctx.block, ctx.has_bias = scale, visible_fn, block, bias is not None
        return lse

    @staticmethod
    def backward(ctx, grad):
        q, k, lse, *rest = ctx.saved_tensors
        bias = rest[0] if ctx.has_bias else None
        B, Hq, Nq, D = q.shape
        Hk, M = k.shape[1], k.shape[2]
        G = Hq // Hk
        acc = lse.dtype
        kr = repeat_kv(k, G).to(acc)
        dq = torch.zeros(B, Hq, Nq, D, dtype=acc, device=q.device)
        dk = torch.zeros(B, Hq, M, D, dtype=acc, device=q.device)
        db = None if bias is None else torch.zeros(B, Hq, M, dtype=acc, device=q.device)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        for a in range(0, Nq, ctx.block):
            b = min(Nq, a + ctx.block)
            s = _block_scores(q, kr, bias, ctx.scale, ctx.visible_fn, a, b, acc)  # (B, Hq, rows, M)
            gs = grad[:, :, a:b, None].to(acc) * torch.exp(s - safe[:, :, a:b, None])  # d lse / d s = softmax
            dq[:, :, a:b] = ctx.scale * torch.matmul(gs, kr)
            dk += ctx.scale * torch.matmul(gs.transpose(-2, -1), q[:, :, a:b].to(acc))
            if db is not None:
                db += gs.sum(dim=-2)
        dk = dk.view(B, Hk, G, M, D).sum(dim=2)
        if db is not None:
            db = db.sum(dim=tuple(i for i in (0, 1) if bias.shape[i] == 1), keepdim=True)
            db = db.to(bias.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), db, None, None, None


def _block_scores(q, kr, bias, scale, visible_fn, a, b, acc):
    s = torch.matmul(q[:, :, a:b].to(acc), kr.transpose(-2, -1)) * scale  # (B, Hq, b-a, M)
    if bias is not None:
        s = s + bias.to(acc).unsqueeze(-2)
    vis = visible_fn(a, b)
    return s if vis is None else s.masked_fill(~vis, float("-inf"))


def _source_mass(q, srcs: list[_Source], *, q_pos, scale) -> dict[str, torch.Tensor]:
    lses = []
    for s in srcs:
        fn: Callable[[int, int], torch.Tensor | None] = (
            lambda a, b, s=s: _visible(s, q_pos, a, b, region=True))
        lses.append(_SourceLSE.apply(q, s.k, s.bias, scale, fn, _LSE_BLOCK))  # (B, Hq, Nq)
    stacked = torch.stack(lses, dim=0)  # (S, B, Hq, Nq)
    top = stacked.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    w = torch.exp(stacked - top)  # (S, B, Hq, Nq); 0 where a source is invisible
    total = w.sum(dim=0)
    share = w / torch.where(total > 0, total, torch.ones_like(total))
    return {s.name: share[i] for i, s in enumerate(srcs)}


# --------------------------------------------------------------------------------------------------------
# The function
# --------------------------------------------------------------------------------------------------------
def cross_attention(
    q: torch.Tensor,
    sources: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    mode: str = "separate",
    masks: Mapping[str, torch.Tensor] | None = None,
    region_masks: Mapping[str, torch.Tensor] | None = None,
    scales: Mapping[str, float | torch.Tensor] | None = None,
    biases: Mapping[str, torch.Tensor] | None = None,
    q_pos: torch.Tensor | None = None,
    kv_pos: Mapping[str, torch.Tensor] | None = None,
    scale: float | None = None,
    return_source_mass: bool = False,
    backend: str = "auto",
):
    """Cross-attention of one query stream over several named context sources (see the module docstring).

    Args:
        q: (B, Hq, Nq, D) queries.
        sources: {name: (k (B, Hk_s, M_s, D), v (B, Hk_s, M_s, Dv))}, Hq % Hk_s == 0, one Dv for all.
        mode: ``"separate"`` (a softmax per source, outputs summed with their scales) or ``"joint"`` (one softmax
            over the concatenated keys).
        masks: {name: (B, M_s) bool}, key padding, True = attend.
        region_masks: {name: (B, Nq)}: bool (the source reaches only these queries) or, in separate mode,
            floating weights in q's dtype multiplying the source's output per query.
        scales: {name: number or 0-d tensor}, default 1: the source's output is multiplied by it (joint: its
            values are, so its keys still compete in the softmax).
        biases: {name: (B|1, Hq|1, M_s)} additive key bias in q's dtype.
        q_pos, kv_pos: causal cross by position: (Nq,) or (B, Nq) and {name: (M_s,) or (B, M_s)}; a query sees a
            context token iff its position is <= the query's. Sources absent from kv_pos are fully visible.
        scale: score scale, default 1 / sqrt(D).
        return_source_mass: also return {name: (B, Hq, Nq)} the share of the joint softmax normaliser each
            source's keys hold (joint mode: the attention mass each source received).
        backend: ``"auto"``/``"fast"`` (fused SDPA) or ``"reference"`` (explicit softmax, O(Nq * M) memory).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, mass) with ``return_source_mass``.
    """
    check_scale(scale)
    check_bool("return_source_mass", return_source_mass)
    check_choice("backend", backend, BACKENDS)
    srcs = _prepare(q, sources, mode=mode, masks=masks, region_masks=region_masks, scales=scales, biases=biases,
                    q_pos=q_pos, kv_pos=kv_pos)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "reference":
        return _reference(q, srcs, mode=mode, q_pos=q_pos, scale=scale, want_mass=return_source_mass)
    out = _fast(q, srcs, mode=mode, q_pos=q_pos, scale=scale)
    if not return_source_mass:
        return out
    return out, _source_mass(q, srcs, q_pos=q_pos, scale=scale)


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------
def _named(arg: str, value: object, single: str | None, known: list[str]) -> dict[str, Any]:
    """A per-source argument as a dict: a mapping (names checked) or, for a single-source layer, one value."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(_mapping(arg, value, known))
    if single is None:
        raise TypeError(f"{arg}: this layer has several sources {known}; expected a mapping from source name to "
                        f"tensor, got {type(value).__name__}")
    return {single: value}


class CrossAttention(nn.Module):
    """Multi-source cross-attention layer: ``x (B, N, dim)`` attends to named contexts -> ``(B, N, dim)``.

    ``context_dims={"text": 768, "image": 1024}`` gives each source its own key/value projections (one query and
    one output projection are shared); ``context_dim=C`` (or neither: C = dim) builds a single-source layer whose
    forward takes one tensor (its source is named ``"context"``). ``bias`` applies to the q/k/v projections and, unless
    ``out_bias`` says otherwise, the output projection (diffusers' layers: ``bias=False, out_bias=True``). ``mode``,
    ``scales`` (initial per-source output
    scales; ``learnable_scales`` makes them parameters) and the masks are those of :func:`cross_attention`.
    ``causal=True``: causal cross by position; forward then needs ``q_pos`` and ``context_pos``.

    Decoding against a fixed context: ``cache = layer.context_cache(context)`` projects it once (or pass an empty
    ``ContextCache`` as ``state`` together with the context); then ``y, cache = layer(x_t, state=cache)`` per step
    reads the cached keys/values. ``append_context=True`` adds new context tokens to cached sources (causal cross:
    new frames with later positions). One cache can serve several layers when their source names differ; the
    layer does not advance ``state.seq_len`` (the count of decoded queries belongs to the cache's owner).
    """

    def __init__(self, dim: int, heads: int, *, context_dims: Mapping[str, int] | None = None,
                 context_dim: int | None = None, mode: str = "separate", kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, out_bias: bool | None = None,
                 scales: Mapping[str, float] | None = None, learnable_scales: bool = False, causal: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        self.kv_heads = heads if kv_heads is None else check_int("kv_heads", kv_heads)
        if heads % self.kv_heads:
            raise ValueError(f"kv_heads: heads ({heads}) must be a multiple of kv_heads, got {self.kv_heads}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"heads: dim ({dim}) must be divisible by heads, got {heads}; or pass head_dim")
            head_dim = dim // heads
        self.head_dim = check_int("head_dim", head_dim)
        self.mode = check_choice("mode", mode, MODES)
        self.causal = check_bool("causal", causal)
        self.backend = check_choice("backend", backend, BACKENDS)
        check_bool("bias", bias)
        out_bias = bias if out_bias is None else check_bool("out_bias", out_bias)
        check_bool("learnable_scales", learnable_scales)
        if context_dims is not None and context_dim is not None:
            raise ValueError("context_dims, context_dim: give one (several named sources, or one source), not both")
        if context_dims is None:
            self.single: str | None = "context"
            context_dims = {"context": dim if context_dim is None else check_int("context_dim", context_dim)}
        else:
            self.single = None
            if not isinstance(context_dims, Mapping) or not context_dims:
                raise TypeError(f"context_dims: expected a non-empty mapping {{source name: width}}, got "
                                f"{context_dims!r}")
            for name, width in context_dims.items():
                if not isinstance(name, str) or not name:
                    raise TypeError(f"context_dims: source names must be non-empty str, got {name!r}")
                check_int(f"context_dims[{name!r}]", width)
        self.context_dims = dict(context_dims)
        self.names = list(context_dims)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        inner, kv_inner = heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.ModuleDict({n: nn.Linear(c, kv_inner, bias=bias) for n, c in context_dims.items()})
        self.v_proj = nn.ModuleDict({n: nn.Linear(c, kv_inner, bias=bias) for n, c in context_dims.items()})
        self.o_proj = nn.Linear(inner, dim, bias=out_bias)
        init = _mapping("scales", scales, self.names)
        values = {n: float(_check_scale_value(f"scales[{n!r}]", init.get(n, 1.0), torch.zeros(()))) for n in self.names}
        if learnable_scales:
            self.scales: Any = nn.ParameterDict({n: nn.Parameter(torch.tensor(v)) for n, v in values.items()})
        else:
            self.scales = values

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"context_dims={self.context_dims}, mode={self.mode!r}, causal={self.causal}")

    # -- projections -----------------------------------------------------------------------------------
    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

    def project(self, name: str, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of source ``name``: context (B, M, C_s) -> k, v (B, Hk, M, head_dim)."""
        if name not in self.context_dims:
            raise ValueError(f"context: unknown source {name!r}; this layer's sources are {self.names}")
        check_module_input(self, context, name=f"context[{name!r}]", channels=self.context_dims[name])
        return (self._heads(self.k_proj[name](context), self.kv_heads),
                self._heads(self.v_proj[name](context), self.kv_heads))

    def context_cache(self, context, *, key_padding_mask=None, context_pos=None,
                      state: ContextCache | None = None) -> ContextCache:
        """A :class:`ContextCache` (new, or ``state``) holding the projected ``context`` of this layer."""
        state = ContextCache() if state is None else state
        self._store(state, context, key_padding_mask, context_pos, append=False)
        return state

    def extend_context(self, state: ContextCache, context, *, key_padding_mask=None, context_pos=None) -> None:
        """Append the projections of new context tokens to ``state`` (causal cross: frames arriving later)."""
        self._store(state, context, key_padding_mask, context_pos, append=True)

    def init_state(self, batch_size: int | None = None) -> ContextCache:
        """An empty :class:`ContextCache` (fill it by calling the layer with a context and ``state=``)."""
        return ContextCache()

    def _store(self, state, context, key_padding_mask, context_pos, *, append: bool) -> None:
        if not isinstance(state, ContextCache):
            raise TypeError(f"state: expected an attnzoo ContextCache, got {type(state).__name__}")
        ctx = _named("context", context, self.single, self.names)
        if not ctx:
            raise ValueError("context: expected at least one source to store, got none")
        kpm = _named("key_padding_mask", key_padding_mask, self.single, self.names)
        pos = _named("context_pos", context_pos, self.single, self.names)
        self._check_extra(ctx, key_padding_mask=kpm, context_pos=pos)
        kv = {name: self.project(name, c) for name, c in ctx.items()}
        self._check_masks(kpm, {n: k.shape[2] for n, (k, _) in kv.items()}, next(iter(kv.values()))[0].shape[0],
                          next(iter(kv.values()))[0].device)
        for name, (k, v) in kv.items():
            if append:
                state.append(name, k, v, key_padding_mask=kpm.get(name), positions=pos.get(name))
            else:
                if name in state:
                    raise ValueError(f"context: source {name!r} is already in this ContextCache; decode with "
                                     "context=None, or pass append_context=True to add tokens to it")
                state.set(name, k, v, key_padding_mask=kpm.get(name), positions=pos.get(name))

    def _check_masks(self, masks: Mapping[str, Any], lengths: Mapping[str, int], batch: int, device) -> None:
        """Each source's key-padding mask: bool (B, M_s) on x's device, named as the caller passed it."""
        for n, m in masks.items():
            check_key_padding_mask(m, batch, lengths[n], device=device,
                                   name="key_padding_mask" if self.single else f"key_padding_mask[{n!r}]")

    def _check_extra(self, ctx: Mapping[str, Any], **named: Mapping[str, Any]) -> None:
        for arg, d in named.items():
            extra = [n for n in d if n not in ctx]
            if extra:
                raise ValueError(f"{arg}: given for source {extra[0]!r}, which is not in this call's context; per-"
                                 "source masks and positions travel with their source's tokens")

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, context=None, *, key_padding_mask=None, region_masks=None, q_pos=None,
                context_pos=None, scales=None, state: ContextCache | None = None, append_context: bool = False,
                return_source_mass: bool = False):
        """x (B, N, dim); context {name: (B, M_s, C_s)} (a tensor for a single-source layer); key_padding_mask
        {name: (B, M_s)} bool; region_masks {name: (B, N)}; q_pos (N,) or (B, N) and context_pos {name: (M_s,) or
        (B, M_s)} (causal layers); scales {name: float} overrides the layer's.

        Returns (B, N, dim); (y, mass) with ``return_source_mass`` (mass {name: (B, heads, N)}); and the state last
        when one is given: (y, state) or (y, mass, state).
        """
        check_module_input(self, x, channels=self.dim)
        check_bool("append_context", append_context)
        B, N, _ = x.shape
        if self.causal and q_pos is None:
            raise ValueError("q_pos: this layer is causal by position (causal=True); pass q_pos (N,) or (B, N) and "
                             "context_pos for the positioned sources")
        if not self.causal and (q_pos is not None or context_pos is not None):
            raise ValueError("q_pos, context_pos: positions are for causal layers; build the layer with causal=True")
        if state is not None:
            if not isinstance(state, ContextCache):
                raise TypeError(f"state: expected an attnzoo ContextCache, got {type(state).__name__}")
            if context is not None:
                self._store(state, context, key_padding_mask, context_pos, append=append_context)
            elif key_padding_mask is not None or context_pos is not None:
                raise ValueError("key_padding_mask, context_pos: decoding from a ContextCache uses the cached masks "
                                 "and positions; pass them with the context when it is stored")
            names = [n for n in self.names if n in state]
            if not names:
                raise ValueError(f"state: this ContextCache holds none of this layer's sources {self.names}; pass "
                                 "the context once (with state=) to fill it")
            if state.batch != B:
                raise ValueError(f"x: batch {B} does not match the ContextCache's batch {state.batch}")
            sources = {n: (state.keys(n), state.values(n)) for n in names}
            masks = {n: state.mask(n) for n in names if state.mask(n) is not None}
            kv_pos = {n: state.positions(n) for n in names if state.positions(n) is not None}
        else:
            if append_context:
                raise ValueError("append_context: needs a ContextCache as state")
            ctx = _named("context", context, self.single, self.names)
            if not ctx:
                raise ValueError(f"context: cross-attention needs a context (sources {self.names}), got none")
            masks = _named("key_padding_mask", key_padding_mask, self.single, self.names)
            kv_pos = _named("context_pos", context_pos, self.single, self.names)
            self._check_extra(ctx, key_padding_mask=masks, context_pos=kv_pos)
            sources = {n: self.project(n, c) for n, c in ctx.items()}
            for n, (k, _) in sources.items():
                if k.shape[0] != B:
                    raise ValueError(f"context[{n!r}]: batch {k.shape[0]} does not match x's batch {B}")
            self._check_masks(masks, {n: k.shape[2] for n, (k, _) in sources.items()}, B, x.device)
        if self.causal and not kv_pos:
            raise ValueError("context_pos: this layer is causal by position; pass positions for the sources the "
                             "queries may see only in part")
        regions = _named("region_masks", region_masks, self.single, self.names)
        self._check_extra(sources, region_masks=regions)
        chosen = dict(self.scales) if scales is None else {**dict(self.scales), **_named("scales", scales, None,
                                                                                          self.names)}
        q = self._heads(self.q_proj(x), self.heads)  # (B, H, N, hd)
        res = cross_attention(q, sources, mode=self.mode, masks=masks or None, region_masks=regions or None,
                              scales={n: chosen[n] for n in sources}, q_pos=q_pos, kv_pos=kv_pos or None,
                              scale=self.scale, return_source_mass=return_source_mass, backend=self.backend)
        out, mass = (res if return_source_mass else (res, None))
        y = self.o_proj(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))  # (B, N, dim)
        result = (y,) + ((mass,) if return_source_mass else ()) + ((state,) if state is not None else ())
        return result[0] if len(result) == 1 else result


class GEGLU(nn.Module):
    """x -> a * gelu(b) with [a, b] = x split in two along the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return a * F.gelu(b)


def feed_forward(dim: int, mult: int, kind: str) -> nn.Module:
    """Pre-norm-free feed-forward of width ``mult * dim``: ``"geglu"`` (Perceiver/Flamingo resamplers) or
    ``"gelu"`` (ViT MLP)."""
    if kind == "geglu":
        return nn.Sequential(nn.Linear(dim, 2 * mult * dim), GEGLU(), nn.Linear(mult * dim, dim))
    return nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))


class ResamplerLayer(nn.Module):
    """One resampler block over a token set: ``z = z + Attn(LN(z), LN_c(x))``, then ``z = z + FF(LN(z))``.

    z (B, Nq, dim) latent queries; x (B, M, context_dim) tokens (keys and values only: the latents do not attend
    to each other, so each latent is computed independently, which causal-by-position decoding relies on).
    ``norm=False`` drops the layer norms, ``ff_mult=0`` the feed-forward. ``source`` names its context in a shared
    :class:`ContextCache`.
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, head_dim: int | None = None,
                 ff_mult: int = 4, ff: str = "geglu", norm: bool = True, bias: bool = False, causal: bool = False,
                 source: str = "context", backend: str = "auto") -> None:
        super().__init__()
        cdim = dim if context_dim is None else check_int("context_dim", context_dim)
        check_int("ff_mult", ff_mult, low=0)
        check_choice("ff", ff, ("geglu", "gelu"))
        check_bool("norm", norm)
        self.source, self.norm = source, norm
        self.norm_q = nn.LayerNorm(dim) if norm else nn.Identity()
        self.norm_c = nn.LayerNorm(cdim) if norm else nn.Identity()
        self.attn = CrossAttention(dim, heads, context_dims={source: cdim}, head_dim=head_dim, bias=bias,
                                   causal=causal, backend=backend)
        self.norm_ff = nn.LayerNorm(dim) if (norm and ff_mult) else nn.Identity()
        self.ff = feed_forward(dim, ff_mult, ff) if ff_mult else None

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None, *, key_padding_mask=None, q_pos=None,
                context_pos=None, state: ContextCache | None = None, append_context: bool = False) -> torch.Tensor:
        """z (B, Nq, dim), x (B, M, context_dim) (None: read from ``state``) -> (B, Nq, dim)."""
        ctx = None if x is None else {self.source: self.norm_c(x)}
        kpm = None if key_padding_mask is None else {self.source: key_padding_mask}
        pos = None if context_pos is None else {self.source: context_pos}
        res = self.attn(self.norm_q(z), ctx, key_padding_mask=kpm, q_pos=q_pos, context_pos=pos, state=state,
                        append_context=append_context)
        z = z + (res[0] if state is not None else res)
        if self.ff is not None:
            z = z + self.ff(self.norm_ff(z))
        return z


class LatentResampler(nn.Module):
    """Learned latent queries cross-attend to a token set: ``x (B, M, context_dim)`` -> ``(B, num_latents, dim)``.

    The resampler path shared by Video-CCAM's projector (with causal positions), TextHawk's ReSA (with levels
    routed to layers) and multi-layer trainable pooling (latents over the hidden states of all layers): ``depth``
    :class:`ResamplerLayer` blocks applied to ``latents`` (``nn.Parameter`` (num_latents, dim), or per-call
    ``latents=`` (B, Nq, dim), e.g. proposed by a network). ``routing`` (one level name per layer) makes ``x`` a
    mapping {level: (B, M_l, context_dim[level])}: layer i reads level ``routing[i]`` (multi-level cross-attention).
    ``causal=True``: latents have positions ``q_pos`` and tokens ``context_pos``; a latent sees tokens at positions
    <= its own. ``state``: a :class:`ContextCache` holding every layer's projected tokens (sources "layer0", ...).
    """

    def __init__(self, dim: int, heads: int, *, num_latents: int, context_dim: int | Mapping[str, int] | None = None,
                 depth: int = 1, routing: tuple[str, ...] | None = None, head_dim: int | None = None,
                 ff_mult: int = 4, ff: str = "geglu", norm: bool = True, bias: bool = False, causal: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        self.num_latents, self.depth = check_int("num_latents", num_latents), check_int("depth", depth)
        if routing is not None:
            if not isinstance(context_dim, Mapping):
                raise TypeError("context_dim: with routing, expected a mapping {level: width}, got "
                                f"{context_dim!r}")
            routing = tuple(routing)
            if len(routing) != depth or any(r not in context_dim for r in routing):
                raise ValueError(f"routing: expected {depth} level names from {list(context_dim)}, got {routing}")
            widths = [context_dim[r] for r in routing]
        else:
            if isinstance(context_dim, Mapping):
                raise TypeError("context_dim: a mapping of levels needs routing (the level each layer reads)")
            widths = [dim if context_dim is None else check_int("context_dim", context_dim)] * depth
        self.routing, self.causal = routing, check_bool("causal", causal)
        self.latents = nn.Parameter(torch.randn(num_latents, dim) / math.sqrt(dim))
        self.layers = nn.ModuleList([
            ResamplerLayer(dim, heads, context_dim=w, head_dim=head_dim, ff_mult=ff_mult, ff=ff, norm=norm,
                           bias=bias, causal=causal, source=f"layer{i}", backend=backend)
            for i, w in enumerate(widths)])

    def forward(self, x=None, *, key_padding_mask=None, context_pos=None, q_pos=None,
                latents: torch.Tensor | None = None, state: ContextCache | None = None,
                append_context: bool = False) -> torch.Tensor:
        """x (B, M, context_dim) or {level: (B, M_l, C_l)} with routing (None: decode from ``state``);
        key_padding_mask / context_pos likewise per level; q_pos (Nq,) latent positions (causal) ->
        (B, Nq, dim)."""
        if latents is None:
            if x is None:
                raise ValueError("latents: decoding from a state needs the latents to compute, (B, Nq, dim)")
            B = (next(iter(x.values())) if isinstance(x, Mapping) else x).shape[0]
            z = self.latents.unsqueeze(0).expand(B, -1, -1)  # (B, Nq, dim)
        else:
            check_tensor("latents", latents, ndim=3)
            if latents.shape[-1] != self.dim:
                raise ValueError(f"latents: expected (B, Nq, {self.dim}), got {tuple(latents.shape)}")
            z = latents
        for i, layer in enumerate(self.layers):
            level = None if self.routing is None else self.routing[i]
            xi, kpm, pos = x, key_padding_mask, context_pos
            if level is not None:
                xi = None if x is None else _named("x", x, None, list(dict.fromkeys(self.routing)))[level]
                kpm = None if kpm is None else _named("key_padding_mask", kpm, None, list(self.routing)).get(level)
                pos = None if pos is None else _named("context_pos", pos, None, list(self.routing)).get(level)
            z = layer(z, xi, key_padding_mask=kpm, q_pos=q_pos, context_pos=pos, state=state,
                      append_context=append_context)
        return z
