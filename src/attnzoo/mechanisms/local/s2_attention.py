"""S2-Attention: heterogeneous context sharding among attention heads (local + vertical-stride block sparsity).

Paper: "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (first version: "Efficient LLM
Training and Serving with Heterogeneous Context Sharding among Attention Heads"), Lin et al., arXiv 2407.17678.
Official code: https://github.com/linxihui/dkernel (DKernel, ``LocalStrideSparseAttention``).
Keys and queries are cut into blocks of ``block_size`` tokens. Head ``x`` sees, causally, the last
``local_blocks`` blocks and every block ``kb`` with ``(kb + x * step + offset) % vert_stride == 0``; the heads
shift the strided blocks so that together they cover the whole context.

The block pattern is DKernel's ``get_sparse_attn_mask`` (confirmed against the official code):
``M[x, qb, kb] = (qb >= kb) & ((qb - kb < local_blocks) | ((kb + x * step + offset) % vert_stride == 0))``,
token mask ``kron(M, ones(b, b)) & causal``, with ``step = max(1, vert_stride // num_query_heads)``
(``head_sliding_step``), ``offset = head_sliding_offset``; the last ``num_dense_heads`` heads are dense; with
grouped-query attention the pattern is per key/value head ``x`` (DKernel's ``num_kv_heads``), shared by the
query heads of its group; ``homo_head=True`` gives every head head 0's pattern. Causal only (DKernel asserts
causal patterns); bottom-right aligned: query i at position i + Nk - Nq, block ``(i + Nk - Nq) // b``.

Fast form (never builds the N x N scores, forward and backward): dense heads run fused causal SDPA; the other
heads run a block-sparse kernel that computes only the selected blocks, in two parts merged by log-sum-exp --
(a) the local band (each query block with its ``local_blocks`` key blocks, a strided view, no gather) and
(b) the strided blocks, which for head x are blocks ``o_x, o_x + V, o_x + 2V, ...``: a strided slice of the
blocked keys, attended by each query block up to its own limit ``kb <= qb - local_blocks``. The backward
recomputes both parts from the final log-sum-exp (FlashAttention style) and adds their key gradients back.

Decoding: :class:`S2Cache` keeps per key/value head only the blocks a later query can see -- its strided
blocks and the last ``local_blocks`` blocks -- about ``N / vert_stride + local_blocks * b`` tokens per sparse
head (the paper's KV-cache saving); dense heads keep everything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import check_step
from ...kernels.sdpa import sdpa
from ...masks import materialize
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from .s2_cache import S2Cache

_TILE_ELEMENTS = 1 << 23  # score elements of one tile group (bounds temporary memory)


# ---------------------------------------------------------------------------------------------------------
# The pattern
# ---------------------------------------------------------------------------------------------------------
def s2_head_offsets(hq: int, hk: int, *, vert_stride: int, num_dense_heads: int = 0, head_sliding_step=None,
                    head_sliding_offset: int = 0, homo_head: bool = False) -> list[int | None]:
    """Per key/value head x: the shift ``c_x`` of its strided blocks ((kb + c_x) % V == 0), None if dense."""
    if num_dense_heads > hk:
        raise ValueError(f"num_dense_heads: expected at most the {hk} key/value heads, got {num_dense_heads}")
    if homo_head and num_dense_heads:
        raise ValueError(f"num_dense_heads: must be 0 with homo_head=True (DKernel's rule), got {num_dense_heads}")
    step = max(1, vert_stride // hq) if head_sliding_step is None else head_sliding_step
    out: list[int | None] = []
    for x in range(hk):
        if x >= hk - num_dense_heads:
            out.append(None)
        else:
            out.append(head_sliding_offset if homo_head else x * step + head_sliding_offset)
    return out


def s2_mask_predicate(hq: int, hk: int, nq: int, nk: int, *, block_size: int, local_blocks: int, vert_stride: int,
                      num_dense_heads: int = 0, head_sliding_step=None, head_sliding_offset: int = 0,
                      homo_head: bool = False):
    """Predicate ``(b, h, q_idx, kv_idx)`` of the S2 token mask for query head h (causal, bottom-right)."""
    offs = s2_head_offsets(hq, hk, vert_stride=vert_stride, num_dense_heads=num_dense_heads,
                           head_sliding_step=head_sliding_step, head_sliding_offset=head_sliding_offset,
                           homo_head=homo_head)
    shift = torch.tensor([0 if c is None else c for c in offs])
    dense = torch.tensor([c is None for c in offs])
    groups, offset = hq // hk, nk - nq

    def s2_mask(b, h, q_idx, kv_idx):
        x = torch.div(h, groups, rounding_mode="floor")
        p = q_idx + offset
        qb = torch.div(p, block_size, rounding_mode="floor")
        kb = torch.div(kv_idx, block_size, rounding_mode="floor")
        strided = torch.remainder(kb + shift.to(kb.device)[x], vert_stride) == 0
        return (kv_idx <= p) & ((qb - kb < local_blocks) | strided | dense.to(kb.device)[x])

    return s2_mask


def s2_mask(hq: int, hk: int, nq: int, nk: int, device=None, **pattern) -> torch.Tensor:
    """Dense (1, Hq, Nq, Nk) bool mask, True = attend."""
    return materialize(s2_mask_predicate(hq, hk, nq, nk, **pattern), 1, hq, nq, nk, device=device)


def s2_registry_mask(nq: int, nk: int, *, causal: bool, heads=None, kv_heads=None, **opts):
    """The registry's predicate: :func:`s2_mask_predicate` for ``heads`` query heads (default 8) over
    ``kv_heads`` key/value heads (default ``heads``)."""
    if not causal:
        raise ValueError("causal: s2_attention is causal only, got causal=False")
    hq = 8 if heads is None else heads
    hk = hq if kv_heads is None else kv_heads
    if hk < 1 or hq % hk:
        raise ValueError(f"kv_heads: expected a divisor of heads={hq}, got {kv_heads!r}")
    pred = s2_mask_predicate(hq, hk, nq, nk, **s2_pattern(opts))
    pred.heads = hq
    return pred


def s2_pattern(opts: dict) -> dict:
    """The pattern options of an S2 options dict (the rest are kernel settings)."""
    return {k: opts[k] for k in ("block_size", "local_blocks", "vert_stride", "num_dense_heads", "head_sliding_step",
                                 "head_sliding_offset", "homo_head")}


def s2_reference(q, k, v, *, causal, key_padding_mask, scale, **opts):
    """Exact softmax attention with the S2 token mask materialized densely."""
    if not causal:
        raise ValueError("causal: S2-Attention is causal only (DKernel's patterns are causal), got causal=False")
    hq, hk, nq, nk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    mask = s2_mask(hq, hk, nq, nk, device=q.device, **s2_pattern(opts))  # (1, Hq, Nq, Nk)
    return softmax_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------------------
# Fast form: the block-sparse kernel
# ---------------------------------------------------------------------------------------------------------
class _Geometry:
    """Blocks of the sparse heads: query blocks qb0..qb0+nqb-1 (positions), key blocks 0..nkb-1."""

    def __init__(self, nq, nk, b, L, V, classes, kpm, device):
        self.b, self.L, self.V = b, L, V
        off = nk - nq
        self.qb0 = off // b
        self.q_front = off - self.qb0 * b
        self.nqb = -(-(nq + self.q_front) // b)
        self.nkb = -(-nk // b)
        self.M = -(-self.nkb // V)  # strided blocks per head (padded)
        self.nq, self.nk = nq, nk
        # key validity (exists, not padded away): (B|1, nkb * b)
        valid = torch.zeros(1, self.M * V * b, dtype=torch.bool, device=device)
        valid[:, :nk] = True
        if kpm is not None:
            valid = valid.repeat(kpm.shape[0], 1)
            valid[:, :nk] = kpm
        self.valid = valid
        # (a) local band: window of block qb = key blocks qb-L+1..qb, layout (L*b) keys
        t = torch.arange(b, device=device).view(b, 1)
        u = torch.arange(L * b, device=device).view(1, L * b)
        band = (L - 1) * b + t - u >= 0  # (b, L*b): key position <= query position
        vw = F.pad(valid[:, : self.nkb * b].to(torch.uint8), ((L - 1) * b, 0))  # (B|1, (L-1)*b + nkb*b)
        vw = vw.unfold(1, L * b, b).bool()  # (B|1, nkb, L*b): validity of each block's window
        vw = vw[:, self.qb0 : self.qb0 + self.nqb]  # (B|1, nqb, L*b)
        self.local_masked = ~(band.view(1, 1, b, L * b) & vw.unsqueeze(2))  # (B|1, nqb, b, L*b)
        # (b) strided: head class c (key/value head x) uses blocks o_x + r V, r < M
        self.o = torch.tensor([(-c) % V for c in classes], device=device)  # (Hk,)
        qb = torch.arange(self.qb0, self.qb0 + self.nqb, device=device).view(1, self.nqb, 1)
        kb = self.o.view(-1, 1, 1) + V * torch.arange(self.M, device=device).view(1, 1, self.M)  # (Hk, 1, M)
        self.strided_ok = kb <= qb - L  # (Hk, nqb, M): whole block before the local band
        cv = valid.view(valid.shape[0], 1, self.M, V, b)  # (B|1, 1, M, V, b)
        idx = self.o.view(1, -1, 1, 1, 1).expand(valid.shape[0], -1, self.M, 1, b)
        self.strided_valid = torch.take_along_dim(cv, idx, dim=3).squeeze(3)  # (B|1, Hk, M, b)

    def chunks(self, rows_per_block: int):
        """Query-block ranges [s, e) whose strided tiles stay under the element budget."""
        out, s = [], 0
        while s < self.nqb:
            e = s + 1
            while e < self.nqb:
                R = self.strided_count(e + 1)
                if (e + 1 - s) * rows_per_block * max(R, 1) * self.b > _TILE_ELEMENTS:
                    break
                e += 1
            out.append((s, e))
            s = e
        return out

    def strided_count(self, e: int) -> int:
        """Compressed blocks any of the first e query blocks can see (r with o + r V <= qb - L for some head)."""
        top = self.qb0 + e - 1 - self.L
        return 0 if top < 0 else min(self.M, top // self.V + 1)


def _windows(xb: torch.Tensor, nback: int) -> torch.Tensor:
    """(B, H, nb, b, D) -> (B, H, nb, (nback + 1) * b, D): each block with the nback blocks before it (zeros
    before the first), an overlapping strided view of the zero-padded sequence (no copy)."""
    B, H, nb, b, D = xb.shape
    padded = F.pad(xb.reshape(B, H, nb * b, D), (0, 0, nback * b, 0))  # (B, H, (nback + nb) * b, D)
    return padded.unfold(2, (nback + 1) * b, b).transpose(-1, -2)  # (B, H, nb, (nback + 1) * b, D)


def _blocks(x: torch.Tensor, nblocks: int, b: int, front: int = 0) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, nblocks, b, D), zero-padded with ``front`` rows before and the rest after."""
    B, H, N, D = x.shape
    return F.pad(x, (0, 0, front, nblocks * b - N - front)).view(B, H, nblocks, b, D)


