"""TransNormerLLM's gated linear attention: Lightning attention with LRPE, SRMSNorm and an output gate.

Paper: "Scaling TransNormer to 175 Billion Parameters" (TransNormerLLM), Qin, Li, Sun, Sun, Shen, Han, Wei,
Lv, Luo, Qiao, Zhong, arXiv 2307.14995. Official code: https://github.com/OpenNLPLab/TransnormerLLM (model
code on the Hugging Face hub, OpenNLPLab/TransNormerLLM-7B, ``NormLinearAttention``).
The token mixer computes ``O = SRMSNorm([(Q K^T) (.) D] V) (.) U`` then ``W_o``: q, k = swish(x W_q), swish(x W_k),
v = x W_v, u = x W_u (one fused projection), LRPE doubles q and k to ``[x cos(theta t), x sin(theta t)]``
so that q_s.k_t carries cos(theta (s - t)), ``D_st = lambda^(s-t)`` is a fixed per-head decay, and
``SRMSNorm(x) = x / sqrt(mean(x^2) + eps)`` over the whole hidden width, with no weight. Training uses the
Lightning block algorithm (``lightning``), decoding the recurrent state ``kv <- lambda kv + k^T v``.

Facts taken from the official code where the CATALOG entry had a (?):
- decay ``lambda_h = exp(-slope_h (1 - l / (L - 1) + 1e-5))`` for head h of layer l of L, with ALiBi's
  slopes ``slope_h = 2^(-8 (h + 1) / H)`` (not ``8 h / H``); no score scale (q.k enters unscaled);
- the gate u is *not* activated in ``NormLinearAttention`` (the CATALOG's swish(x W_u) is the paper's
  figure; the ``tnl_attn`` example of lightning-attention uses sigmoid of a low-rank projection):
  ``gate`` chooses, default ``"none"`` as the released model;
- LRPE's theta is a learned (H, 1, head_dim) parameter initialised ``10000^(-2 i / hidden)``, positions
  start at 0 and continue from the decode state's length;
- SRMSNorm eps 1e-6, computed in float32 (or wider).
Choices where the code is silent: L = 1 (``num_layers=1``) uses the factor ``1 + 1e-5`` (the official formula
divides by zero); a padded key contributes nothing (the official code zeroes its v, which is the same).
Only the causal pattern is supported (the released model is a causal LM).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import check_backend, check_bool, check_int, check_sequence_call
from ...reference import acc_dtype
from ...registry import Mechanism, Option, register
from ...state import RecurrentState
from .lightning import alibi_slopes, lightning_fast, lightning_reference, lightning_step
from .linear_attention import CHUNK_OPTION, init_linear_state

GATES = ("none", "silu", "sigmoid")


def tnl_decay(heads: int, layer_idx: int, num_layers: int) -> list[float]:
    """Per-head decay of layer ``layer_idx`` of ``num_layers``: exp(-slope_h (1 - l / (L - 1) + 1e-5))."""
    factor = 1 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1 + 1e-5
    return [math.exp(-s * factor) for s in alibi_slopes(heads)]


def srms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Simple RMS norm: x / sqrt(mean(x^2) + eps) over the last axis, no weight, in float32 or wider."""
    xf = x.to(acc_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def lrpe(x: torch.Tensor, theta: torch.Tensor, offset: int) -> torch.Tensor:
    """LRPE: (B, H, N, d) -> (B, H, N, 2d) = [x cos(theta t), x sin(theta t)], t = offset .. offset + N - 1."""
    acc = acc_dtype(x.dtype)
    t = torch.arange(offset, offset + x.shape[2], device=x.device, dtype=acc).view(1, -1, 1)  # (1, N, 1)
    ang = theta.to(acc) * t  # (H, N, d)
    xf = x.to(acc)
    return torch.cat([xf * torch.cos(ang), xf * torch.sin(ang)], dim=-1).to(x.dtype)  # (B, H, N, 2d)


class TransNormerAttention(nn.Module):
    """TransNormerLLM's ``NormLinearAttention``: x (B, N, dim) -> (B, N, dim), causal.

    ``backend``: "reference" (the quadratic masked form), "fast"/"auto" (Lightning's block algorithm).
    Decoding: ``state = layer.init_state(batch)`` (a :class:`~attnzoo.state.RecurrentState` with ``kv``
    (B, H, F, head_dim), F = 2 head_dim with LRPE), then ``out, state = layer(x_new, state=state)``.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = True,
                 hidden_dim: int | None = None, lrpe: bool = True, layer_idx: int = 0, num_layers: int = 1,
                 gate: str = "none", norm_eps: float = 1e-6, bias: bool = False, chunk: int = 64,
                 backend: str = "auto") -> None:
        super().__init__()
        if causal is not True:
            raise ValueError(f"causal: TransNormerLLM's attention is causal (patterns ['causal_self']), "
                             f"got causal={causal!r}")
        dim, heads = check_int("dim", dim), check_int("heads", heads)
        if kv_heads is not None and kv_heads != heads:
            raise ValueError(f"kv_heads: TransNormerLLM has one key/value head per head, expected None or {heads}, "
                             f"got {kv_heads}")
        hidden = dim if hidden_dim is None else check_int("hidden_dim", hidden_dim)
        if hidden % heads:
            raise ValueError(f"hidden_dim: ({hidden}) must be divisible by heads, got heads={heads}")
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer_idx: expected 0 <= layer_idx < num_layers = {num_layers}, got {layer_idx}")
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {list(GATES)}, got {gate!r}")
        self.dim, self.heads, self.hidden, self.head_dim = dim, heads, hidden, hidden // heads
        self.use_lrpe, self.gate, self.norm_eps = check_bool("lrpe", lrpe), gate, norm_eps
        self.chunk, self.backend = check_int("chunk", chunk), check_backend(backend)
        self.decay = tnl_decay(heads, layer_idx, num_layers)  # python floats: immune to .to(dtype)
        self.qkvu_proj = nn.Linear(dim, 4 * hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, dim, bias=bias)
        if lrpe:
            theta = 10000 ** (-2 / hidden * torch.arange(hidden, dtype=torch.float64))
            self.theta = nn.Parameter(theta.view(heads, 1, self.head_dim).float())

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, hidden_dim={self.hidden}, lrpe={self.use_lrpe}, "
                f"gate={self.gate!r}, decay={[round(d, 6) for d in self.decay]}")

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None):
        w = self.qkvu_proj.weight
        feat = 2 * self.head_dim if self.use_lrpe else self.head_dim
        return init_linear_state(batch_size, self.heads, feat, self.head_dim, normalize=False,
                                 dtype=w.dtype if dtype is None else dtype,
                                 device=w.device if device is None else device)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state=None):
        """x (B, N, dim) -> (B, N, dim), or ``(out, state)`` when decoding with a state."""
        if context is not None:
            raise ValueError("context: TransNormerLLM's attention is causal self attention (pattern 'causal_self'); "
                             "got a context")
        check_sequence_call(self, x, key_padding_mask=key_padding_mask, state=state, state_type=RecurrentState)
        q, k, v, u = self.qkvu(x, 0 if state is None else state.seq_len)
        opts = dict(decay=self.decay, chunk=self.chunk)
        if state is not None:
            o = lightning_step(q, k, v, state, scale=1.0, key_padding_mask=key_padding_mask, **opts)
        else:
            fn = lightning_reference if self.backend == "reference" else lightning_fast
            o = fn(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=1.0, **opts)  # (B, H, N, d)
        y = self.output(o, u)  # (B, N, dim)
        return (y, state) if state is not None else y

    def qkvu(self, x: torch.Tensor, offset: int = 0):
        """The attention core's inputs for x (B, N, dim) at positions ``offset, offset + 1, ...``: q, k (B, H, N, F)
        (swish, then LRPE: F = 2 head_dim), v (B, H, N, head_dim) and the gate's u (B, N, hidden). The core is
        Lightning attention with ``decay=self.decay``, ``scale=1.0`` (``attnzoo.distributed`` runs it by LASP-2)."""
        B, N, _ = x.shape
        H, d = self.heads, self.head_dim
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)  # (B, N, hidden) each
        q = F.silu(q).view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        k = F.silu(k).view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        v = v.view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        if self.use_lrpe:
            q, k = lrpe(q, self.theta, offset), lrpe(k, self.theta, offset)  # (B, H, N, 2d)
        return q, k, v, u

    def output(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """SRMSNorm of the core's output o (B, H, N, head_dim), the gate u (B, N, hidden), then W_o: (B, N, dim)."""
        B, _, N, _ = o.shape
        o = srms_norm(o.transpose(1, 2).reshape(B, N, self.hidden), self.norm_eps)  # (B, N, hidden)
        if self.gate == "silu":
            u = F.silu(u)
        elif self.gate == "sigmoid":
            u = torch.sigmoid(u)
        return self.out_proj(o * u)  # (B, N, dim)


def _transnormer(dim, heads, *, kv_heads=None, causal=False, backend="auto", **options):
    """``attnzoo.build("transnormer", ...)``: options validated against the record's ranges."""
    opts = TRANSNORMER.resolve_options(options)
    return TransNormerAttention(dim, heads, kv_heads=kv_heads, causal=causal, backend=backend, **opts)


TRANSNORMER = register(Mechanism(
    name="transnormer",
    aliases=("transnormer_llm", "tnl", "norm_linear_attention"),
    family="linear",
    catalog="P096",
    title="Scaling TransNormer to 175 Billion Parameters",
    arxiv="2307.14995",
    code="https://github.com/OpenNLPLab/TransnormerLLM",
    summary="Gated linear attention: SRMSNorm(Lightning(swish q, swish k, v) with LRPE and decay) * u, then W_o.",
    patterns=("causal_self",),
    exact=False,
    state="recurrent",
    complexity="time O(N B d + N d^2), memory O(N (B + d)); decode state O(d^2) per head (2d x d with LRPE)",
    fast=lightning_fast,
    module=_transnormer,
    options=(
        Option("hidden_dim", None, int, low=1, allow_none=True, doc="width of q, k, v, u (default dim)"),
        Option("lrpe", True, bool, doc="LRPE: q, k -> [x cos(theta t), x sin(theta t)], learned theta"),
        Option("layer_idx", 0, int, low=0, doc="layer index l (decay slope factor 1 - l/(L-1) + 1e-5)"),
        Option("num_layers", 1, int, low=1, doc="number of layers L of the model"),
        Option("gate", "none", str, choices=GATES, doc="activation of the output gate u (official: none)"),
        Option("norm_eps", 1e-6, float, low=0.0, doc="SRMSNorm epsilon"),
        Option("bias", False, bool, doc="biases in the projections"),
        CHUNK_OPTION,
    ),
    test_options={"chunk": 3},
    notes="decay per head exp(-ALiBi slope * (1 - l/(L-1) + 1e-5)); no score scale; theta=0 and decay 1 reduce the "
          "attention core to unnormalised causal linear attention (tests).",
))
