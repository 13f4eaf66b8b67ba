"""Titans' neural long-term memory (Sec. 3 of "Titans: Learning to Memorize at Test Time", Behrouz, Zhong &
Mirrokni, arXiv 2501.00663; CATALOG P022): the memory MLP, its analytic gradient, the token-by-token
reference of the update rule and its chunked (mini-batch, eq. 16) fast form, and the memory's state.

The architectures built on it (MAC, MAG, MAL, LMM; Sec. 4) and their registry records are in ``titans.py``;
its header documents the choices made where the paper is silent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ...errors import check_int
from ...state.base import DecodeState

# --------------------------------------------------------------------------------------------------------
# The memory MLP and its analytic gradient
# --------------------------------------------------------------------------------------------------------


def _act(z):
    return F.silu(z)


def _act_prime(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def memory_forward(weights, x):
    """M(x) for an MLP given as weights [W_1 (.., h_1, d), ..., W_L (.., d_out, h_{L-1})]; x (.., T, d).

    Returns (out (.., T, d_out), pre-activations [z_1..z_L], layer inputs [a_0 = x, .., a_{L-1}])."""
    zs, inputs = [], []
    a = x
    for i, W in enumerate(weights):
        inputs.append(a)
        z = torch.matmul(a, W.transpose(-1, -2))  # (.., T, out)
        zs.append(z)
        a = _act(z) if i < len(weights) - 1 else z
    return a, zs, inputs


def memory_grad_factors(weights, k, v):
    """Analytic gradient of l = ||M(k) - v||^2 per token, as rank-one factors.

    grad_{W_l} l(token t) = delta_l[t] (outer) a_{l-1}[t]; returns (deltas, inputs), lists over layers of
    (.., T, out_l) and (.., T, in_l)."""
    out, zs, inputs = memory_forward(weights, k)
    delta = 2 * (out - v)  # dl/d out
    deltas = [None] * len(weights)
    for i in reversed(range(len(weights))):
        deltas[i] = delta  # dl/dz_i
        if i > 0:
            delta = torch.matmul(delta, weights[i]) * _act_prime(zs[i - 1])
    return deltas, inputs


def memory_loss_grad(weights, k, v):
    """Explicit gradient matrices [grad W_1, ..] of l = ||M(k) - v||^2 for one token k (.., d), v (.., d_out)."""
    deltas, inputs = memory_grad_factors(weights, k.unsqueeze(-2), v.unsqueeze(-2))
    return [d.transpose(-1, -2) @ a for d, a in zip(deltas, inputs)]  # (.., out, in)


# --------------------------------------------------------------------------------------------------------
# Reference: the recurrence token by token
# --------------------------------------------------------------------------------------------------------
def _gates(alpha, eta, theta, active):
    """Inactive (padded) tokens: alpha = 0, eta = 1, theta = 0 and no momentum added (g = 0)."""
    if active is None:
        return alpha, eta, theta, torch.ones_like(alpha)
    a = active.unsqueeze(1).to(alpha.dtype)  # (B, 1, T)
    return alpha * a, eta * a + (1 - a), theta * a, a.expand_as(alpha)


def memory_reference(mem: NeuralMemoryState, q, k, v, alpha, eta, theta, *, active=None, q_after=None):
    """Run the memory over T tokens, one at a time, in the paper's order.

    q, k: (B, H, T, d) (q None: no reads); v: (B, H, T, d_out); alpha, eta, theta: (B, H, T); active: (B, T)
    bool or None;
    q_after: (B, H, T, d) queries read AFTER each token's update (MAC's output gate), or None.
    For each token t: read M_{t-1}(q_t); u_t = grad l(M_{t'}; k_t, v_t) at the chunk-start weights M_{t'};
    S_t = eta_t S_{t-1} - theta_t u_t; M_t = (1 - alpha_t) M_{t-1} + S_t; read M_t(q_after_t); when t ends a
    chunk, M_{t'} <- M_t. ``mem`` is updated in place; returns (reads (B, H, T, d_out), reads_after or None).
    """
    alpha, eta, theta, g = _gates(alpha, eta, theta, active)
    W, S, A = list(mem.weights), list(mem.momentum), list(mem.anchor)
    reads, after = [], []
    for t in range(k.shape[2]):
        if q is not None:
            reads.append(memory_forward(W, q[:, :, t : t + 1])[0])  # (B, H, 1, d_out): read BEFORE the update
        u = memory_loss_grad(A, k[:, :, t], v[:, :, t])  # gradient at the chunk-start weights
        at, et, tt, gt = (x[:, :, t, None, None] for x in (alpha, eta, theta, g))
        S = [et * s - tt * ui for s, ui in zip(S, u)]
        W = [(1 - at) * w + gt * s for w, s in zip(W, S)]
        if q_after is not None:
            after.append(memory_forward(W, q_after[:, :, t : t + 1])[0])  # read AFTER the update
        mem.pos += 1
        if mem.pos % mem.chunk_size == 0:
            A = list(W)
    mem.weights, mem.momentum, mem.anchor = W, S, A
    return (torch.cat(reads, 2) if q is not None else None), (torch.cat(after, 2) if q_after is not None else None)


# --------------------------------------------------------------------------------------------------------
# Fast: chunked mini-batch gradient descent as matmuls, momentum and decay as a scan
# --------------------------------------------------------------------------------------------------------
def _segsum(x):
    """x (.., T) -> (.., T, T) with [i, m] = sum_{r=m+1..i} x_r for i >= m, -inf above the diagonal
    (cumulative sums of a masked matrix, no differences of cumsums: exact with -inf entries)."""
    T = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, T)  # [.., r, m] = x_r
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    s = torch.cumsum(xx.masked_fill(~strict, 0.0), dim=-2)  # [.., i, m] = sum_{m < r <= i} x_r
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return s.masked_fill(~lower, float("-inf"))


def _chunk(W, S, A, q, k, v, la, le, th, g, q_after):
    """One piece of T tokens inside a single chunk (gradients at the chunk-start weights A).

    la = log(1 - alpha), le = log(eta), th = theta, g = active, all (B, H, T). Returns reads before each
    token, reads after (or None), and the weights/momentum after the piece."""
    deltas, inputs = memory_grad_factors(A, k, v)  # rank-one factors of u_j, (B, H, T, out/in)
    Dm = torch.exp(_segsum(la))  # D[i, m] = prod_{m<r<=i} (1 - alpha_r)
    Hm = torch.exp(_segsum(le))  # H[m, j] = prod_{j<r<=m} eta_r
    E = torch.exp(torch.cumsum(le, -1))  # E_m = prod_{r<=m} eta_r: coefficient of S_0 in S_m
    Ahat = torch.exp(torch.cumsum(la, -1))  # coefficient of W_0 in M_i
    C = torch.matmul(Dm, g.unsqueeze(-1) * Hm) * th.unsqueeze(-2)  # (B, H, T, T): -C[i, j] u_j enters M_i
    Fv = torch.matmul(Dm, (g * E).unsqueeze(-1)).squeeze(-1)  # (B, H, T): coefficient of S_0 in M_i

    def read(x, a_c, f_c, c):
        for i, (Wl, Sl) in enumerate(zip(W, S)):
            z = a_c.unsqueeze(-1) * torch.matmul(x, Wl.transpose(-1, -2))  # (B, H, T, out)
            z = z + f_c.unsqueeze(-1) * torch.matmul(x, Sl.transpose(-1, -2))
            z = z - torch.matmul(c * torch.matmul(x, inputs[i].transpose(-1, -2)), deltas[i])  # rank-one terms
            x = _act(z) if i < len(W) - 1 else z
        return x

    one = torch.ones_like(Ahat[..., :1])
    a_prev = torch.cat([one, Ahat[..., :-1]], -1)  # state before token i is M_{i-1} (M_{-1} = W)
    f_prev = torch.cat([torch.zeros_like(one), Fv[..., :-1]], -1)
    c_prev = torch.cat([torch.zeros_like(C[..., :1, :]), C[..., :-1, :]], -2)
    reads = read(q, a_prev, f_prev, c_prev) if q is not None else None
    after = read(q_after, Ahat, Fv, C) if q_after is not None else None
    cl = C[..., -1, :].unsqueeze(-1)  # (B, H, T, 1)
    hl = (Hm[..., -1, :] * th).unsqueeze(-1)
    W_new = [Ahat[..., -1, None, None] * Wl + Fv[..., -1, None, None] * Sl
             - torch.matmul((d * cl).transpose(-1, -2), a) for Wl, Sl, d, a in zip(W, S, deltas, inputs)]
    S_new = [E[..., -1, None, None] * Sl - torch.matmul((d * hl).transpose(-1, -2), a)
             for Sl, d, a in zip(S, deltas, inputs)]
    return reads, after, W_new, S_new


def _pieces(pos: int, T: int, chunk: int) -> list[tuple[int, int]]:
    """Split T tokens starting at stream position ``pos`` at the chunk boundaries."""
    out, t0 = [], 0
    while t0 < T:
        t1 = min(T, t0 + chunk - (pos + t0) % chunk)
        out.append((t0, t1))
        t0 = t1
    return out


def _run_pieces(pieces, pos0, chunk, nW, *tensors):
    """Run consecutive pieces; ``tensors`` = W.., S.., A.., q, k, v, la, le, th, g, q_after (None allowed)."""
    W, S, A = list(tensors[:nW]), list(tensors[nW : 2 * nW]), list(tensors[2 * nW : 3 * nW])
    q, k, v, la, le, th, g, q_after = tensors[3 * nW :]
    reads, after = [], []
    base = pieces[0][0]
    for t0, t1 in pieces:
        sl = slice(t0 - base, t1 - base)
        piece = lambda x, sl=sl: None if x is None else x[:, :, sl]
        r, ra, W, S = _chunk(W, S, A, piece(q), k[:, :, sl], v[:, :, sl], la[..., sl], le[..., sl], th[..., sl],
                             g[..., sl], piece(q_after))
        reads.append(r)
        after.append(ra)
        if (pos0 + t1) % chunk == 0:
            A = list(W)
    cat = lambda xs: None if xs[0] is None else torch.cat(xs, 2)
    return (cat(reads), cat(after), *W, *S, *A)


def memory_fast(mem: NeuralMemoryState, q, k, v, alpha, eta, theta, *, active=None, q_after=None,
                checkpoint_chunks: int | None = None):
    """The same computation as :func:`memory_reference`, chunk by chunk (Sec. 3.2): per chunk the
    gradients at the chunk-start weights are rank-one factors, the decay/momentum products form (T x T)
    matrices, and reads of ``M_{t-1}`` inside the chunk are matmuls. Cost per chunk O(T^2 (d + h) + T d h).

    When autograd records, groups of ``checkpoint_chunks`` chunks (default about sqrt(#chunks)) are
    recomputed in the backward, so training keeps the memory state at group boundaries only: O(sqrt(N / b))
    copies of the weights instead of O(N / b)."""
    alpha, eta, theta, g = _gates(alpha, eta, theta, active)
    la, le = torch.log1p(-alpha), torch.log(eta)
    nW = len(mem.weights)
    T, chunk, pos0 = k.shape[2], mem.chunk_size, mem.pos
    pieces = _pieces(pos0, T, chunk)
    args = [q, k, v, la, le, theta, g, q_after]
    grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in [*args, *mem.weights, *mem.momentum, *mem.anchor])
    per = checkpoint_chunks or max(1, int(math.isqrt(len(pieces))))
    if not grad or len(pieces) <= per:
        res = _run_pieces(pieces, pos0, chunk, nW, *mem.weights, *mem.momentum, *mem.anchor, *args)
        outs = [res]
    else:
        outs, state = [], [*mem.weights, *mem.momentum, *mem.anchor]
        for i in range(0, len(pieces), per):
            grp = pieces[i : i + per]
            lo, hi = grp[0][0], grp[-1][1]
            sl = lambda x, lo=lo, hi=hi: None if x is None else x[..., lo:hi, :] if x.dim() == 4 else x[..., lo:hi]
            res = torch.utils.checkpoint.checkpoint(_run_pieces, grp, pos0, chunk, nW, *state, *map(sl, args),
                                                    use_reentrant=False)
            outs.append(res)
            state = list(res[2:])
    last = outs[-1]
    mem.weights, mem.momentum = list(last[2 : 2 + nW]), list(last[2 + nW : 2 + 2 * nW])
    mem.anchor = list(last[2 + 2 * nW :])
    mem.pos = pos0 + T
    cat = lambda i: None if outs[0][i] is None else torch.cat([o[i] for o in outs], 2)
    return cat(0), cat(1)


def memory_forms(backend: str):
    return memory_reference if backend == "reference" else memory_fast


class NeuralMemoryState(DecodeState):
    """Titans' neural memory: MLP weights M_t, momentum S_t and the chunk-start weights M_{t'}.

    ``weights``, ``momentum``, ``anchor``: lists over the MLP's layers of (B, H, out, in). ``pos`` counts
    the tokens the memory has consumed (its stream position; chunk boundaries are multiples of
    ``chunk_size``). Inside a chunk the gradients are taken at ``anchor`` (mini-batch gradient descent,
    arXiv 2501.00663 eq. 16), so decoding keeps it next to the running weights. Memory O(1) in the
    sequence length: 3 x the memory's parameters per sequence.
    """

    _tensor_fields = ("weights", "momentum", "anchor")

    def __init__(self, weights: list[torch.Tensor], *, chunk_size: int) -> None:
        super().__init__()
        self.chunk_size = check_int("chunk_size", chunk_size)
        if not weights or any(not isinstance(w, torch.Tensor) or w.dim() != 4 for w in weights):
            raise ValueError("weights: expected a non-empty list of (B, H, out, in) tensors")
        self.batch = weights[0].shape[0]
        self.weights = list(weights)
        self.momentum = [torch.zeros_like(w) for w in weights]
        self.anchor = list(weights)

    @property
    def pos(self) -> int:
        """Tokens consumed (the memory's stream position); the same as ``seq_len``."""
        return self.seq_len

    @pos.setter
    def pos(self, value: int) -> None:
        self.seq_len = value

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        for name in self._tensor_fields:
            setattr(self, name, [t.index_select(0, index.to(t.device)) for t in getattr(self, name)])
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        if length != self.seq_len:
            raise ValueError(f"length: a neural memory cannot forget tokens it has learned from (holds {self.seq_len}, "
                             f"asked {length}); build the TitansState with history >= {self.seq_len - length}")


