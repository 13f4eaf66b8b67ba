"""The quality protocol: which studies a profile trains, how learning rates are chosen, and how mechanisms rank.

A :class:`Study` is one training setting -- a task configuration, the tiny model's size, the steps, the
learning rates swept, the mechanisms trained and the options they use at the task's scale -- plus the
option settings swept to draw the recall-vs-state trade-off (BASED, arXiv 2402.18668, Figure 1). Every
(mechanism, option setting) of a study is a *variant*.

Learning rates (Zoology, arXiv 2312.04927, sweeps the learning rate and reports the best): each variant is
trained on the first seed at every learning rate of the study; the learning rate with the best value is
kept and the other seeds train at it. A variant's result is the mean and spread over the seeds at its
chosen learning rate.

Ranking: two variants *tie* when their seed ranges (min..max over seeds) overlap, i.e. when their difference
is inside the seed spread. A variant's rank is 1 + the number of variants that are better than it beyond
the spread, so tied variants share a rank and a difference inside the noise never orders them.

The MQAR studies follow Zoology's protocol at CPU scale (sequence lengths 64-512, 4-64 key-value pairs,
model dims 64-256): a plain softmax model reaches accuracy 1.0 at length 64 with 8 pairs, model dim 64,
2 layers within 3,000 steps on every seed, while elu+1 linear attention stays far below it (the published
ordering). 1,500 steps were not enough: softmax sits on a plateau near 0.17 (the accuracy linear attention
stays at) before it learns the recall, and the step at which it leaves it varies with the seed -- at lr 3e-3
seeds 0 and 1 reached 1.0 within 1,500 steps, seed 2 was still on the plateau (0.168) and reached 1.0
within 3,000 (benchmarks/results/quality-mqar-head, quality-mqar-softmax3000).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from ... import registry

ALL = None
"""``Study.mechanisms = ALL``: every registered mechanism the task applies to."""


@dataclass(frozen=True)
class Study:
    """One training setting. ``options``: the options each mechanism trains with in this study (sizes at
    the task's scale, e.g. a window shorter than the passkey distance); ``sweep``: further option settings
    per mechanism, each trained as its own variant (points of the recall-vs-state plot)."""

    name: str
    task: str
    config: dict[str, Any]
    dim: int = 64
    layers: int = 2
    heads: int = 4
    batch: int = 32
    steps: int = 200
    lrs: tuple[float, ...] = (3e-3,)
    budget: float = 3.0  # seconds of training per case (upper bound; the run's deadline may shrink it)
    reserve: bool = False  # a run's deadline never shrinks this study's budget (it shrinks the others' first)
    mechanisms: tuple[str, ...] | None = ALL
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweep: dict[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)
    about: str = ""

    def variants(self, mechanism: str, user: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(label, options) of every variant of ``mechanism``: the study's setting (overridden by the user's
        ``--option``), then each sweep setting. The label names the options that differ from the defaults."""
        base = {**self.options.get(mechanism, {}), **(user or {})}
        out = [(variant_label(base), base)]
        for extra in self.sweep.get(mechanism, ()):
            opts = {**base, **extra}
            label = variant_label(opts)
            if all(label != lab for lab, _ in out):
                out.append((label, opts))
        return out

    def hyper(self) -> dict[str, Any]:
        return {"dim": self.dim, "layers": self.layers, "heads": self.heads, "batch": self.batch}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def variant_label(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(options.items())) or "default"


# --------------------------------------------------------------------------------------------------------
# The studies of each profile
# --------------------------------------------------------------------------------------------------------
# Options at the task's scale: the registry defaults (windows of 256-2048 tokens) would make every windowed
# mechanism exact softmax at these lengths. Windows here are shorter than the distances the tasks recall over.
PASSKEY_OPTIONS = {
    "sliding_window": {"window": 16}, "sink_window": {"window": 16, "sinks": 4}, "sinklora": {"group_size": 16},
    "neighborhood_1d": {"kernel_size": 15}, "landmark": {"block_size": 8}, "longheads": {"chunk_size": 16,
                                                                                             "max_chunks": 4},
    "cca": {"group_size": 8, "window": 16}, "moa": {"alphas": 16, "sinks": 4}, "dma": {"window": 16},
    "s2_attention": {"block_size": 8, "local_blocks": 2, "vert_stride": 4},
    "hip": {"topk": 16, "block_size_q": 8, "block_size_k": 4, "sliding_window": 8},
    "mqsa": {"long_window": 4}, "titans": {"segment": 16, "window": 16, "chunk_size": 8},
    "titans_mag": {"segment": 16, "window": 16, "chunk_size": 8},
    "titans_mal": {"segment": 16, "window": 16, "chunk_size": 8},
    "recycled": {"stride": 8, "top_k": 16}, "based_layer": {"window": 16},
    "fit": {"group_size": 16, "latents": 8},
}
"""Mechanism options of the passkey study (length 128, the key at least 96 tokens before the question) and of
the other length-128 studies: every window (16 tokens; 2 layers reach 30 tokens back) and every sink cache is
smaller than the distance, so only retrieval over the whole context can answer."""

MQAR_OPTIONS = {
    "sliding_window": {"window": 16}, "sink_window": {"window": 16, "sinks": 4}, "sinklora": {"group_size": 16},
    "neighborhood_1d": {"kernel_size": 15}, "landmark": {"block_size": 8}, "longheads": {"chunk_size": 8,
                                                                                             "max_chunks": 4},
    "cca": {"group_size": 8, "window": 16}, "moa": {"alphas": 16, "sinks": 4}, "dma": {"window": 16},
    "s2_attention": {"block_size": 8, "local_blocks": 2, "vert_stride": 4},
    "hip": {"topk": 16, "block_size_q": 8, "block_size_k": 4, "sliding_window": 8},
    "titans": {"segment": 16, "window": 16, "chunk_size": 8}, "titans_mag": {"segment": 16, "window": 16,
                                                                            "chunk_size": 8},
    "titans_mal": {"segment": 16, "window": 16, "chunk_size": 8}, "recycled": {"stride": 8, "top_k": 16},
    "based_layer": {"window": 16}, "fit": {"group_size": 16, "latents": 8},
}
"""Mechanism options of the MQAR studies at length 64: windows and memories of a quarter of the sequence, so
that a bounded state must compress the key-value pairs (the registry defaults would be exact at this length)."""

MQAR_SWEEP = {
    "sliding_window": ({"window": 4}, {"window": 8}, {"window": 32}, {"window": 64}),
    "sink_window": ({"window": 8}, {"window": 32}),
    "based_layer": ({"feature_dim": 8}, {"feature_dim": 24}, {"window": 32}),
    "cca": ({"group_size": 4, "window": 8}, {"group_size": 16, "window": 32}),
    "landmark": ({"block_size": 4}, {"block_size": 16}),
    "longheads": ({"chunk_size": 4, "max_chunks": 4}, {"chunk_size": 16, "max_chunks": 3}),
    "s2_attention": ({"block_size": 4}, {"block_size": 16}),
    "neighborhood_1d": ({"kernel_size": 7}, {"kernel_size": 31}),
}
"""Option settings swept at MQAR length 64 (window sizes, feature dims, chunk counts): the points of the
recall-vs-state plot beside each mechanism's default variant."""

CORE = ("softmax", "linear", "based", "lightning", "sliding_window", "sink_window", "landmark", "longheads",
        "cca", "based_layer", "s2_attention", "transnormer", "aaren")
"""The mechanisms of the longer (costlier) studies: exact attention, the linear and windowed families, the
memory/retrieval family."""

STUDIES: dict[str, list[Study]] = {
    "quick": [
        Study("mqar-separation", "mqar", {"pairs": 4, "seq_len": 24, "vocab": 24, "eval_size": 256}, dim=32,
              layers=2, heads=2, batch=32, steps=400, lrs=(3e-3,), budget=20.0, reserve=True,
              mechanisms=("softmax", "linear"),
              about="a quick case that separates exact attention from elu+1 linear attention in seconds (softmax "
                    "reaches accuracy 1.0 within about 300 steps, linear attention stays near 0.35)"),
        Study("mqar", "mqar", {"pairs": 4, "seq_len": 32, "vocab": 64, "eval_size": 256},
              about="every mechanism, a few seconds each: a smoke test, not converged"),
        Study("digits", "digits", {}, about="real 8x8 digits for grid and channel mechanisms"),
        Study("skimage_patches", "skimage_patches", {"patch": 16, "eval_size": 500},
              about="16x16 patches of scikit-image's sample photographs (on request: --tasks skimage_patches)"),
    ],
    "full": [
        Study("mqar-L64-P8", "mqar", {"pairs": 8, "seq_len": 64, "vocab": 128, "eval_size": 1000}, dim=64,
              layers=2, heads=4, batch=32, steps=3000, lrs=(1e-3, 3e-3), budget=3600.0, options=MQAR_OPTIONS,
              sweep=MQAR_SWEEP, about="Zoology MQAR at CPU scale: every causal mechanism, the headline ranking"),
        Study("mqar-L128-P16", "mqar", {"pairs": 16, "seq_len": 128, "vocab": 256, "eval_size": 1000}, dim=128,
              layers=2, heads=4, batch=64, steps=2000, lrs=(1e-3, 3e-3), budget=1800.0, mechanisms=CORE,
              options=MQAR_OPTIONS),
        Study("mqar-L256-P32", "mqar", {"pairs": 32, "seq_len": 256, "vocab": 256, "eval_size": 500}, dim=128,
              layers=2, heads=4, batch=32, steps=3000, lrs=(1e-3,), budget=3600.0,
              mechanisms=("softmax", "linear", "based", "sliding_window", "lightning"), options=MQAR_OPTIONS),
        Study("mqar-L512-P64", "mqar", {"pairs": 64, "seq_len": 512, "vocab": 512, "eval_size": 250}, dim=256,
              layers=2, heads=4, batch=16, steps=3000, lrs=(1e-3,), budget=7200.0,
              mechanisms=("softmax", "linear", "based", "sliding_window"), options=MQAR_OPTIONS),
        Study("passkey-beyond-window", "passkey", {"seq_len": 128, "digits": 5, "min_distance": 96,
                                                  "eval_size": 500}, dim=64, layers=2, heads=4, batch=32,
              steps=800, lrs=(1e-3,), budget=3600.0, mechanisms=(
                  "softmax", "sliding_window", "sink_window", "landmark", "longheads", "cca", "linear", "based",
                  "s2_attention", "moa"), options=PASSKEY_OPTIONS,
              about="the key at least 96 tokens before the question, beyond every window and sink cache (softmax "
                    "reaches accuracy 1.0 within about 600 steps)"),
        Study("selective_copy", "selective_copy", {"seq_len": 128, "tokens": 16, "vocab": 16, "eval_size": 1000},
              dim=64, layers=2, heads=4, batch=32, steps=1500, lrs=(1e-3,), budget=900.0, mechanisms=CORE,
              options=PASSKEY_OPTIONS),
        Study("char_lm", "char_lm", {"seq_len": 128, "eval_windows": 256}, dim=128, layers=2, heads=4, batch=32,
              steps=2000, lrs=(1e-3,), budget=1200.0, mechanisms=CORE, options=PASSKEY_OPTIONS,
              about="bits per character on held-out real English text"),
        Study("icl_regression", "icl_regression", {"dim": 8, "pairs": 32, "queries": 8, "eval_size": 1000},
              dim=128, batch=64, steps=1500, lrs=(1e-3,), budget=90.0),
        Study("listops", "listops", {"max_len": 128, "max_depth": 4, "max_args": 4, "eval_size": 1000},
              dim=128, batch=64, steps=1500, lrs=(1e-3,), budget=90.0),
        Study("digits", "digits", {}, dim=128, batch=64, steps=1500, lrs=(1e-3,), budget=90.0),
        Study("skimage_patches", "skimage_patches", {"patch": 16, "eval_size": 1000}, dim=128, batch=64,
              steps=1500, lrs=(1e-3,), budget=90.0),
    ],
}

QUALITY_ONLY_EXTRA = ("mqar-separation",)
"""Quick studies that `attnzoo bench --quality` (quick) keeps beside the full profile's studies."""


def studies(profile: str, tasks: tuple[str, ...] | list[str] | None = None,
            names: tuple[str, ...] | list[str] | None = None) -> list[Study]:
    """The studies of ``profile`` ("quick" or "full") whose task is in ``tasks`` (and whose name is in
    ``names``, when given)."""
    if profile not in STUDIES:
        raise ValueError(f"profile: expected one of {sorted(STUDIES)}, got {profile!r}")
    out = [s for s in STUDIES[profile] if tasks is None or s.task in tasks]
    if names:
        known = {s.name for p in STUDIES.values() for s in p}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"studies: unknown {unknown}; expected some of {sorted(known)}")
        every = {s.name: s for p in ("quick", "full") for s in STUDIES[p]}
        out = [every[n] for n in names if tasks is None or every[n].task in tasks]
    return out


