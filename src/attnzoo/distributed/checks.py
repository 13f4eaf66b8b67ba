"""Distributed == single process: checks that run inside a process group and compare every layout's output,
log-sum-exp and gradients with the single-process result of the same mechanism.

CATALOG P025 (its test oracle: the merged sharded output equals single-device attention for any number of
shards, causal shard-level masks included), P117 (LASP-2: concatenated outputs equal single-device linear
attention for any W), P089 (split-KV decode equals single-device decode), P075 (head sharding).

Each check builds the *global* inputs from a fixed seed on every rank, shards them, runs the distributed
call, and compares this rank's shard of the output and of the gradients of q, k, v (an upstream gradient
fixed by the seed; the lse's too where it is returned) with the same shard of the single-process result,
by relative error ``||a - b|| / ||b||``; a replicated decay's gradient is summed over the ranks first. Every
check returns :class:`Result` rows, so one spawned world runs many checks (``attnzoo.distributed.launch``).
Run them on your own cluster with ``run_checks(CASES_FLOAT64)`` inside an initialized group.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

import attnzoo

from .. import masks, registry
from ..functional import attention as single_attention
from ..reference import softmax_attention
from .api import attention, mask_predicate
from .comm import comm_stats, reset_comm_stats
from .heads import shard_heads
from .sharding import Sharding

__all__ = ["Case", "Result", "run_case", "run_checks", "TOLERANCE", "ulysses_cases", "rel_err"]

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass
class Result:
    name: str
    rank: int
    ok: bool
    errors: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def __str__(self) -> str:
        errs = ", ".join(f"{k}={v:.1e}" for k, v in self.errors.items())
        return f"[rank {self.rank}] {'ok ' if self.ok else 'FAIL'} {self.name}: {errs} {self.message}".strip()


@dataclass(frozen=True)
class Case:
    """One distributed call and its single-process twin."""

    layout: str
    mechanism: str
    causal: bool = True
    options: tuple = ()  # ((name, value), ...)
    scheme: str = "contiguous"
    n: int = 23  # global query tokens (not divisible by most world sizes: padding is exercised)
    nk: int | None = None  # global key tokens (cross attention), default n
    batch: int = 2
    hq: int = 4
    hk: int = 2
    d: int = 5
    dv: int = 3
    dtype: torch.dtype = torch.float64
    padding: bool = True  # a key-padding mask
    mask: str | None = None  # an extra predicate: "document" or "prefix"
    lse: bool = False
    decay_grad: bool = False  # lightning: a decay tensor requiring grad
    ulysses: int = 2  # hybrid: Ulysses group size
    seed: int = 0

    @property
    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        bits = [self.layout, self.mechanism, "causal" if self.causal else "noncausal", self.scheme,
                f"n={self.n}" + (f",nk={self.nk}" if self.nk else ""), f"Hq={self.hq},Hk={self.hk}",
                str(self.dtype)[6:]]
        if opts:
            bits.append(opts)
        if self.padding:
            bits.append("kpm")
        if self.mask:
            bits.append(f"mask={self.mask}")
        if self.decay_grad:
            bits.append("decay-grad")
        return " ".join(bits)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = float(b.norm())
    num = float((a - b).norm())
    return num / den if den > 0 else num


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    nk = case.nk or case.n
    dt = case.dtype
    q = torch.randn(case.batch, case.hq, case.n, case.d, generator=g, dtype=torch.float64).to(dt)
    k = torch.randn(case.batch, case.hk, nk, case.d, generator=g, dtype=torch.float64).to(dt)
    v = torch.randn(case.batch, case.hk, nk, case.dv, generator=g, dtype=torch.float64).to(dt)
    kpm = None
    if case.padding:
        kpm = torch.rand(case.batch, nk, generator=g) > 0.25
        kpm[:, -1] = True  # every row keeps keys at the end too
    dout = torch.randn(case.batch, case.hq, case.n, case.dv, generator=g, dtype=torch.float64).to(dt)
    dlse = torch.randn(case.batch, case.hq, case.n, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 3, (case.batch, max(case.n, nk)), generator=g).sort(dim=1).values
    return q, k, v, kpm, dout, dlse, ids


def _extra_mask(case: Case, ids: torch.Tensor):
    if case.mask is None:
        return None
    if case.mask == "document":
        nk = case.nk or case.n
        return masks.document(ids[:, : case.n], ids[:, :nk])
    if case.mask == "prefix":
        return masks.prefix_lm(5, offset=(case.nk or case.n) - case.n)
    raise ValueError(f"mask: unknown check mask {case.mask!r}")


def _reference(case: Case, q, k, v, kpm, mask, opts, decay):
    """Single-process output (and lse) with autograd."""
    mech = registry.get(case.mechanism)
    if case.lse or mask is not None:
        pred = mask_predicate(mech, q.shape[2], k.shape[2], case.causal, opts, mask)
        dense = None if pred is None else masks.materialize(pred, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return softmax_attention(q, k, v, key_padding_mask=kpm, attn_mask=dense, return_lse=True)
    o = dict(opts)
    if decay is not None:
        o["decay"] = decay
    return single_attention(q, k, v, mechanism=case.mechanism, causal=case.causal, key_padding_mask=kpm, **o), None


def run_case(case: Case, *, group=None, hybrid=None) -> Result:
    """Run one case on this rank (a collective: every rank of the group runs it)."""
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    tol = TOLERANCE[case.dtype]
    q, k, v, kpm, dout, dlse, ids = _inputs(case)
    opts = dict(case.options)
    mask = _extra_mask(case, ids)
    decay = None
    if case.decay_grad:
        decay = torch.tensor([0.9, 0.75, 0.6, 0.97][: case.hk], dtype=torch.float64, requires_grad=True)
    # single process
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = _reference(case, qr, kr, vr, kpm, mask, opts, decay)
    loss = (ref.double() * dout.double()).sum()
    if case.lse:
        loss = loss + (_finite(ref_lse).double() * dlse).sum()
    ref_grads = torch.autograd.grad(loss, [qr, kr, vr] + ([decay] if decay is not None else []))
    # distributed
    ul = case.ulysses if case.layout == "hybrid" else 1
    shq = Sharding(case.n, W, case.scheme, ul)
    shk = shq if case.nk is None else Sharding(case.nk, W, case.scheme, ul)
    qs, ks, vs = shq.shard(q, rank), shk.shard(k, rank), shk.shard(v, rank)
    qs, ks, vs = (t.requires_grad_() for t in (qs, ks, vs))
    ms = None if kpm is None else shk.shard(kpm, rank, dim=1)
    o = dict(opts)
    dec = None
    if decay is not None:
        dec = decay.detach().clone().requires_grad_()
        o["decay"] = dec
    grp = hybrid if case.layout == "hybrid" else group
    out = attention(qs, ks, vs, mechanism=case.mechanism, group=grp, layout=case.layout, sharding=shq.scheme,
                    seq_len=case.n, kv_seq_len=case.nk, causal=case.causal, key_padding_mask=ms, mask=mask,
                    return_lse=case.lse, **o)
    lse = None
    if case.lse:
        out, lse = out
    dls = shq.shard(dout, rank)
    dloss = (out.double() * dls.double()).sum()
    if case.lse:
        dloss = dloss + (_finite(lse).double() * shq.shard(dlse, rank, dim=2)).sum()
    grads = torch.autograd.grad(dloss, [qs, ks, vs] + ([dec] if dec is not None else []))
    errors = {"out": rel_err(out, shq.shard(ref.detach(), rank))}
    if case.lse:
        real = shq.valid(rank)
        want = shq.shard(_finite(ref_lse.detach()), rank, dim=2)[:, :, real]
        errors["lse"] = rel_err(_finite(lse)[:, :, real], want)
        inf_ok = bool((torch.isinf(lse[:, :, real]) == torch.isinf(shq.shard(ref_lse.detach(), rank, dim=2)[:, :, real])
                       ).all())
        if not inf_ok:
            errors["lse_inf_pattern"] = 1.0
    for name, gd, gr, sh in (("dq", grads[0], ref_grads[0], shq), ("dk", grads[1], ref_grads[1], shk),
                             ("dv", grads[2], ref_grads[2], shk)):
        errors[name] = rel_err(gd, sh.shard(gr, rank))
    if dec is not None:
        total = grads[3].detach().clone()
        dist.all_reduce(total, group=group)
        errors["ddecay"] = rel_err(total, ref_grads[3])
    ok = all(e <= tol for e in errors.values())
    return Result(case.name, rank, ok, errors, "" if ok else f"(tolerance {tol:g})")


def ulysses_cases(dtype: torch.dtype = torch.float64, world: int = 2) -> list[Case]:
    """One Ulysses case per functional mechanism (its causal pattern if it has one), with its test options and
    sizes; mechanisms whose heads are coupled (``HEAD_COUPLED``) are left out (their refusal is checked)."""
    from .heads import HEAD_COUPLED

    out = []
    for m in attnzoo.list_mechanisms():
        if not m.functional or m.name in HEAD_COUPLED:
            continue
        causal = "causal_self" in m.patterns
        if not causal and "noncausal_self" not in m.patterns:
            continue
        from ..testing import Sizes

        sz = Sizes.of(m)
        n = m.test_sizes.get("n", 23)  # the conformance length if the record pins one, else one that pads
        out.append(Case("ulysses", m.name, causal, tuple(sorted(m.test_options.items())), "zigzag", n=n,
                        d=sz.head_dim, dv=sz.value_dim, hq=sz.heads, hk=sz.kv_heads, batch=sz.batch, dtype=dtype,
                        padding=m.supports_key_padding))
    return out


def run_checks(cases: list[Case], *, group=None, hybrid=None) -> list[Result]:
    """Every case on this rank; a case that raises is a failed :class:`Result` (the group stays in step as
    long as every rank raises the same way: the checks' errors are argument errors raised before any message)."""
    out = []
    for case in cases:
        try:
            out.append(run_case(case, group=group, hybrid=hybrid))
        except Exception as err:  # noqa: BLE001 - reported as a failed check
            rank = dist.get_rank(group)
            out.append(Result(case.name, rank, False, {}, f"raised {type(err).__name__}: {err}\n"
                                                           f"{traceback.format_exc()[-1500:]}"))
    return out


# --------------------------------------------------------------------------------------------------------
# Decoding, head sharding, the module wrapper
# --------------------------------------------------------------------------------------------------------
def check_split_kv(mechanism: str, options: dict, *, dtype=torch.float64, prefill: int = 7, steps: int = 6,
                   group=None, block: int = 1, padding: bool = True, from_ring: bool = False) -> Result:
    """SplitKVCache / SplitRecurrentState decoding == the mechanism's own single-process step, token by token."""
    from .decode import SPLIT_KV_MECHANISMS, SplitKVCache, SplitRecurrentState

    rank, W = dist.get_rank(group), dist.get_world_size(group)
    tol = TOLERANCE[dtype]
    mech = registry.get(mechanism)
    opts = mech.resolve_options(options)
    B, Hq, Hk, D, Dv = 2, 4, 2, 4, 3
    T = prefill + steps
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hk, T, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hk, T, Dv, generator=g, dtype=torch.float64).to(dtype)
    kpm = (torch.rand(B, T, generator=g) > 0.2) if padding else None
    if kpm is not None:
        kpm[:, 0] = True
    scale = 1.0 / math.sqrt(D)
    single = mech.init_state(batch=B, kv_heads=Hk, head_dim=D, value_dim=Dv, dtype=dtype, device=None, **opts)
    cls = SplitKVCache if mechanism in SPLIT_KV_MECHANISMS else SplitRecurrentState
    kw = {"block": block} if cls is SplitKVCache else {}
    split = cls(group, batch=B, kv_heads=Hk, head_dim=D, value_dim=Dv, mechanism=mechanism, dtype=dtype, **kw,
                **options)
    chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]
    errors: dict[str, float] = {}
    for a, b in chunks:
        m = None if kpm is None else kpm[:, a:b]
        want = mech.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], single, scale=scale, key_padding_mask=m, **opts)
        if from_ring and a == 0 and cls is SplitKVCache:
            sh = Sharding(prefill, W, "contiguous")
            split.prefill_shard(sh.shard(k[:, :, :b], rank), sh.shard(v[:, :, :b], rank), sh.positions(rank), prefill,
                                None if m is None else sh.shard(m, rank, dim=1))
            continue
        got = split.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=scale, key_padding_mask=m)
        errors[f"tokens {a}..{b - 1}"] = rel_err(got, want)
    err = max(errors.values())
    name = f"split decode {mechanism} {options} {str(dtype)[6:]} block={block}" + (" from-ring" if from_ring else "")
    local = split.local_tokens() if cls is SplitKVCache else split.rows
    return Result(name, rank, err <= tol, {"max": err}, f"(local: {local})")


