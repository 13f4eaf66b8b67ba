"""ComplexFormer: complex multi-head attention (CMHA) with head-specific adaptive rotations.

Paper: "ComplexFormer: Disruptively Advancing Transformer Inference Ability via Head-Specific Complex
Vector Attention", arXiv 2505.10222 -- WITHDRAWN from arXiv (v2, May 2025). Official code: none.
This implementation follows the abstract and attnzoo's CATALOG entry only; every detail below beyond
"per-head Euler transform to polar form" and "exp[i(Adapt(AS_mn) + Delta(P_mn))]" is our choice.

Each head pairs the query/key channels (2j, 2j+1) into complex numbers in polar form (r, theta) and scores

    score_mn = scale * sum_j r_q,mj r_k,nj cos(Adapt_h(theta_q,mj - theta_k,nj) + Delta_h(m - n)_j)

then softmax and values as usual.

Choices (options):
- ``adapt="affine"`` (default): Adapt_h(a)_j = alpha_hj * a + beta_hj, alpha initialised to 1 and beta
  to 0; ``"identity"`` fixes Adapt to the identity.
- Delta_h(p)_j = p * omega_hj with head-specific frequencies omega initialised to RoPE's
  base^(-2j/d) (``rope_base``), learned when ``learn_frequencies`` (default True).
- Angles are atan2 in (-pi, pi]; the difference is not wrapped (for alpha != 1 the map depends on the
  branch, as any angle scaling does). At r = 0 the angle is taken as 0 and the gradient of r as 0.
- Positions are bottom-right aligned: query i sits at key position i + Nk - Nq (decoding continues
  from the cache length). Grouped-query attention: alpha and omega belong to key/value heads (shared by
  their query group), beta to query heads, so keys are cached once per key/value head.

At init (alpha = 1, beta = 0, omega = RoPE) the mechanism is exactly RoPE attention; with omega = 0 it is
plain dot-product attention (Re(z_q conj z_k) = q . k).

Forms: the reference sums r r cos(...) over an explicit (B, H, Nq, Nk, d/2) tensor of angle
differences. The fast form uses cos(a - b) = cos a cos b + sin a sin b: queries and keys are re-embedded
as (r cos phi, r sin phi) with phi_q = alpha theta_q + omega m + beta and phi_k = alpha theta_k + omega n,
and fed to fused SDPA -- exact, O(N) memory. Decoding caches the re-embedded keys (KV cache).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import check_backend, check_heads, check_pattern_flag, check_sequence_call
from ...kernels.sdpa import sdpa
from ...reference import acc_dtype, dense_mask, repeat_kv
from ...registry import PATTERNS, CrossSpec, Mechanism, Option, register
from ...state import KVCache
from ._common import masked_softmax, merge_heads, projection_kv_cache, split_heads


def polar(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (x_2j, x_2j+1) as complex numbers: (..., d) -> modulus r, angle theta, each (..., d/2).

    Exact zeros get angle 0 and a zero gradient for r (instead of NaN from 0/0)."""
    re, im = x[..., 0::2], x[..., 1::2]  # (..., d/2)
    r2 = re * re + im * im
    nz = r2 > 0
    r = torch.sqrt(torch.where(nz, r2, torch.ones_like(r2))) * nz  # (..., d/2)
    theta = torch.atan2(torch.where(nz, im, torch.zeros_like(im)), torch.where(nz, re, torch.ones_like(re)))
    return r, theta


