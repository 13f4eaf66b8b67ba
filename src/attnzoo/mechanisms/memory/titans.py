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

from ...errors import check_init_state, check_int, check_sequence_call
from ...kernels.sdpa import sdpa
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from ...state.base import DecodeState
from ...state.kv import SinkWindowCache, SlidingWindowCache
from ..local.sliding_window import sliding_window_fast, sliding_window_reference
from ..memory.streaming_sinks import sink_window_fast, sink_window_reference
from .titans_memory import NeuralMemoryState, memory_fast, memory_forms, memory_forward

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
        dim, heads = check_int("dim", dim), check_int("heads", heads)
        kv_heads = heads if kv_heads is None else check_int("kv_heads", kv_heads)
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
        check_int("batch_size", batch_size)
        w = self.mem_k.weight
        spec = check_init_state(batch=batch_size, dtype=w.dtype if dtype is None else dtype,
                                device=w.device if device is None else device)
        dtype, device = spec["dtype"], spec["device"]
        if self.persistent_tokens is not None and self.variant != "mac" and (dtype, device) != (w.dtype, w.device):
            raise ValueError(f"dtype, device: this {self.variant.upper()} state starts from the persistent tokens run "
                             f"through the layer, so it takes the layer's dtype {w.dtype} and device {w.device}; "
                             f"got {dtype} on {device}")
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
        state = TitansState(mem, attn, history=history).built_for(**spec)
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
        if context is not None:
            raise ValueError("context: Titans layers are causal self attention (pattern causal_self); got a context")
        check_sequence_call(self, x, key_padding_mask=key_padding_mask, state=state, state_type=TitansState)
        own = state is None
        if own:
            state = self.init_state(x.shape[0], dtype=x.dtype, device=x.device)
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


def _flatten(snap: dict) -> list[torch.Tensor]:
    out = []
    for val in snap.values():
        if isinstance(val, torch.Tensor):
            out.append(val)
        elif isinstance(val, list):
            out += [t for t in val if isinstance(t, torch.Tensor)]
    return out


class TitansState(DecodeState):
    """Decode state of a Titans layer: its :class:`NeuralMemoryState` plus what its attention needs.

    ``attn``: MAG a :class:`SinkWindowCache` (persistent tokens as sinks), MAL a :class:`SlidingWindowCache`
    over the memory's outputs, LMM/MAC None; it holds ``prefix`` persistent tokens before the inputs. MAC
    keeps the current segment: the memory weights at the segment start (``seg_weights``) and the keys and
    values of the segment's retrieved tokens h and of its tokens (``seg_k``, ``seg_v``: (B, Hk, 2 T, D),
    ``seg_mask`` (B, 2 T)). ``seq_len`` counts input tokens (not the persistent prefix).

    ``history = r`` keeps the memory as it was before each of the last r tokens (and the attention cache
    is built with ``extra = r``), so ``crop`` can roll back up to r tokens (speculative decoding); the layer
    then feeds a multi-token chunk one token at a time. Memory O(1) in the sequence length
    (window/segment sized), plus r copies of the memory.
    """

    _tensor_fields = ("_mem_tensors", "_attn_tensors", "seg_weights", "seg_k", "seg_v", "seg_mask")

    def __init__(self, memory: NeuralMemoryState, attn: DecodeState | None = None, *, prefix: int = 0,
                 history: int = 0) -> None:
        super().__init__()
        self.memory, self.attn = memory, attn
        self.batch = memory.batch
        self.prefix = check_int("prefix", prefix, low=0)
        self.history = check_int("history", history, low=0)
        self.seg_weights: list[torch.Tensor] | None = None
        self.seg_k = self.seg_v = self.seg_mask = None
        self._snapshots: list[tuple[int, dict]] = []

    @property
    def _mem_tensors(self):
        return self.memory.tensors()

    @property
    def _attn_tensors(self):
        return [] if self.attn is None else self.attn.tensors()

    def nbytes(self) -> int:
        total = super().nbytes()
        seen = {t.untyped_storage().data_ptr() for t in self.tensors()}
        for _, snap in self._snapshots:
            for t in _flatten(snap):
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total

    # -- snapshots for crop (the layer replaces tensors, never writes them in place) ------------------
    def snapshot(self) -> None:
        """Remember the memory and segment before the next token (called by the layer when history > 0)."""
        if self.history == 0:
            return
        mem = self.memory
        snap = {"weights": list(mem.weights), "momentum": list(mem.momentum), "anchor": list(mem.anchor),
                "pos": mem.pos, "seg_weights": self.seg_weights, "seg_k": self.seg_k,
                "seg_v": self.seg_v, "seg_mask": self.seg_mask}
        self._snapshots.append((self.seq_len, snap))
        del self._snapshots[: -self.history]

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        self.memory.reorder(index)
        if self.attn is not None:
            self.attn.reorder(index)
        sel = lambda t: None if t is None else t.index_select(0, index.to(t.device))
        sel_list = lambda ts: None if ts is None else [sel(t) for t in ts]
        self.seg_weights = sel_list(self.seg_weights)
        self.seg_k, self.seg_v, self.seg_mask = sel(self.seg_k), sel(self.seg_v), sel(self.seg_mask)
        for _, snap in self._snapshots:
            for key in ("weights", "momentum", "anchor", "seg_weights"):
                snap[key] = sel_list(snap[key])
            for key in ("seg_k", "seg_v", "seg_mask"):
                snap[key] = sel(snap[key])
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        if length == self.seq_len:
            return
        for i, (n, snap) in enumerate(self._snapshots):
            if n == length:
                if self.attn is not None:
                    self.attn.crop(self.prefix + length)
                mem = self.memory
                mem.weights, mem.momentum, mem.anchor = snap["weights"], snap["momentum"], snap["anchor"]
                mem.pos = snap["pos"]
                self.seg_weights, self.seg_k, self.seg_v, self.seg_mask = (
                    snap["seg_weights"], snap["seg_k"], snap["seg_v"], snap["seg_mask"])
                self.seq_len = length
                del self._snapshots[i:]
                return
        held = [n for n, _ in self._snapshots]
        raise ValueError(f"length: cannot crop this TitansState to {length} tokens: it holds {self.seq_len} and "
                         f"snapshots at {held}; build it with history >= {self.seq_len - length}")


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
