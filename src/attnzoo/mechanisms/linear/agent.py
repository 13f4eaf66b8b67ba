"""Agent Attention: softmax attention routed through a few agent tokens pooled from the queries.

Paper: "Agent Attention: On the Integration of Softmax and Linear Attention", Han, Ye, Han, Pan, Song, Wan,
Song, Huang, arXiv 2312.08874. Official code: https://github.com/LeapLabTHU/Agent-Attention
With m << N agent tokens A (average-pooled from the queries), agents first aggregate the values,
``V_A = softmax(A K^T / sqrt(d) + B1) V``, then every query reads the agents, ``O = softmax(Q A^T / sqrt(d) + B2)
V_A``: two softmax attentions of cost O(N m d), a generalised linear attention with phi_q(Q) = softmax(Q A^T)
and phi_k(K) = softmax(A K^T)^T. Vision models add a 3x3 depthwise convolution of V to the output.

Two records:
- ``agent`` (functional): agents pooled along the query sequence (``adaptive_avg_pool1d`` to ``agents``
  tokens), no bias, no convolution; non-causal self and cross attention.
- ``agent_layer`` (module, token grids (B, H, W, C)): the official vision block (``agent_pvt.py``): one
  projection to q, k, v, agents ``AdaptiveAvgPool2d`` of the query grid to sqrt(m) x sqrt(m), the agent
  biases (7 x 7 position tables bilinearly resized to the grid plus per-row and per-column tables for
  both directions), the depthwise-conv term ``DWC(V)`` and the output projection.

Choices where the paper is silent (each an option or a documented convention):
- ``scale`` (default 1/sqrt(D)) scales both softmaxes, as the official ``head_dim ** -0.5``.
- Functional agents are pooled from all queries; ``key_padding_mask`` masks keys in the agent
  aggregation, and in self attention (Nq == Nk) the queries at padded positions are left out of the
  pooling too (the valid queries are cut into adaptive bins of their own length), so a padded batch row
  gives what the unpadded sequence gives; a batch row with every key masked returns zeros.
- Causal patterns are not supported (agents pool every query, so the first query would see the future).
- Module: the per-row/column bias tables are sized for a ``grid`` x ``grid`` token grid (the official
  ``window``); another grid size resizes them linearly, as the official code resizes the 7 x 7 tables.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_heads, check_int, check_module_input
from ...kernels.sdpa import sdpa
from ...reference import acc_dtype, repeat_kv
from ...registry import CrossSpec, Mechanism, Option, register


def pool_agents(q: torch.Tensor, agents: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Agent tokens: q (B, H, N, D) average-pooled along N into (B, H, agents, D) (adaptive bins).

    With ``valid`` (B, N) bool, only the valid queries are pooled: they are taken in order and cut into the
    same adaptive bins as a sequence of their own length (so a padded row pools exactly what the unpadded
    sequence would)."""
    B, H, N, D = q.shape
    if valid is None:
        a = F.adaptive_avg_pool1d(q.reshape(B * H, N, D).transpose(1, 2), agents)  # (B*H, D, m)
        return a.transpose(1, 2).reshape(B, H, agents, D)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # (B, N): valid positions first
    qc = q.gather(2, order.view(B, 1, N, 1).expand(B, H, N, D))  # (B, H, N, D) compacted
    n = valid.sum(dim=1).view(B, 1)  # (B, 1)
    i = torch.arange(agents, device=q.device).view(1, agents)
    start = torch.div(i * n, agents, rounding_mode="floor")  # (B, m): adaptive bins over n valid queries
    end = -torch.div(-(i + 1) * n, agents, rounding_mode="floor")  # ceil((i + 1) n / m)
    cs = F.pad(qc.cumsum(dim=2), (0, 0, 1, 0))  # (B, H, N + 1, D) prefix sums
    idx = lambda t: t.view(B, 1, agents, 1).expand(B, H, agents, D)
    sums = cs.gather(2, idx(end)) - cs.gather(2, idx(start))  # (B, H, m, D)
    return sums / (end - start).clamp(min=1).view(B, 1, agents, 1).to(q.dtype)


