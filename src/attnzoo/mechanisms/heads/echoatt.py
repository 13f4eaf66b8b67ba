"""EchoAtt: a group of attention layers sharing one attention matrix.

Paper: "EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models", Rajabzadeh, Jafari et al.,
arXiv 2409.14595. Official code: none released.
Within a group of consecutive inner layers with similar attention patterns, the first layer computes
``A = softmax(Q K^T / sqrt(d) + mask)`` and every later layer of the group reuses it, ``out_l = A V_l W_O^l``: those
layers have no W_Q, W_K, compute no scores, and cache no keys when decoding (student trained by distillation).

The module is one group of ``layers`` attention layers with residual connections,
``h_{l+1} = between[l](h_l + Attn_l(h_l))``; ``between`` holds ``nn.Identity`` modules where a model puts its MLP
blocks (replace them: ``group.between[0] = my_mlp``). ``share=False`` gives independent layers (each with its own
Q, K): the sharing-disabled baseline. Choices where the paper is silent: the shared matrix is the leader's
full softmax matrix (per head, mask included), the followers keep their own value/output projections and their
own value heads (grouped-query layout as the leader's keys); no normalisation layers inside the group.

There is one form: computing A once and reusing it is the efficient algorithm (it is what the reference does);
A is materialised (B, H, N, M) because it is reused. ``last_attention`` keeps it (detached) after a forward.
Decoding keeps an :class:`EchoAttentionCache`: the leader's keys and every layer's values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...errors import check_bool, check_heads, check_int, check_sequence_call
from ...reference import dense_mask, repeat_kv
from ...registry import PATTERNS, Mechanism, Option, register
from ._common import TokenBuffers
from ._routing import split_heads


def attention_probs(q: torch.Tensor, k: torch.Tensor, *, causal: bool, key_padding_mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """softmax(scale q k^T + mask): q (B, H, N, D), k (B, Hk, M, D) -> (B, H, N, M); rows with no key are 0."""
    B, H, N, _ = q.shape
    M = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), repeat_kv(k, H // k.shape[1]).to(acc).transpose(-2, -1)) * scale  # (B,H,N,M)
    mask = dense_mask(B, H, N, M, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    w = torch.exp(scores - row_max)
    den = w.sum(dim=-1, keepdim=True)
    return w / torch.where(den > 0, den, torch.ones_like(den))  # (B, H, N, M)


class EchoAttention(nn.Module):
    """A group of ``layers`` attention layers; with ``share`` the later ones reuse the first one's attention matrix.

    ``x (B, N, dim)`` (``context (B, M, context_dim)`` for cross attention: every layer reads the context) ->
    ``(B, N, dim)``. ``q_proj``/``k_proj`` exist for the leader only when sharing (for every layer otherwise);
    ``v_proj[l]``, ``o_proj[l]`` for every layer.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, layers: int = 2,
                 share: bool = True, head_dim: int | None = None, context_dim: int | None = None,
                 bias: bool = False) -> None:
        super().__init__()
        opts = ECHOATT.resolve_options(dict(layers=layers, share=share))
        self.dim, self.heads, self.kv_heads, self.head_dim = check_heads(dim, heads, kv_heads, head_dim=head_dim)
        hd = self.head_dim
        check_bool("causal", causal)
        self.causal, self.layers, self.share = causal, opts["layers"], opts["share"]
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        self.scale = 1.0 / math.sqrt(hd)
        n_qk = 1 if self.share else self.layers
        self.q_proj = nn.ModuleList(nn.Linear(dim, heads * hd, bias=bias) for _ in range(n_qk))
        self.k_proj = nn.ModuleList(nn.Linear(self.context_dim, self.kv_heads * hd, bias=bias) for _ in range(n_qk))
        self.v_proj = nn.ModuleList(nn.Linear(self.context_dim, self.kv_heads * hd, bias=bias)
                                    for _ in range(self.layers))
        self.o_proj = nn.ModuleList(nn.Linear(heads * hd, dim, bias=bias) for _ in range(self.layers))
        self.between = nn.ModuleList(nn.Identity() for _ in range(self.layers))
        self.last_attention: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, layers={self.layers}, "
                f"share={self.share}, causal={self.causal}")

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> EchoAttentionCache:
        """The group's cache: the leader's keys and every layer's values (keys of every layer if not sharing)."""
        if not self.causal:
            raise ValueError("causal: decoding needs a causal layer; build it with causal=True")
        check_int("batch_size", batch_size)
        w = self.v_proj[0].weight
        return EchoAttentionCache(batch_size, self.kv_heads, self.head_dim, self.layers, share=self.share,
                                  dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, state: EchoAttentionCache | None = None):
        """x (B, N, dim), context (B, M, context_dim) or None, key_padding_mask (B, M or N) bool (True = attend).

        Returns (B, N, dim), or ``(out, state)`` with a decode state.
        """
        src = check_sequence_call(self, x, context, key_padding_mask=key_padding_mask, state=state,
                                  state_type=EchoAttentionCache, mech=ECHOATT)
        B, N, _ = x.shape
        H, Hk, hd = self.heads, self.kv_heads, self.head_dim
        kpm = key_padding_mask if state is None else state.pending_mask(N, key_padding_mask)
        h = x
        shared = None
        for layer in range(self.layers):
            src = h if context is None else context
            v = split_heads(self.v_proj[layer](src), Hk, hd)  # (B, Hk, M, hd)
            if state is not None:
                v = state.write(state.value_index(layer), v)  # (B, Hk, L, hd)
            if layer == 0 or not self.share:
                q = split_heads(self.q_proj[layer](h), H, hd)  # (B, H, N, hd)
                k = split_heads(self.k_proj[layer](src), Hk, hd)  # (B, Hk, M, hd)
                if state is not None:
                    k = state.write(state.key_index(layer), k)
                probs = attention_probs(q, k, causal=self.causal, key_padding_mask=kpm, scale=self.scale)  # (B,H,N,M)
                if layer == 0:
                    shared = probs
            else:
                probs = shared  # the leader's matrix, reused: no scores computed here
            out = torch.matmul(probs, repeat_kv(v, H // Hk).to(probs.dtype)).to(x.dtype)  # (B, H, N, hd)
            h = self.between[layer](h + self.o_proj[layer](out.transpose(1, 2).reshape(B, N, H * hd)))
        self.last_attention = shared.detach()
        if state is not None:
            state.advance(N, key_padding_mask)
            return h, state
        return h


def _echoatt_module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    return EchoAttention(dim, heads, kv_heads=kv_heads, causal=causal, **options)


class EchoAttentionCache(TokenBuffers):
    """Decode state of an EchoAtt group of ``layers`` attention layers.

    With sharing, buffer 0 holds the leader's keys (B, kv_heads, L, head_dim) and buffer 1 + l the values of
    layer l: the layers that reuse the leader's attention matrix cache no keys at all. Without sharing
    (independent layers) every layer keeps keys and values: buffers 2 l (keys) and 2 l + 1 (values).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, layers: int, *, share: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        check_int("layers", layers)
        if share:
            shapes = [(kv_heads, head_dim)] * (1 + layers)
            names = ["leader k"] + [f"layer {i} v" for i in range(layers)]
        else:
            shapes = [(kv_heads, head_dim)] * (2 * layers)
            names = [f"layer {i // 2} {'kv'[i % 2]}" for i in range(2 * layers)]
        super().__init__(batch, shapes, dtype=dtype, device=device, names=names)
        self.layers, self.share = layers, share

    def key_index(self, layer: int) -> int:
        if self.share:
            if layer != 0:
                raise ValueError(f"layer: only the leader (layer 0) caches keys when sharing, got layer {layer}")
            return 0
        return 2 * layer

    def value_index(self, layer: int) -> int:
        return 1 + layer if self.share else 2 * layer + 1


ECHOATT = register(Mechanism(
    name="echoatt",
    aliases=("echo_attention", "shared_attention_matrix"),
    family="heads",
    kind="sequence",
    catalog="P125",
    title="EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models",
    arxiv="2409.14595",
    code="(none released)",
    summary="A group of layers where the first computes softmax(QK^T) and the others reuse it with their own "
            "V and O (no Q/K, no key cache).",
    patterns=PATTERNS,
    exact=False,
    state="echo_kv",
    complexity="scores O(N M d) once per group instead of per layer; cache: leader keys + every layer's values",
    module=_echoatt_module,
    options=(
        Option("layers", 2, int, low=1, doc="attention layers in the group (1 = a single residual layer)"),
        Option("share", True, bool, doc="reuse the first layer's attention matrix (False: independent layers)"),
    ),
    test_options={"layers": 3},
    notes="share=False is a stack of independent residual attention layers; layers=1 is x + MHA(x).",
))
