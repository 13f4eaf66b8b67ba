"""FIT: Far-reaching Interleaved Transformers (local groups + global latents).

Paper: "FIT: Far-reaching Interleaved Transformers", Chen & Li, arXiv 2305.12689.
Official code: https://github.com/google-research/pix2seq (``architectures/transformers.py``: ``FIT``,
``FITAR``). Data tokens are split into groups of ``group_size``; each group owns ``latents`` latent
tokens. One FIT block: local self-attention inside each group; the group's latents read their group's
tokens (cross-attention); all latents attend to each other (global); the tokens write back by
cross-attending to their group's latents. Cost O(N g + (N m / g)^2) instead of O(N^2).

This module is that attention sub-block (the official layer minus its MLPs), returned as a residual
update: ``x + FIT(x)`` = ``h + write(h, latents)`` with ``h = x + local(x)``. Each attention is pre-norm
(LayerNorm on its queries, and on its context for the two cross-attentions, ``use_enc_ln``), as in the
official ``TransformerDecoderLayer``.

Causal (``FITAR``): local attention is causal inside a group; a group's latents read its whole group;
latent group t attends to latent groups <= t; and the tokens of group t write from the latents of group
t - 1 (group 0 from zero latents, the official ``_latent_shift``). Token-by-token decoding is therefore
exact: a state keeps the current group's keys, the latents' keys/values and the last group's latents.

Choices where the paper is silent: initial latents are one learned (latents, dim) set shared by all
groups (the official code learns a per-group position embedding for a fixed number of groups; shared
latents keep the layer length-agnostic and group-permutation equivariant); one latent self-attention
layer per block; a sequence whose length is not a multiple of ``group_size`` is padded (padding masked).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_bool, check_heads, check_int, check_sequence_call
from ...kernels.sdpa import sdpa
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from ...state.base import DecodeState
from ...state.kv import KVCache


class _Attn(nn.Module):
    """q/k/v/o projections of one attention; ``heads`` query heads, ``kv_heads`` key/value heads."""

    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def split(self, x, h):
        *lead, T, _ = x.shape
        return x.view(*lead, T, h, self.hd).transpose(-2, -3)  # (.., h, T, hd)

    def qkv(self, xq, xkv):
        return self.split(self.q(xq), self.heads), self.split(self.k(xkv), self.kv_heads), \
            self.split(self.v(xkv), self.kv_heads)

    def out(self, o):
        *lead, H, T, hd = o.shape
        return self.o(o.transpose(-2, -3).reshape(*lead, T, H * hd))


class FIT(nn.Module):
    """FIT attention block ``x (B, N, dim) -> (B, N, dim)`` (a residual update).

    ``backend``: "reference" builds the dense masks over the whole sequence (N x N local, groups x tokens
    read/write, latents x latents); "fast"/"auto" batches the groups (O(N g + (N m / g)^2)).
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 group_size: int = 256, latents: int = 16, backend: str = "auto") -> None:
        super().__init__()
        dim, heads, kv_heads, _ = check_heads(dim, heads, kv_heads)
        check_bool("causal", causal)
        opts = FIT_RECORD.resolve_options({"group_size": group_size, "latents": latents})
        self.group_size, self.n_latents = opts["group_size"], opts["latents"]
        self.dim, self.heads, self.kv_heads, self.causal, self.backend = dim, heads, kv_heads, causal, backend
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.latents = nn.Parameter(torch.randn(self.n_latents, dim) / math.sqrt(dim))
        self.local = _Attn(dim, heads, kv_heads)
        self.read = _Attn(dim, heads, heads)
        self.glob = _Attn(dim, heads, heads)
        self.write = _Attn(dim, heads, heads)
        self.ln_local = nn.LayerNorm(dim)
        self.ln_read_q, self.ln_read_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ln_glob = nn.LayerNorm(dim)
        self.ln_write_q, self.ln_write_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, causal={self.causal}, group_size={self.group_size}, " \
               f"latents={self.n_latents}"

    def _attend(self, q, k, v, mask):
        if self.backend == "reference":
            return softmax_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return sdpa(q, k, v, attn_mask=mask, scale=self.scale)

    # -- parallel forms ---------------------------------------------------------------------------------
    def forward(self, x, context=None, *, key_padding_mask=None, state: FITState | None = None):
        if context is not None:
            raise ValueError("context: FIT is self attention over groups and latents; got a context")
        check_sequence_call(self, x, key_padding_mask=key_padding_mask, state=state, state_type=FITState,
                            mech=FIT_RECORD)
        if state is not None:
            return self._decode(x, key_padding_mask, state), state
        B, N, _ = x.shape
        g = self.group_size
        ng = -(-N // g)
        pad = ng * g - N
        xp = F.pad(x, (0, 0, 0, pad))  # (B, ng*g, dim)
        valid = torch.ones(B, N, dtype=torch.bool, device=x.device) if key_padding_mask is None else key_padding_mask
        valid = F.pad(valid, (0, pad))  # (B, ng*g): padding and masked tokens are never keys
        run = self._dense if self.backend == "reference" else self._grouped
        return run(xp, valid, ng)[:, :N]

    def _dense(self, x, valid, ng):
        """Reference: every attention over the whole sequence with its block mask materialized."""
        B, M, _ = x.shape
        g, m = self.group_size, self.n_latents
        tok_group = torch.arange(M, device=x.device) // g  # (M,)
        lat_group = torch.arange(ng * m, device=x.device) // m  # (ng*m,)
        kv = valid.view(B, 1, 1, M)
        local_mask = (tok_group.view(M, 1) == tok_group.view(1, M))
        if self.causal:
            local_mask = local_mask & torch.ones(M, M, dtype=torch.bool, device=x.device).tril()
        q, k, v = self.local.qkv(self.ln_local(x), self.ln_local(x))
        local = self.local.out(self._attend(q, k, v, local_mask.view(1, 1, M, M) & kv))  # (B, M, dim)
        h = x + local
        lat0 = self.latents.to(x.dtype).repeat(ng, 1).unsqueeze(0).expand(B, -1, -1)  # (B, ng*m, dim)
        read_mask = (lat_group.view(-1, 1) == tok_group.view(1, M)).view(1, 1, ng * m, M) & kv
        q, k, v = self.read.qkv(self.ln_read_q(lat0), self.ln_read_kv(h))
        lat = lat0 + self.read.out(self._attend(q, k, v, read_mask))
        glob_mask = None
        if self.causal:  # latent group t attends to latent groups <= t
            glob_mask = (lat_group.view(-1, 1) >= lat_group.view(1, -1)).view(1, 1, ng * m, ng * m)
        u = self.ln_glob(lat)
        q, k, v = self.glob.qkv(u, u)
        lat = lat + self.glob.out(self._attend(q, k, v, glob_mask))
        if self.causal:  # tokens of group t write from the latents of group t - 1; group 0 from zeros
            ctx = torch.cat([torch.zeros_like(lat[:, :m]), lat[:, : (ng - 1) * m]], 1)
        else:
            ctx = lat
        write_mask = (tok_group.view(M, 1) == lat_group.view(1, -1)).view(1, 1, M, ng * m)
        q, k, v = self.write.qkv(self.ln_write_q(h), self.ln_write_kv(ctx))
        return local + self.write.out(self._attend(q, k, v, write_mask))

    def _grouped(self, x, valid, ng):
        """Fast: groups folded into the batch; only the latents attend globally."""
        B, M, dim = x.shape
        g, m = self.group_size, self.n_latents
        xg = x.view(B * ng, g, dim)
        kv = valid.view(B * ng, 1, 1, g)
        local_mask = kv
        if self.causal:
            local_mask = kv & torch.ones(g, g, dtype=torch.bool, device=x.device).tril().view(1, 1, g, g)
        u = self.ln_local(xg)
        q, k, v = self.local.qkv(u, u)  # (B*ng, H, g, hd)
        local = self.local.out(self._attend(q, k, v, local_mask))  # (B*ng, g, dim)
        h = xg + local
        lat0 = self.latents.to(x.dtype).unsqueeze(0).expand(B * ng, m, dim)
        q, k, v = self.read.qkv(self.ln_read_q(lat0), self.ln_read_kv(h))
        lat = (lat0 + self.read.out(self._attend(q, k, v, kv))).reshape(B, ng * m, dim)
        glob_mask = None
        if self.causal:
            lg = torch.arange(ng * m, device=x.device) // m
            glob_mask = (lg.view(-1, 1) >= lg.view(1, -1)).view(1, 1, ng * m, ng * m)
        u = self.ln_glob(lat)
        q, k, v = self.glob.qkv(u, u)
        lat = lat + self.glob.out(self._attend(q, k, v, glob_mask))
        if self.causal:
            lat = torch.cat([torch.zeros_like(lat[:, :m]), lat[:, : (ng - 1) * m]], 1)
        ctx = lat.reshape(B * ng, m, dim)
        q, k, v = self.write.qkv(self.ln_write_q(h), self.ln_write_kv(ctx))
        out = local + self.write.out(self._attend(q, k, v, None))
        return out.reshape(B, M, dim)

    # -- decoding (causal) ------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, dtype=None, device=None) -> FITState:
        if not self.causal:
            raise ValueError("causal: decoding needs a causal FIT layer; build it with causal=True")
        check_int("batch_size", batch_size)
        w = self.latents
        return FITState(batch_size, self.dim, self.heads, self.kv_heads, self.group_size, self.n_latents,
                        dtype=dtype or w.dtype, device=device or w.device)

    def _decode(self, x, mask, state: FITState):
        outs, t0, T = [], 0, x.shape[1]
        while t0 < T:
            t1 = min(T, t0 + self.group_size - state.seq_len % self.group_size)
            outs.append(self._decode_piece(x[:, t0:t1], None if mask is None else mask[:, t0:t1], state))
            t0 = t1
        return torch.cat(outs, 1)

    def _decode_piece(self, x, mask, state: FITState):
        B, T, dim = x.shape
        g, m = self.group_size, self.n_latents
        off = state.seq_len % g
        new_ok = torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None else mask
        u = self.ln_local(x)
        q, k, v = self.local.qkv(u, u)  # (B, H, T, hd)
        state.push_group(k, v, new_ok)
        L = state.g_k.shape[2]
        seen = torch.arange(L, device=x.device).view(1, L) <= torch.arange(off, off + T, device=x.device).view(T, 1)
        seen = seen.view(1, 1, T, L) & state.g_mask.view(B, 1, 1, L)  # causal inside the group, unpadded
        local = self.local.out(self._attend(q, state.g_k, state.g_v, seen))
        h = x + local
        state.push_h(h)
        ctx = state.prev_latents if state.prev_latents is not None else torch.zeros(B, m, dim, dtype=x.dtype,
                                                                                    device=x.device)
        q, k, v = self.write.qkv(self.ln_write_q(h), self.ln_write_kv(ctx))
        out = local + self.write.out(self._attend(q, k, v, None))
        state.seq_len += T
        if state.seq_len % g == 0:  # the group is complete: its latents read it, then attend globally
            lat0 = self.latents.to(x.dtype).unsqueeze(0).expand(B, m, dim)
            q, k, v = self.read.qkv(self.ln_read_q(lat0), self.ln_read_kv(state.g_h))
            lat = lat0 + self.read.out(self._attend(q, k, v, state.g_mask.view(B, 1, 1, -1)))
            uq = self.ln_glob(lat)
            q, k, v = self.glob.qkv(uq, uq)
            keys, values, _ = state.latent_kv.append(k, v)  # latent groups <= t
            state.prev_latents = lat + self.glob.out(self._attend(q, keys, values, None))
            state.clear_group()
        return out


class FITState(DecodeState):
    """Causal FIT's decode state: the current group's local keys/values, its tokens after local attention
    (``g_h``, read by the group's latents once it completes), the latents' keys/values of the completed
    groups (``latent_kv``) and the latents of the last completed group (``prev_latents``, the write context
    of the current group). Memory O(group_size + N * latents / group_size).
    """

    def __init__(self, batch: int, dim: int, heads: int, kv_heads: int, group_size: int, latents: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.built_for(batch=batch, kv_heads=kv_heads, dtype=dtype, device=device)
        self.dim, self.group_size = dim, check_int("group_size", group_size)
        hd = dim // heads
        device = self.device
        self._empty = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)
        self.g_k, self.g_v = self._empty(batch, kv_heads, 0, hd), self._empty(batch, kv_heads, 0, hd)
        self.g_mask = self._empty(batch, 0, dt=torch.bool)
        self.g_h = self._empty(batch, 0, dim)
        self.latent_kv = KVCache(batch, heads, hd, hd, dtype=dtype, device=device)
        self.prev_latents: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        out = [self.g_k, self.g_v, self.g_mask, self.g_h] + self.latent_kv.tensors()
        return out + ([] if self.prev_latents is None else [self.prev_latents])

    def push_group(self, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor) -> None:
        self.g_k, self.g_v = torch.cat([self.g_k, k], 2), torch.cat([self.g_v, v], 2)
        self.g_mask = torch.cat([self.g_mask, ok], 1)

    def push_h(self, h: torch.Tensor) -> None:
        self.g_h = torch.cat([self.g_h, h], 1)

    def clear_group(self) -> None:
        self.g_k, self.g_v = self.g_k[:, :, :0], self.g_v[:, :, :0]
        self.g_mask, self.g_h = self.g_mask[:, :0], self.g_h[:, :0]

    def reorder(self, index: torch.Tensor) -> None:
        index = self._check_index(index, self.batch)
        sel = lambda t: t.index_select(0, index.to(t.device))
        self.g_k, self.g_v, self.g_mask, self.g_h = map(sel, (self.g_k, self.g_v, self.g_mask, self.g_h))
        self.latent_kv.reorder(index)
        if self.prev_latents is not None:
            self.prev_latents = sel(self.prev_latents)
        self.batch = index.numel()

    def crop(self, length: int) -> None:
        length = self._check_crop(length)
        start = (self.seq_len // self.group_size) * self.group_size
        if length < start:
            raise ValueError(f"length: cannot crop this FITState to {length} tokens: the latents of the completed "
                             f"group ending at {start} already include later tokens (crop within the current group, "
                             f"positions >= {start})")
        keep = length - start
        self.g_k, self.g_v = self.g_k[:, :, :keep], self.g_v[:, :, :keep]
        self.g_mask, self.g_h = self.g_mask[:, :keep], self.g_h[:, :keep]
        self.seq_len = length


FIT_RECORD = register(Mechanism(
    name="fit",
    aliases=("far_reaching_interleaved",),
    family="memory",
    kind="sequence",
    catalog="P128",
    title="FIT: Far-reaching Interleaved Transformers",
    arxiv="2305.12689",
    code="https://github.com/google-research/pix2seq",
    summary="Local attention inside token groups interleaved with a few latents per group: latents read "
            "their group, attend globally, and the tokens write back from them.",
    patterns=("noncausal_self", "causal_self"),
    exact=False,
    state="fit",
    complexity="time O(N g d + (N m / g)^2 d); causal decode state O(g + N m / g)",
    module=FIT,
    fast=FIT._grouped,  # the group-batched form; FIT(backend="fast") runs it
    options=(
        Option("group_size", 256, int, low=1, doc="data tokens per group (g)"),
        Option("latents", 16, int, low=1, doc="latent tokens per group (m)"),
    ),
    permutation_equivariant=False,
    test_options={"group_size": 3, "latents": 2},
    test_sizes={"n": 10, "dim": 8, "heads": 2},
    notes="One group with the write disabled is a standard (local) attention layer; non-causal FIT is "
          "equivariant to permuting whole groups.",
))
