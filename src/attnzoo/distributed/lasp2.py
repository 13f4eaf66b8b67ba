"""LASP-2: sequence parallelism for the linear-attention family by one all-gather of chunk states.

CATALOG P117 ("LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid", Sun et al., arXiv
2502.07563; official code https://github.com/OpenSparseLLMs/Linear-MoE). Rank t holds the contiguous chunk
``[t n, (t + 1) n)`` of the sequence and computes

    M_t = sum_{j in chunk t} lambda^(end_t - 1 - j) phi(k_j) v_j^T           (its chunk's state, decayed to its end)
    one all-gather of every M_s                                            (O(W F Dv) bytes, independent of N)
    S_t = sum_{s < t} lambda^(n (t - 1 - s)) M_s                            (the state before chunk t: prefix-combine)
    O_t = chunked linear attention of chunk t started from S_t               (intra-chunk + inter-chunk terms)

with ``lambda = 1`` for undecayed forms. Non-causal: every rank uses the total ``sum_s M_s``. The backward is
the same pattern reversed: the gradient of each rank's initial state, ``dS_t``, comes out of the chunked
kernel's backward; one all-gather of the dS_t; ``dM_s = sum_{t > s} lambda^(n (t - 1 - s)) dS_t``; autograd takes
dM_s back to the rank's keys and values (:class:`_PrefixStates`).

Family members (their feature maps, scales, normalisers and kernels are the single-process ones):
``linear`` (phi = elu + 1 or identity, normalised by phi(q) . sum phi(k) + eps), ``lightning`` (per-head decay,
unnormalised), ``based`` (2nd-order Taylor features for the states, the polynomial ``1 + s + s^2/2`` inside
chunks: :func:`~attnzoo.mechanisms.linear.based.chunked_taylor_attention`); TransNormerLLM's attention core is
``lightning`` with its layer's decay and scale 1 (see :class:`attnzoo.distributed.ContextParallel`).

Gradient of Lightning's decay (the chunked kernel treats the decay as a constant): every term of the output
is ``lambda^(P_i - P_j)`` times a factor linear in ``q_i`` and one linear in ``k_j`` (global positions P), so

    dL/d log(lambda_h) = sum_i P_i <dL/dq_i, q_i> - sum_j P_j <dL/dk_j, k_j>

over the query heads of group h and that head's keys -- computed from the gradients the kernel already
returns (:class:`_DecayTap`), with no extra pass and no N x N matrix. A decay given to the call is replicated on
every rank; its gradient on each rank is that rank's share (sum it over the group, as for every parameter
of a sequence-parallel model; :meth:`ContextParallel.all_reduce_gradients` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.chunked import DEFAULT_CHUNK, chunked_linear_attention, decay_weights
from ..mechanisms.linear.based import chunked_taylor_attention, taylor_features
from .comm import Comm

__all__ = ["LASP2_MECHANISMS", "LinearForm", "linear_form", "lasp2_attention"]

LASP2_MECHANISMS = ("linear", "lightning", "based")


@dataclass
class LinearForm:
    """A linear attention as the kernel sees it: q, k already mapped and scaled (``taylor``: raw q, k and the
    scale of the Taylor kernel), an optional (Hk,) decay, the normaliser."""

    q: torch.Tensor
    k: torch.Tensor
    decay: torch.Tensor | None
    normalize: bool
    eps: float
    taylor: bool
    scale: float
    chunk: int

    def query_features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) for the states: the packed Taylor features (the chunked Taylor kernel's state layout), else x."""
        return taylor_features(x, self.scale) if self.taylor else x


