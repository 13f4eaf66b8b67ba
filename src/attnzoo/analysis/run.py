"""``attnzoo analyze``: the analyses of this package on real models and on any mechanism, as one results dict with
PNG figures (rendered to report.html / summary.md by :mod:`attnzoo.analysis.report`).

Targets and what each section measures (``--what``):

- ``smollm2`` (SmolLM2-135M-Instruct, causal LM)
  - ``retrieval-heads`` (P045): copy-paste retrieval scores from needle-in-a-haystack prompts; passkey accuracy with the
    top-k retrieval heads masked vs k random heads (several seeds);
  - ``sinks``: mass on the first token per head, hidden sinks beyond it; P046 ACT (head selection on calibration text,
    perplexity and passkey before/after); P098 VAR on a marked span of a text prompt;
  - ``importance`` (P019): gate ablation and gradient scores, attention-distance profiles;
  - ``maps``: attention maps and head entropies of a short prompt.
- ``minilm`` (all-MiniLM-L6-v2, encoder): ``importance``, ``maps``, ``sinks`` (mass on [CLS] / [SEP]).
- ``dinov2`` (DINOv2 ViT-S/14): ``importance``, ``maps`` (P113 regularised attention flow / rollout heatmaps over
  scikit-image's sample images, drawn over the images; per-head [CLS] maps), ``sinks`` ([CLS] mass, peak patches).
- ``whisper`` (Whisper tiny.en, encoder-decoder): ``alignment`` (the checkpoint's cross-attention alignment heads as
  a monotone word-to-audio alignment by DTW, on speech synthesised word by word with known word starts; the first
  decoder layer's heads as the control).
- any registered functional mechanism: ``maps`` and ``sinks`` of its effective operator on random inputs.

``mechanism``/``options`` switch the model's attention to an attnzoo mechanism (through :mod:`attnzoo.hf`); every
section then reads that mechanism's effective operator. Quick mode shrinks every size (tests, smoke runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import registry
from .context import Context
from .sections_media import (
    dinov2_importance,
    dinov2_maps,
    dinov2_sinks,
    mechanism_maps,
    mechanism_sinks,
    spoken_words,
    whisper_alignment,
)
from .sections_text import (
    minilm_importance,
    minilm_maps,
    minilm_sinks,
    smollm2_importance,
    smollm2_maps,
    smollm2_retrieval,
    smollm2_sinks,
)

__all__ = ["MODELS", "WHAT", "SUPPORTED", "RUNNERS", "Context", "analyze", "target_kind", "spoken_words"]

MODELS = ("smollm2", "minilm", "dinov2", "whisper")
WHAT = ("retrieval-heads", "sinks", "importance", "maps", "alignment")
SUPPORTED = {"smollm2": ("retrieval-heads", "sinks", "importance", "maps"), "whisper": ("alignment",),
             "minilm": ("sinks", "importance", "maps"), "dinov2": ("sinks", "importance", "maps"),
             "mechanism": ("sinks", "maps")}



RUNNERS: dict[tuple[str, str], Callable[[Context], dict[str, Any]]] = {
    ("smollm2", "retrieval-heads"): smollm2_retrieval, ("smollm2", "sinks"): smollm2_sinks,
    ("smollm2", "importance"): smollm2_importance, ("smollm2", "maps"): smollm2_maps,
    ("minilm", "importance"): minilm_importance, ("minilm", "maps"): minilm_maps, ("minilm", "sinks"): minilm_sinks,
    ("dinov2", "importance"): dinov2_importance, ("dinov2", "maps"): dinov2_maps, ("dinov2", "sinks"): dinov2_sinks,
    ("mechanism", "maps"): mechanism_maps, ("mechanism", "sinks"): mechanism_sinks,
    ("whisper", "alignment"): whisper_alignment,
}


def target_kind(target: str) -> str:
    if target in MODELS:
        return target
    registry.get(target)  # unknown names raise with a suggestion
    if not registry.get(target).functional:
        raise ValueError(f"target: {target!r} has no functional form (its attention lives inside its module); "
                         f"expected one of {list(MODELS)} or a functional mechanism")
    return "mechanism"


def analyze(target: str, what: list[str], *, out_dir: str, mechanism: str = "softmax",
            options: dict[str, Any] | None = None, quick: bool = False, reduced: bool = False, progress=None,
            cache=None) -> dict[str, Any]:
    """Run the ``what`` sections on ``target``; returns {"target", "mechanism", "options", "sections": {what: {...}},
    "seconds"}. Figures are written into ``out_dir``."""
    kind = target_kind(target)
    bad = [w for w in what if w not in SUPPORTED[kind]]
    if bad:
        raise ValueError(f"what: {bad[0]!r} is not available for {target!r}; expected some of {list(SUPPORTED[kind])}")
    if kind == "mechanism" and mechanism != "softmax":
        raise ValueError(f"mechanism: the target {target!r} is itself a mechanism; --mechanism switches a model's "
                         "attention")
    mech = registry.get(mechanism)
    if not mech.functional:
        raise ValueError(f"mechanism: {mechanism!r} has no functional form to run inside a model")
    if kind == "mechanism":  # the options are the target mechanism's
        registry.get(target).resolve_options(options or {})
        mech = registry.get("softmax")
    else:
        mech.resolve_options(options or {})
    ctx = Context(target, out_dir, mech.name, dict(options or {}), quick, progress,
                  cache=cache if cache is not None else {}, reduced=reduced)
    out: dict[str, Any] = {"target": target, "mechanism": mech.name, "options": dict(options or {}), "quick": quick,
                           "sections": {}}
    t0 = time.time()
    for w in what:
        ctx.say(f"{ctx.tag}: {w}")
        t = time.time()
        out["sections"][w] = RUNNERS[(kind, w)](ctx)
        out["sections"][w]["seconds"] = round(time.time() - t, 1)
    out["seconds"] = round(time.time() - t0, 1)
    return out