def check_heads(mechanism: str, options: dict, *, causal: bool = True, hq: int = 4, hk: int = 2, n: int = 17,
                d: int = 4, dtype=torch.float64, group=None) -> Result:
    """Head sharding (layout 'heads'): each rank's heads of the full computation, per-head options rewritten."""
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, hq, n, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(2, hk, n, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(2, hk, n, 3, generator=g, dtype=torch.float64).to(dtype)
    ref = single_attention(q, k, v, mechanism=mechanism, causal=causal, **options)
    ql, kl, vl, shard = shard_heads(q, k, v, rank, W)
    out = attention(ql, kl, vl, mechanism=mechanism, group=group, layout="heads", causal=causal,
                    num_heads=(hq, hk), **options)
    err = rel_err(out, ref[:, shard.q_start : shard.q_stop])
    return Result(f"heads {mechanism} {options} Hq={hq},Hk={hk}", rank, err <= TOLERANCE[dtype], {"out": err})


def check_heads_decode(mechanism: str, options: dict, *, hq: int = 4, hk: int = 4, steps: int = 15, d: int = 4,
                       dtype=torch.float64, group=None) -> Result:
    """Head-sharded decoding (P075, P025): each rank decodes its heads with the mechanism's own decode state and
    step, options rewritten for the subset; equals those heads of the single-process decode, token by token. The
    state each rank keeps is reported (S2-Attention: only its heads' strided and local blocks)."""
    from .heads import local_options

    rank, W = dist.get_rank(group), dist.get_world_size(group)
    mech = registry.get(mechanism)
    opts = mech.resolve_options(options)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, hq, steps, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(2, hk, steps, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(2, hk, steps, 3, generator=g, dtype=torch.float64).to(dtype)
    ql, kl, vl, shard = shard_heads(q, k, v, rank, W)
    lo = local_options(mechanism, opts, shard, hq, hk)
    full = mech.init_state(batch=2, kv_heads=hk, head_dim=d, value_dim=3, dtype=dtype, device=None, **opts)
    mine = mech.init_state(batch=2, kv_heads=kl.shape[1], head_dim=d, value_dim=3, dtype=dtype, device=None, **lo)
    scale = 1.0 / math.sqrt(d)
    err = 0.0
    for t in range(steps):
        want = mech.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], full, scale=scale, **opts)
        got = mech.step(ql[:, :, t : t + 1], kl[:, :, t : t + 1], vl[:, :, t : t + 1], mine, scale=scale, **lo)
        err = max(err, rel_err(got, want[:, shard.q_start : shard.q_stop]))
    return Result(f"head-sharded decode {mechanism} {options} Hq={hq},Hk={hk}", rank, err <= TOLERANCE[dtype],
                  {"max": err}, f"(state bytes: this rank {mine.nbytes()}, one process {full.nbytes()})")


