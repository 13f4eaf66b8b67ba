"""RCMHA: relative convolutional multi-head attention.

Paper: "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling", Sugiharto,
Aradea, Mubarok, arXiv 2308.03429. Official code: none found.
Two changes to multi-head attention: a depth-wise 1-D convolution along the sequence produces the
queries, keys and values (as Primer's multi-DConv-head attention), and the scores get Transformer-XL's
relative positional terms:

    A_ij = [(q_i + u) . k_j + (q_i + v) . (W_R r_{i-j})] / sqrt(d),   softmax_j,   O = A V W_O

with r the sinusoidal embedding of the signed distance i - j (dimension ``dim``), W_R a per-head
projection and u, v learned per-head biases.

Choices (options; the abstract and catalog leave them open):
- ``conv_input="projections"`` (default, the catalog's reading and Primer's MDHA): each of the q/k/v
  projections is convolved, channel by channel; ``"embeddings"``: one depth-wise convolution of the input
  embedding before the (shared-input) projections ("applied to the input embedding").
- ``kernel_size`` 3 (Primer's), no bias; causal modules pad on the left (output t sees inputs <= t),
  non-causal ones pad symmetrically ("same"). PyTorch's default init (not the identity).
- u and v initialised to zero, W_R as a default ``nn.Linear`` (no bias).
- Key padding: padded tokens are zeroed before the convolution (so they reach no neighbour's q/k/v, like
  the causal zero padding at the start) and masked as keys.
- Self attention only (the convolution runs along the one sequence), both non-causal and causal.

Forms: the reference gathers W_R r_{i-j} for every (i, j) pair and writes both score terms out; the fast
form computes the position term on the 2N-1 distinct distances (Transformer-XL's trick), adds it as a float
bias and runs PyTorch's SDPA on (q + u, k, v) -- still O(N^2) memory for the bias. Decoding keeps a KV
cache and the last ``kernel_size - 1`` pre-convolution rows (:class:`TokenHistoryCache`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_heads, check_pattern_flag, check_sequence_call
from ...reference import acc_dtype, dense_mask
from ...registry import Mechanism, Option, register
from ._common import TokenHistoryCache, masked_softmax, merge_heads, sinusoid, split_heads


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Depth-wise 1-D convolution along the sequence: x (B, N, F), weight (F, k) -> (B, N, F).

    Output t = sum_s weight[:, s] * x[t - (k - 1) + s] (causal) or centred at t ("same")."""
    k = weight.shape[1]
    left = k - 1 if causal else (k - 1) // 2
    xt = F.pad(x.transpose(1, 2), (left, k - 1 - left))  # (B, F, N + k - 1)
    return F.conv1d(xt, weight.unsqueeze(1), groups=weight.shape[0]).transpose(1, 2)  # (B, N, F)