def _strided(xb: torch.Tensor, o: torch.Tensor, M: int, V: int) -> torch.Tensor:
    """(B, Hk, M*V, b, D) blocked keys -> (B, Hk, M, b, D): head x's blocks o_x, o_x + V, ..."""
    B, Hk, _, b, D = xb.shape
    idx = o.view(1, Hk, 1, 1, 1, 1).expand(B, Hk, M, 1, b, D)
    return torch.take_along_dim(xb.view(B, Hk, M, V, b, D), idx, dim=3).squeeze(3)


def _unstrided(dxs: torch.Tensor, o: torch.Tensor, M: int, V: int) -> torch.Tensor:
    """Adjoint of :func:`_strided`: (B, Hk, M, b, D) -> (B, Hk, M*V, b, D) with zeros elsewhere."""
    B, Hk, _, b, D = dxs.shape
    out = dxs.new_zeros(B, Hk, M, V, b, D)
    out.scatter_(3, o.view(1, Hk, 1, 1, 1, 1).expand(B, Hk, M, 1, b, D), dxs.unsqueeze(3))
    return out.view(B, Hk, M * V, b, D)


class _S2Tensors:
    """Blocked operands shared by forward and backward."""

    def __init__(self, q, k, v, geo: _Geometry, scale: float):
        B, Hq, _, D = q.shape
        Hk = k.shape[1]
        self.G = G = Hq // Hk
        acc = torch.promote_types(q.dtype, torch.float32)
        b, L = geo.b, geo.L
        qb = _blocks(q.to(acc) * scale, geo.nqb, b, geo.q_front)  # (B, Hq, nqb, b, D)
        self.qs = qb.view(B, Hk, G, geo.nqb, b, D).transpose(2, 3).reshape(B, Hk, geo.nqb, G * b, D)
        kb = _blocks(k.to(acc), geo.M * geo.V, b)  # (B, Hk, M*V, b, D)
        vb = _blocks(v.to(acc), geo.M * geo.V, b)  # (B, Hk, M*V, b, Dv)
        win = slice(geo.qb0, geo.qb0 + geo.nqb)
        self.kw = _windows(kb[:, :, : geo.nkb], L - 1)[:, :, win]  # (B, Hk, nqb, L*b, D)
        self.vw = _windows(vb[:, :, : geo.nkb], L - 1)[:, :, win]  # (B, Hk, nqb, L*b, Dv)
        self.ks = _strided(kb, geo.o, geo.M, geo.V).reshape(B, Hk, geo.M * b, D)  # (B, Hk, M*b, D)
        self.vs = _strided(vb, geo.o, geo.M, geo.V).reshape(B, Hk, geo.M * b, -1)  # (B, Hk, M*b, Dv)
        self.acc = acc

    def local_scores(self, geo, s, e):
        sc = torch.matmul(self.qs[:, :, s:e], self.kw[:, :, s:e].transpose(-1, -2))  # (B, Hk, g, G*b, L*b)
        B, Hk, g, _, Lb = sc.shape
        m = geo.local_masked[:, s:e].view(-1, 1, g, 1, geo.b, Lb)
        sc.view(B, Hk, g, self.G, geo.b, Lb).masked_fill_(m, float("-inf"))
        return sc

    def strided_scores(self, geo, s, e, R):
        B, Hk, _, Gb, D = self.qs.shape
        g = e - s
        rows = self.qs[:, :, s:e].reshape(B, Hk, g * Gb, D)  # (B, Hk, g*G*b, D)
        sc = torch.matmul(rows, self.ks[:, :, : R * geo.b].transpose(-1, -2))  # (B, Hk, g*G*b, R*b)
        ok = geo.strided_ok[:, s:e, :R].view(1, Hk, g, 1, R, 1) & geo.strided_valid[:, :, :R].view(-1, Hk, 1, 1, R,
                                                                                                     geo.b)
        sc.view(B, Hk, g, Gb, R, geo.b).masked_fill_(~ok, float("-inf"))
        return sc


