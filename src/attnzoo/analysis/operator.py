"""The effective attention operator of every mechanism: the (B, H, Nq, Nk) weights it actually applies to v.

DESIGN.md, "Analysis". Sink, retrieval-head and head-importance metrics and attention-map plots read this operator,
so they cover every family, not only softmax:

- exact and sparse mechanisms: the softmax matrix under the mask they select (a static registry ``mask``, or a
  content-dependent selection: HiP's tree search, DMA's top-w, HyperAttention's sortLSH blocks and samples);
- linear mechanisms: the normalised masked kernel matrix, with decay (``linear``, ``lightning``, ``based``);
- Agent attention: the composed operator softmax(Q A^T) softmax(A K^T);
- memory mechanisms: the retrieved tokens' attribution (CCA's core tokens spread over their groups by their pooling
  weights, Landmark's retrieved blocks, Recycled's top-K sets, LongHeads' chunks);
- cross mechanisms: the weights of each source (:func:`source_operators`).

A record gives its operator in its own file (``Mechanism.operator``, next to its reference); a record with a static
``mask`` and none gets softmax under that mask. ``reference(q, k, v) == operator(q, k, v) @ v`` in float64 for
every record that has one (``tests/analysis/test_operator.py`` iterates the registry). Two operators depend on v
(the output is W(v) v, not linear in v): DMA scores keys by ||v||, LongHeads' chunk summaries read v; the identity
still holds at the given v. :func:`operator_table` lists every record: where its operator comes from, whether it
is linear in v, and why a record has none.

Everything here is O(Nq Nk) per head: for small inputs and for the short contexts of the real-model analyses.
Long contexts use the streaming statistics of :mod:`attnzoo.analysis.stats` (softmax and masked softmax, from q,
k and the log-sum-exp, no n x n matrix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import registry
from ..errors import check_bool, check_key_padding_mask, check_qkv, check_scale, check_tensor
from ..functional import pattern_of
from ..masks import materialize
from ..reference import one_hot_values, repeat_kv, softmax_weights

__all__ = ["effective_operator", "operator_source", "operator_exception", "source_operators", "apply_operator",
           "operator_table"]


class OperatorUnavailable(ValueError):
    """The mechanism has no effective operator (the message says why)."""


def operator_source(mech: registry.Mechanism) -> str | None:
    """``"operator"`` (the record's own ``operator``), ``"mask"`` (softmax under its declared static mask) or None."""
    if mech.operator is not None:
        return "operator"
    if mech.mask is not None and mech.functional:
        return "mask"
    return None


def operator_exception(mech: registry.Mechanism) -> str | None:
    """Why ``mech`` has no effective operator, or None when it has one."""
    if operator_source(mech) is not None:
        return None
    if mech.family == "cross":
        return ("cross module: its per-source weights are attnzoo.analysis.operator.source_operators of the queries "
                "and each source's keys (the module's own projections produce them)")
    if not mech.functional:
        what = {"grid": "token-grid module", "channel": "CNN channel/spatial module", "pooling": "pooling module",
                "fusion": "fusion module"}.get(mech.kind, "module")
        return (f"{what} with its own projections and no functional q, k, v form: the weights live inside the "
                "module (its forward computes them from x), not in a registry operator")
    return "functional mechanism without an operator or a declared mask (add Mechanism.operator next to its reference)"


def _validated(mech: registry.Mechanism, q, k, v, causal, key_padding_mask, scale, options):
    B, Hq, Hk, Nq, Nk, D, Dv = check_qkv(q, k, v)
    check_bool("causal", causal)
    check_key_padding_mask(key_padding_mask, B, Nk)
    check_scale(scale)
    mech.check_pattern(pattern_of(Nq, Nk, causal))
    return mech.resolve_options(options), (1.0 / math.sqrt(D) if scale is None else float(scale))


def effective_operator(mechanism: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                       **options: Any) -> torch.Tensor:
    """The (B, Hq, Nq, Nk) weights ``mechanism`` applies to v on these inputs (float32 or wider).

    Functional sequence mechanisms take SDPA-layout q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) with the
    arguments of :func:`attnzoo.attention` (``causal`` bottom-right aligned, ``key_padding_mask`` bool (B, Nk) True
    = attend, ``scale`` default 1/sqrt(D), the mechanism's options). Grid mechanisms with a functional form
    (``neighborhood_2d``) take that form's tensors and keywords and return (B, heads, H*W, H*W) over the
    row-major flattened grid. v is needed because a few selections read it (DMA, LongHeads).
    Raises :class:`OperatorUnavailable` (a ValueError) naming the reason when the mechanism has none.
    """
    mech = registry.get(mechanism)
    source = operator_source(mech)
    if source is None:
        raise OperatorUnavailable(f"mechanism: {mech.name!r} has no effective operator: {operator_exception(mech)}")
    if mech.kind != "sequence":
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, t, ndim=5)
        return mech.operator(q, k, v, scale=scale, **options)
    opts, scale = _validated(mech, q, k, v, causal, key_padding_mask, scale, options)
    if source == "operator":
        return mech.operator(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **opts)
    Hq, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    pred = mech.mask(Nq, Nk, causal=causal, heads=Hq, kv_heads=k.shape[1], **opts)
    mask = materialize(pred, 1, Hq, Nq, Nk, device=q.device)  # (1, Hq, Nq, Nk)
    # the declared mask is the whole mask, causality included (the registry contract, testing.check_declared_mask):
    # a modality mask (AKI: image rows see the later prompt) is not a subset of the causal one
    return softmax_weights(q, k, key_padding_mask=key_padding_mask, attn_mask=mask, scale=scale)


