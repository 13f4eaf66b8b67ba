"""Titans: a neural long-term memory trained at test time, combined with attention (MAC, MAG, MAL).

Paper: "Titans: Learning to Memorize at Test Time", Behrouz, Zhong & Mirrokni, arXiv 2501.00663.
Official code: none released (unofficial: lucidrains/titans-pytorch). This file follows the paper.
The memory is an MLP ``M`` whose weights are updated token by token with the gradient of
``l(M; x_t) = ||M(k_t) - v_t||^2`` (the "surprise"), with momentum and weight decay (eqs. 13-14):
``S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; x_t)`` and ``M_t = (1 - alpha_t) M_{t-1} + S_t``, and
read by a forward pass without update, ``y_t = M*(q_t)``. Training tensorises this over chunks of
``chunk_size`` tokens (Sec. 3.2, eq. 16): inside a chunk every gradient is taken at the chunk-start
weights ``M_{t'}`` (mini-batch gradient descent), so the chunk's updates are rank-one terms combined by
matmuls, and the momentum/decay recurrences become a scan. ``chunk_size = 1`` is the pure sequential rule.

Order (where the paper is explicit, eq. 21 and Sec. 3.1, and what the unofficial code got wrong for a
while): a token first READS the memory as it was before the token, then the memory is UPDATED with the
token. Reads at token t use ``M_{t-1}`` of the mini-batch recurrence (eq. 16 defines ``M_t`` for every
t, so reads inside a chunk see the earlier tokens of the chunk). MAC's output gate reads the memory after
the token's update (eq. 25, ``M*_t(y_t)``).

Variants (Sec. 4): ``mac`` memory as context: per segment of ``segment`` tokens, h = M*_{seg start}(q),
attention over [persistent; h; segment], its output y updates the memory, out = y (x) M*_t(y);
``mag`` memory as gate: sliding-window attention over [persistent; x] (persistent tokens as sinks)
gated with the memory branch; ``mal`` memory as layer: the memory's reads of [persistent; x] feed a
sliding-window attention; ``lmm``: the memory alone (the paper's "Titans (LMM)").

Choices where the paper is silent (each an option or documented here):
- Memory per head (``heads`` memories of width dim/heads); MLP with ``memory_depth`` layers (1 = matrix),
  hidden width ``memory_expansion * head_dim``, SiLU, no biases; initial weights are learned parameters.
- Sec. 4.4: q, k, v = SiLU(linear(x)), q and k l2-normalised per head. The depthwise convolutions of
  Sec. 4.4 are not implemented (the paper reports they do not significantly affect performance).
- Gates per token and head: alpha = sigmoid(.), eta = sigmoid(.), theta = max_lr * sigmoid(.), each a
  linear function of the memory's input token.
- The gate (x) is ``rmsnorm(y) * w_y * sigmoid(rmsnorm(m) * w_m)`` ("normalise with learnable
  vector-valued weights, followed by a non-linearity").
- MAC: h_j (retrieved for segment token j) is visible to segment tokens i >= j only; the paper's
  Figure 3a draws the memory tokens as a full prefix, which would leak the segment's later queries.
  Persistent tokens are visible to all. The memory is updated with y at the segment's own positions.
- MAG/MAL: the persistent tokens pass through the memory too (x~ = [p || x] is its input, eqs. 26, 29).
- Key padding: a padded token neither updates the memory (alpha = 0, eta = 1, theta = 0, and its S is
  not added) nor is attended to; its own output row is unspecified.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ...errors import check_key_padding_mask, check_tensor
from ...kernels.sdpa import sdpa
from ...layers import _check_int
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from ...state.kv import SinkWindowCache, SlidingWindowCache
from ...state.memory import NeuralMemoryState, TitansState
from ..local.sliding_window import sliding_window_fast, sliding_window_reference
from ..memory.streaming_sinks import sink_window_fast, sink_window_reference

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


# --------------------------------------------------------------------------------------------------------
# The Titans layer
# --------------------------------------------------------------------------------------------------------
VARIANTS = ("mac", "mag", "mal", "lmm")


class Titans(nn.Module):
    """A Titans layer ``x (B, N, dim) -> (B, N, dim)``: neural long-term memory + attention (``variant``).

    Learned parts: the memory's q/k/v projections and initial MLP weights (``memory_init``), the per-token
    gates (``gates``: alpha, eta, theta per head), the persistent tokens, the attention projections and
    the output gate's norm weights. ``backend`` "reference" runs the memory token by token and dense
    attention; "fast"/"auto" the chunked memory and fused attention (the same computation).

    Decoding: ``state = layer.init_state(batch)`` (runs the persistent tokens through the memory), then
    ``out, state = layer(x_new, state=state)``; the forward without a state is the same computation
    from a fresh state. ``init_state(batch, history=r)`` allows ``state.crop`` by up to r tokens.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = True,
                 variant: str = "mac", chunk_size: int = 64, segment: int = 512, window: int = 512,
                 persistent: int = 4, memory_depth: int = 2, memory_expansion: int = 4, max_lr: float = 0.01,
                 backend: str = "auto") -> None:
        super().__init__()
        if causal is not True:
            raise ValueError(f"causal: Titans layers are causal (pattern causal_self), got causal={causal!r}")
        dim, heads = _check_int("dim", dim), _check_int("heads", heads)
        kv_heads = heads if kv_heads is None else _check_int("kv_heads", kv_heads)
        if dim % heads or heads % kv_heads:
            raise ValueError(f"heads, kv_heads: need dim % heads == 0 and heads % kv_heads == 0, got dim={dim}, "
                             f"heads={heads}, kv_heads={kv_heads}")
        opts = TITANS.resolve_options(dict(variant=variant, chunk_size=chunk_size, segment=segment, window=window,
                                           persistent=persistent, memory_depth=memory_depth,
                                           memory_expansion=memory_expansion, max_lr=max_lr))
        for key, val in opts.items():
            setattr(self, key, val)
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, dim // heads
        self.causal, self.backend = True, backend
        self.scale = 1.0 / math.sqrt(self.head_dim)
        hd = self.head_dim
        self.mem_q = nn.Linear(dim, dim, bias=False)
        self.mem_k = nn.Linear(dim, dim, bias=False)
        self.mem_v = nn.Linear(dim, dim, bias=False)
        self.gates = nn.Linear(dim, 3 * heads)
        with torch.no_grad():  # start with little forgetting, strong momentum, a moderate step
            self.gates.bias.copy_(torch.tensor([-4.0] * heads + [2.0] * heads + [0.0] * heads))
        sizes = [hd] + [self.memory_expansion * hd] * (self.memory_depth - 1) + [hd]
        self.memory_init = nn.ParameterList(
            nn.Parameter(torch.randn(heads, sizes[i + 1], sizes[i]) / math.sqrt(sizes[i]))
            for i in range(self.memory_depth))
        use_p = self.persistent > 0
        self.persistent_tokens = nn.Parameter(0.02 * torch.randn(self.persistent, dim)) if use_p else None
        if self.variant != "lmm":
            self.attn_q = nn.Linear(dim, dim, bias=False)
            self.attn_k = nn.Linear(dim, kv_heads * hd, bias=False)
            self.attn_v = nn.Linear(dim, kv_heads * hd, bias=False)
        if self.variant == "mac":
            self.attn_o = nn.Linear(dim, dim, bias=False)
        if self.variant in ("mac", "mag"):
            self.gate_y = nn.Parameter(torch.ones(dim))
            self.gate_m = nn.Parameter(torch.ones(dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, dim={self.dim}, heads={self.heads}, chunk_size={self.chunk_size}, "
                f"memory_depth={self.memory_depth}, persistent={self.persistent}")

    # -- pieces -----------------------------------------------------------------------------------------
    def _heads(self, x, h):
        B, T, _ = x.shape
        return x.view(B, T, h, self.head_dim).transpose(1, 2)  # (B, h, T, hd)

    def _merge(self, x):
        B, H, T, hd = x.shape
        return x.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, dim)

    def _mem_dtype(self, dtype):
        return torch.promote_types(dtype, torch.float32)  # the memory state accumulates in >= float32

    def _mem_query(self, u):
        return F.normalize(self._heads(F.silu(self.mem_q(u)), self.heads), dim=-1)  # (B, H, T, hd)

    def _mem_update(self, mem, u, active, *, read: bool, read_after: bool):
        """Feed tokens u (B, T, dim) to the memory: keys/values/gates from u, reads before/after each token."""
        md = self._mem_dtype(u.dtype)
        q = self._mem_query(u).to(md)
        k = F.normalize(self._heads(F.silu(self.mem_k(u)), self.heads), dim=-1).to(md)  # (B, H, T, hd)
        v = self._heads(F.silu(self.mem_v(u)), self.heads).to(md)  # (B, H, T, hd)
        g = self.gates(u).to(md).transpose(1, 2)  # (B, 3H, T)
        alpha, eta = torch.sigmoid(g[:, : self.heads]), torch.sigmoid(g[:, self.heads : 2 * self.heads])
        theta = self.max_lr * torch.sigmoid(g[:, 2 * self.heads :])  # (B, H, T) each
        reads, after = memory_forms(self.backend)(mem, q if read else None, k, v, alpha, eta, theta,
                                                  active=active, q_after=q if read_after else None)
        cast = lambda r: None if r is None else self._merge(r).to(u.dtype)
        return cast(reads), cast(after)

    def _gate(self, y, m):
        rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)
        return rms(y) * self.gate_y * torch.sigmoid(rms(m) * self.gate_m)

    def _persistent(self, batch, dtype):
        return self.persistent_tokens.to(dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, Np, dim)

    # -- state ------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, history: int = 0, dtype=None, device=None) -> TitansState:
        """A fresh state for ``batch_size`` sequences; the persistent tokens already went through the memory
        (MAG, MAL, LMM) and the attention cache (MAG, MAL)."""
        _check_int("batch_size", batch_size)
        w = self.mem_k.weight
        dtype, device = dtype or w.dtype, device or w.device
        md = self._mem_dtype(dtype)
        weights = [W.to(device=device, dtype=md).unsqueeze(0).expand(batch_size, -1, -1, -1) for W in self.memory_init]
        mem = NeuralMemoryState(weights, chunk_size=self.chunk_size)
        attn, prefix = None, 0
        if self.variant == "mag":
            attn = SinkWindowCache(batch_size, self.kv_heads, self.head_dim, self.head_dim, window=self.window,
                                   sinks=self.persistent, extra=history, dtype=dtype, device=device)
        elif self.variant == "mal":
            attn = SlidingWindowCache(batch_size, self.kv_heads, self.head_dim, self.head_dim, window=self.window,
                                      extra=history, dtype=dtype, device=device)
        state = TitansState(mem, attn, history=history)
        if self.persistent_tokens is not None and self.variant != "mac":
            p = self._persistent(batch_size, dtype).to(device)
            reads, _ = self._mem_update(mem, p, None, read=self.variant == "mal", read_after=False)
            if self.variant == "mag":
                attn.append(self._heads(self.attn_k(p), self.kv_heads), self._heads(self.attn_v(p), self.kv_heads))
            elif self.variant == "mal":
                attn.append(self._heads(self.attn_k(reads), self.kv_heads),
                            self._heads(self.attn_v(reads), self.kv_heads))
            prefix = self.persistent
        state.prefix = prefix
        return state

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x, context=None, *, key_padding_mask=None, state: TitansState | None = None):
        """x (B, N, dim), key_padding_mask (B, N) bool; returns (B, N, dim), or (out, state) with a state."""
        check_tensor("x", x, ndim=3)
        if context is not None:
            raise ValueError("context: Titans layers are causal self attention (pattern causal_self); got a context")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dim {self.dim}, got shape {tuple(x.shape)}")
        check_key_padding_mask(key_padding_mask, x.shape[0], x.shape[1])
        own = state is None
        if own:
            state = self.init_state(x.shape[0], dtype=x.dtype, device=x.device)
        elif not isinstance(state, TitansState):
            raise TypeError(f"state: expected a TitansState from init_state(), got {type(state).__name__}")
        elif state.batch != x.shape[0]:
            raise ValueError(f"state: built for batch {state.batch}, got x of batch {x.shape[0]}")
        if state.history > 0 and x.shape[1] > 1:  # one token at a time, so that crop can stop anywhere
            outs = [self._advance(x[:, t : t + 1], None if key_padding_mask is None else key_padding_mask[:, t : t + 1],
                                  state) for t in range(x.shape[1])]
            out = torch.cat(outs, 1)
        else:
            out = self._advance(x, key_padding_mask, state)
        return out if own else (out, state)

    def _advance(self, x, mask, state: TitansState):
        state.snapshot()
        fn = {"mac": self._mac, "mag": self._mag, "mal": self._mal, "lmm": self._lmm}[self.variant]
        out = fn(x, mask, state)
        state.seq_len += x.shape[1]
        return out

    def _lmm(self, x, mask, state):
        reads, _ = self._mem_update(state.memory, x, mask, read=True, read_after=False)
        return self.out_proj(reads)

    def _window_attention(self, q, k, v, mask, cache, sinks):
        keys, values, kmask = cache.append(k, v, mask)
        T = q.shape[2]
        if self.backend != "reference" and T <= 64:  # decoding: a (T, cache) mask, no blocked kernel
            S = min(sinks, cache.seq_len) if sinks else 0
            kpos = torch.cat([torch.arange(S), torch.arange(cache.start, cache.seq_len)]).to(q.device).view(1, -1)
            qpos = torch.arange(cache.seq_len - T, cache.seq_len, device=q.device).view(-1, 1)
            vis = (kpos <= qpos) & ((qpos - kpos < self.window) | (kpos < S))  # (T, L)
            vis = vis.view(1, 1, T, -1) if kmask is None else vis.view(1, 1, T, -1) & kmask.view(-1, 1, 1, kpos.numel())
            out = sdpa(q, keys, values, attn_mask=vis, scale=self.scale)
            cache.evict()
            return self._merge(out)
        kw = dict(causal=True, key_padding_mask=kmask, scale=self.scale, window=self.window)
        if sinks is not None:
            kw["sinks"] = min(sinks, cache.seq_len)
            fn = sink_window_reference if self.backend == "reference" else sink_window_fast
        else:
            fn = sliding_window_reference if self.backend == "reference" else sliding_window_fast
        out = fn(q, keys, values, **kw)  # (B, Hq, T, hd)
        cache.evict()
        return self._merge(out)

    def _mag(self, x, mask, state):
        q = self._heads(self.attn_q(x), self.heads)
        k, v = self._heads(self.attn_k(x), self.kv_heads), self._heads(self.attn_v(x), self.kv_heads)
        y = self._window_attention(q, k, v, mask, state.attn, self.persistent)  # SW-Attn* over [p || x]
        m, _ = self._mem_update(state.memory, x, mask, read=True, read_after=False)  # M(x~), reads before update
        return self.out_proj(self._gate(y, m))

    def _mal(self, x, mask, state):
        y, _ = self._mem_update(state.memory, x, mask, read=True, read_after=False)  # y = M(x~)
        q = self._heads(self.attn_q(y), self.heads)
        k, v = self._heads(self.attn_k(y), self.kv_heads), self._heads(self.attn_v(y), self.kv_heads)
        return self.out_proj(self._window_attention(q, k, v, mask, state.attn, None))  # SW-Attn(y)

    def _mac(self, x, mask, state):
        B, T, _ = x.shape
        outs, t0, pos = [], 0, state.seq_len
        while t0 < T:
            off = pos % self.segment
            t1 = min(T, t0 + self.segment - off)
            if off == 0:  # a new segment: freeze the memory it retrieves from, forget the old segment
                state.seg_weights = list(state.memory.weights)
                state.seg_k = state.seg_v = state.seg_mask = None
            xs, ms = x[:, t0:t1], None if mask is None else mask[:, t0:t1]
            outs.append(self._mac_piece(xs, ms, off, state))
            pos += t1 - t0
            t0 = t1
        return torch.cat(outs, 1)

    def _mac_piece(self, xs, ms, off, state):
        B, Tp, _ = xs.shape
        md = self._mem_dtype(xs.dtype)
        h = self._merge(memory_forward(state.seg_weights, self._mem_query(xs).to(md))[0]).to(xs.dtype)  # M*_{t-1}(q)
        kh, vh = self._heads(self.attn_k(h), self.kv_heads), self._heads(self.attn_v(h), self.kv_heads)
        kx, vx = self._heads(self.attn_k(xs), self.kv_heads), self._heads(self.attn_v(xs), self.kv_heads)
        pair = lambda a, b: torch.stack([a, b], 3).flatten(2, 3)  # (B, Hk, 2 Tp, hd): h_j, x_j, h_{j+1}, ...
        new_m = torch.ones(B, Tp, dtype=torch.bool, device=xs.device) if ms is None else ms
        cat = lambda old, new, dim: new if old is None else torch.cat([old, new], dim)
        state.seg_k = cat(state.seg_k, pair(kh, kx), 2)
        state.seg_v = cat(state.seg_v, pair(vh, vx), 2)
        state.seg_mask = cat(state.seg_mask, new_m.repeat_interleave(2, 1), 1)  # (B, 2 L)
        L = state.seg_k.shape[2] // 2
        keys, values = state.seg_k, state.seg_v
        Np = 0 if self.persistent_tokens is None else self.persistent
        if Np:
            p = self._persistent(B, xs.dtype)
            keys = torch.cat([self._heads(self.attn_k(p), self.kv_heads), keys], 2)
            values = torch.cat([self._heads(self.attn_v(p), self.kv_heads), values], 2)
        qi = torch.arange(Tp, device=xs.device).view(Tp, 1) + off  # segment position of each query
        kj = torch.arange(2 * L, device=xs.device).view(1, 2 * L) // 2  # segment position of each h/x key
        seen = (kj <= qi).view(1, 1, Tp, 2 * L) & state.seg_mask.view(B, 1, 1, 2 * L)
        attn_mask = torch.cat([torch.ones(B, 1, Tp, Np, dtype=torch.bool, device=xs.device), seen], -1)
        q = self._heads(self.attn_q(xs), self.heads)
        if self.backend == "reference":
            o = softmax_attention(q, keys, values, attn_mask=attn_mask, scale=self.scale)
        else:
            o = sdpa(q, keys, values, attn_mask=attn_mask, scale=self.scale)
        y = self.attn_o(self._merge(o))  # y_t = Attn([p || h || S])
        _, m = self._mem_update(state.memory, y, ms, read=False, read_after=True)  # M_t = M_{t-1}(y), M*_t(y)
        return self.out_proj(self._gate(y, m))  # o_t = y (x) M*_t(y)