def tiny_model(dim: int = 16, heads: int = 4, kv_heads: int = 2, vocab: int = 11, seed: int = 0,
               mechanisms=(("softmax", {}), ("sliding_window", {"window": 5}), ("lightning", {"decay": [0.9, 0.8]})),
               transnormer: bool = True, dtype=torch.float64, max_len: int = 512):
    """A tiny causal LM: embedding, one attnzoo layer per ``mechanisms`` entry (+ a TransNormer layer), each
    with an MLP and residuals, and a head. Token-wise except its attention layers (shardable by sequence)."""
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = attn
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x, key_padding_mask=None):
            x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
            return x + self.mlp(self.norm2(x))

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.pos = nn.Embedding(max_len, dim)
            layers = [attnzoo.build(name, dim, heads, kv_heads=kv_heads, causal=True, **opts) for name, opts in
                      mechanisms]
            if transnormer:
                layers.append(attnzoo.build("transnormer", dim, heads, causal=True, chunk=4))
            self.blocks = nn.ModuleList(Block(a) for a in layers)
            self.head = nn.Linear(dim, vocab)

        def forward(self, tokens, positions=None, key_padding_mask=None):
            pos = torch.arange(tokens.shape[1]) if positions is None else positions
            x = self.emb(tokens) + self.pos(pos)
            for blk in self.blocks:
                x = blk(x, key_padding_mask=key_padding_mask)
            return self.head(x)

    return TinyLM().to(dtype)