def _softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis that returns zeros on rows whose every score is -inf."""
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    w = torch.exp(scores - m)
    s = w.sum(dim=-1, keepdim=True)
    return w / torch.where(s > 0, s, torch.ones_like(s))


def agent_reference(q, k, v, *, causal, key_padding_mask, scale, agents):
    """Two explicit softmax attentions: agents over keys, then queries over agents."""
    if causal:
        raise ValueError("causal: agent attention pools every query into its agents; causal patterns are unsupported")
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype)
    qa = q.to(acc)
    kk, vv = repeat_kv(k, Hq // Hk).to(acc), repeat_kv(v, Hq // Hk).to(acc)  # (B, Hq, Nk, D|Dv)
    A = pool_agents(qa, agents, key_padding_mask if Nq == Nk else None)  # (B, Hq, m, D)
    s1 = torch.matmul(A, kk.transpose(-1, -2)) * scale  # (B, Hq, m, Nk)
    if key_padding_mask is not None:
        s1 = s1.masked_fill(~key_padding_mask.view(B, 1, 1, Nk), float("-inf"))
    v_agents = torch.matmul(_softmax_rows(s1), vv)  # (B, Hq, m, Dv): agent aggregation
    s2 = torch.matmul(qa, A.transpose(-1, -2)) * scale  # (B, Hq, Nq, m)
    out = torch.matmul(torch.softmax(s2, dim=-1), v_agents)  # (B, Hq, Nq, Dv): agent broadcast
    return out.to(q.dtype)


def agent_fast(q, k, v, *, causal, key_padding_mask, scale, agents):
    """The same two stages on PyTorch's fused SDPA (no N x m matrix kept for backward)."""
    if causal:
        raise ValueError("causal: agent attention pools every query into its agents; causal patterns are unsupported")
    self_attention = q.shape[2] == k.shape[2]
    A = pool_agents(q, agents, key_padding_mask if self_attention else None)  # (B, Hq, m, D)
    v_agents = sdpa(A, k, v, key_padding_mask=key_padding_mask, scale=scale)  # (B, Hq, m, Dv)
    return sdpa(q, A, v_agents, scale=scale)  # (B, Hq, Nq, Dv)


AGENT = register(Mechanism(
    name="agent",
    aliases=("agent_attention",),
    family="linear",
    catalog="P014",
    title="Agent Attention: On the Integration of Softmax and Linear Attention",
    arxiv="2312.08874",
    code="https://github.com/LeapLabTHU/Agent-Attention",
    summary="softmax(Q A^T) softmax(A K^T) V with m agent tokens A pooled from the queries: O(N m d).",
    patterns=("noncausal_self", "noncausal_cross"),
    exact=False,
    state=None,
    complexity="time O((Nq + Nk) m d), memory O((Nq + Nk) m) reference, O(N d) fused",
    reference=agent_reference,
    fast=agent_fast,
    options=(Option("agents", 49, int, low=1, doc="number of agent tokens m pooled from the queries"),),
    permutation_equivariant=False,
    test_options={"agents": 3},
    notes="invariant to permuting keys with their values, not to permuting queries (agents pool them in order); "
          "agents >= Nq with Nq | agents makes the agents the queries themselves (repeated).",
    cross=CrossSpec(query_independent=False, context_permutation_invariant=True),  # agents pool all the queries
))


