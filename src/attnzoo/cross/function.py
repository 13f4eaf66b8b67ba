"""The multi-source cross-attention function :func:`cross_attention`: validation of the sources and their masks,
scales, biases and positions; visibility by position; the reference (dense, float64-exact) and the fast form
(fused SDPA, causal cross by position in blocks of queries); the per-source mass from log-sum-exps."""


from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import (
    BACKENDS,
    check_bool,
    check_choice,
    check_key_padding_mask,
    check_positions,
    check_qkv,
    check_scale,
    check_tensor,
)
from ..reference import repeat_kv

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
    bias: torch.Tensor | None  # (B|1, Hq|1, M) or (B|1, Hq|1, Nq, M)
    pos: torch.Tensor | None  # (M,) or (B, M)
    pair: torch.Tensor | None = None  # (B|1, Nq, M) bool

    @property
    def pairwise(self) -> bool:
        """True when the source has a per-query-key term (pair mask or pairwise bias)."""
        return self.pair is not None or (self.bias is not None and self.bias.dim() == 4)

    @property
    def m(self) -> int:
        return self.k.shape[2]


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------
def source_mapping(name: str, value: object, known: list[str]) -> Mapping[str, Any]:
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


def check_scale_value(name: str, value: object, q: torch.Tensor) -> float | torch.Tensor:
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


def _prepare(q, sources, *, mode, masks, region_masks, scales, biases, q_pos, kv_pos,
             pair_masks=None) -> list[_Source]:
    check_tensor("q", q, ndim=4)
    check_choice("mode", mode, MODES)
    if not isinstance(sources, Mapping) or not sources:
        got = type(sources).__name__ if not isinstance(sources, Mapping) else "an empty mapping"
        raise TypeError(f"sources: expected a non-empty mapping {{name: (k, v)}}, got {got}")
    names = list(sources)
    masks = source_mapping("masks", masks, names)
    region_masks = source_mapping("region_masks", region_masks, names)
    scales = source_mapping("scales", scales, names)
    biases = source_mapping("biases", biases, names)
    pair_masks = source_mapping("pair_masks", pair_masks, names)
    kv_pos = source_mapping("kv_pos", kv_pos, names)
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
        scale_s = check_scale_value(f"scales[{name!r}]", scales.get(name, 1.0), q)
        bias = biases.get(name)
        if bias is not None:
            check_tensor(f"biases[{name!r}]", bias)
            if bias.dim() not in (3, 4) or bias.shape[0] not in (1, B) or bias.shape[1] not in (1, Hq) or (
                    bias.shape[-1] != M or (bias.dim() == 4 and bias.shape[2] != Nq)):
                raise ValueError(f"biases[{name!r}]: expected per key (B or 1, Hq or 1, M) = ({B} or 1, {Hq} or 1, "
                                 f"{M}) or per pair (B or 1, Hq or 1, Nq, M) = ({B} or 1, {Hq} or 1, {Nq}, {M}), got "
                                 f"{tuple(bias.shape)}")
            if bias.dtype != q.dtype or bias.device != q.device:
                raise TypeError(f"biases[{name!r}]: expected q's dtype {q.dtype} and device {q.device}, got "
                                f"{bias.dtype} on {bias.device}")
        pair = pair_masks.get(name)
        if pair is not None:
            if not isinstance(pair, torch.Tensor) or pair.dim() != 3 or pair.shape[0] not in (1, B) or (
                    tuple(pair.shape[1:]) != (Nq, M)):
                got = tuple(pair.shape) if isinstance(pair, torch.Tensor) else type(pair).__name__
                raise ValueError(f"pair_masks[{name!r}]: expected a bool tensor (B or 1, Nq, M) = ({B} or 1, {Nq}, "
                                 f"{M}), got {got}")
            if pair.dtype != torch.bool:
                raise TypeError(f"pair_masks[{name!r}]: expected dtype torch.bool (True = the query sees the key), got "
                                f"{pair.dtype}; convert an additive 0/-inf mask with `mask == 0`, 0/1 weights with "
                                "`mask > 0`")
            if pair.device != q.device:
                raise ValueError(f"pair_masks[{name!r}]: expected device {q.device} (q's), got {pair.device}")
        pos = kv_pos.get(name)
        check_positions(f"kv_pos[{name!r}]", pos, B, M, device=q.device)
        out.append(_Source(name, k, v, mask, region, scale_s, bias, pos, pair))
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
    """Bool (B|1, 1, b-a|1, M) of the keys of ``s`` query rows a..b may see (key padding, positions, pair mask, and
    with ``region`` the bool region mask), or None when every key is visible."""
    vis = None
    if s.mask is not None:
        vis = s.mask[:, None, None, :]  # (B, 1, 1, M)
    if s.pair is not None:
        p = s.pair[:, None, a:b, :]  # (B|1, 1, b-a, M)
        vis = p if vis is None else vis & p
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
            sc = sc + _bias4(s.bias).to(acc)  # (B|1, Hq|1, Nq|1, M)
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
def _bias4(bias: torch.Tensor) -> torch.Tensor:
    """A per-key bias (B|1, Hq|1, M) as (B|1, Hq|1, 1, M); a pairwise one (B|1, Hq|1, Nq, M) as it is."""
    return bias.unsqueeze(-2) if bias.dim() == 3 else bias