def check_context_parallel(*, n: int = 21, dtype=torch.float64, group=None, layout: str = "auto",
                           sharding: str = "contiguous", padding: bool = True, **model_kw) -> Result:
    """ContextParallel(model) == model: per-token outputs and every parameter's gradient (after the all-reduce)."""
    from .module import ContextParallel

    rank = dist.get_rank(group)
    model = tiny_model(dtype=dtype, **model_kw)
    twin = tiny_model(dtype=dtype, **model_kw)
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 11, (2, n), generator=g)
    labels = torch.randint(0, 11, (2, n), generator=g)
    kpm = (torch.rand(2, n, generator=g) > 0.2) if padding else None
    if kpm is not None:
        kpm[:, 0] = True
    ref = twin(tokens, key_padding_mask=kpm)  # (B, N, vocab)
    ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, ref.shape[-1]), labels.reshape(-1), reduction="sum")
    ref_loss.backward()
    cp = ContextParallel(model, group, layout=layout, sharding=sharding, position_kwarg="positions")
    out = cp(tokens, key_padding_mask=kpm)  # (B, n, vocab)
    lab = cp.shard_target(labels)
    valid = cp.valid(n)
    loss = torch.nn.functional.cross_entropy(out[:, valid].reshape(-1, out.shape[-1]), lab[:, valid].reshape(-1),
                                             reduction="sum")
    loss.backward()
    cp.all_reduce_gradients()
    errors = {"out": rel_err(out[:, valid], cp.shard_target(ref.detach())[:, valid])}
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    errors["loss"] = rel_err(total, ref_loss.detach())
    gerr = 0.0
    for p, p2 in zip(model.parameters(), twin.parameters()):
        gerr = max(gerr, rel_err(p.grad, p2.grad))
    errors["param grads (max)"] = gerr
    cp.unwrap()
    ok = all(e <= TOLERANCE[dtype] for e in errors.values())
    return Result(f"ContextParallel tiny LM layout={layout} {sharding} n={n} {str(dtype)[6:]}", rank, ok, errors)