# --------------------------------------------------------------------------------------------------------
# The vision module
# --------------------------------------------------------------------------------------------------------
def _resize_axis(t: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    """Linearly resize one axis of a bias table (identity when it already has ``size`` entries)."""
    if t.shape[axis] == size:
        return t
    moved = t.movedim(axis, -1)
    shape = moved.shape
    out = F.interpolate(moved.reshape(-1, 1, shape[-1]), size=size, mode="linear", align_corners=False)
    return out.reshape(*shape[:-1], size).movedim(-1, axis)


class AgentAttention2d(nn.Module):
    """Agent attention on a token grid: x (B, H, W, C) -> (B, H, W, C) (official ``agent_pvt`` block, sr 1).

    ``backend``: "reference" (explicit softmaxes) or "fast"/"auto" (fused SDPA with the biases as additive
    masks); both include the agent biases and the depthwise convolution.
    """

    def __init__(self, dim: int, heads: int, *, agents: int = 49, grid: int = 14, qkv_bias: bool = False,
                 agent_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        dim, heads, _, _ = check_heads(dim, heads)
        agents, grid = check_int("agents", agents), check_int("grid", grid)
        pool = math.isqrt(agents)
        if pool * pool != agents:
            raise ValueError(f"agents: the module pools the grid to sqrt(agents) x sqrt(agents); expected a perfect "
                             f"square, got {agents}")
        self.dim, self.heads, self.agents, self.pool_size, self.grid = dim, heads, agents, pool, grid
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.backend = check_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.agent_bias = agent_bias
        if agent_bias:
            h, m = heads, agents
            self.an_bias = nn.Parameter(torch.zeros(h, m, 7, 7))  # agent -> key, position table
            self.na_bias = nn.Parameter(torch.zeros(h, m, 7, 7))  # query -> agent, position table
            self.ah_bias = nn.Parameter(torch.zeros(1, h, m, grid, 1))  # agent -> key row
            self.aw_bias = nn.Parameter(torch.zeros(1, h, m, 1, grid))  # agent -> key column
            self.ha_bias = nn.Parameter(torch.zeros(1, h, grid, 1, m))  # query row -> agent
            self.wa_bias = nn.Parameter(torch.zeros(1, h, 1, grid, m))  # query column -> agent
            for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
                nn.init.trunc_normal_(p, std=0.02)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, agents={self.agents}, grid={self.grid}"

    def biases(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, h, m, H*W) agent -> key and (1, h, H*W, m) query -> agent additive biases."""
        h, m, N = self.heads, self.agents, height * width
        pb1 = F.interpolate(self.an_bias, size=(height, width), mode="bilinear").reshape(1, h, m, N)
        pb2 = (_resize_axis(self.ah_bias, height, 3) + _resize_axis(self.aw_bias, width, 4)).reshape(1, h, m, N)
        ab1 = F.interpolate(self.na_bias, size=(height, width), mode="bilinear").reshape(1, h, m, N).transpose(-1, -2)
        ab2 = (_resize_axis(self.ha_bias, height, 2) + _resize_axis(self.wa_bias, width, 3)).reshape(1, h, N, m)
        return pb1 + pb2, ab1 + ab2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) channels-last -> (B, H, W, C)."""
        check_module_input(self, x, layout="(B, H, W, C)", channels=self.dim)
        B, Hh, Ww, C = x.shape
        N, h, d, m = Hh * Ww, self.heads, self.head_dim, self.agents
        q, k, v = self.qkv(x.reshape(B, N, C)).chunk(3, dim=-1)  # (B, N, C) each
        agents = F.adaptive_avg_pool2d(q.reshape(B, Hh, Ww, C).permute(0, 3, 1, 2), self.pool_size)  # (B, C, p, p)
        agents = agents.reshape(B, C, m).transpose(1, 2).reshape(B, m, h, d).transpose(1, 2)  # (B, h, m, d)
        qh, kh, vh = (t.reshape(B, N, h, d).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        if self.agent_bias:
            bias1, bias2 = self.biases(Hh, Ww)  # (1, h, m, N), (1, h, N, m)
        else:
            bias1 = bias2 = None
        if self.backend == "reference":
            acc = acc_dtype(x.dtype)
            s1 = torch.matmul(agents.to(acc), kh.to(acc).transpose(-1, -2)) * self.scale  # (B, h, m, N)
            s1 = s1 if bias1 is None else s1 + bias1.to(acc)
            v_agents = torch.matmul(torch.softmax(s1, dim=-1), vh.to(acc))  # (B, h, m, d)
            s2 = torch.matmul(qh.to(acc), agents.to(acc).transpose(-1, -2)) * self.scale  # (B, h, N, m)
            s2 = s2 if bias2 is None else s2 + bias2.to(acc)
            out = torch.matmul(torch.softmax(s2, dim=-1), v_agents).to(x.dtype)  # (B, h, N, d)
        else:
            b1 = None if bias1 is None else bias1.to(x.dtype)
            b2 = None if bias2 is None else bias2.to(x.dtype)
            v_agents = F.scaled_dot_product_attention(agents, kh, vh, attn_mask=b1, scale=self.scale)  # (B, h, m, d)
            out = F.scaled_dot_product_attention(qh, agents, v_agents, attn_mask=b2, scale=self.scale)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, Hh, Ww, C)  # (B, H, W, C)
        conv = self.dwc(v.reshape(B, Hh, Ww, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
        return self.proj(out + conv)


def _agent_layer(dim, heads, *, backend="auto", **options):
    """``attnzoo.build("agent_layer", dim, heads, ...)``: options validated against the record."""
    return AgentAttention2d(dim, heads, backend=backend, **AGENT_LAYER.resolve_options(options))


AGENT_LAYER = register(Mechanism(
    name="agent_layer",
    aliases=("agent_attention_2d",),
    family="linear",
    kind="grid",
    catalog="P014",
    title="Agent Attention: On the Integration of Softmax and Linear Attention",
    arxiv="2312.08874",
    code="https://github.com/LeapLabTHU/Agent-Attention",
    summary="Agent attention block on a token grid: pooled agents, agent biases, depthwise-conv term, projection.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(H W m d), memory O(H W m)",
    fast=agent_fast,
    module=_agent_layer,
    options=(
        Option("agents", 49, int, low=1, doc="agent tokens m (a perfect square: the grid is pooled to sqrt(m)^2)"),
        Option("grid", 14, int, low=1, doc="grid side the row/column bias tables are sized for"),
        Option("qkv_bias", False, bool, doc="bias of the q/k/v projection"),
        Option("agent_bias", True, bool, doc="the learned agent biases B1, B2"),
    ),
    test_options={"agents": 4, "grid": 6},
    notes="x (B, H, W, C) channels-last; other grid sizes resize the bias tables (7x7 bilinear, rows/cols linear).",
))
