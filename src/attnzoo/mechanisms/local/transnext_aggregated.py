"""TransNeXt aggregated attention (pixel-focused attention).

Paper: "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", Shi, arXiv 2311.17132
(catalog P115). Official code: https://github.com/DaiShiResearch/TransNeXt
(``classification/transnext_native.py``, class ``AggregatedAttention``; confirmed against it).
Every query attends, in ONE softmax, to its k x k sliding-window neighbours (fine, zero-padded and masked at
the border) and to P = Ph x Pw pooled tokens of the whole map (coarse). With length-scaled cosine attention:

    q_hat  = (L2(q) + query_embedding) * softplus(temperature) * log(n_local + P)
    logits = [q_hat . L2(k_local) + rpb_local,  q_hat . L2(k_pool) + CPB(rel. coords to pooled tokens)]
    A      = softmax(logits)
    out    = (A_local + L2(q) . learnable_tokens + learnable_bias) V_local + A_pool V_pool

n_local is the number of in-image neighbours of the query (fewer at the border). The pooled tokens are
LayerNorm(AdaptiveAvgPool(GELU(sr(x)))) with sr a 1x1 convolution, projected by the same kv Linear. The
continuous position bias CPB is an MLP (2 -> 512 -> heads) of the log-spaced relative coordinates
sign(t) log2(|t| + 1) / log2(8), t = 8 (query - pooled-token centre) / (pretrain_size - 1) per axis.

Choices and differences from the official code:
- The relative coordinates, the border mask and the length scale are computed from the grid size at forward
  time (the official module fixes them for one input resolution at construction). ``pretrain_size``
  defaults to the grid size, as the official default (pretrain = img size); an axis of length 1 uses a
  denominator of 1 instead of 0.
- ``pool_size`` is given directly (the official code derives it as input_resolution // sr_ratio; 7 x 7 for
  every stage of the ImageNet models). ``cpb_hidden`` (512) is exposed for small models. Dropouts omitted.

Forms: ``reference`` = dense softmax over all H*W tokens plus the P pooled ones, with the local window mask
built from :func:`attnzoo.masks.sliding_window` on rows and columns, the local bias and the learnable-token
weights scattered densely; ``fast`` = the official unfold computation (k^2 gathered neighbours per query, P
pooled keys), O(HW (k^2 + P) d), never the HW x HW matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_bool, check_heads, check_int, check_module_input, check_pair
from ...masks import Predicate, materialize, sliding_window
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register


def window_2d(height: int, width: int, window: int) -> Predicate:
    """Predicate over flattened indices: key within the (window x window) square centred on the query
    (clipped at the border): |dy| <= window // 2 and |dx| <= window // 2 (window odd)."""
    rows = sliding_window(window // 2 + 1, causal=False)
    cols = sliding_window(window // 2 + 1, causal=False)

    def window_2d_mask(b, h, q_idx, kv_idx):
        qr, qc = torch.div(q_idx, width, rounding_mode="floor"), torch.remainder(q_idx, width)
        kr, kc = torch.div(kv_idx, width, rounding_mode="floor"), torch.remainder(kv_idx, width)
        return rows(b, h, qr, kr) & cols(b, h, qc, kc)

    return window_2d_mask


def local_geometry(height: int, width: int, window: int, device=None):
    """Neighbour indices into the zero-padded grid (N*k^2,), the border mask (N, k^2) True = outside the
    image, and the number of in-image neighbours (N,)."""
    r = window // 2
    Wp = width + 2 * r
    rows = torch.arange(height, device=device).view(height, 1) + torch.arange(window, device=device).view(1, window)
    cols = torch.arange(width, device=device).view(width, 1) + torch.arange(window, device=device).view(1, window)
    idx = (rows.view(height, 1, window, 1) * Wp + cols.view(1, width, 1, window)).reshape(-1)  # (H*W*k*k,)
    out_r = (rows < r) | (rows >= height + r)  # (H, k) padded-grid row outside the image
    out_c = (cols < r) | (cols >= width + r)
    outside = (out_r.view(height, 1, window, 1) | out_c.view(1, width, 1, window)).reshape(height * width, -1)
    return idx, outside, (~outside).sum(-1)


@torch.no_grad()
def relative_position_cpb(query_size, key_size, pretrain_size, device=None):
    """Index (N*P,) into a table of unique log-spaced relative coordinates (U, 2), as the official
    ``get_relative_position_cpb``: pooled-token centres are the adaptive-average-pooled pixel coordinates."""
    (qh, qw), (kh, kw), (ph, pw) = query_size, key_size, pretrain_size
    axis_qh = torch.arange(qh, dtype=torch.float32, device=device)
    axis_qw = torch.arange(qw, dtype=torch.float32, device=device)
    axis_kh = F.adaptive_avg_pool1d(axis_qh.view(1, 1, -1), kh).view(-1)
    axis_kw = F.adaptive_avg_pool1d(axis_qw.view(1, 1, -1), kw).view(-1)
    kh_, kw_ = torch.meshgrid(axis_kh, axis_kw, indexing="ij")
    qh_, qw_ = torch.meshgrid(axis_qh, axis_qw, indexing="ij")
    rel_h = (qh_.reshape(-1, 1) - kh_.reshape(1, -1)) / max(ph - 1, 1) * 8
    rel_w = (qw_.reshape(-1, 1) - kw_.reshape(1, -1)) / max(pw - 1, 1) * 8
    rel = torch.stack([rel_h, rel_w], dim=-1).view(-1, 2)  # (N*P, 2)
    table, idx = torch.unique(rel, return_inverse=True, dim=0)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return idx, table


def aggregated_fast(q_hat, q_norm, k, v, k_pool, v_pool, local_bias, pool_bias, tokens, token_bias, *, window):
    """Official unfold form. q_hat, q_norm, k (unit), v: (B, h, H, W, d); k_pool (unit), v_pool (B, h, P, d);
    local_bias (h, k^2); pool_bias (h, N, P); tokens (h, d, k^2) and token_bias (h, 1, k^2) or None.
    Returns (B, h, H, W, d)."""
    B, h, H, W, d = q_hat.shape
    N, K = H * W, window * window
    idx, outside, _ = local_geometry(H, W, window, q_hat.device)
    r = window // 2
    unfold = lambda t: F.pad(t, (0, 0, r, r, r, r)).reshape(B, h, -1, t.shape[-1]).index_select(2, idx).view(
        B, h, N, K, t.shape[-1])  # (B, h, N, k^2, d), zeros outside the image
    k_loc, v_loc = unfold(k), unfold(v)
    qh = q_hat.reshape(B, h, N, d)
    a_loc = torch.einsum("bhnd,bhnkd->bhnk", qh, k_loc) + local_bias.view(1, h, 1, K)  # (B, h, N, k^2)
    a_loc = a_loc.masked_fill(outside.view(1, 1, N, K), float("-inf"))
    a_pool = torch.matmul(qh, k_pool.transpose(-1, -2)) + pool_bias.unsqueeze(0)  # (B, h, N, P)
    attn = torch.cat([a_loc, a_pool], dim=-1).softmax(dim=-1)  # (B, h, N, k^2 + P): one softmax
    a_loc, a_pool = attn[..., :K], attn[..., K:]
    if tokens is not None:
        a_loc = a_loc + torch.matmul(q_norm.reshape(B, h, N, d), tokens.unsqueeze(0)) + token_bias.unsqueeze(0)
    out = torch.einsum("bhnk,bhnkd->bhnd", a_loc, v_loc) + torch.matmul(a_pool, v_pool)  # (B, h, N, d)
    return out.view(B, h, H, W, -1)


def aggregated_reference(q_hat, q_norm, k, v, k_pool, v_pool, local_bias, pool_bias, tokens, token_bias, *, window):
    """Dense: one softmax of every query over all H*W tokens (window mask) and the P pooled tokens."""
    B, h, H, W, d = q_hat.shape
    N, P, r = H * W, k_pool.shape[2], window // 2
    device = q_hat.device
    local = materialize(window_2d(H, W, window), 1, 1, N, N, device=device)  # (1, 1, N, N)
    mask = torch.cat([local, torch.ones(1, 1, N, P, dtype=torch.bool, device=device)], dim=-1)  # (1, 1, N, N+P)
    rr = torch.arange(H, device=device).view(H, 1).expand(H, W).reshape(-1)
    cc = torch.arange(W, device=device).view(1, W).expand(H, W).reshape(-1)
    dy = (rr.view(1, N) - rr.view(N, 1) + r).clamp(0, window - 1)  # key minus query, shifted to >= 0
    dx = (cc.view(1, N) - cc.view(N, 1) + r).clamp(0, window - 1)
    offset = dy * window + dx  # (N, N) position in the query's k x k window
    bias = torch.cat([local_bias[:, offset], pool_bias], dim=-1).unsqueeze(0)  # (1, h, N, N + P)
    flat = lambda t: t.reshape(B, h, N, t.shape[-1])
    keys = torch.cat([flat(k), k_pool], dim=2)  # (B, h, N + P, d)
    vals = torch.cat([flat(v), v_pool], dim=2)
    out = softmax_attention(flat(q_hat), keys, vals, attn_mask=mask, bias=bias.to(q_hat.dtype), scale=1.0)
    if tokens is not None:
        w = torch.matmul(flat(q_norm), tokens.unsqueeze(0)) + token_bias.unsqueeze(0)  # (B, h, N, k^2)
        dense = w.gather(-1, offset.view(1, 1, N, N).expand(B, h, N, N)) * local  # (B, h, N, N), 0 off-window
        out = out + torch.matmul(dense, flat(v))
    return out.view(B, h, H, W, -1)


class AggregatedAttention(nn.Module):
    """TransNeXt aggregated attention, ``x (B, H, W, dim) -> (B, H, W, dim)``.

    Args:
        dim, heads: channels and heads (dim % heads == 0).
        window_size: odd side k of the sliding window (default 3). pool_size: int or (Ph, Pw), pooled grid
            (default 7). qkv_bias: default True. cpb_hidden: CPB MLP width (default 512).
        pretrain_size: int or pair, the grid size the CPB coordinates are normalised by (default: the input's).
        backend: "auto", "fast" or "reference".
    """

    def __init__(self, dim: int, heads: int, *, window_size: int = 3, pool_size=7, qkv_bias: bool = True,
                 cpb_hidden: int = 512, pretrain_size=None, backend: str = "auto") -> None:
        super().__init__()
        dim, heads, _, _ = check_heads(dim, heads)
        check_int("window_size", window_size)
        check_int("cpb_hidden", cpb_hidden)
        if window_size % 2 == 0:
            raise ValueError(f"window_size: expected an odd int (a window centred on the query), got {window_size}")
        check_bool("qkv_bias", qkv_bias)
        check_backend(backend)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window, self.pool_size = window_size, check_pair("pool_size", pool_size)
        self.pretrain_size = None if pretrain_size is None else check_pair("pretrain_size", pretrain_size)
        self.backend = backend
        K = window_size * window_size
        self.temperature = nn.Parameter(torch.full((heads, 1, 1), math.log(math.expm1(1 / 0.24))))  # softplus = 1/0.24
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, 1, self.head_dim), std=0.02))
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Linear(dim, dim)  # the 1x1 convolution on channels-last grids
        self.norm = nn.LayerNorm(dim)
        self.cpb_fc1 = nn.Linear(2, cpb_hidden)
        self.cpb_fc2 = nn.Linear(cpb_hidden, heads)
        self.relative_pos_bias_local = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, K), std=0.0004))
        self.learnable_tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, self.head_dim, K), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(heads, 1, K))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, window_size={self.window}, pool_size={self.pool_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_module_input(self, x, layout="(B, H, W, C)", channels=self.dim)
        B, H, W, C = x.shape
        check_backend(self.backend)
        h, d, N = self.heads, self.head_dim, H * W
        Ph, Pw = self.pool_size
        split = lambda t: t.reshape(B, -1, h, d).permute(0, 2, 1, 3)  # (B, h, tokens, d)
        _, _, count = local_geometry(H, W, self.window, x.device)
        length_scale = torch.log(count.to(x.dtype) + Ph * Pw).view(1, 1, N, 1)  # log(n_local + P) per query
        q_norm = F.normalize(split(self.q(x)), dim=-1)  # (B, h, N, d)
        q_hat = (q_norm + self.query_embedding) * F.softplus(self.temperature) * length_scale  # (B, h, N, d)
        k, v = self.kv(x).chunk(2, dim=-1)
        k = F.normalize(split(k), dim=-1)  # (B, h, N, d)
        v = split(v)
        pooled = F.adaptive_avg_pool2d(F.gelu(self.sr(x)).permute(0, 3, 1, 2), (Ph, Pw))  # (B, C, Ph, Pw)
        pooled = self.norm(pooled.flatten(2).transpose(1, 2))  # (B, P, C)
        k_pool, v_pool = self.kv(pooled).chunk(2, dim=-1)
        k_pool, v_pool = F.normalize(split(k_pool), dim=-1), split(v_pool)  # (B, h, P, d)
        idx, table = relative_position_cpb((H, W), (Ph, Pw), self.pretrain_size or (H, W), device=x.device)
        cpb = self.cpb_fc2(torch.relu(self.cpb_fc1(table.to(x.dtype))))  # (U, heads)
        pool_bias = cpb.t()[:, idx].view(h, N, Ph * Pw)  # (h, N, P)
        grid = lambda t: t.view(B, h, H, W, d)
        fn = aggregated_reference if self.backend == "reference" else aggregated_fast
        out = fn(grid(q_hat), grid(q_norm), grid(k), grid(v), k_pool, v_pool, self.relative_pos_bias_local, pool_bias,
                 self.learnable_tokens, self.learnable_bias, window=self.window)  # (B, h, H, W, d)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))  # (B, H, W, dim)


TRANSNEXT_AGGREGATED = register(Mechanism(
    name="transnext_aggregated",
    aliases=("transnext", "aggregated_attention", "pixel_focused_attention"),
    family="local",
    kind="grid",
    catalog="P115",
    title="TransNeXt: Robust Foveal Visual Perception for Vision Transformers",
    arxiv="2311.17132",
    code="https://github.com/DaiShiResearch/TransNeXt",
    summary="One softmax over k x k sliding-window keys and P pooled keys, length-scaled cosine attention with a "
            "query embedding, learnable tokens and a continuous position bias.",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(HW (k^2 + P) d), memory O(HW (k^2 + P))",
    fast=aggregated_fast,
    module=AggregatedAttention,
    options=(
        Option("window_size", 3, int, low=1, doc="odd sliding-window side k"),
        Option("pool_size", 7, int, low=1, doc="pooled grid side (a pair is accepted by the module)"),
        Option("qkv_bias", True, bool, doc="bias of the q and kv projections"),
        Option("cpb_hidden", 512, int, low=1, doc="hidden width of the continuous position bias MLP"),
        Option("pretrain_size", None, int, low=2, allow_none=True, doc="grid size normalising the CPB coordinates"),
    ),
    test_options={"window_size": 3, "pool_size": 2, "cpb_hidden": 8},
    test_sizes={"height": 5, "width": 6},
    notes="kind 'grid': x (B, H, W, C) -> (B, H, W, C). Not plain softmax attention: learnable tokens add "
          "query-dependent, unnormalised weights on the local values.",
))