def expect_error(fn, exc_type, contains: str, name: str, group=None) -> Result:
    """A call that must raise ``exc_type`` with ``contains`` in its message (on this rank)."""
    rank = dist.get_rank(group)
    try:
        fn()
    except exc_type as err:
        ok = contains in str(err)
        return Result(name, rank, ok, {}, "" if ok else f"message lacks {contains!r}: {err}")
    except Exception as err:  # noqa: BLE001
        return Result(name, rank, False, {}, f"raised {type(err).__name__} instead of {exc_type.__name__}: {err}")
    return Result(name, rank, False, {}, "did not raise")


def bytes_of(fn) -> dict[str, Any]:
    """Run ``fn`` and return the bytes this rank sent meanwhile (data bytes by kind, control bytes)."""
    reset_comm_stats()
    fn()
    return comm_stats().snapshot()


def with_(case: Case, **kw) -> Case:
    return replace(case, **kw)


# --------------------------------------------------------------------------------------------------------
# Bytes against the analytic minimum
# --------------------------------------------------------------------------------------------------------
def analytic_bytes(layout: str, mechanism: str, *, rank: int, world: int, n: int, batch: int, hk: int, d: int,
                   dv: int, elsize: int, causal: bool = True, scheme: str = "contiguous", window: int | None = None,
                   features: int | None = None, normalize: bool = False) -> dict[str, int]:
    """What rank ``rank`` must send per forward + backward step, from the math alone (not from the plan code):

    - ring / halo, causal sliding window ``w`` over contiguous shards (N divisible by W, w - 1 <= N / W): rank r's
      last ``w - 1`` keys (K and V) are needed by rank r + 1 -- forward; the ring sends them again in the backward
      (it keeps no remote block between the passes), and every rank returns the gradients (dK, dV) of the ``w - 1``
      keys it received.
    - ring, causal softmax over zig-zag shards (N divisible by 2W, chunk c = N / 2W): rank r needs rank o's early
      chunk only if o < r (its own early chunk sees it; its late chunk sees it too but not o's late chunk), both
      of o's chunks if o > r; so rank o sends ``c (W - 1 - o) + 2 c o`` keys, and returns the gradients of the
      ``c r + 2 c (W - 1 - r)`` keys it received.
    - lasp2 causal: one all-gather of the (B, Hk, F, Dv') chunk state each way: ``(W - 1) |M|`` each.
    """
    key = batch * hk * (d + dv) * elsize  # K and V of one token position
    r, W = rank, world
    if layout in ("ring", "halo") and mechanism == "sliding_window" and causal and scheme == "contiguous":
        kv = (window - 1) * key * (r < W - 1)
        grads = (window - 1) * key * (r >= 1)
        return {"forward": kv, "backward": (kv if layout == "ring" else 0) + grads}
    if layout == "ring" and mechanism == "softmax" and causal and scheme == "zigzag":
        c = n // (2 * W)
        sent = c * (W - 1 - r) + 2 * c * r
        received = c * r + 2 * c * (W - 1 - r)
        return {"forward": sent * key, "backward": sent * key + received * key}
    if layout == "lasp2" and causal:
        state = batch * hk * features * (dv + (1 if normalize else 0)) * max(elsize, 4)
        return {"forward": (W - 1) * state, "backward": (W - 1) * state}
    raise ValueError(f"analytic_bytes: no formula for layout={layout!r}, mechanism={mechanism!r}, causal={causal}, "
                     f"scheme={scheme!r}")


def check_bytes(layout: str, mechanism: str, options: dict, *, scheme: str = "contiguous", n: int = 64,
                batch: int = 1, hq: int = 4, hk: int = 2, d: int = 8, dv: int = 8, dtype=torch.float32,
                group=None, limit: float = 1.1) -> Result:
    """Data bytes this rank sent for one forward + backward, against :func:`analytic_bytes` (within ``limit``x)."""
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(11)
    sh = Sharding(n, W, scheme)
    q, k, v = (sh.shard(torch.randn(batch, h, n, e, generator=g, dtype=dtype), rank).requires_grad_()
               for h, e in ((hq, d), (hk, d), (hk, dv)))
    kw = dict(mechanism=mechanism, group=group, layout=layout, sharding=scheme, causal=True, **options)
    attention(q, k, v, **kw)  # warm-up: builds and caches the plan (control bytes)
    reset_comm_stats()
    out = attention(q, k, v, **kw)
    fwd = comm_stats().data_bytes
    out.sum().backward()
    snap = comm_stats().snapshot()
    bwd = snap["data_bytes"] - fwd
    want = analytic_bytes(layout, mechanism, rank=rank, world=W, n=n, batch=batch, hk=hk, d=d, dv=dv,
                          elsize=torch.empty((), dtype=dtype).element_size(), scheme=scheme,
                          window=options.get("window"), features=d, normalize=False)
    errors = {}
    ok = True
    for part, got in (("forward", fwd), ("backward", bwd)):
        w = want[part]
        ratio = got / w if w else (0.0 if got == 0 else float("inf"))
        errors[f"{part} sent/min"] = ratio
        ok = ok and (got == w == 0 or 1.0 <= ratio <= limit)
    name = f"bytes {layout} {mechanism} {options} {scheme} n={n}"
    return Result(name, rank, ok, errors, f"(sent {fwd} + {bwd} bytes, minimum {want['forward']} + "
                                          f"{want['backward']}; control {snap['control_bytes']})")