def linear_form(mechanism: str, q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool,
                options: dict) -> LinearForm:
    """The linear form of ``mechanism`` (one of :data:`LASP2_MECHANISMS`) for these inputs and options."""
    from ..mechanisms.linear.lightning import resolve_decay
    from ..mechanisms.linear.linear_attention import feature_map

    acc = torch.promote_types(q.dtype, torch.float32)
    qa, ka = q.to(acc), k.to(acc)
    chunk = options.get("chunk", DEFAULT_CHUNK)
    if mechanism == "linear":
        fm = options["feature_map"]
        return LinearForm(feature_map(qa, fm) * scale, feature_map(ka, fm), None, options["normalize"],
                          options["eps"], False, scale, chunk)
    if mechanism == "lightning":
        lam = resolve_decay(options.get("decay"), k.shape[1])
        if not causal and lam is not None:
            raise ValueError(f"decay: a non-causal lightning attention is defined only at decay 1 (the global summary "
                             f"Q (K^T V)); got decay {lam.detach().tolist()}. Pass decay=1.0, or causal=True")
        return LinearForm(qa * scale, ka, lam, False, 0.0, False, scale, chunk)
    if mechanism == "based":
        return LinearForm(qa, ka, None, options["normalize"], options["eps"], True, scale, chunk)
    raise ValueError(f"mechanism: LASP-2 covers {list(LASP2_MECHANISMS)}, got {mechanism!r}")


class _PrefixStates(torch.autograd.Function):
    """M_t (every rank's chunk state) -> S_t = sum_{s<t} lambda^(n (t-1-s)) M_s; one all-gather each way."""

    @staticmethod
    def forward(ctx, M, log_decay, comm: Comm, n: int):
        allM = comm.all_gather(M, what="LASP-2 all-gather of the chunk states", kind="lasp2 states")
        ctx.comm, ctx.n, ctx.log_decay = comm, n, log_decay
        return _combine(allM, range(comm.rank), comm.rank, log_decay, n, prefix=True)

    @staticmethod
    def backward(ctx, dS):
        comm = ctx.comm
        allg = comm.all_gather(dS.contiguous(), what="LASP-2 all-gather of the state gradients",
                               kind="lasp2 state gradients")
        dM = _combine(allg, range(comm.rank + 1, comm.world), comm.rank, ctx.log_decay, ctx.n, prefix=False)
        return dM, None, None, None


def _combine(stack: torch.Tensor, ranks, me: int, log_decay, n: int, *, prefix: bool) -> torch.Tensor:
    """sum over ``ranks`` of lambda^(n * distance) stack[s] (distance t-1-s before me, s-1-t after me)."""
    out = torch.zeros_like(stack[0])
    for s in ranks:
        dist = (me - 1 - s) if prefix else (s - 1 - me)
        if log_decay is None:
            out += stack[s]
        else:
            w = torch.exp(log_decay * (n * dist)).to(out.dtype)  # (Hk,)
            out += stack[s] * w.view(1, -1, 1, 1)
    return out


class _ChunkState(torch.autograd.Function):
    """M = (phi(K) * w)^T V for the chunk (w: each key's decay to the chunk's end, or None). Saves only its
    inputs, which the chunked kernel keeps anyway: the weighted copy of phi(K) is not kept for the backward."""

    @staticmethod
    def forward(ctx, feats, vv, w):
        ctx.save_for_backward(feats, vv, w)
        kw = feats if w is None else feats * w
        return torch.matmul(kw.transpose(-1, -2), vv)  # (B, Hk, F, Dv')

    @staticmethod
    def backward(ctx, dM):
        feats, vv, w = ctx.saved_tensors
        dfeats = torch.matmul(vv, dM.transpose(-1, -2))  # (B, Hk, n, F)
        if w is not None:
            dfeats = dfeats * w
        kw = feats if w is None else feats * w
        return dfeats, torch.matmul(kw, dM), None


class _AllSum(torch.autograd.Function):
    """sum over ranks of M (the non-causal total state), by one all-gather each way."""

    @staticmethod
    def forward(ctx, M, comm: Comm):
        ctx.comm = comm
        return comm.all_gather(M, what="LASP-2 all-gather of the states", kind="lasp2 states").sum(0)

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.all_gather(g.contiguous(), what="LASP-2 all-gather of the state gradients",
                                   kind="lasp2 state gradients").sum(0), None