def _sdpa(q, k, v, *, scale: float, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """Fused SDPA: q (B, Hq, Nq, D), k (B, Hk, M, D), v (B, Hk, M, Dv); ``mask`` bool (B|1, 1, Nq|1, M),
    ``bias`` additive (B|1, Hq|1, M) or (B|1, Hq|1, Nq, M). Rows with no visible key are zeros."""
    gqa = q.shape[1] != k.shape[1]
    if bias is None:
        am = mask
    else:
        am = _bias4(bias)  # (B|1, Hq|1, Nq|1, M)
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
    if s.pos is not None and not s.pairwise:
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
    dense = any(s.pos is not None or s.region is not None or s.pair is not None for s in srcs)
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
    if any(s.bias is not None and s.bias.dim() == 4 for s in srcs):  # pairwise: every source's bias per pair
        bias = torch.cat([(_bias4(s.bias) if s.bias is not None else q.new_zeros(1, 1, 1, s.m)).expand(
            B, Hq, Nq, s.m) for s in srcs], dim=-1)  # (B, Hq, Nq, M)
    elif any(s.bias is not None for s in srcs):
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
        db = None if bias is None else torch.zeros(B, Hq, *bias.shape[2:], dtype=acc, device=q.device)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        for a in range(0, Nq, ctx.block):
            b = min(Nq, a + ctx.block)
            s = _block_scores(q, kr, bias, ctx.scale, ctx.visible_fn, a, b, acc)  # (B, Hq, rows, M)
            gs = grad[:, :, a:b, None].to(acc) * torch.exp(s - safe[:, :, a:b, None])  # d lse / d s = softmax
            dq[:, :, a:b] = ctx.scale * torch.matmul(gs, kr)
            dk += ctx.scale * torch.matmul(gs.transpose(-2, -1), q[:, :, a:b].to(acc))
            if db is not None and bias.dim() == 4:
                db[:, :, a:b] = gs
            elif db is not None:
                db += gs.sum(dim=-2)
        dk = dk.view(B, Hk, G, M, D).sum(dim=2)
        if db is not None:
            db = db.sum(dim=tuple(i for i in (0, 1) if bias.shape[i] == 1), keepdim=True)
            db = db.to(bias.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), db, None, None, None


def _block_scores(q, kr, bias, scale, visible_fn, a, b, acc):
    s = torch.matmul(q[:, :, a:b].to(acc), kr.transpose(-2, -1)) * scale  # (B, Hq, b-a, M)
    if bias is not None:
        s = s + (bias[:, :, a:b] if bias.dim() == 4 else bias.unsqueeze(-2)).to(acc)
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
    pair_masks: Mapping[str, torch.Tensor] | None = None,
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
        biases: {name: (B|1, Hq|1, M_s) per key or (B|1, Hq|1, Nq, M_s) per query-key pair}, additive, in q's
            dtype.
        pair_masks: {name: (B|1, Nq, M_s) bool}: query i sees key j of the source only where True.
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
                    q_pos=q_pos, kv_pos=kv_pos, pair_masks=pair_masks)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "reference":
        return _reference(q, srcs, mode=mode, q_pos=q_pos, scale=scale, want_mass=return_source_mass)
    out = _fast(q, srcs, mode=mode, q_pos=q_pos, scale=scale)
    if not return_source_mass:
        return out
    return out, _source_mass(q, srcs, q_pos=q_pos, scale=scale)