def apply_operator(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights (B, Hq, Nq, Nk) @ v (B, Hk, Nk, Dv) with grouped heads (query head h reads value head h // G)."""
    check_tensor("weights", weights, ndim=4)
    check_tensor("v", v, ndim=4)
    Hq, Hk = weights.shape[1], v.shape[1]
    if Hk == 0 or Hq % Hk or v.shape[2] != weights.shape[3] or v.shape[0] != weights.shape[0]:
        raise ValueError(f"v: expected (B, Hk, Nk, Dv) with B={weights.shape[0]}, Nk={weights.shape[3]} and Hk "
                         f"dividing Hq={Hq}, got {tuple(v.shape)}")
    return torch.matmul(weights, repeat_kv(v, Hq // Hk).to(weights.dtype))  # (B, Hq, Nq, Dv)


# --------------------------------------------------------------------------------------------------------
# Cross attention: per-source weights
# --------------------------------------------------------------------------------------------------------
def source_operators(q: torch.Tensor, keys: Mapping[str, torch.Tensor], *, mode: str = "separate",
                     masks: Mapping[str, torch.Tensor] | None = None, scale: float | None = None,
                     ) -> dict[str, torch.Tensor]:
    """Per-source weights of multi-source cross-attention (DESIGN.md "Cross-attention"): {name: (B, Hq, Nq, M_s)}.

    ``mode="separate"``: one softmax per source (IP-Adapter: out = sum_s scale_s W_s v_s, each W_s row-stochastic);
    ``"joint"``: one softmax over the concatenated keys, split back per source (FcaFormer, DCAL's PWCA: the rows of
    all sources together sum to 1). ``keys[name]`` is (B, Hk_s, M_s, D) (grouped heads per source), ``masks[name]``
    a key-padding mask (B, M_s) bool, True = attend. A source's output scale multiplies its output, not these
    weights. Rows that see no key of a source are zero there.
    """
    check_tensor("q", q, ndim=4)
    if not isinstance(keys, Mapping) or not keys:
        raise TypeError(f"keys: expected a non-empty mapping {{source name: k}}, got {type(keys).__name__}")
    if mode not in ("separate", "joint"):
        raise ValueError(f"mode: expected 'separate' or 'joint', got {mode!r}")
    masks = dict(masks or {})
    unknown = [m for m in masks if m not in keys]
    if unknown:
        raise ValueError(f"masks: unknown source {unknown[0]!r}; the sources are {list(keys)}")
    check_scale(scale)
    B, Hq, _, D = q.shape
    for name, k in keys.items():
        check_tensor(f"keys[{name!r}]", k, ndim=4)
        if k.shape[0] != B or k.shape[3] != D or k.shape[1] == 0 or Hq % k.shape[1]:
            raise ValueError(f"keys[{name!r}]: expected (B, Hk, M, D) = ({B}, Hk | {Hq}, M, {D}), got {tuple(k.shape)}")
        check_key_padding_mask(masks.get(name), B, k.shape[2], name=f"masks[{name!r}]", device=q.device)
    if mode == "separate":
        return {name: softmax_weights(q, k, key_padding_mask=masks.get(name), scale=scale) for name, k in keys.items()}
    names = list(keys)
    full = torch.cat([repeat_kv(keys[n], Hq // keys[n].shape[1]) for n in names], dim=2)  # (B, Hq, sum M, D)
    kpm = None
    if masks:
        kpm = torch.cat([masks.get(n, torch.ones(B, keys[n].shape[2], dtype=torch.bool, device=q.device))
                         for n in names], dim=1)  # (B, sum M)
    w = softmax_weights(q, full, key_padding_mask=kpm, scale=scale)  # (B, Hq, Nq, sum M)
    return dict(zip(names, torch.split(w, [keys[n].shape[2] for n in names], dim=-1)))


# --------------------------------------------------------------------------------------------------------
# The registry-wide check and table
# --------------------------------------------------------------------------------------------------------
def _test_inputs(mech: registry.Mechanism, pattern: str, seed: int = 0):
    from ..testing import qkv

    return qkv(mech, pattern, torch.float64, seed=seed)


def check_operator(mech: registry.Mechanism, pattern: str) -> dict[str, Any]:
    """Assert ``operator @ v == reference`` (float64, 1e-10) on the conformance sizes of ``pattern``, with and
    without a key-padding mask, and report whether the operator depends on v: {"rel_err", "linear_in_v"}."""
    from ..functional import attention
    from ..testing import TOL, padding_mask, rel_err

    q, k, v = _test_inputs(mech, pattern)
    causal = pattern.startswith("causal")
    opts = dict(mech.test_options)
    worst = 0.0
    masks = [None]
    if mech.supports_key_padding:
        masks.append(padding_mask(q.shape[0], k.shape[2]))
    for kpm in masks:
        w = effective_operator(mech.name, q, k, v, causal=causal, key_padding_mask=kpm, **opts)
        assert w.shape == (*q.shape[:3], k.shape[2]), f"{mech.name} {pattern}: operator shape {tuple(w.shape)}"
        ref = attention(q, k, v, mechanism=mech.name, causal=causal, key_padding_mask=kpm, backend="reference",
                        **opts)
        got = apply_operator(w, v)
        for form, out in (("reference", ref), ("fast", None)):
            if form == "fast":
                if mech.fast is None:
                    continue
                out = attention(q, k, v, mechanism=mech.name, causal=causal, key_padding_mask=kpm, **opts)
            err = rel_err(got, out)
            assert err <= TOL[torch.float64], (f"{mech.name} {pattern} (key padding {kpm is not None}): operator @ v "
                                               f"vs the {form} form, relative error {err:.3e}")
            worst = max(worst, err)
    _, _, v2 = _test_inputs(mech, pattern, seed=7)
    w1 = effective_operator(mech.name, q, k, v, causal=causal, **opts)
    w2 = effective_operator(mech.name, q, k, v2, causal=causal, **opts)
    linear = bool(rel_err(w2, w1) <= TOL[torch.float64])
    probe = None
    if linear:
        # v of rank Dv < Nk does not pin W down; one-hot values do: the reference on them is its whole matrix
        try:
            full = attention(q, k, one_hot_values(k), mechanism=mech.name, causal=causal, backend="reference", **opts)
        except ValueError as e:  # a value width the mechanism constrains (LongHeads: Dv == D)
            probe = f"not applicable: {e}"
        else:
            err = rel_err(w1, full)
            assert err <= TOL[torch.float64], f"{mech.name} {pattern}: operator vs reference(q, k, I), {err:.3e}"
            probe = err
    return {"rel_err": worst, "linear_in_v": linear, "one_hot_rel_err": probe}


def check_grid_operator(mech: registry.Mechanism) -> dict[str, Any]:
    """The grid form of :func:`check_operator` (``neighborhood_2d``): operator @ v == the functional reference on
    a (B, H, W, heads, D) grid, for the record's test options that the functional form takes."""
    import inspect

    from ..testing import TOL, Sizes, rel_err

    s = Sizes.of(mech)
    g = torch.Generator().manual_seed(0)
    shape = lambda h, d: (s.batch, s.height, s.width, h, d)
    q = torch.randn(*shape(s.heads, s.head_dim), generator=g, dtype=torch.float64)
    k = torch.randn(*shape(s.kv_heads, s.head_dim), generator=g, dtype=torch.float64)
    v = torch.randn(*shape(s.kv_heads, s.value_dim), generator=g, dtype=torch.float64)
    params = inspect.signature(mech.reference).parameters
    opts = {n: val for n, val in mech.test_options.items() if n in params}
    w = effective_operator(mech.name, q, k, v, **opts)  # (B, heads, HW, HW)
    ref = mech.reference(q, k, v, **opts)  # (B, H, W, heads, Dv)
    n = s.height * s.width
    flat_v = v.permute(0, 3, 1, 2, 4).reshape(s.batch, s.kv_heads, n, s.value_dim)
    got = apply_operator(w, flat_v).view(s.batch, s.heads, s.height, s.width, s.value_dim).permute(0, 2, 3, 1, 4)
    err = rel_err(got, ref)
    assert err <= TOL[torch.float64], f"{mech.name}: operator @ v vs reference, relative error {err:.3e}"
    return {"rel_err": err, "linear_in_v": True, "one_hot_rel_err": None}


def operator_table() -> list[dict[str, Any]]:
    """One row per registered mechanism: name, family, kind, source of its operator (``operator``/``mask``/None),
    per pattern the measured relative error of operator @ v vs the reference and whether it is linear in v, and
    the reason when it has no operator. Runs :func:`check_operator` on tiny float64 inputs."""
    rows = []
    for mech in registry.mechanisms():
        src = operator_source(mech)
        row: dict[str, Any] = {"name": mech.name, "family": mech.family, "kind": mech.kind, "source": src,
                               "catalog": mech.catalog, "patterns": {}, "reason": operator_exception(mech)}
        if src is not None:
            if mech.kind == "sequence":
                for p in mech.patterns:
                    row["patterns"][p] = check_operator(mech, p)
            else:
                row["patterns"]["noncausal_self"] = check_grid_operator(mech)
            row["linear_in_v"] = all(r["linear_in_v"] for r in row["patterns"].values())
        rows.append(row)
    return rows