def check_mask_dropping(*, group=None, n: int = 22, window: int = 4, dtype=torch.float64) -> Result:
    """A sliding-window model sharded over the group equals its single-process run and differs from the same
    weights under full causal attention -- the window is applied across shard boundaries, not dropped."""
    from .module import ContextParallel

    rank = dist.get_rank(group)
    sw = tiny_model(mechanisms=(("sliding_window", {"window": window}),), transnormer=False, dtype=dtype)
    full = tiny_model(mechanisms=(("softmax", {}),), transnormer=False, dtype=dtype)
    full.load_state_dict(sw.state_dict())
    tokens = torch.randint(0, 11, (2, n), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_sw = sw(tokens)
        ref_full = full(tokens)
        out = ContextParallel(sw, group, layout="ring", sharding="zigzag", position_kwarg="positions")(tokens)
    sh = Sharding(n, dist.get_world_size(group), "zigzag")
    valid = sh.valid(rank)
    same = rel_err(out[:, valid], sh.shard(ref_sw, rank, dim=1)[:, valid])
    vs_full = rel_err(out[:, valid], sh.shard(ref_full, rank, dim=1)[:, valid])
    # some rank's window crosses a shard boundary; all ranks must agree with their own window run
    differs = torch.tensor([vs_full], dtype=torch.float64)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=group)
    ok = same <= TOLERANCE[dtype] and float(differs) > 1e-3
    return Result(f"mask dropping: sliding window (w={window}) sharded model vs single process and vs full causal",
                  rank, ok, {"vs single-process window": same, "max over ranks vs full causal": float(differs)})


# --------------------------------------------------------------------------------------------------------
# Suites: one spawned world runs many checks (tests/distributed)
# --------------------------------------------------------------------------------------------------------
SW = (("window", 4),)
SINKS = (("sinks", 2), ("window", 3))
NA = (("dilation", 2), ("kernel_size", 3))


def mask_cases(dtype=torch.float64, schemes=("contiguous", "zigzag")) -> list[Case]:
    """Ring and halo over the mask-defined mechanisms, with padding (N = 23), GQA and a key-padding mask."""
    out = []
    for scheme in schemes:
        out += [
            Case("ring", "softmax", True, scheme=scheme, dtype=dtype, lse=True),
            Case("ring", "softmax", False, scheme=scheme, dtype=dtype),
            Case("ring", "sliding_window", True, SW, scheme, dtype=dtype, lse=True),
            Case("ring", "sliding_window", False, SW, scheme, dtype=dtype),
            Case("ring", "sink_window", True, SINKS, scheme, dtype=dtype),
            Case("ring", "neighborhood_1d", True, NA, scheme, dtype=dtype),
            Case("ring", "neighborhood_1d", False, NA, scheme, dtype=dtype, padding=False),
            Case("ring", "softmax", True, scheme=scheme, dtype=dtype, mask="document", lse=True),
            Case("halo", "sliding_window", True, SW, scheme, dtype=dtype, lse=True),
            Case("halo", "sliding_window", False, SW, scheme, dtype=dtype),
            Case("halo", "neighborhood_1d", False, NA, scheme, dtype=dtype, padding=False),
            Case("halo", "sink_window", True, SINKS, scheme, dtype=dtype),
        ]
    out += [
        Case("ring", "softmax", True, scheme="zigzag", dtype=dtype, mask="prefix"),
        Case("ring", "softmax", False, scheme="zigzag", dtype=dtype, n=13, nk=23, lse=True),  # cross attention
        Case("ring", "softmax", True, scheme="contiguous", dtype=dtype, n=13, nk=23),  # causal cross (bottom-right)
        Case("ring", "softmax", True, scheme="zigzag", dtype=dtype, hq=4, hk=1),  # multi-query
        Case("ulysses", "softmax", False, scheme="contiguous", dtype=dtype, n=13, nk=23),
    ]
    return out


def lasp2_cases(dtype=torch.float64) -> list[Case]:
    return [
        Case("lasp2", "linear", True, (("chunk", 3),), dtype=dtype),
        Case("lasp2", "linear", False, (("chunk", 3),), dtype=dtype),
        Case("lasp2", "lightning", True, (("chunk", 3),), dtype=dtype, decay_grad=True),
        Case("lasp2", "lightning", True, (("chunk", 4),), dtype=dtype),  # the ALiBi-slope default decay
        Case("lasp2", "lightning", False, (("chunk", 3), ("decay", 1.0)), dtype=dtype),
        Case("lasp2", "based", True, (("chunk", 3),), dtype=dtype, d=4),
        Case("lasp2", "based", False, (("chunk", 3),), dtype=dtype, d=4),
    ]


