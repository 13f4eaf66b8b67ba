"""PNG figures of the analysis report (matplotlib, imported inside each function: the ``bench`` extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def layer_head_map(values: torch.Tensor, path: str, *, title: str, cbar: str, cmap: str = "viridis",
                   marks: Sequence[tuple[int, int]] = (), center: bool = False) -> str:
    """An (L, H) heatmap (layers down, heads across); ``marks`` outlined (e.g. the masked retrieval heads)."""
    plt = _plt()
    v = values.detach().double().numpy()
    L, H = v.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * H, 1.0 + 0.22 * L))
    kw = {}
    if center:
        m = float(np.abs(v).max()) or 1.0
        kw = {"vmin": -m, "vmax": m}
    im = ax.imshow(v, aspect="auto", cmap=cmap, interpolation="nearest", **kw)
    for layer, head in marks:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.05)
    return _save(fig, path)


def bars(groups: dict[str, float], path: str, *, title: str, ylabel: str, errors: dict[str, float] | None = None
         ) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(groups), 3.2))
    names = list(groups)
    ax.bar(names, [groups[n] for n in names], yerr=[(errors or {}).get(n, 0) for n in names], capsize=3,
           color=["#4c72b0" if "random" not in n else "#999999" for n in names])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def matrices(mats: Sequence[torch.Tensor], titles: Sequence[str], path: str, *, suptitle: str, cols: int = 4,
             log: bool = False) -> str:
    """A grid of small matrices (attention maps / operators), one colour scale each."""
    plt = _plt()
    n = len(mats)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m, t in zip(axes.flat, mats, titles):
        a = m.detach().double().numpy()
        if log:
            a = np.log10(np.clip(np.abs(a), 1e-6, None))
        ax.imshow(a, cmap="magma", interpolation="nearest")
        ax.set_title(t, fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def distance_scatter(mean_distance: torch.Tensor, path: str, *, title: str, unit: str) -> str:
    """Mean attention distance of every head against its layer (the ViT paper's figure)."""
    plt = _plt()
    v = mean_distance.detach().double().numpy()
    L, H = v.shape
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for h in range(H):
        ax.scatter(np.arange(L), v[:, h], s=10, alpha=0.75)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean attention distance ({unit})")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def histograms(hist: torch.Tensor, bins: torch.Tensor, path: str, *, title: str, layers: Sequence[int]) -> str:
    """Attention mass per distance bin for every head of the given layers."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(layers), figsize=(3.0 * len(layers), 2.6), squeeze=False)
    labels = [f"{bins[i]:.0f}-{bins[i + 1]:.0f}" for i in range(len(bins) - 1)]
    for ax, layer in zip(axes[0], layers):
        for h in range(hist.shape[1]):
            ax.plot(range(len(labels)), hist[layer, h].numpy(), marker=".", lw=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, fontsize=6)
        ax.set_title(f"layer {layer}", fontsize=9)
    axes[0][0].set_ylabel("attention mass")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def overlays(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], titles: Sequence[str], path: str, *,
             suptitle: str) -> str:
    """Heatmaps (gh, gw) upsampled and drawn over their images (H, W, 3) in [0, 1]."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(2.8 * n, 3.0), squeeze=False)
    for ax, img, m, t in zip(axes[0], images, maps, titles):
        ax.imshow(img)
        ax.imshow(m, cmap="jet", alpha=0.45, extent=(0, img.shape[1], img.shape[0], 0), interpolation="bilinear")
        ax.set_title(t, fontsize=8)
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def curve(values: Sequence[float], path: str, *, title: str, ylabel: str, hlines: dict[str, float] | None = None
          ) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    ax.plot(values, lw=0.8)
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", lw=0.8, label=name, color="gray" if name == "zero" else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if hlines:
        ax.legend(fontsize=7)
    return _save(fig, path)


def alignment(matrix: torch.Tensor, path_frames: Sequence[int], words: Sequence[str], truth: Sequence[float],
              predicted: Sequence[float], frame_seconds: float, path: str, *, title: str) -> str:
    """A word-to-audio alignment: the (tokens, frames) score matrix, the DTW path over it, and the words' true and
    predicted start times as vertical ticks (seconds on the x axis)."""
    plt = _plt()
    m = matrix.detach().double().numpy()
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ext = (0, m.shape[1] * frame_seconds, m.shape[0] - 0.5, -0.5)
    ax.imshow(m, aspect="auto", cmap="magma", interpolation="nearest", extent=ext)
    ax.plot(np.asarray(path_frames[1]) * frame_seconds, path_frames[0], color="cyan", lw=1, label="DTW path")
    for i, (t, p) in enumerate(zip(truth, predicted)):
        ax.axvline(t, color="lime", lw=0.8, ls="--", label="true word start" if i == 0 else None)
        ax.axvline(p, color="white", lw=0.8, label="predicted word start" if i == 0 else None)
        ax.text(t, -0.7, words[i], color="black", fontsize=7, rotation=45, ha="left", va="bottom")
    ax.set_xlabel("seconds")
    ax.set_ylabel("text token")
    ax.set_title(title, fontsize=9, pad=24)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)