def titans_fast(mem, q, k, v, alpha, eta, theta, *, active=None, q_after=None):
    """The chunked memory (:func:`memory_fast`): what ``Titans(backend="fast")`` runs."""
    return memory_fast(mem, q, k, v, alpha, eta, theta, active=active, q_after=q_after)


def _options(with_variant: bool):
    opts = [
        Option("chunk_size", 64, int, low=1, doc="mini-batch of the memory's gradient descent (1: sequential)"),
        Option("segment", 512, int, low=1, doc="MAC: tokens per segment"),
        Option("window", 512, int, low=1, doc="MAG/MAL: sliding-window size (keys incl. the query's own)"),
        Option("persistent", 4, int, low=0, doc="persistent (learned, input-independent) memory tokens"),
        Option("memory_depth", 2, int, low=1, doc="layers of the memory MLP (1: a matrix memory)"),
        Option("memory_expansion", 4, int, low=1, doc="hidden width of the memory MLP / head_dim"),
        Option("max_lr", 0.01, float, low=0.0, high=1.0,
               doc="theta_t = max_lr * sigmoid(.); at 0.1, chunks of 64 diverge at initialisation (NaN by 2k tokens)"),
    ]
    if with_variant:
        opts.insert(0, Option("variant", "mac", str, choices=VARIANTS, doc="mac | mag | mal | lmm"))
    return tuple(opts)


