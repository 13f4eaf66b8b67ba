"""ARM-Net: exponential neurons whose interaction weights come from a gated multi-head sparse (alpha-entmax)
attention over the fields of a tabular record.

Paper: "ARM-Net: Adaptive Relation Modeling Network for Structured Data", Cai, Zheng, Chen, Jagadish, Ooi, Zhang,
arXiv 2107.01830 (SIGMOD 2021), catalog P082. Official code: https://github.com/nusdbsystem/ARM-Net
(``models/armnet.py`` ``SparseAttLayer`` and ``ARMNetModel.forward``).
Field embeddings e_f (B, m fields, d). Head k has a bilinear key map W_k (d x d_k); its o-th exponential neuron has a
learned query q_ko (d_k) and value gates v_ko (m):
    g_kof = (e_f^T W_k q_ko) / sqrt(d_k)                 (B, K, O, m) attention scores over the fields
    w_ko  = alpha-entmax_f(g_ko) * v_ko                  (sparse: most fields get an exact 0 weight)
    y_ko  = exp(sum_f w_kof e_f)                         (B, K, O, d) the exponential neuron (a cross feature)
then BatchNorm1d over the K*O neurons. The paper writes y = exp(sum_f w_f log e_f); the code feeds the embeddings as
they are (they are learned, so they *are* the log-space features: exp(sum w_f e_f) = prod_f exp(e_f)^w_f), and so
does this module: its input is the (B, m, d) log-space field embeddings, its output (B, K*O, d) neurons (kind
``pooling``: K*O learned queries pool m fields). The prediction MLP and the optional DNN ensemble are the model
around it.

Confirmed from the official code: alpha = 1.7 by default (``--alpha``; 1 -> softmax, 2 -> sparsemax), d_k = d, 4
heads, 128 neurons (``--nattn_head``, ``--h``; here ``neurons`` defaults to 32), Xavier-uniform init (gain 1.414) of
W, q and v, BatchNorm over the K*O neurons. The entmax here is exact (:mod:`attnzoo.kernels.entmax`: sort-based for
alpha 1.5 and 2, bisection to the dtype's precision otherwise; sums to 1, exact zeros) where the official one runs
50 bisection steps. The number of fields is fixed at construction (the value gates v_ko are per field). This is a
tabular module (CATALOG family sparse/routing/local); it lives with the vision modules of its issue.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import check_int, check_module_input
from ...kernels.entmax import entmax
from ...registry import Mechanism, Option, register


class ExponentialNeurons(nn.Module):
    """ARM-Net's adaptive relation module: ``x (B, fields, dim)`` log-space field embeddings ->
    ``(B, heads * neurons, dim)`` exponential neurons (BatchNorm'd over the neurons if ``norm``).

    Args:
        dim: embedding size d. heads: attention heads K (each with its own bilinear key map).
        fields: number of fields m (required). neurons: exponential neurons O per head (32).
        alpha: entmax alpha (1.7; 1 = softmax, 1.5 and 2 exact closed forms). key_dim: d_k (None: dim).
        norm: BatchNorm1d over the K * O neurons, as the official model (True).
    """

    def __init__(self, dim: int, heads: int = 4, *, fields: int | None = None, neurons: int = 32, alpha: float = 1.7,
                 key_dim: int | None = None, norm: bool = True) -> None:
        super().__init__()
        opts = ARMNET.resolve_options(dict(fields=fields, neurons=neurons, alpha=alpha, key_dim=key_dim, norm=norm))
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        if opts["fields"] is None:
            raise ValueError("fields: ARM-Net's value gates are per field; give the number of fields m of the "
                             "records, got None")
        self.fields, self.neurons, self.alpha = opts["fields"], opts["neurons"], opts["alpha"]
        dk = dim if opts["key_dim"] is None else opts["key_dim"]
        self.scale = dk ** -0.5
        self.bilinear_w = nn.Parameter(torch.empty(heads, dim, dk))
        self.query = nn.Parameter(torch.empty(heads, self.neurons, dk))
        self.values = nn.Parameter(torch.empty(heads, self.neurons, self.fields))
        for p in (self.bilinear_w, self.query, self.values):
            nn.init.xavier_uniform_(p, gain=1.414)
        self.arm_bn = nn.BatchNorm1d(heads * self.neurons) if opts["norm"] else None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, fields={self.fields}, neurons={self.neurons}, alpha={self.alpha}"

    def interaction_weights(self, x: torch.Tensor) -> torch.Tensor:
        """w (B, K, O, m): the gated sparse attention of every neuron over the fields (entmax * value gates)."""
        x = check_module_input(self, x, layout="(B, N, C)", channels=self.dim)
        if x.shape[1] != self.fields:
            raise ValueError(f"x: expected (B, {self.fields}, {self.dim}) field embeddings, got {tuple(x.shape)}")
        keys = torch.einsum("bfx,kxy->bkfy", x, self.bilinear_w)  # (B, K, m, dk)
        gates = torch.einsum("bkfy,koy->bkof", keys, self.query) * self.scale  # (B, K, O, m)
        return entmax(gates, self.alpha, dim=-1) * self.values  # (B, K, O, m)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, fields, dim) -> (B, heads * neurons, dim). Every field is present (ARM-Net's fields are fixed
        columns with per-field gates); a key_padding_mask is refused rather than ignored."""
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask: ARM-Net's fields are fixed table columns with their own gates, every "
                             "one present; got a key_padding_mask (encode a missing value as its own embedding)")
        w = self.interaction_weights(x)  # (B, K, O, m)
        y = torch.exp(torch.einsum("bfe,bkof->bkoe", x, w))  # (B, K, O, d) exp(sum_f w_f e_f)
        y = y.reshape(x.shape[0], self.heads * self.neurons, self.dim)  # (B, K*O, d)
        return self.arm_bn(y) if self.arm_bn is not None else y