def mechanisms_of(study: Study, names: list[str]) -> list[str]:
    """The mechanisms of ``names`` the study trains (softmax first, the reference point of every study)."""
    pool = names if study.mechanisms is ALL else [n for n in study.mechanisms if n in names]
    return sorted(pool, key=lambda n: (n != "softmax", pool.index(n)))


def causal_sequence_mechanisms() -> list[str]:
    return [m.name for m in registry.mechanisms() if m.kind == "sequence" and "causal_self" in m.patterns]


# --------------------------------------------------------------------------------------------------------
# Learning-rate choice and ranking
# --------------------------------------------------------------------------------------------------------
def best_lr(values: dict[float, float | None], higher_is_better: bool) -> float | None:
    """The learning rate with the best value (None values lost; ties go to the smaller learning rate)."""
    ok = {lr: v for lr, v in values.items() if v is not None}
    if not ok:
        return None
    return min(ok, key=lambda lr: ((-ok[lr] if higher_is_better else ok[lr]), lr))


def summarize(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "seeds": len(values)}


def beats(a: dict[str, Any], b: dict[str, Any], higher_is_better: bool) -> bool:
    """True when ``a`` is better than ``b`` beyond the seed spread: their seed ranges do not overlap."""
    if higher_is_better:
        return a["min"] > b["max"]
    return a["max"] < b["min"]


def rank(entries: list[dict[str, Any]], higher_is_better: bool) -> list[dict[str, Any]]:
    """Each entry (with mean/min/max over seeds) gets ``rank`` = 1 + the number of entries better than it
    beyond the seed spread, and ``ties`` = the entries whose seed range overlaps its own; sorted by rank,
    then mean."""
    out = []
    for e in entries:
        better = [o for o in entries if o is not e and beats(o, e, higher_is_better)]
        ties = [o["key"] for o in entries if o is not e and not beats(o, e, higher_is_better)
                and not beats(e, o, higher_is_better)]
        out.append({**e, "rank": 1 + len(better), "ties": ties})
    out.sort(key=lambda e: (e["rank"], -e["mean"] if higher_is_better else e["mean"]))
    return out
