"""Draw which keys each query sees, for static attention patterns, as a PNG.

    from attnzoo.analysis.mask_plot import plot_mask
    mask = plot_mask("neighborhood_1d", n=32, path="na.png", kernel_size=7, dilation=2)
    mask = plot_mask("s2_attention", n=64, path="s2.png", heads=4, head=1, block_size=4, local_blocks=2,
                     vert_stride=4)
    mask = plot_mask(attnzoo.masks.prefix_lm(8), n=32, path="prefix.png")

``mechanism_or_mask`` is a registered static mechanism name or alias (``sliding_window``, ``sink_window``,
``neighborhood_1d``, ``s2_attention``, ``moa``, ``softmax``), a pattern name (``causal``, ``dilated``,
``block_local``, ``prefix_lm``), a mask predicate ``(b, h, q_idx, kv_idx) -> bool`` (as in
:mod:`attnzoo.masks`), or a bool array (Nq, Nk). Mechanism options are validated by the registry (unknown
names and out-of-range values raise). Returns the boolean matrix that was drawn, (Nq, Nk), True = attend.

matplotlib is optional (the ``bench`` extra): it is imported inside :func:`plot_mask`.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import numpy as np
import torch

from .. import masks, registry
from ..errors import check_int

PATTERNS = ("causal", "dilated", "block_local", "prefix_lm")
"""Pattern names that are not mechanisms; each maps to its predicate in :mod:`attnzoo.masks`."""


def _pattern_predicate(name: str, n: int, causal: bool, opts: dict[str, Any]):
    def take(*names):
        unknown = sorted(set(opts) - set(names))
        if unknown:
            raise ValueError(f"{unknown[0]}: not an option of pattern {name!r} (options: {list(names)})")
        return [opts[x] for x in names if x in opts]

    if name == "causal":
        take()
        return masks.causal()
    if name == "dilated":
        take("window", "dilation")
        return masks.dilated_window(opts.get("window", 4), opts.get("dilation", 2), causal=causal)
    if name == "block_local":
        take("block_size")
        pred = masks.block_local(opts.get("block_size", 8))
        return masks.and_masks(pred, masks.causal()) if causal else pred
    take("prefix_length")
    return masks.prefix_lm(opts.get("prefix_length", n // 4))


def _mechanism_mask(mech: registry.Mechanism, n: int, causal: bool, head: int, heads: int | None,
                    kv_heads: int | None, opts: dict[str, Any]) -> tuple[torch.Tensor, str]:
    """(Nq, Nk) bool mask of a static mechanism's head ``head`` for self-attention of length n: its registry
    ``mask`` predicate (every mechanism whose pattern does not depend on the content declares one)."""
    if mech.mask is None:
        static = [m.name for m in registry.mechanisms() if m.mask is not None]
        raise ValueError(
            f"mechanism_or_mask: {mech.name!r} has no static mask to draw (its pattern depends on the content); "
            f"expected one of {[*static, *PATTERNS]}, a mask predicate or a bool array")
    if causal and not any(p.startswith("causal") for p in mech.patterns):
        raise ValueError(f"causal: {mech.name} has no causal form, got causal=True")
    if not causal and not any(p.startswith("noncausal") for p in mech.patterns):
        raise ValueError(f"causal: {mech.name} is causal only, got causal=False")
    pred = mech.mask(n, n, causal=causal, heads=heads, kv_heads=kv_heads, **mech.resolve_options(opts))
    hq = getattr(pred, "heads", 1 if heads is None else heads)
    if not 0 <= head < hq:
        raise ValueError(f"head: expected an index in [0, {hq}) for {mech.name!r} with {hq} heads, got {head}")
    return masks.materialize(pred, 1, hq, n, n)[0, head], mech.name


def mask_matrix(mechanism_or_mask, n: int, *, causal: bool | None = None, head: int = 0, heads: int | None = None,
                kv_heads: int | None = None, **options: Any) -> tuple[np.ndarray, str]:
    """The (Nq, Nk) boolean mask :func:`plot_mask` draws, and a label for it."""
    check_int("n", n)
    if isinstance(mechanism_or_mask, (np.ndarray, torch.Tensor)):
        m = torch.as_tensor(mechanism_or_mask)
        if m.dtype != torch.bool or m.dim() != 2:
            raise ValueError(f"mechanism_or_mask: expected a 2-D bool array (Nq, Nk), got dtype {m.dtype}, "
                             f"shape {tuple(m.shape)}")
        if options:
            raise ValueError(f"{sorted(options)[0]}: options do not apply to an explicit mask array")
        return m.cpu().numpy(), "mask"
    if callable(mechanism_or_mask):
        if options:
            raise ValueError(f"{sorted(options)[0]}: options do not apply to a predicate (build it with them)")
        hq = head + 1 if heads is None else heads
        m = masks.materialize(mechanism_or_mask, 1, hq, n, n)[0, head]
        return m.cpu().numpy(), getattr(mechanism_or_mask, "__name__", "predicate")
    if not isinstance(mechanism_or_mask, str):
        raise TypeError(f"mechanism_or_mask: expected a mechanism or pattern name, a predicate or a bool array, "
                        f"got {type(mechanism_or_mask).__name__}")
    name = mechanism_or_mask
    if name in PATTERNS:
        causal = name != "prefix_lm" if causal is None else causal
        pred = _pattern_predicate(name, n, causal, options)
        return masks.materialize(pred, 1, 1, n, n)[0, 0].cpu().numpy(), name
    mech = registry.get(name)  # unknown names raise with a suggestion
    if causal is None:
        causal = mech.supports("causal_self")
    m, label = _mechanism_mask(mech, n, causal, head, heads, kv_heads, options)
    return m.cpu().numpy(), label


def plot_mask(mechanism_or_mask, n: int, path: str | os.PathLike, *, causal: bool | None = None, head: int = 0,
              heads: int | None = None, kv_heads: int | None = None, title: str | None = None, size: int = 512,
              **options: Any) -> np.ndarray:
    """Draw the attention mask (query position on the vertical axis, key position on the horizontal one) and
    write it to ``path`` as a ``size`` x ``size`` pixel PNG.

    Args:
        mechanism_or_mask: a static mechanism or pattern name, a mask predicate, or a bool array (Nq, Nk).
        n: sequence length (self-attention, Nq = Nk = n).
        causal: the causal form (default: causal wherever the mechanism has one; the patterns are causal
            except ``prefix_lm``).
        head, heads, kv_heads: which head to draw, of how many (query / key-value) heads, for per-head patterns
            (``moa``, ``s2_attention``; default ``heads`` = the length of ``alphas`` for moa, 8 for s2).
        title: figure title (default: the name and its options).
        **options: the mechanism's options (``window``, ``kernel_size``, ``block_size``, ...).

    Returns:
        The boolean matrix drawn, (Nq, Nk), True = attend.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised with matplotlib hidden
        raise ImportError("plot_mask needs matplotlib: pip install attnzoo[bench]") from e
    check_int("size", size, low=64)
    mask, label = mask_matrix(mechanism_or_mask, n, causal=causal, head=head, heads=heads, kv_heads=kv_heads,
                              **options)
    if title is None:
        extra = "".join(f", {k}={v}" for k, v in options.items())
        kind = "" if causal is None else (", causal" if causal else ", non-causal")
        hd = f", head {head}" if heads is not None or head else ""
        title = f"{label} (n={n}{kind}{extra}{hd})"
    dpi = 100
    fig, ax = plt.subplots(figsize=(size / dpi, size / dpi), dpi=dpi)
    try:
        im = ax.imshow(mask, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", origin="upper",
                       extent=(-0.5, mask.shape[1] - 0.5, mask.shape[0] - 0.5, -0.5))
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        ax.set_title(textwrap.fill(title, width=max(30, size // 8)), fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        drawn = np.asarray(im.get_array(), dtype=bool)
    finally:
        plt.close(fig)
    return drawn