def _armnet_module(dim: int, heads: int, **options: Any) -> ExponentialNeurons:
    return ExponentialNeurons(dim, heads, **options)


def _case_options(*, n, side, heads, causal):
    """Benchmark cases: the n tokens are the fields."""
    return {"fields": n}


ARMNET = register(Mechanism(
    name="armnet",
    aliases=("arm_net", "exponential_neurons"),
    family="vision",
    kind="pooling",
    catalog="P082",
    title="ARM-Net: Adaptive Relation Modeling Network for Structured Data",
    arxiv="2107.01830",
    code="https://github.com/nusdbsystem/ARM-Net",
    summary="Exponential neurons exp(sum_f w_f e_f) over m field embeddings; w = alpha-entmax (exact, sparse) of "
            "learned-query bilinear scores times value gates; (B, m, d) -> (B, heads*neurons, d).",
    patterns=("noncausal_self",),
    exact=False,
    complexity="time O(K m d d_k + K O m (d_k + d)), memory O(K O (m + d))",
    module=_armnet_module,
    case_options=_case_options,
    options=(
        Option("fields", None, int, low=1, allow_none=True, doc="number of fields m (required: per-field gates)"),
        Option("neurons", 32, int, low=1, doc="exponential neurons per head"),
        Option("alpha", 1.7, float, low=1.0, doc="entmax alpha (1 softmax, 1.5 and 2 exact closed forms)"),
        Option("key_dim", None, int, low=1, allow_none=True, doc="bilinear key dimension d_k (None: dim)"),
        Option("norm", True, bool, doc="BatchNorm1d over the neurons, as the official model"),
    ),
    supports_key_padding=False,
    test_options={"fields": 7, "neurons": 3},
    test_sizes={"heads": 2, "dim": 6},
    notes="Interaction weights per neuron: entmax over the fields (on the simplex, exact zeros) times the value "
          "gates. Input embeddings are read as log-space features.",
))