def _rows_lse(sc):
    m = sc.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = (sc - m).exp_()
    return m, p


class _S2Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, b, L, V, classes, kpm):
        B, Hq, Nq, _ = q.shape
        Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        geo = _Geometry(Nq, Nk, b, L, V, classes, kpm, q.device)
        T = _S2Tensors(q, k, v, geo, scale)
        G, acc = T.G, T.acc
        out = torch.zeros(B, Hk, geo.nqb, G * b, Dv, dtype=acc, device=q.device)
        lse = torch.full((B, Hk, geo.nqb, G * b, 1), float("-inf"), dtype=acc, device=q.device)
        step = max(1, _TILE_ELEMENTS // max(1, B * Hq * b * L * b))
        for s in range(0, geo.nqb, step):  # (a) local band
            e = min(geo.nqb, s + step)
            m, p = _rows_lse(T.local_scores(geo, s, e))  # (B, Hk, g, G*b, L*b)
            den = p.sum(dim=-1, keepdim=True)
            out[:, :, s:e] = torch.matmul(p, T.vw[:, :, s:e]) / torch.where(den > 0, den, torch.ones_like(den))
            lse[:, :, s:e] = m + torch.log(den)
        for s, e in geo.chunks(B * Hq * b):  # (b) strided blocks, merged by log-sum-exp
            R = geo.strided_count(e)
            if R == 0:
                continue
            g = e - s
            m, p = _rows_lse(T.strided_scores(geo, s, e, R))  # (B, Hk, g*G*b, R*b)
            den = p.sum(dim=-1, keepdim=True)
            o2 = torch.matmul(p, T.vs[:, :, : R * b]) / torch.where(den > 0, den, torch.ones_like(den))
            l2 = (m + torch.log(den)).view(B, Hk, g, G * b, 1)
            l1 = lse[:, :, s:e]
            top = torch.maximum(l1, l2)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
            tot = w1 + w2
            safe = torch.where(tot > 0, tot, torch.ones_like(tot))
            out[:, :, s:e] = (out[:, :, s:e] * w1 + o2.view(B, Hk, g, G * b, Dv) * w2) / safe
            lse[:, :, s:e] = top + torch.log(tot)
        result = _unblock(out, B, Hq, Nq, geo).to(q.dtype)  # (B, Hq, Nq, Dv)
        ctx.save_for_backward(q, k, v, result, lse, kpm)
        ctx.args = (scale, b, L, V, classes, kpm is not None)
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kpm = ctx.saved_tensors
        scale, b, L, V, classes, has_mask = ctx.args
        kpm = kpm if has_mask else None
        B, Hq, Nq, D = q.shape
        Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        geo = _Geometry(Nq, Nk, b, L, V, classes, kpm, q.device)
        T = _S2Tensors(q, k, v, geo, scale)
        G, acc = T.G, T.acc
        dob = _reblock(dout.to(acc), Hk, geo)  # (B, Hk, nqb, G*b, Dv)
        delta = _reblock((dout.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True), Hk, geo)  # (B, Hk, nqb, G*b, 1)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        dq = torch.zeros_like(T.qs)  # (B, Hk, nqb, G*b, D)
        dkw = torch.zeros_like(T.kw)  # (B, Hk, nqb, L*b, D)
        dvw = torch.zeros_like(T.vw)  # (B, Hk, nqb, L*b, Dv)
        dks = torch.zeros_like(T.ks)  # (B, Hk, M*b, D)
        dvs = torch.zeros_like(T.vs)  # (B, Hk, M*b, Dv)
        step = max(1, _TILE_ELEMENTS // max(1, B * Hq * b * L * b))
        for s in range(0, geo.nqb, step):  # (a)
            e = min(geo.nqb, s + step)
            p = T.local_scores(geo, s, e).sub_(lse[:, :, s:e]).exp_()  # (B, Hk, g, G*b, L*b)
            dvw[:, :, s:e] = torch.matmul(p.transpose(-1, -2), dob[:, :, s:e])
            ds = torch.matmul(dob[:, :, s:e], T.vw[:, :, s:e].transpose(-1, -2)).sub_(delta[:, :, s:e]).mul_(p)
            dq[:, :, s:e] += torch.matmul(ds, T.kw[:, :, s:e])
            dkw[:, :, s:e] = torch.matmul(ds.transpose(-1, -2), T.qs[:, :, s:e])
        for s, e in geo.chunks(B * Hq * b):  # (b)
            R = geo.strided_count(e)
            if R == 0:
                continue
            g = e - s
            rows = lambda x: x[:, :, s:e].reshape(B, Hk, g * G * b, x.shape[-1])  # noqa: B023
            p = T.strided_scores(geo, s, e, R).sub_(rows(lse)).exp_()  # (B, Hk, g*G*b, R*b)
            do = rows(dob)
            dvs[:, :, : R * b] += torch.matmul(p.transpose(-1, -2), do)
            ds = torch.matmul(do, T.vs[:, :, : R * b].transpose(-1, -2)).sub_(rows(delta)).mul_(p)
            dq[:, :, s:e] += torch.matmul(ds, T.ks[:, :, : R * b]).view(B, Hk, g, G * b, D)
            dks[:, :, : R * b] += torch.matmul(ds.transpose(-1, -2), rows(T.qs))
        dq = _unblock(dq, B, Hq, Nq, geo) * scale  # (B, Hq, Nq, D)
        dk = torch.zeros(B, Hk, geo.M * V, b, D, dtype=acc, device=q.device)  # blocked key gradients
        dv = torch.zeros(B, Hk, geo.M * V, b, Dv, dtype=acc, device=q.device)
        _fold_local(dk, dkw, geo)
        _fold_local(dv, dvw, geo)
        dk += _unstrided(dks.view(B, Hk, geo.M, b, D), geo.o, geo.M, V)
        dv += _unstrided(dvs.view(B, Hk, geo.M, b, Dv), geo.o, geo.M, V)
        dk = dk.view(B, Hk, -1, D)[:, :, :Nk]
        dv = dv.view(B, Hk, -1, Dv)[:, :, :Nk]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def _fold_local(dst, dw, geo):
    """Add the local-window key gradients (B, Hk, nqb, L*b, D) into the blocked key gradient (B, Hk, *, b, D)
    (the adjoint of the strided window view). Window i covers key blocks qb0 + i - L + 1 .. qb0 + i; blocks
    before 0 are padding and dropped."""
    nqb = dw.shape[2]
    L, b = geo.L, geo.b
    for j in range(L):  # slice j of every window is key block qb0 + i - (L - 1) + j
        first = geo.qb0 - (L - 1) + j
        lo = max(0, -first)
        if lo >= nqb:
            continue
        dst[:, :, first + lo : first + nqb] += dw[:, :, lo:, j * b : (j + 1) * b]


def _reblock(x: torch.Tensor, hk: int, geo: _Geometry) -> torch.Tensor:
    """(B, Hq, Nq, D) -> (B, Hk, nqb, G*b, D), the layout of the query tiles."""
    B, Hq, _, D = x.shape
    G = Hq // hk
    xb = _blocks(x, geo.nqb, geo.b, geo.q_front)  # (B, Hq, nqb, b, D)
    return xb.view(B, hk, G, geo.nqb, geo.b, D).transpose(2, 3).reshape(B, hk, geo.nqb, G * geo.b, D)


def _unblock(xb: torch.Tensor, B: int, hq: int, nq: int, geo: _Geometry) -> torch.Tensor:
    """Inverse of :func:`_reblock`: (B, Hk, nqb, G*b, D) -> (B, Hq, Nq, D)."""
    Hk, nqb, D = xb.shape[1], xb.shape[2], xb.shape[-1]
    G = hq // Hk
    x = xb.view(B, Hk, nqb, G, geo.b, D).transpose(2, 3).reshape(B, hq, nqb * geo.b, D)
    return x[:, :, geo.q_front : geo.q_front + nq]


def s2_sparse_attention(q, k, v, *, scale: float, block_size: int, local_blocks: int, vert_stride: int,
                        shifts: list[int], key_padding_mask=None) -> torch.Tensor:
    """The block-sparse kernel for heads without dense ones: q (B, Hq, Nq, D), k (B, Hk, Nk, D) with Nq <= Nk,
    ``shifts[x]`` = c_x of key/value head x. Causal, bottom-right aligned."""
    return _S2Attention.apply(q, k, v, scale, block_size, local_blocks, vert_stride, tuple(shifts), key_padding_mask)


def s2_fast(q, k, v, *, causal, key_padding_mask, scale, **opts):
    """Dense heads through fused causal SDPA; sparse heads through the block-sparse kernel (selected blocks
    only, hand-written backward)."""
    if not causal:
        raise ValueError("causal: S2-Attention is causal only (DKernel's patterns are causal), got causal=False")
    B, Hq, nq, _ = q.shape
    Hk, nk = k.shape[1], k.shape[2]
    if nq > nk:  # bottom-right: the first Nq - Nk queries precede every key and see nothing
        rest = s2_fast(q[:, :, nq - nk :], k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale, **opts)
        return torch.cat([q.new_zeros(B, Hq, nq - nk, v.shape[3]), rest], dim=2)
    pat = s2_pattern(opts)
    shifts = s2_head_offsets(Hq, Hk, vert_stride=pat["vert_stride"], num_dense_heads=pat["num_dense_heads"],
                             head_sliding_step=pat["head_sliding_step"], head_sliding_offset=pat["head_sliding_offset"],
                             homo_head=pat["homo_head"])
    n_sparse = Hk - pat["num_dense_heads"]
    G = Hq // Hk
    parts = []
    if n_sparse:
        parts.append(s2_sparse_attention(
            q[:, : n_sparse * G], k[:, :n_sparse], v[:, :n_sparse], scale=scale, block_size=pat["block_size"],
            local_blocks=pat["local_blocks"], vert_stride=pat["vert_stride"], shifts=shifts[:n_sparse],
            key_padding_mask=key_padding_mask))
    if n_sparse < Hk:  # DKernel puts the dense heads last
        parts.append(sdpa(q[:, n_sparse * G :], k[:, n_sparse:], v[:, n_sparse:], causal=True,
                          key_padding_mask=key_padding_mask, scale=scale))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, Hq, Nq, Dv)


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------
def init_s2_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device, **opts):
    return S2Cache(batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device, **s2_pattern(opts))


