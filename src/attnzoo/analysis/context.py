"""What an analysis section needs (:class:`Context`: target, switched mechanism, sizes, output directory, progress,
the loaded models) and two helpers every section uses (a figure record, a model's next-token NLL under the
analyzer). The sections live in :mod:`.sections_text` (SmolLM2, MiniLM) and :mod:`.sections_media` (DINOv2,
Whisper, a mechanism on random inputs); :mod:`.run` dispatches to them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Context:
    """What a section needs: the target, the switched mechanism, sizes, the output directory and progress."""

    target: str
    out_dir: str
    mechanism: str = "softmax"
    options: dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    progress: Any = None
    seed: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    reduced: bool = False  # fewer prompts (the mechanism-switched runs of the full report)

    def pick(self, quick, reduced, full):
        """The size of a setting in quick / reduced / full runs."""
        return quick if self.quick else reduced if self.reduced else full

    @property
    def tag(self) -> str:
        if self.mechanism == "softmax":
            return self.target
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.target}+{self.mechanism}" + (f"({opts})" if opts else "")

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.tag).strip("_")

    def path(self, name: str) -> str:
        import os

        return os.path.join(self.out_dir, f"{self.slug}_{name}.png")

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.message(msg)

    def tick(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.tick(n)

    def model(self, name: str):
        if name not in self.cache:
            from .. import models

            self.say(f"loading {name}")
            self.cache[name] = {"smollm2": models.load_smollm2, "minilm": models.load_minilm,
                                "dinov2": models.load_dinov2_small, "whisper": models.load_whisper_tiny_en}[name]()
        return self.cache[name]

    def corpus_ids(self) -> torch.Tensor:
        if "corpus" not in self.cache:
            from ..bench.real import corpus_text

            _, tok = self.model("smollm2")
            name, text = corpus_text()
            self.cache["corpus_name"] = name
            self.cache["corpus"] = tok(text, return_tensors="pt")["input_ids"]
        return self.cache["corpus"]


def figure(path: str, title: str, caption: str) -> dict[str, str]:
    import os

    return {"file": os.path.basename(path), "title": title, "caption": caption}


def nll(model, ids: torch.Tensor, mechanism: str, options: dict, hooks=()) -> float:
    """Mean next-token NLL of a (1, N) window with the analyzer's hooks."""
    from .capture import Analyzer

    with torch.no_grad(), Analyzer(model, mechanism, hooks=list(hooks), **options):
        logits = model(ids, use_cache=False).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))