class RelativeConvolutionalMHA(nn.Module):
    """RCMHA: x (B, N, dim) -> (B, N, dim). Decoding: ``state = m.init_state(batch)``,
    ``out, state = m(x_new, state=state)``."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 kernel_size: int = 3, conv_input: str = "projections", backend: str = "auto") -> None:
        super().__init__()
        mech = RCMHA
        self.dim, self.heads, _, self.head_dim = check_heads(
            dim, heads, kv_heads, gqa=False, what=f"mechanism {mech.name!r}")
        self.causal = check_pattern_flag(mech, causal)
        opts = mech.resolve_options({"kernel_size": kernel_size, "conv_input": conv_input})
        self.kernel_size, self.conv_input = opts["kernel_size"], opts["conv_input"]
        self.backend = check_backend(backend)
        D, H, d = self.dim, self.heads, self.head_dim
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, H * d, bias=False)
        self.v_proj = nn.Linear(D, H * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        width = 3 * H * d if self.conv_input == "projections" else D
        conv = nn.Conv1d(width, width, self.kernel_size, groups=width, bias=False)  # PyTorch default init
        self.conv_weight = nn.Parameter(conv.weight.detach().squeeze(1))  # (width, k)
        self.r_proj = nn.Linear(D, H * d, bias=False)  # W_R
        self.u = nn.Parameter(torch.zeros(H, d))
        self.v = nn.Parameter(torch.zeros(H, d))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, causal={self.causal}, kernel_size={self.kernel_size}, "
                f"conv_input={self.conv_input!r}")

    # -- pieces --------------------------------------------------------------------------------------
    def _conv_stream(self, x: torch.Tensor) -> torch.Tensor:
        """What the convolution reads: the three projections (B, N, 3 H d) or the embedding (B, N, dim)."""
        if self.conv_input == "projections":
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return x

    def _qkv_from_conv(self, c: torch.Tensor):
        """Convolved stream (B, N, F) -> q, k, v each (B, H, N, d)."""
        if self.conv_input == "projections":
            q, k, v = c.split(self.heads * self.head_dim, dim=-1)
        else:
            q, k, v = self.q_proj(c), self.k_proj(c), self.v_proj(c)
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)

    def position_table(self, distances: torch.Tensor, dtype) -> torch.Tensor:
        """W_R r_p for signed distances p (P,) -> (P, H, d)."""
        r = sinusoid(distances.to(dtype), self.dim)  # (P, dim)
        return self.r_proj(r.to(self.r_proj.weight.dtype)).to(dtype).view(-1, self.heads, self.head_dim)

    def relative_term_reference(self, q: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(q_i + v) . W_R r_{i-j} for every pair, gathered explicitly: (B, H, Nq, Nk)."""
        dist = q_pos.view(-1, 1) - k_pos.view(1, -1)  # (Nq, Nk) signed distances i - j
        lo = int(dist.min())
        table = self.position_table(torch.arange(lo, int(dist.max()) + 1, device=q.device), q.dtype)  # (P, H, d)
        R = table[dist - lo]  # (Nq, Nk, H, d): W_R r_{i-j} for each pair
        return torch.einsum("bhid,ijhd->bhij", q + self.v.to(q.dtype).unsqueeze(1), R)  # (B, H, Nq, Nk)

    def relative_term_fast(self, q: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Same, computed on the distinct distances only and gathered afterwards (Transformer-XL)."""
        dist = q_pos.view(-1, 1) - k_pos.view(1, -1)  # (Nq, Nk)
        lo = int(dist.min())
        table = self.position_table(torch.arange(lo, int(dist.max()) + 1, device=q.device), q.dtype)  # (P, H, d)
        bd = torch.einsum("bhid,phd->bhip", q + self.v.to(q.dtype).unsqueeze(1), table)  # (B, H, Nq, P)
        idx = (dist - lo).view(1, 1, *dist.shape).expand(q.shape[0], self.heads, -1, -1)
        return torch.gather(bd, 3, idx)  # (B, H, Nq, Nk)

    def attend(self, q, k, v, q_pos, k_pos, key_padding_mask, causal):
        """Scores of both terms, masked softmax, values. q (B, H, Nq, d), k/v (B, H, Nk, d)."""
        B, H, Nq, d = q.shape
        Nk = k.shape[2]
        scale = 1.0 / math.sqrt(d)
        # Positions are explicit (decoding continues from the cache length): causal means k_pos <= q_pos.
        causal_mask = (k_pos.view(1, -1) <= q_pos.view(-1, 1)).view(1, 1, Nq, Nk) if causal else None
        mask = dense_mask(B, H, Nq, Nk, key_padding_mask=key_padding_mask, attn_mask=causal_mask, device=q.device)
        u = self.u.to(q.dtype).unsqueeze(1)  # (H, 1, d)
        if self.backend == "reference":
            acc = acc_dtype(q.dtype)
            qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
            content = torch.matmul(qa + u.to(acc), ka.transpose(-2, -1))  # (B, H, Nq, Nk): (q_i + u) . k_j
            position = self.relative_term_reference(qa, q_pos, k_pos)  # (B, H, Nq, Nk)
            probs = masked_softmax((content + position) * scale, mask)
            return torch.matmul(probs, va).to(q.dtype)  # (B, H, Nq, d)
        return rcmha_fast(q + u, k, v, self.relative_term_fast(q, q_pos, k_pos) * scale, mask, scale)

    # -- module API -----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None) -> TokenHistoryCache:
        if not self.causal:
            raise ValueError("causal: decoding needs a causal module; build it with causal=True")
        w = self.q_proj.weight
        return TokenHistoryCache(batch_size, self.heads, self.head_dim, self.head_dim,
                                 features=self.conv_weight.shape[0], keep=self.kernel_size - 1,
                                 dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, x, context=None, *, key_padding_mask=None, state=None):
        if context is not None:
            raise ValueError("context: RCMHA convolves one sequence (self attention only); got a context")
        check_sequence_call(self, x, None, key_padding_mask=key_padding_mask, state=state, state_type=TokenHistoryCache,
                            mech=RCMHA)
        B, N, _ = x.shape
        stream = self._conv_stream(x)  # (B, N, F)
        if key_padding_mask is not None:
            stream = stream * key_padding_mask.unsqueeze(-1).to(stream.dtype)  # padded rows reach no one
        w = self.conv_weight.to(stream.dtype)
        if state is not None:
            start = state.seq_len
            hist, _ = state.extend_history(stream, key_padding_mask)  # (B, h + N, F), h <= k - 1
            conv = depthwise_conv(hist, w, causal=True)[:, -N:]  # (B, N, F): left zero padding = sequence start
            q, k, v = self._qkv_from_conv(conv)
            k, v, kpm = state.append(k, v, key_padding_mask)  # (B, H, L, d)
            q_pos = torch.arange(start, start + N, device=x.device)
            k_pos = torch.arange(k.shape[2], device=x.device)
            out = self.attend(q, k, v, q_pos, k_pos, kpm, causal=True)
            return self.o_proj(merge_heads(out)), state
        q, k, v = self._qkv_from_conv(depthwise_conv(stream, w, causal=self.causal))  # (B, H, N, d) each
        pos = torch.arange(N, device=x.device)
        out = self.attend(q, k, v, pos, pos, key_padding_mask, causal=self.causal)
        return self.o_proj(merge_heads(out))  # (B, N, dim)


def rcmha_fast(q, k, v, bias, mask, scale):
    """SDPA on (q + u, k, v) with the scaled relative term as a float bias and -inf where ``mask`` is False.

    Rows that see no key get an all-zero bias (finite, so no NaN reaches the backward) and a zero output."""
    B, H, Nq, _ = q.shape
    if mask is not None:
        mask = mask.expand(B, H, Nq, k.shape[2])
        visible = mask.any(dim=-1, keepdim=True)  # (B, H, Nq, 1)
        keep = mask | ~visible  # invisible rows: attend anywhere, zeroed below
        bias = bias.masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)  # (B, H, Nq, d)
    if mask is not None:
        out = torch.where(visible, out, torch.zeros((), dtype=out.dtype))
    return out


def build_rcmha(dim, heads, *, kv_heads=None, causal=False, **options):
    return RelativeConvolutionalMHA(dim, heads, kv_heads=kv_heads, causal=causal, **options)


RCMHA = register(Mechanism(
    name="rcmha",
    aliases=("relative_convolutional_mha",),
    family="dense",
    catalog="P007",
    title="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
    arxiv="2308.03429",
    code="",
    summary="Depth-wise convolved q/k/v (Primer MDHA) with Transformer-XL relative scores "
            "(q+u).k + (q+v).W_R r_{i-j}.",
    patterns=("noncausal_self", "causal_self"),
    exact=False,
    state="kv+history",
    complexity="time O(N^2 d), memory O(N^2) (the relative bias); decode state O(N)",
    module=build_rcmha,
    fast=rcmha_fast,
    options=(
        Option("kernel_size", 3, int, low=1, doc="depth-wise convolution width (causal: left padded)"),
        Option("conv_input", "projections", str, choices=("projections", "embeddings"),
               doc="convolve each q/k/v projection (Primer MDHA) or the input embedding once"),
    ),
    test_options={"kernel_size": 3},
    notes="Self attention only. kernel = identity (delta at the current token), W_R = 0 and u = v = 0 give "
          "standard multi-head attention.",
))
