"""Linear attention (the family's base): attention as a kernel feature map, computable as an RNN.

Paper: "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", Katharopoulos,
Vyas, Pappas, Fleuret, arXiv 2006.16236. Official code: https://github.com/idiap/fast-transformers
Replaces exp(q.k) by a kernel phi(q).phi(k) (phi = elu + 1 in the paper), so that
``o_i = phi(q_i) S_i / (phi(q_i) . z_i)`` with ``S_i = sum_{j<=i} phi(k_j) v_j^T``, ``z_i = sum_{j<=i} phi(k_j)``:
O(N) time and a constant-size decode state (S, z). Every mechanism of this family reduces to it.

Choices where the paper is silent (each an option or a documented convention):
- ``scale`` (attnzoo's score scale, default 1/sqrt(D)) multiplies every score: s_ij = scale phi(q_i).phi(k_j).
  With ``normalize=True`` it cancels in the ratio except against ``eps``; with ``normalize=False`` it
  scales the output (pass ``scale=1.0`` for the paper's unscaled sum).
- ``eps`` is added to the denominator as in fast-transformers (1e-6): o = num / (den + eps). A row that
  sees no key (all masked) has num = den = 0 and returns 0.
- ``feature_map="identity"`` (phi(x) = x) is offered for the unnormalised linear attention that
  Lightning/TransNormer reduce to at decay 1 (use it with ``normalize=False``: phi(q).phi(k) can be
  negative, so its denominator can vanish).
- A masked key (``key_padding_mask`` False) contributes nothing: its feature vector is zeroed.
- GQA: the G = Hq / Hk query heads of a group share one (S, z) state.

This file also holds the plumbing the other linear mechanisms reuse: the readable quadratic-masked form
(:func:`quadratic_linear_attention`), the explicit token loop (:func:`recurrent_linear_attention`), the
chunked/global fast form (:func:`fast_linear_attention`, on :mod:`attnzoo.kernels.chunked`) and the
decode step on a :class:`~attnzoo.state.RecurrentState` (:func:`linear_state_step`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...errors import check_init_state, check_int, check_step
from ...kernels.chunked import DEFAULT_CHUNK, chunked_linear_attention, decay_weights, global_linear_attention
from ...reference import acc_dtype, repeat_kv
from ...registry import PATTERNS, Mechanism, Option, register
from ...state import RecurrentState

FEATURE_MAPS = ("elu+1", "identity")


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi(x): ``elu(x) + 1`` (positive, the paper's) or the identity."""
    if name == "elu+1":
        return F.elu(x).add_(1)  # in place: elu's backward reads its input, not its output
    if name == "identity":
        return x
    raise ValueError(f"feature_map: expected one of {list(FEATURE_MAPS)}, got {name!r}")