def _refusals(group=None) -> list[Result]:
    W = dist.get_world_size(group)
    x = torch.randn(1, 4, 6, 4, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    out = [
        expect_error(lambda: attention(x, k, k, mechanism="hyperattention", group=group, layout="ulysses",
                                       seq_len=6 * W), ValueError, "cannot be sharded by heads",
                     "ulysses refuses head-coupled hyperattention", group),
        expect_error(lambda: attention(x, k, k, mechanism="dma", group=group, layout="ring", seq_len=6 * W),
                     ValueError, "not defined by one", "ring refuses a mechanism without a mask predicate", group),
        expect_error(lambda: attention(x, k, k, mechanism="lightning", group=group, layout="lasp2",
                                       sharding="zigzag", causal=True), ValueError, "contiguous",
                     "lasp2 refuses zig-zag shards", group),
        expect_error(lambda: attention(x[:, :1], k[:, :1], k[:, :1], mechanism="softmax", group=group,
                                       layout="ulysses") if W > 1 else (_ for _ in ()).throw(ValueError("heads")),
                     ValueError, "heads", "ulysses refuses fewer query heads than ranks", group),
        expect_error(lambda: attention(x, k, k, mechanism="softmax", group=group, layout="ring", seq_len=5 * W + 3),
                     ValueError, "local tokens", "a wrong local length names the expected one", group),
        expect_error(lambda: attention(x, k, k, mechanism="neighborhood_1d", group=group, layout="halo",
                                       kernel_size=3, key_padding_mask=torch.ones(1, 6, dtype=torch.bool)),
                     ValueError, "variable-length", "non-causal neighborhood + padding refused on halo", group),
    ]
    return out


def suite_float64(rank: int, world: int) -> list[Result]:
    """Every layout x mechanism at float64 (1e-10), lengths that pad, GQA, key padding; refusals; decoding."""
    res = run_checks(mask_cases(torch.float64) + lasp2_cases(torch.float64) + ulysses_cases(torch.float64, world)
                     + [Case("ulysses", "lightning", True, (("chunk", 3),)),  # per-head (ALiBi) decays sliced
                        Case("ulysses", "s2_attention", True, (("block_size", 2), ("local_blocks", 1),
                                                                ("vert_stride", 2)), n=17, hq=4, hk=4)])
    if world % 2 == 0:
        hg = hybrid_groups_cached(2)
        res += run_checks([Case("hybrid", "softmax", True, scheme="zigzag", lse=True),
                           Case("hybrid", "sliding_window", True, SW, "contiguous")], hybrid=hg)
    res.append(check_heads("s2_attention", {"block_size": 2, "local_blocks": 1, "vert_stride": 2}))
    res.append(check_heads("s2_attention", {"block_size": 2, "local_blocks": 1, "vert_stride": 4,
                                            "num_dense_heads": 1}, hq=4, hk=4))
    res.append(check_heads("moa", {"alphas": (2, 3, 5, 4), "betas": (0.0, 0.25, 0.0, 0.5), "sinks": 1, "length": 8}))
    res.append(check_heads("lightning", {}))
    res.append(check_heads_decode("s2_attention", {"block_size": 2, "local_blocks": 1, "vert_stride": 2}))
    res.append(check_heads_decode("s2_attention", {"block_size": 2, "local_blocks": 2, "vert_stride": 4,
                                                   "num_dense_heads": 1}))
    res.append(check_heads_decode("lightning", {}))
    for mech, opts in (("softmax", {}), ("sliding_window", {"window": 3}), ("sink_window", {"window": 3, "sinks": 2}),
                       ("neighborhood_1d", {"kernel_size": 3, "dilation": 2}), ("linear", {}), ("lightning", {}),
                       ("based", {})):
        res.append(check_split_kv(mech, opts))
    res.append(check_split_kv("softmax", {}, from_ring=True))
    res.append(check_split_kv("sliding_window", {"window": 3}, from_ring=True, block=2))
    res.append(check_context_parallel())
    res.append(check_context_parallel(layout="ulysses", sharding="zigzag", transnormer=False))
    res += _refusals()
    return res


_HYBRID: dict[int, Any] = {}


def hybrid_groups_cached(ulysses: int):
    """One HybridGroups per Ulysses size per process (creating groups is a collective)."""
    from .ulysses import hybrid_groups

    if ulysses not in _HYBRID:
        _HYBRID[ulysses] = hybrid_groups(ulysses)
    return _HYBRID[ulysses]


def suite_float32(rank: int, world: int) -> list[Result]:
    """float32 (1e-5) on a bigger world: ring/halo/hybrid/ulysses/lasp2 with uneven heads, bytes against the
    analytic minimum, the mask-dropping check, split-KV decoding."""
    f32 = torch.float32
    cases = [
        Case("ring", "softmax", True, scheme="zigzag", dtype=f32, n=45, lse=True),
        Case("ring", "sliding_window", True, SW, "contiguous", dtype=f32, n=45),
        Case("halo", "sliding_window", False, SW, "contiguous", dtype=f32, n=45, lse=True),
        Case("ring", "neighborhood_1d", True, NA, "zigzag", dtype=f32, n=45),
        Case("ring", "softmax", True, scheme="zigzag", dtype=f32, n=45, mask="document"),
        Case("ulysses", "softmax", True, scheme="zigzag", dtype=f32, n=45, hq=6, hk=2),  # 6 heads over 4 ranks
        Case("ulysses", "lightning", True, (("chunk", 4),), "contiguous", dtype=f32, n=45, hq=6, hk=3),
        Case("ulysses", "sliding_window", True, SW, "contiguous", dtype=f32, n=45, hq=4, hk=1),
        Case("lasp2", "lightning", True, (("chunk", 4),), dtype=f32, n=45, decay_grad=True),
        Case("lasp2", "linear", True, (("chunk", 4),), dtype=f32, n=45),
        Case("lasp2", "based", True, (("chunk", 4),), dtype=f32, n=45, d=4),
    ]
    res = run_checks(cases)
    if world % 2 == 0:
        res += run_checks([Case("hybrid", "softmax", True, scheme="zigzag", dtype=f32, n=45, lse=True),
                           Case("hybrid", "sink_window", True, SINKS, "contiguous", dtype=f32, n=45)],
                          hybrid=hybrid_groups_cached(2))
    res.append(check_bytes("ring", "sliding_window", {"window": 5}, n=16 * world))
    res.append(check_bytes("halo", "sliding_window", {"window": 5}, n=16 * world))
    res.append(check_bytes("ring", "softmax", {}, scheme="zigzag", n=16 * world))
    res.append(check_bytes("lasp2", "lightning", {"chunk": 4}, n=16 * world))
    res.append(check_mask_dropping())
    res.append(check_split_kv("softmax", {}, dtype=f32))
    res.append(check_split_kv("lightning", {}, dtype=f32))
    res.append(check_context_parallel(dtype=f32, n=37))
    return res


def suite_mismatch(rank: int, world: int) -> list[Result]:
    """Ranks that disagree (shapes, dtypes, mechanisms, options, grad mode) get a RankMismatchError on every rank,
    naming the field; the group stays usable afterwards."""
    from .comm import RankMismatchError

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 8, 4, generator=g)
    k = torch.randn(1, 2, 8, 4, generator=g)
    last = rank == world - 1
    res = [
        expect_error(lambda: attention(q[:, :, : 7 if last else 8], k[:, :, : 7 if last else 8],
                                       k[:, :, : 7 if last else 8], layout="ulysses", seq_len=None),
                     RankMismatchError, "q:", "mismatched local shapes"),
        expect_error(lambda: attention(q.double() if last else q, k.double() if last else k,
                                       k.double() if last else k, layout="ring"),
                     RankMismatchError, "dtype", "mismatched dtypes"),
        expect_error(lambda: attention(q, k, k, mechanism="sliding_window" if last else "softmax", layout="ring",
                                       **({"window": 3} if last else {})),
                     RankMismatchError, "mechanism", "mismatched mechanisms"),
        expect_error(lambda: attention(q, k, k, mechanism="sliding_window", layout="halo", window=3 if last else 4),
                     RankMismatchError, "options", "mismatched options"),
        expect_error(lambda: attention(q, k, k, layout="ring" if last else "halo"),
                     RankMismatchError, "op", "mismatched layouts"),
    ]
    # still usable: a matching call goes through
    out = attention(q, k, k, layout="ring", causal=True)
    res.append(Result("the group works after the mismatches", rank, out.shape == (1, 4, 8, 4)))
    return res


def scenario_failure(rank: int, world: int, mode: str, timeout: float) -> str:
    """Rank world - 1 dies (``mode="die"``: exits without a word) or hangs (``"hang"``: sleeps) before an
    attention call; every other rank must raise :class:`DistributedError` within about ``timeout`` seconds (the
    error propagates to :func:`attnzoo.distributed.launch.run`, which records it)."""
    import os
    import time

    q = torch.randn(1, 4, 8, 4)
    k = torch.randn(1, 2, 8, 4)
    attention(q, k, k, layout="ring", causal=True, timeout=timeout)  # everyone alive: works
    if rank == world - 1:
        if mode == "die":
            os._exit(3)
        time.sleep(20 * timeout)
        os._exit(4)
    attention(q, k, k, layout="ring", causal=True, timeout=timeout)
    return "no error"