_COMMON = dict(
    family="memory", kind="sequence", catalog="P022", title="Titans: Learning to Memorize at Test Time",
    arxiv="2501.00663", code="none official (follows the paper)", patterns=("causal_self",), exact=False,
    state="titans", fast=titans_fast,
    test_sizes={"n": 7, "dim": 8, "heads": 2, "batch": 2},
)
_TEST = {"chunk_size": 2, "segment": 3, "window": 3, "persistent": 2, "memory_depth": 2, "memory_expansion": 2}

TITANS = register(Mechanism(
    name="titans", aliases=("titans_mac",),
    summary="Neural long-term memory (MLP trained at test time by surprise with momentum and decay) "
            "with attention; variant mac (memory as context), mag (gate), mal (layer) or lmm (memory only).",
    complexity="train O(N (C + b) d) (segments C, chunks b); decode O(1) state: memory weights + segment/window",
    module=Titans, options=_options(True), test_options={"variant": "mac", **_TEST},
    notes="chunk_size = 1 is the sequential surprise rule; memory_depth = 1, eta = alpha = 0 the delta rule.",
    **_COMMON,
))


class _Variant:
    """Module factory of a fixed Titans variant (the titans_mag / titans_mal records)."""

    def __init__(self, variant: str) -> None:
        self.variant = variant

    def __call__(self, dim, heads, **kw):
        return Titans(dim, heads, variant=self.variant, **kw)


for _name, _variant, _summary in (
    ("titans_mag", "mag", "Titans memory as a gate: sliding-window attention (persistent tokens as sinks) gated "
                          "with the neural memory's reads."),
    ("titans_mal", "mal", "Titans memory as a layer: the neural memory's reads feed a sliding-window attention."),
):
    register(Mechanism(name=_name, summary=_summary,
                       complexity="train O(N (w + b) d); decode O(1) state: memory weights + window cache",
                       module=_Variant(_variant), options=_options(False), test_options=dict(_TEST),
                       notes=f"the titans record with variant={_variant!r}.", **_COMMON))