def mask_keys(kf: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the features of masked keys: kf (B, Hk, Nk, F), mask (B, Nk) True = attend."""
    if key_padding_mask is None:
        return kf
    return kf * key_padding_mask.view(kf.shape[0], 1, kf.shape[2], 1).to(kf.dtype)  # (B, Hk, Nk, F)


def decay_matrix(decay: torch.Tensor | None, hq: int, nq: int, nk: int, causal: bool, dtype, device):
    """(1, Hq or 1, Nq, Nk) weights D_ij = lambda^(p_i - j) for keys j <= p_i = i + Nk - Nq (bottom-right),
    0 for later keys; all ones (non-causal, no decay) or the causal 0/1 mask without decay."""
    p = (torch.arange(nq, device=device) + (nk - nq)).view(nq, 1)
    j = torch.arange(nk, device=device).view(1, nk)
    seen = (j <= p) if causal else torch.ones(nq, nk, dtype=torch.bool, device=device)
    if decay is None:
        return seen.to(dtype).view(1, 1, nq, nk)
    lam = decay.to(device=device, dtype=torch.float64)
    lam = lam.repeat_interleave(hq // lam.numel()).view(hq, 1, 1)  # (Hq, 1, 1): each query head its group's
    dist = (p - j).clamp(min=0).to(torch.float64)  # (Nq, Nk)
    w = torch.where(seen, torch.exp(dist * torch.log(lam)), torch.zeros((), dtype=torch.float64, device=device))
    return w.to(dtype).view(1, hq, nq, nk)


def quadratic_linear_attention(qf, kf, v, *, causal: bool, decay: torch.Tensor | None = None,
                               normalize: bool, eps: float, key_padding_mask=None,
                               scores: torch.Tensor | None = None) -> torch.Tensor:
    """The readable parallel form: ``O = [(phi(Q) phi(K)^T) (.) D] V`` (divided by its row sums + eps
    when ``normalize``), D the causal decay mask. O(Nq Nk) memory.

    qf (B, Hq, Nq, F), kf (B, Hk, Nk, F) mapped (and scaled) features, v (B, Hk, Nk, Dv); decay (Hk,) or
    None. ``scores`` (B, Hq, Nq, Nk) replaces phi(Q) phi(K)^T when the kernel is given directly (BASED's
    Taylor polynomial). Returns (B, Hq, Nq, Dv) in the accumulation dtype.
    """
    B, Hq, Nq, _ = qf.shape
    Hk, Nk = v.shape[1], v.shape[2]
    acc = acc_dtype(v.dtype)
    vv = repeat_kv(v, Hq // Hk).to(acc)  # (B, Hq, Nk, Dv)
    if scores is None:
        kk = repeat_kv(kf, Hq // Hk).to(acc)  # (B, Hq, Nk, F)
        scores = torch.matmul(qf.to(acc), kk.transpose(-1, -2))  # (B, Hq, Nq, Nk)
    scores = scores.to(acc) * decay_matrix(decay, Hq, Nq, Nk, causal, acc, qf.device)  # (B, Hq, Nq, Nk)
    if key_padding_mask is not None:
        scores = scores * key_padding_mask.view(B, 1, 1, Nk).to(acc)
    out = torch.matmul(scores, vv)  # (B, Hq, Nq, Dv)
    if normalize:
        out = out / (scores.sum(dim=-1, keepdim=True) + eps)  # (B, Hq, Nq, Dv)
    return out


def recurrent_linear_attention(qf, kf, v, *, decay: torch.Tensor | None = None, normalize: bool, eps: float,
                               key_padding_mask=None, kv=None, z=None):
    """The RNN form, one token at a time (causal self attention, Nq == Nk): an explicit loop for tests.

    ``S <- lambda S + phi(k_t) v_t^T``, ``z <- lambda z + phi(k_t)``, ``o_t = phi(q_t) S / (phi(q_t) . z + eps)``.
    Returns (out (B, Hq, N, Dv), kv (B, Hk, F, Dv), z (B, Hk, F)).
    """
    B, Hq, N, Fd = qf.shape
    Hk, Dv = v.shape[1], v.shape[3]
    G = Hq // Hk
    acc = acc_dtype(v.dtype)
    kf = mask_keys(kf, key_padding_mask).to(acc)
    kv = torch.zeros(B, Hk, Fd, Dv, dtype=acc, device=v.device) if kv is None else kv
    z = torch.zeros(B, Hk, Fd, dtype=acc, device=v.device) if z is None else z
    lam = None if decay is None else decay.to(device=v.device, dtype=acc).view(1, Hk, 1)
    outs = []
    for t in range(N):
        k_t, v_t = kf[:, :, t], v[:, :, t].to(acc)  # (B, Hk, F), (B, Hk, Dv)
        if lam is not None:
            kv, z = kv * lam.unsqueeze(-1), z * lam
        kv = kv + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # (B, Hk, F, Dv)
        z = z + k_t  # (B, Hk, F)
        q_t = qf[:, :, t].to(acc).view(B, Hk, G, Fd)  # (B, Hk, G, F)
        o = torch.matmul(q_t, kv)  # (B, Hk, G, Dv)
        if normalize:
            o = o / (torch.matmul(q_t, z.unsqueeze(-1)) + eps)
        outs.append(o.reshape(B, Hq, Dv))
    return torch.stack(outs, dim=2), kv, z


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Dv) -> (B, H, N, Dv + 1): the normaliser rides along as a last value column of ones."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


class _Normalize(torch.autograd.Function):
    """(..., Dv + 1) -> (..., Dv): num / (den + eps) with den the last column; one allocation each way
    (autograd through slicing and division makes several full-size passes)."""

    @staticmethod
    def forward(ctx, o, eps):
        den = o[..., -1:] + eps  # (..., 1)
        out = o[..., :-1] / den  # (..., Dv)
        ctx.save_for_backward(out, den)
        return out

    @staticmethod
    def backward(ctx, g):
        out, den = ctx.saved_tensors
        r = den.reciprocal()
        d = torch.empty(*g.shape[:-1], g.shape[-1] + 1, dtype=g.dtype, device=g.device)
        torch.mul(g, r, out=d[..., :-1])  # d/dnum
        d[..., -1:] = -(g * out).sum(-1, keepdim=True) * r  # d/dden
        return d, None


def _split_norm(out: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    if not normalize:
        return out
    return _Normalize.apply(out, eps)


def fast_linear_attention(qf, kf, v, *, causal: bool, decay: torch.Tensor | None = None, normalize: bool,
                          eps: float, key_padding_mask=None, chunk: int = DEFAULT_CHUNK, q_map=None,
                          k_map=None, causal_kernel=None) -> torch.Tensor:
    """Chunked causal form (bottom-right aligned) or the global key-value summary (non-causal); never an
    Nq x Nk matrix. Same arguments and result as :func:`quadratic_linear_attention` (accumulation dtype).

    With ``q_map``/``k_map``, ``qf``/``kf`` are the raw q, k and the causal kernel applies the maps piece by
    piece (wide features such as BASED's are then never stored for the backward). ``causal_kernel``
    replaces :func:`~attnzoo.kernels.chunked.chunked_linear_attention` for the causal part (same keyword
    arguments except the maps and the decay), e.g. BASED's Taylor kernel.

    Causal with Nk > Nq: the first Nk - Nq keys, seen by every query, are summed into the initial state
    ``S_0 = sum_j lambda^(Nk - Nq - 1 - j) phi(k_j) v_j^T``. Causal with Nk < Nq: the first Nq - Nk queries
    see no key and return zeros.
    """
    B, Hq, Nq, _ = qf.shape
    Nk = v.shape[2]
    acc = acc_dtype(v.dtype)
    vv = _with_ones(v.to(acc)) if normalize else v  # (B, Hk, Nk, Dv [+ 1])
    if not causal:
        if decay is not None:
            raise ValueError("decay: a non-causal linear attention has no order to decay along; expected decay 1")
        if q_map is not None:
            qf, kf = q_map(qf.to(acc)), k_map(kf.to(acc))
        kf = mask_keys(kf, key_padding_mask)
        return _split_norm(global_linear_attention(qf, kf, vv), normalize, eps)
    off = Nk - Nq
    if off < 0:  # the first -off queries see no key at all
        out = fast_linear_attention(qf[:, :, -off:], kf, v, causal=True, decay=decay, normalize=normalize,
                                    eps=eps, key_padding_mask=key_padding_mask, chunk=chunk, q_map=q_map,
                                    k_map=k_map, causal_kernel=causal_kernel)
        return torch.cat([out.new_zeros(B, Hq, -off, out.shape[-1]), out], dim=2)
    s0 = None
    if off > 0:
        kp = kf[:, :, :off].to(acc)  # (B, Hk, off, F)
        if k_map is not None:
            kp = k_map(kp)
        kp = mask_keys(kp, None if key_padding_mask is None else key_padding_mask[:, :off])
        w = decay_weights(decay, off, acc, kf.device)  # (Hk, off, 1) or None
        if w is not None:
            kp = kp * w
        s0 = torch.matmul(kp.transpose(-1, -2), vv[:, :, :off].to(acc))  # (B, Hk, F, Dv [+ 1])
    mask = None if key_padding_mask is None else key_padding_mask[:, off:]
    if causal_kernel is not None:
        out, _ = causal_kernel(qf, kf[:, :, off:], vv[:, :, off:], chunk=chunk, initial_state=s0,
                               key_padding_mask=mask)
    else:
        out, _ = chunked_linear_attention(qf, kf[:, :, off:], vv[:, :, off:], decay=decay, chunk=chunk,
                                          initial_state=s0, q_map=q_map, k_map=k_map, key_padding_mask=mask)
    return _split_norm(out, normalize, eps)


# --------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------
def init_linear_state(batch: int, kv_heads: int, features: int | Callable[[int], int], value_dim: int, *,
                      normalize: bool, dtype: torch.dtype, device, head_dim: int | None = None) -> RecurrentState:
    """Empty state: ``kv`` (B, Hk, F, Dv) and, when normalising, ``z`` (B, Hk, F), in float32 or wider; built for
    calls with ``batch``, ``kv_heads``, ``head_dim`` (``features`` may be a function of it), ``value_dim`` and
    ``dtype`` (validated first)."""
    spec = check_init_state(batch=batch, kv_heads=kv_heads, head_dim=head_dim, value_dim=value_dim, dtype=dtype,
                            device=device)
    features = check_int("features", features(head_dim) if callable(features) else features)
    acc = acc_dtype(dtype)
    device = spec["device"]
    tensors = {"kv": torch.zeros(batch, kv_heads, features, value_dim, dtype=acc, device=device)}
    if normalize:
        tensors["z"] = torch.zeros(batch, kv_heads, features, dtype=acc, device=device)
    return RecurrentState(**tensors).built_for(**spec)


def linear_state_step(qf, kf, v, state: RecurrentState, *, decay: torch.Tensor | None = None, normalize: bool,
                      eps: float, key_padding_mask=None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Consume T new tokens: qf (B, Hq, T, F), kf (B, Hk, T, F), v (B, Hk, T, Dv); mask (B, T).

    One token: ``S <- lambda S + phi(k) v^T`` and ``o = phi(q) S`` directly; several (prefill): the chunked
    kernel started from the state. Updates ``state`` (replacing its tensors) and returns (B, Hq, T, Dv) in
    the accumulation dtype.
    """
    B, Hq, T, Fd = qf.shape
    Hk, Dv = v.shape[1], v.shape[3]
    kv = state["kv"]
    if kv.shape != (B, Hk, Fd, Dv):
        raise ValueError(f"state: holds kv of shape {tuple(kv.shape)}, expected (B, Hk, F, Dv) = {(B, Hk, Fd, Dv)} "
                         "for these inputs")
    acc = kv.dtype
    kf = mask_keys(kf, key_padding_mask)
    vv = _with_ones(v.to(acc)) if normalize else v.to(acc)  # (B, Hk, T, Dv [+ 1])
    s = torch.cat([kv, state["z"].unsqueeze(-1)], dim=-1) if normalize else kv  # (B, Hk, F, Dv [+ 1])
    if T == 1:
        if decay is not None:
            s = s * decay.to(device=s.device, dtype=acc).view(1, Hk, 1, 1)
        s = s + kf[:, :, 0].to(acc).unsqueeze(-1) * vv[:, :, 0].unsqueeze(-2)  # (B, Hk, F, Dv [+ 1])
        out = torch.matmul(qf[:, :, 0].to(acc).view(B, Hk, Hq // Hk, Fd), s)  # (B, Hk, G, Dv [+ 1])
        out = out.view(B, Hq, 1, -1)
    else:
        out, s = chunked_linear_attention(qf, kf, vv, decay=decay, chunk=chunk, initial_state=s)
    if normalize:
        state.update(kv=s[..., :-1], z=s[..., -1])
    else:
        state.update(kv=s)
    state.advance(T)
    return _split_norm(out, normalize, eps)


# --------------------------------------------------------------------------------------------------------
# The `linear` mechanism
# --------------------------------------------------------------------------------------------------------
def _features(q, k, scale, feature_map_name):
    qf = feature_map(q, feature_map_name)  # (B, Hq, Nq, D)
    if scale != 1.0:
        qf = qf * scale  # the score scale rides on the queries
    kf = feature_map(k, feature_map_name)  # (B, Hk, Nk, D)
    return qf, kf


def linear_reference(q, k, v, *, causal, key_padding_mask, scale, feature_map, normalize, eps, chunk):
    """``[(scale phi(Q) phi(K)^T) (.) M] V / (row sums + eps)``, M the (bottom-right) causal mask."""
    acc = acc_dtype(q.dtype)
    qf, kf = _features(q.to(acc), k.to(acc), scale, feature_map)
    out = quadratic_linear_attention(qf, kf, v, causal=causal, normalize=normalize, eps=eps,
                                     key_padding_mask=key_padding_mask)
    return out.to(q.dtype)


def linear_fast(q, k, v, *, causal, key_padding_mask, scale, feature_map, normalize, eps, chunk):
    """Chunked causal form / global summary (:func:`fast_linear_attention`). Normalised, the scale moves
    onto eps (s num / (s den + eps) = num / (den + eps / s)), saving a pass over the queries."""
    if normalize:
        qf, kf = _features(q, k, 1.0, feature_map)
        eps = eps / scale
    else:
        qf, kf = _features(q, k, scale, feature_map)
    out = fast_linear_attention(qf, kf, v, causal=causal, normalize=normalize, eps=eps,
                                key_padding_mask=key_padding_mask, chunk=chunk)
    return out.to(q.dtype)


def linear_init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, feature_map, normalize, eps, chunk):
    return init_linear_state(batch, kv_heads, head_dim, value_dim, normalize=normalize, dtype=dtype, device=device,
                             head_dim=head_dim)


def linear_step(q, k, v, state, *, scale, key_padding_mask=None, feature_map, normalize, eps, chunk):
    """Decode T new tokens on the (kv, z) state; constant time and memory per token."""
    check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=RecurrentState)
    qf, kf = _features(q, k, scale, feature_map)
    out = linear_state_step(qf, kf, v, state, normalize=normalize, eps=eps, key_padding_mask=key_padding_mask,
                            chunk=chunk)
    return out.to(q.dtype)


CHUNK_OPTION = Option("chunk", DEFAULT_CHUNK, int, low=1,
                      doc="tokens per chunk of the fast form (any sequence length; does not change the result)")

LINEAR = register(Mechanism(
    name="linear",
    aliases=("linear_attention", "katharopoulos", "transformers_are_rnns"),
    family="linear",
    catalog="",
    title="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    arxiv="2006.16236",
    code="https://github.com/idiap/fast-transformers",
    summary="Kernelised attention phi(q).phi(k) (elu+1), normalised by phi(q).sum phi(k); an RNN when causal.",
    patterns=PATTERNS,
    exact=False,
    state="recurrent",
    complexity="time O(N C D + N D Dv) chunked, memory O(N (C + D)); decode state O(D Dv) per head",
    reference=linear_reference,
    fast=linear_fast,
    step=linear_step,
    init_state=linear_init_state,
    options=(
        Option("feature_map", "elu+1", str, choices=FEATURE_MAPS, doc="phi: elu(x) + 1 (paper) or identity"),
        Option("normalize", True, bool, doc="divide by phi(q) . sum phi(k) (paper); False = unnormalised"),
        Option("eps", 1e-6, float, low=0.0, doc="added to the denominator (fast-transformers' 1e-6)"),
        CHUNK_OPTION,
    ),
    permutation_equivariant=True,
    test_options={"chunk": 3},
    notes="scores are scale * phi(q).phi(k) (scale cancels when normalised, up to eps); causal_cross is bottom-right "
          "aligned (earlier keys form the initial state); identity + normalize=False is Lightning at decay 1.",
))