def rope_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """(d/2,) RoPE frequencies base^(-2j/d)."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def embed(r: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """(r, phi) each (..., d/2) -> interleaved real vector (..., d) = [r cos phi, r sin phi] per pair."""
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi)], dim=-1).flatten(-2)


class ComplexMultiHeadAttention(nn.Module):
    """CMHA: x (B, N, dim) [, context (B, M, dim)] -> (B, N, dim)."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 adapt: str = "affine", learn_frequencies: bool = True, rope_base: float = 10000.0,
                 backend: str = "auto") -> None:
        super().__init__()
        mech = COMPLEXFORMER
        self.dim, self.heads, self.kv_heads, self.head_dim = check_heads(
            dim, heads, kv_heads, gqa=True, what=f"mechanism {mech.name!r}")
        if self.head_dim % 2:
            raise ValueError(f"heads: the head dim dim/heads = {self.head_dim} must be even (channels are paired "
                             f"into complex numbers); got dim={dim}, heads={heads}")
        self.causal = check_pattern_flag(mech, causal)
        opts = mech.resolve_options({"adapt": adapt, "learn_frequencies": learn_frequencies,
                                     "rope_base": rope_base})
        self.adapt = opts["adapt"]
        self.backend = check_backend(backend)
        H, Hk, d = self.heads, self.kv_heads, self.head_dim
        self.q_proj = nn.Linear(self.dim, H * d, bias=False)
        self.k_proj = nn.Linear(self.dim, Hk * d, bias=False)
        self.v_proj = nn.Linear(self.dim, Hk * d, bias=False)
        self.o_proj = nn.Linear(H * d, self.dim, bias=False)
        omega = rope_frequencies(d, opts["rope_base"]).to(torch.get_default_dtype()).repeat(Hk, 1)  # (Hk, d/2)
        if opts["learn_frequencies"]:
            self.omega = nn.Parameter(omega)
        else:
            self.register_buffer("omega", omega)
        if self.adapt == "affine":
            self.alpha = nn.Parameter(torch.ones(Hk, d // 2))
            self.beta = nn.Parameter(torch.zeros(H, d // 2))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, causal={self.causal}, "
                f"adapt={self.adapt!r}")

    def _params(self, dtype):
        g = self.heads // self.kv_heads
        omega = self.omega.to(dtype)  # (Hk, d/2)
        if self.adapt == "affine":
            alpha, beta = self.alpha.to(dtype), self.beta.to(dtype)
        else:
            alpha = torch.ones_like(omega)
            beta = torch.zeros(self.heads, omega.shape[1], dtype=dtype, device=omega.device)
        return alpha, beta, omega, g

    def query_angles(self, q: torch.Tensor, positions: torch.Tensor):
        """q (B, H, N, d), positions (N,) -> r, phi_q (B, H, N, d/2) with phi_q = alpha theta + omega m + beta."""
        alpha, beta, omega, g = self._params(q.dtype)
        r, theta = polar(q)
        a = alpha.repeat_interleave(g, 0).unsqueeze(1)  # (H, 1, d/2)
        w = omega.repeat_interleave(g, 0).unsqueeze(1)  # (H, 1, d/2)
        return r, a * theta + w * positions.view(-1, 1).to(q.dtype) + beta.unsqueeze(1)

    def key_angles(self, k: torch.Tensor, positions: torch.Tensor):
        """k (B, Hk, M, d), positions (M,) -> r, phi_k (B, Hk, M, d/2) with phi_k = alpha theta + omega n."""
        alpha, _, omega, _ = self._params(k.dtype)
        r, theta = polar(k)
        return r, alpha.unsqueeze(1) * theta + omega.unsqueeze(1) * positions.view(-1, 1).to(k.dtype)

    def scores_reference(self, q, k, q_pos, k_pos):
        """Explicit scores (B, H, Nq, Nk) = scale sum_j r r cos(Adapt(theta_q - theta_k) + omega (m - n))."""
        alpha, beta, omega, g = self._params(q.dtype)
        rq, tq = polar(q)  # (B, H, Nq, d/2)
        rk, tk = polar(repeat_kv(k, g))  # (B, H, Nk, d/2)
        a = alpha.repeat_interleave(g, 0).view(1, self.heads, 1, 1, -1)  # (1, H, 1, 1, d/2)
        w = omega.repeat_interleave(g, 0).view(1, self.heads, 1, 1, -1)
        b = beta.view(1, self.heads, 1, 1, -1)
        dtheta = tq.unsqueeze(3) - tk.unsqueeze(2)  # (B, H, Nq, Nk, d/2): semantic angle differences
        dpos = (q_pos.view(-1, 1) - k_pos.view(1, -1)).to(q.dtype).view(1, 1, q.shape[2], k.shape[2], 1)
        angle = a * dtheta + b + w * dpos  # (B, H, Nq, Nk, d/2): Adapt(AS) + Delta(P)
        mag = rq.unsqueeze(3) * rk.unsqueeze(2)  # (B, H, Nq, Nk, d/2)
        return (mag * torch.cos(angle)).sum(-1) / math.sqrt(self.head_dim)  # (B, H, Nq, Nk)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences (causal modules only)."""
        return projection_kv_cache(self, batch_size, dtype, device)

    def forward(self, x, context=None, *, key_padding_mask=None, state=None):
        src = check_sequence_call(self, x, context, key_padding_mask=key_padding_mask, state=state,
                                  state_type=KVCache, mech=COMPLEXFORMER)
        B, N, _ = x.shape
        q = split_heads(self.q_proj(x), self.heads)  # (B, H, N, d)
        k = split_heads(self.k_proj(src), self.kv_heads)  # (B, Hk, M, d)
        v = split_heads(self.v_proj(src), self.kv_heads)  # (B, Hk, M, d)
        scale = 1.0 / math.sqrt(self.head_dim)
        if state is not None:  # keys cached re-embedded at their absolute positions
            start = state.seq_len
            pos = torch.arange(start, start + N, device=x.device)
            rk, pk = self.key_angles(k, pos)
            keys, values, kpm = state.append(embed(rk, pk), v, key_padding_mask)  # (B, Hk, L, d)
            rq, pq = self.query_angles(q, pos)
            out = sdpa(embed(rq, pq), keys, values, causal=True, key_padding_mask=kpm, scale=scale)
            return self.o_proj(merge_heads(out)), state
        M = src.shape[1]
        k_pos = torch.arange(M, device=x.device)
        q_pos = torch.arange(N, device=x.device) + (M - N)  # bottom-right aligned
        if self.backend == "reference":
            acc = acc_dtype(x.dtype)
            scores = self.scores_reference(q.to(acc), k.to(acc), q_pos, k_pos)  # (B, H, N, M)
            mask = dense_mask(B, self.heads, N, M, causal=self.causal, key_padding_mask=key_padding_mask,
                              device=x.device)
            probs = masked_softmax(scores, mask)  # (B, H, N, M)
            out = torch.matmul(probs, repeat_kv(v, self.heads // self.kv_heads).to(acc)).to(x.dtype)
        else:
            out = complexformer_fast(self, q, k, v, q_pos, k_pos, causal=self.causal,
                                     key_padding_mask=key_padding_mask, scale=scale)
        return self.o_proj(merge_heads(out))  # (B, N, dim)


def complexformer_fast(module, q, k, v, q_pos, k_pos, *, causal, key_padding_mask, scale):
    """Re-embed queries (r cos phi_q, r sin phi_q) and keys (r cos phi_k, r sin phi_k); fused SDPA."""
    rq, pq = module.query_angles(q, q_pos)  # (B, H, N, d/2)
    rk, pk = module.key_angles(k, k_pos)  # (B, Hk, M, d/2)
    return sdpa(embed(rq, pq), embed(rk, pk), v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def build_complexformer(dim, heads, *, kv_heads=None, causal=False, **options):
    return ComplexMultiHeadAttention(dim, heads, kv_heads=kv_heads, causal=causal, **options)


COMPLEXFORMER = register(Mechanism(
    name="complexformer",
    aliases=("cmha", "complex_multihead_attention"),
    family="dense",
    catalog="P020",
    title="ComplexFormer: Disruptively Advancing Transformer Inference Ability via Head-Specific Complex "
          "Vector Attention (withdrawn from arXiv)",
    arxiv="2505.10222",
    code="",
    summary="Polar-form (complex) q/k per head; score r r cos(Adapt_h(dtheta) + omega_h (m-n)) with learned "
            "per-head angle map and frequencies; RoPE at init. From the abstract only (paper withdrawn).",
    patterns=PATTERNS,
    exact=False,
    state="kv",
    complexity="time O(Nq Nk d), memory O(Nq + Nk) fused (O(Nq Nk d) reference); decode state O(N)",
    module=build_complexformer,
    fast=complexformer_fast,
    options=(
        Option("adapt", "affine", str, choices=("affine", "identity"),
               doc="Adapt_h(dtheta) = alpha dtheta + beta (learned) or the identity"),
        Option("learn_frequencies", True, bool, doc="learn the per-head frequencies omega (RoPE init)"),
        Option("rope_base", 10000.0, float, low=1.0, doc="base of the initial frequencies base^(-2j/d)"),
    ),
    test_options={"adapt": "affine"},
    notes="Implemented from the abstract and CATALOG only: the arXiv paper was withdrawn (v2, May 2025) "
          "and no code was released. adapt='identity' is exactly RoPE attention.",
    # queries sit at index positions (bottom-right) and are rotated by them: an output depends on where it sits
    cross=CrossSpec(query_independent=False),
))