def s2_step(q, k, v, state: S2Cache, *, scale, key_padding_mask=None, **opts):
    """Append T tokens; the sparse key/value heads attend (exactly, over their few stored keys, with the S2
    mask) in one fused call per tile of queries, the dense heads with causal SDPA over everything."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=S2Cache)
    Hq, Hk, T = q.shape[1], k.shape[1], q.shape[2]
    if state.shifts is None:  # the default head step depends on the number of query heads
        state.configure(s2_head_offsets(Hq, Hk, **{k: v for k, v in state.pattern.items()
                                                   if k not in ("block_size", "local_blocks")}))
    state.append(k, v, key_padding_mask)
    G = Hq // Hk
    ns = state.n_sparse
    qpos = torch.arange(state.seq_len - T, state.seq_len, device=q.device)
    outs = []
    if ns:
        keys, values, pos, kmask = state.sparse.view()  # (B, ns, L, D), (B, ns, L, Dv), (ns, L), (B, ns, L)
        p = state.pattern
        b, Lb, V = p["block_size"], p["local_blocks"], p["vert_stride"]
        shift = torch.tensor(state.shifts[:ns], device=q.device).view(ns, 1, 1)
        kb = torch.div(pos, b, rounding_mode="floor").view(ns, 1, -1)  # (ns, 1, L); empty slots: far away
        L = pos.shape[1]
        qs = q[:, : ns * G]
        out = q.new_empty(q.shape[0], ns * G, T, v.shape[3])
        step = max(1, _TILE_ELEMENTS // max(1, q.shape[0] * ns * G * L))
        for r0 in range(0, T, step):  # tiles of queries bound the (T, L) mask
            r1 = min(T, r0 + step)
            qp = qpos[r0:r1].view(1, -1, 1)  # (1, t, 1)
            qb = torch.div(qp, b, rounding_mode="floor")
            vis = (pos.view(ns, 1, L) <= qp) & ((qb - kb < Lb) | (torch.remainder(kb + shift, V) == 0))  # (ns, t, L)
            vis = vis.unsqueeze(0)  # (1, ns, t, L)
            if kmask is not None:
                vis = vis & kmask.unsqueeze(2)  # (B, ns, t, L)
            out[:, :, r0:r1] = sdpa(qs[:, :, r0:r1], keys, values, attn_mask=vis.repeat_interleave(G, dim=1),
                                    scale=scale)
        outs.append(out)
    if ns < Hk:  # dense heads: every token, plain causal attention
        keys, values, _, kmask = state.dense.view()
        outs.append(sdpa(q[:, ns * G:], keys, values, causal=True, scale=scale,
                         key_padding_mask=None if kmask is None else kmask[:, 0]))
    state.evict()
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (B, Hq, T, Dv)


S2_ATTENTION = register(Mechanism(
    name="s2_attention",
    aliases=("s2attn", "dkernel", "local_stride_sparse"),
    family="local",
    catalog="P075",
    title="S2-Attention: Hardware-Aware Context Sharding Among Attention Heads",
    arxiv="2407.17678",
    code="https://github.com/linxihui/dkernel",
    summary="Block-sparse causal attention: each head sees its last local_blocks blocks plus every "
            "vert_stride-th block, shifted per head so the heads together cover the context.",
    patterns=("causal_self", "causal_cross"),
    exact=True,
    state="s2_cache",
    complexity="time O(N (L b + N / V) d) per sparse head, memory O(N d); decode state O(N / V + L b) per head",
    reference=s2_reference,
    fast=s2_fast,
    step=s2_step,
    init_state=init_s2_cache,
    mask=s2_registry_mask,
    options=(
        Option("block_size", 64, int, low=1, doc="tokens per block (DKernel: a power of 2 >= 16 on GPU)"),
        Option("local_blocks", 16, int, low=1, doc="most recent blocks every query sees (sliding window)"),
        Option("vert_stride", 8, int, low=1, doc="1 older block in every vert_stride is kept; 1 = dense causal"),
        Option("num_dense_heads", 0, int, low=0, doc="the last key/value heads that are dense"),
        Option("head_sliding_step", None, int, low=0, allow_none=True,
               doc="shift of the strided blocks between heads; None = max(1, vert_stride // query heads)"),
        Option("head_sliding_offset", 0, int, low=0, doc="shift of head 0's strided blocks"),
        Option("homo_head", False, bool, doc="every head uses head 0's pattern"),
    ),
    test_options={"block_size": 2, "local_blocks": 1, "vert_stride": 2},
    test_sizes={"n": 9, "nq": 5, "nk": 11},
    notes="defaults are Phi-3-small's (block 64, 16 local blocks, vertical stride 8); vert_stride = 1 or "
          "local_blocks >= blocks is dense causal attention; the pattern is per key/value head (GQA).",
))