class _DecayTap(torch.autograd.Function):
    """Identity on (q, k) whose backward also returns the decay's gradient (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, decay, qpos, kpos):
        ctx.save_for_backward(q, k, decay, qpos, kpos)
        return q.clone(), k.clone()

    @staticmethod
    def backward(ctx, dq, dk):
        q, k, decay, qpos, kpos = ctx.saved_tensors
        B, Hq, n, _ = q.shape
        Hk = k.shape[1]
        f64 = torch.float64
        a = (dq.to(f64) * q.to(f64)).sum(-1) * qpos.to(f64)  # (B, Hq, n)
        c = (dk.to(f64) * k.to(f64)).sum(-1) * kpos.to(f64)  # (B, Hk, n)
        dlog = a.view(B, Hk, Hq // Hk, n).sum(dim=(0, 2, 3)) - c.sum(dim=(0, 2))  # (Hk,)
        ddecay = (dlog / decay.detach().to(f64)).to(decay.dtype)
        return dq, dk, ddecay, None, None


def lasp2_attention(q, k, v, *, mechanism: str, comm: Comm, positions: torch.Tensor, seq_len: int, causal: bool,
                    key_padding_mask: torch.Tensor | None, scale: float, options: dict) -> torch.Tensor:
    """LASP-2 on this rank's contiguous chunk: q (B, Hq, n, D), k (B, Hk, n, D), v (B, Hk, n, Dv), ``positions``
    (n,) global positions (contiguous, padding >= seq_len), key_padding_mask (B, n). Returns (B, Hq, n, Dv) in
    q's dtype; padded query rows are zeros."""
    B, Hq, n, _ = q.shape
    Hk = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    form = linear_form(mechanism, q, k, scale=scale, causal=causal, options=options)
    real = (positions < seq_len).to(q.device)  # (n,)
    padded = not bool(real.all())
    kvalid = real.view(1, n).expand(B, n) if key_padding_mask is None else key_padding_mask & real.view(1, n)
    masked = padded or key_padding_mask is not None
    qf, lam = form.q, form.decay
    lam_c = None if lam is None else lam.detach()
    if form.taylor:  # the kernel 1 + s + s^2/2 is 1, not 0, at k = 0: mask the features and pass the mask
        kf = form.k
        feats = form.query_features(kf)  # (B, Hk, n, F)
        if masked:
            feats = feats * kvalid.view(B, 1, n, 1).to(acc)
    else:
        kf = form.k * kvalid.view(B, 1, n, 1).to(acc) if masked else form.k  # masked keys contribute nothing
        if lam is not None and lam.requires_grad:
            pos = positions.to(q.device)
            qf, kf = _DecayTap.apply(qf, kf, lam, pos, pos)
        feats = kf
    vv = v.to(acc)
    if form.normalize:
        vv = torch.cat([vv, vv.new_ones(B, Hk, n, 1)], dim=-1)  # (B, Hk, n, Dv + 1): the normaliser rides along
    if not causal:
        M = torch.matmul(feats.transpose(-1, -2), vv)  # (B, Hk, F, Dv')
        total = _AllSum.apply(M, comm)
        fq = form.query_features(qf)  # (B, Hq, n, F)
        out = torch.matmul(fq.reshape(B, Hk, (Hq // Hk) * n, -1), total).view(B, Hq, n, -1)
    else:
        w = decay_weights(lam_c, n, acc, q.device)  # (Hk, n, 1): lambda^(n - 1 - j), or None
        M = _ChunkState.apply(feats, vv, w)  # (B, Hk, F, Dv'): this chunk's state at its end
        log_decay = None if lam_c is None else torch.log(lam_c.to(device=q.device, dtype=torch.float64))
        S = _PrefixStates.apply(M, log_decay, comm, n)  # the state before this chunk
        if form.taylor:
            out, _ = chunked_taylor_attention(qf, kf, vv, scale=form.scale, chunk=form.chunk, initial_state=S,
                                              key_padding_mask=kvalid if masked else None)
        else:
            out, _ = chunked_linear_attention(qf, kf, vv, decay=lam_c, chunk=form.chunk, initial_state=S)
    if form.normalize:
        out = out[..., :-1] / (out[..., -1:] + form.eps)
    if padded:  # padded query rows: zeros, no gradient
        out = out * real.view(1, 1, n, 1).to(out.dtype)
    return out.to(q.dtype)
