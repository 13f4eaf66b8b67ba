"""``attnzoo.distributed.attention``: one call for every context-parallel layout.

CATALOG P025 (unified view + distributed MHA: ring, halo, head-parallel split), P117 (LASP-2), P075 (S2-Attention
head sharding). The layouts and what they support:

============  ==========================================================================  =====================
layout        mechanisms                                                                   sharding
============  ==========================================================================  =====================
``ring``      ``softmax`` and every mechanism defined by a mask predicate (the record's    contiguous or zigzag
              ``mask``: sliding_window, sink_window, neighborhood_1d, ...), plus any extra
              ``mask=`` predicate (document ids, prefix-LM, modality masks)
``halo``      the same (meant for local masks: only the boundary keys move)                contiguous or zigzag
``ulysses``   every functional mechanism (heads independent; see ``heads.HEAD_COUPLED``)  contiguous or zigzag
``hybrid``    as ``ring``, over a ring x Ulysses grid (:func:`hybrid_groups`)             contiguous or zigzag
``lasp2``     ``linear``, ``lightning``, ``based`` (self attention)                         contiguous
``heads``     as ``ulysses``, on inputs already split by heads (full sequences)            (none)
============  ==========================================================================  =====================
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import registry
from ..errors import (
    check_backend,
    check_bool,
    check_choice,
    check_int,
    check_key_padding_mask,
    check_qkv,
    check_scale,
)
from ..functional import attention as local_attention
from ..functional import pattern_of
from ..masks import and_masks
from ..masks import causal as causal_mask
from .comm import DEFAULT_TIMEOUT, Comm, describe, preflight
from .heads import HeadShard, local_options, split_heads
from .lasp2 import LASP2_MECHANISMS, lasp2_attention
from .ring import PLANS, build_plan, halo_attention, halo_block_plan, ring_attention
from .sharding import SCHEMES, Sharding
from .ulysses import HybridGroups, SeqToHeads, ulysses_attention

__all__ = ["LAYOUTS", "attention", "mask_predicate"]

LAYOUTS = ("ring", "halo", "ulysses", "hybrid", "lasp2", "heads")
_MASK_LAYOUTS = ("ring", "halo", "hybrid")

# Mechanisms whose registry predicate does not describe them under a key-padding mask (the record says so).
_NO_PADDING_PREDICATE = {
    "neighborhood_1d": (lambda causal: not causal,
                        "non-causal neighborhood attention with a key-padding mask runs every row on its own tokens "
                        "(NATTEN's variable-length borders), which no mask predicate expresses"),
}


def mask_predicate(mech: registry.Mechanism, nq: int, nk: int, causal: bool, options: dict, extra=None):
    """The predicate under which softmax attention is ``mech`` (None = every key), ANDed with ``extra``."""
    if mech.name == "softmax":
        base = causal_mask(nk - nq) if causal else None
    elif mech.mask is not None:
        base = mech.mask(nq, nk, causal=causal, **options)
    else:
        raise ValueError(
            f"mechanism: layouts {list(_MASK_LAYOUTS)} compute softmax attention under a mask predicate; "
            f"{mech.name!r} is not defined by one (its record has no `mask`). Use layout='ulysses' (any functional "
            f"mechanism) or, for the linear family, layout='lasp2'")
    if extra is None:
        return base
    return extra if base is None else and_masks(base, extra)


def _sharding(value, n_global: int | None, n_local: int, world: int, name: str, ulysses: int = 1) -> Sharding:
    if isinstance(value, Sharding):
        sh = value
    else:
        check_choice("sharding", value, SCHEMES)
        sh = Sharding(world * n_local if n_global is None else n_global, world, value, ulysses)
    if sh.world != world or sh.ulysses != ulysses:
        raise ValueError(f"sharding: built for {sh.world} ranks (Ulysses groups of {sh.ulysses}), the group has "
                         f"{world} (Ulysses groups of {ulysses})")
    if sh.local_len != n_local:
        raise ValueError(
            f"{name}: expected {sh.local_len} local tokens per rank for a sequence of {sh.seq_len} tokens over {world} "
            f"ranks with {sh.scheme!r} sharding (padded to {sh.padded_len}), got {n_local}; shard the sequence with "
            f"attnzoo.distributed.Sharding(...).shard(x, rank) and pass seq_len")
    return sh


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mechanism: str = "softmax", group=None,
    layout: str = "ring", sharding: str | Sharding = "contiguous", seq_len: int | None = None,
    kv_seq_len: int | None = None, causal: bool = False, key_padding_mask: torch.Tensor | None = None, mask=None,
    scale: float | None = None, return_lse: bool = False, backend: str = "auto", timeout: float = DEFAULT_TIMEOUT,
    check: bool = True, num_heads: tuple[int, int] | None = None, **options: Any,
):
    """Attention of ``mechanism`` over a sequence sharded across the ranks of ``group``.

    Args:
        q: (B, Hq, n, D) this rank's queries; k (B, Hk, n_k, D), v (B, Hk, n_k, Dv) its keys/values (SDPA
            layout, Hq % Hk == 0). Every rank holds the same number of tokens (the sequence is padded at its
            end; :class:`~attnzoo.distributed.Sharding` shards and unshards). With ``layout="heads"``: whole
            sequences of this rank's heads (:func:`~attnzoo.distributed.shard_heads`).
        mechanism: a registered functional mechanism (see the module docstring for what each layout takes).
        group: the process group (None = the default group); for ``layout="hybrid"`` a
            :class:`~attnzoo.distributed.HybridGroups` from :func:`~attnzoo.distributed.hybrid_groups`.
        layout: ``"ring"``, ``"halo"``, ``"ulysses"``, ``"hybrid"``, ``"lasp2"`` or ``"heads"``.
        sharding: ``"contiguous"``, ``"zigzag"`` or a :class:`~attnzoo.distributed.Sharding`.
        seq_len: the global number of query tokens N (default: world x local, no padding); ``kv_seq_len`` the
            keys' (cross attention; default seq_len when q and k have the same local length).
        causal: bottom-right aligned causal mask over the global sequence (query i sees keys j <= i + Nk - Nq).
        key_padding_mask: (B, n_k) bool, True = attend: this rank's shard of the global mask.
        mask: an extra predicate ``(b, h, q_idx, kv_idx) -> bool`` of :mod:`attnzoo.masks` over *global*
            positions and head indices, ANDed with the mechanism's (layouts ring, halo, hybrid).
        scale: score scale, default 1 / sqrt(D).
        return_lse: also return the log-sum-exp (B, Hq, n) of the scores (layouts ring, halo, hybrid).
        backend: the form used inside ``ulysses`` / ``heads`` (``"auto"``, ``"reference"``, ``"fast"``).
        timeout: seconds any single wait may take; a dead, hung or mismatched rank raises
            :class:`~attnzoo.distributed.DistributedError` on every surviving rank within about that time.
        check: run the pre-flight all-gather that compares every rank's arguments (one small message);
            a mismatch raises :class:`~attnzoo.distributed.RankMismatchError` on every rank.
        num_heads: ``(Hq, Hk)`` of the whole model (``layout="heads"`` only).
        **options: the mechanism's options (``attnzoo info NAME``).

    Returns:
        (B, Hq, n, Dv) this rank's output shard (zeros at padded positions), and the lse if asked. Gradients flow
        to q, k, v (each rank gets its shard's); a decay tensor (lightning) gets this rank's share.
    """
    check_choice("layout", layout, LAYOUTS)
    mech = registry.get(mechanism)
    if not mech.functional:
        raise TypeError(f"mechanism: {mech.name!r} has its own parameters (kind {mech.kind!r}); wrap the model in "
                        f"attnzoo.distributed.ContextParallel instead")
    B, Hq, Hk, nq, nk, D, Dv = check_qkv(q, k, v)
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    check_bool("check", check)
    check_key_padding_mask(key_padding_mask, B, nk, device=q.device)
    check_scale(scale)
    check_backend(backend)
    if mask is not None and not callable(mask):
        raise TypeError(f"mask: expected a predicate (b, h, q_idx, kv_idx) -> bool (attnzoo.masks), got "
                        f"{type(mask).__name__}")
    if layout not in _MASK_LAYOUTS:
        if mask is not None:
            raise ValueError(f"mask: an extra predicate applies to layouts {list(_MASK_LAYOUTS)}, "
                             f"got layout={layout!r}")
        if return_lse:
            raise ValueError(f"return_lse: the log-sum-exp is returned by layouts {list(_MASK_LAYOUTS)}, got "
                             f"layout={layout!r}")
    opts = mech.resolve_options(options)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    if layout == "hybrid":
        if not isinstance(group, HybridGroups):
            raise TypeError(f"group: layout 'hybrid' needs the HybridGroups of attnzoo.distributed.hybrid_groups(...), "
                            f"got {type(group).__name__}")
        comm = Comm(group.group, timeout=timeout)
        uly = group.ulysses_size
    else:
        if isinstance(group, HybridGroups):
            raise TypeError(f"group: HybridGroups is for layout 'hybrid', got layout={layout!r}")
        comm = Comm(group, timeout=timeout)
        uly = 1
    W = comm.world

    if layout == "heads":
        return _heads(q, k, v, key_padding_mask, mech, opts, comm, causal, scale, backend, num_heads, check)
    if num_heads is not None:
        raise ValueError(f"num_heads: only for layout 'heads', got layout={layout!r}")

    sh_q = _sharding(sharding, seq_len, nq, W, "q", uly)
    if kv_seq_len is None and nk == nq:
        sh_k = sh_q
    else:
        scheme = sharding.scheme if isinstance(sharding, Sharding) else sharding
        sh_k = _sharding(scheme, kv_seq_len, nk, W, "k", uly)
    Nq, Nk = sh_q.seq_len, sh_k.seq_len
    mech.check_pattern(pattern_of(Nq, Nk, causal))
    if layout == "lasp2":
        if mech.name not in LASP2_MECHANISMS:
            raise ValueError(f"mechanism: layout 'lasp2' covers the linear family {list(LASP2_MECHANISMS)}, got "
                             f"{mech.name!r}; use layout='ulysses' for other mechanisms")
        if sh_q is not sh_k or not sh_q.is_contiguous():
            raise ValueError(f"sharding: LASP-2 needs self attention over contiguous shards (each rank one stretch of "
                             f"the sequence), got {sh_q.scheme!r} sharding"
                             + ("" if sh_q is sh_k else " and cross attention"))
    pred = None
    if layout in _MASK_LAYOUTS:
        pred = mask_predicate(mech, Nq, Nk, causal, opts, mask)
        rule = _NO_PADDING_PREDICATE.get(mech.name)
        if rule is not None and key_padding_mask is not None and rule[0](causal):
            raise ValueError(f"key_padding_mask: {rule[1]}; layout {layout!r} cannot honour it. Use layout='ulysses'")

    rank = comm.rank
    plan_key = None
    if layout in ("ring", "halo"):
        plan_key = ("plan", layout, mech.name, describe(opts), causal, Nq, Nk, sh_q, sh_k, B, Hq, rank, W,
                    id(comm.group), id(mask))
    if check:
        meta = {"op": f"attnzoo.distributed.attention(layout={layout!r})", "mechanism": mech.name, "options": opts,
                "causal": causal, "scale": scale, "sharding": (sh_q.scheme, Nq, Nk, sh_q.ulysses),
                "q": (B, Hq, nq, D), "k": (B, Hk, nk, D), "v": (B, Hk, nk, Dv),
                "dtype": (str(q.dtype), str(k.dtype), str(v.dtype)), "device": q.device.type,
                "key_padding_mask": key_padding_mask is not None, "mask": mask, "return_lse": return_lse,
                "backend": backend, "grad": torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))}
        cached = preflight(comm, meta, soft=[int(plan_key is not None and PLANS.get(plan_key) is not None)])
        if plan_key is not None and not bool((cached == 1).all()):
            PLANS.discard(plan_key)  # some rank lacks it: every rank rebuilds (a collective)

    if layout in ("ring", "halo"):
        plan = PLANS.get(plan_key)
        if plan is None:
            plan = build_plan(comm, pred, batch=B, heads=torch.arange(Hq), q_positions=sh_q.all_positions(),
                              k_positions=sh_k.all_positions(), q_limit=Nq, k_limit=Nk)
            if layout == "halo":
                plan.halo = halo_block_plan(plan, pred, batch=B, heads=torch.arange(Hq), qpos=sh_q.positions(rank),
                                            k_positions=sh_k.all_positions(), q_limit=Nq, k_limit=Nk)
            PLANS.put(plan_key, (mask, comm.group), plan)
        if layout == "ring":
            out, lse = ring_attention(q, k, v, key_padding_mask, comm=comm, plan=plan, scale=scale)
        else:
            out, lse = halo_attention(q, k, v, key_padding_mask, comm=comm, plan=plan, halo_block=plan.halo,
                                      scale=scale)
        return (out, lse) if return_lse else out
    if layout == "hybrid":
        out, lse = _hybrid(q, k, v, key_padding_mask, group, comm, sh_q, sh_k, pred, scale, timeout)
        return (out, lse) if return_lse else out
    if layout == "lasp2":
        return lasp2_attention(q, k, v, mechanism=mech.name, comm=comm, positions=sh_q.positions(rank), seq_len=Nq,
                               causal=causal, key_padding_mask=key_padding_mask, scale=scale, options=opts)
    # ulysses
    def run(qn, kn, vn, mn, shard: HeadShard):
        lo = local_options(mech.name, opts, shard, Hq, Hk)
        return local_attention(qn, kn, vn, mechanism=mech.name, causal=causal, key_padding_mask=mn, scale=scale,
                               backend=backend, **lo)

    return ulysses_attention(q, k, v, key_padding_mask, comm=comm, q_positions=sh_q.all_positions(),
                             k_positions=sh_k.all_positions(), nq=Nq, nk=Nk, run=run)


def _heads(q, k, v, kpm, mech, opts, comm, causal, scale, backend, num_heads, check):
    if num_heads is None:
        raise ValueError("num_heads: layout 'heads' needs the model's (Hq, Hk) to know which heads this rank holds")
    if not isinstance(num_heads, (tuple, list)) or len(num_heads) != 2:
        raise TypeError(f"num_heads: expected a pair (Hq, Hk) of ints, got {num_heads!r}")
    hq, hk = check_int("num_heads[0]", num_heads[0]), check_int("num_heads[1]", num_heads[1])
    if hq % hk:
        raise ValueError(f"num_heads: Hq must be a multiple of Hk (grouped-query attention), got {tuple(num_heads)}")
    shard = split_heads(hq, hk, comm.world)[comm.rank]
    if q.shape[1] != shard.q_heads or k.shape[1] != len(shard.kv_local):
        raise ValueError(f"q, k: rank {comm.rank} of {comm.world} holds query heads "
                         f"{shard.q_start}..{shard.q_stop - 1} "
                         f"and key/value heads {list(shard.kv_local)} of (Hq, Hk) = {num_heads}; expected "
                         f"{shard.q_heads} query and {len(shard.kv_local)} key/value heads, got {q.shape[1]} and "
                         f"{k.shape[1]} (attnzoo.distributed.shard_heads splits them)")
    mech.check_pattern(pattern_of(q.shape[2], k.shape[2], causal))
    if check:
        preflight(comm, {"op": "attnzoo.distributed.attention(layout='heads')", "mechanism": mech.name,
                         "options": opts, "causal": causal, "scale": scale, "num_heads": tuple(num_heads),
                         "seq": (q.shape[0], q.shape[2], k.shape[2], q.shape[3], v.shape[3]), "dtype": str(q.dtype),
                         "key_padding_mask": kpm is not None, "backend": backend})
    lo = local_options(mech.name, opts, shard, hq, hk)
    return local_attention(q, k, v, mechanism=mech.name, causal=causal, key_padding_mask=kpm, scale=scale,
                           backend=backend, **lo)


def _hybrid(q, k, v, kpm, groups: HybridGroups, comm: Comm, sh_q: Sharding, sh_k: Sharding, pred, scale, timeout):
    U, R = groups.ulysses_size, groups.ring_size
    cu, cr = Comm(groups.ulysses, timeout=timeout), Comm(groups.ring, timeout=timeout)
    i, u = divmod(comm.rank, U)
    if (cu.rank, cr.rank, cu.world, cr.world) != (u, i, U, R):
        raise ValueError(f"group: rank {comm.rank} should be Ulysses member {u} of {U} and ring member {i} of {R}; "
                         f"the HybridGroups give {cu.rank} of {cu.world} and {cr.rank} of {cr.world}")
    Hq, Hk = q.shape[1], k.shape[1]
    shards = split_heads(Hq, Hk, U)
    mine = shards[u]
    members_q = [[sh_q.positions(j * U + m) for m in range(U)] for j in range(R)]
    members_k = [[sh_k.positions(j * U + m) for m in range(U)] for j in range(R)]
    sq, sk = SeqToHeads(cu, shards, members_q[i]), SeqToHeads(cu, shards, members_k[i])
    qh = sq.heads_in(q, kv=False, kind="hybrid q")  # (B, hq, U n, D)
    kh = sk.heads_in(k, kv=True, kind="hybrid k")
    vh = sk.heads_in(v, kv=True, kind="hybrid v")
    idx = mine.expand_index()
    if idx is not None:
        kh, vh = kh.index_select(1, torch.tensor(idx)), vh.index_select(1, torch.tensor(idx))
    mh = sk.gather_mask(kpm)
    heads = mine.q_index()
    q_positions = [torch.cat(p) for p in members_q]
    k_positions = [torch.cat(p) for p in members_k]
    plan = build_plan(cr, pred, batch=q.shape[0], heads=heads, q_positions=q_positions, k_positions=k_positions,
                      q_limit=sh_q.seq_len, k_limit=sh_k.seq_len)
    out, lse = ring_attention(qh, kh, vh, mh, comm=cr, plan=plan, scale=scale)  # (B, hq, U n, Dv), (B, hq, U n)
    out = sq.heads_out(out, "hybrid out")
    lse = sq.heads_out(lse.unsqueeze(-1), "hybrid lse").squeeze(-1)
    return out, lse
