"""The reduction registry: one ``Reduction`` record per token-reduction paper (CATALOG family ``reduce``).

A parallel registry beside ``attnzoo.registry`` (whose ``Mechanism`` record describes an attention function over
q/k/v, its patterns, decode state and conformance suite; a reduction is none of that). It reuses the family name
``"reduce"`` of ``attnzoo.registry.FAMILIES`` and the record's shared fields (name, title, arXiv id, official code,
CATALOG id), and says what a method scores and what it keeps. Records register when ``attnzoo.reduce`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UnknownMechanismError, suggest
from ..registry import FAMILIES

STEPS: tuple[str, ...] = ("prune", "merge", "compress", "exit", "mask")
"""What a reduction does to the tokens: ``prune`` keeps a subset (original order), ``merge`` averages groups
(sizes tracked, unmergeable), ``compress`` replaces them with M new tokens (learned queries), ``exit`` removes a
whole modality after a layer, ``mask`` restricts who attends to whom (computation pruning without dropping)."""


@dataclass(frozen=True)
class Reduction:
    """One token-reduction method: what it scores, what it keeps, its entry point."""

    name: str
    catalog: str
    title: str
    arxiv: str
    code: str
    step: str
    scores: str
    keeps: str
    training_free: bool
    entry: Callable[..., Any]
    family: str = "reduce"
    notes: str = ""

    def __post_init__(self) -> None:
        if self.step not in STEPS:
            raise ValueError(f"step of {self.name!r}: expected one of {list(STEPS)}, got {self.step!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family of {self.name!r}: expected one of {list(FAMILIES)}, got {self.family!r}")
        if not (self.catalog.startswith("P") and self.catalog[1:].isdigit()):
            raise ValueError(f"catalog of {self.name!r}: expected a CATALOG id like 'P057', got {self.catalog!r}")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "catalog": self.catalog, "family": self.family, "title": self.title,
                "arxiv": self.arxiv, "code": self.code, "step": self.step, "scores": self.scores,
                "keeps": self.keeps, "training_free": self.training_free,
                "entry": f"{self.entry.__module__}.{self.entry.__qualname__}", "notes": self.notes}


_REDUCTIONS: dict[str, Reduction] = {}


def register_reduction(rec: Reduction) -> Reduction:
    if rec.name in _REDUCTIONS:
        raise ValueError(f"reduction name {rec.name!r} is already registered")
    _REDUCTIONS[rec.name] = rec
    return rec


def reductions() -> list[Reduction]:
    """All registered reductions, sorted by CATALOG id."""
    from .. import reduce  # noqa: F401  (importing the package registers every record)

    return sorted(_REDUCTIONS.values(), key=lambda r: (r.catalog, r.name))


def get_reduction(name: str) -> Reduction:
    from .. import reduce  # noqa: F401

    if name not in _REDUCTIONS:
        raise UnknownMechanismError(f"reduction: unknown name {name!r}.{suggest(name, _REDUCTIONS)} "
                                    f"Registered: {sorted(_REDUCTIONS)}")
    return _REDUCTIONS[name]
