"""What a benchmark run measures: :class:`BenchConfig` and the ``quick`` and ``full`` profiles.

``quick`` (the default of ``attnzoo bench``) must finish in under 5 minutes on 2 cores while touching every
registered mechanism: it measures each mechanism's primary pattern at two short lengths, single-threaded,
with short repeat budgets, and gives the efficiency stage and each mechanism an explicit time budget that
shrinks as the registry grows (``deadline``), so ~70 mechanisms still fit. Every case that a budget cut is
recorded as ``skipped`` with the reason, never silently dropped. ``full`` is the thorough run: every
pattern, lengths 256..8192, all peers, every quality task with three seeds, and the real pretrained-model
stage (``attnzoo bench real``) when its model packages are installed (a missing one is recorded and printed).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import check_int
from ..registry import PATTERNS
from .built import DTYPES, MODES

PEERS = ("reference", "sdpa_masked", "flex", "local_attention")
"""Optional implementations measured beside a mechanism: its own reference form (when it has a fast one),
SDPA with its static mask materialized, compiled FlexAttention with its block mask, the `local-attention`
package (sliding windows)."""


@dataclass
class BenchConfig:
    profile: str = "quick"
    mechanisms: list[str] | None = None  # None = every registered mechanism
    lengths: tuple[int, ...] = (256, 1024)
    patterns: tuple[str, ...] | None = None  # None = every pattern a mechanism supports
    primary_pattern_only: bool = True  # quick: one pattern per mechanism (causal_self if supported)
    modes: tuple[str, ...] = MODES
    dtype: str = "float32"
    batch: int = 1
    heads: int = 4
    kv_heads: int | None = None  # None = heads (no grouped-query sharing)
    head_dim: int = 64
    threads: int = 1
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # mechanism -> option -> value
    cross_ratio: float = 0.5  # cross patterns: Nq = cross_ratio * Nk
    decode_tokens: int = 4
    min_run_time: float = 0.05
    warmup: int = 1
    retries: int = 1
    memory: bool = True
    peers: tuple[str, ...] = ("sdpa_masked",)
    peer_modes: tuple[str, ...] = ("forward",)
    mechanism_budget: float = 6.0  # seconds of efficiency measurement per mechanism (upper bound)
    deadline: float | None = 190.0  # seconds of measuring; budgets shrink to fit (None = no limit). The quick
    # profile leaves ~1.5 minutes of the 5 for start-up and rendering plots of a ~70-mechanism registry.
    efficiency_share: float = 0.55  # share of the deadline for the efficiency stage
    efficiency: bool = True
    quality: bool = True
    tasks: tuple[str, ...] = ("mqar", "digits")
    quality_steps: int = 200
    quality_budget: float = 3.0  # seconds of training per quality case (upper bound)
    seeds: tuple[int, ...] = (0,)
    real: bool = False  # the real pretrained-model stage (attnzoo.bench.real); full: on when its packages exist
    imports: list[str] = field(default_factory=list)
    isolate: bool = True  # every probe in a forked fresh process with a hard timeout (where fork exists)
    out: str = "bench-results"
    progress: bool = True
    command: str = ""

    def validate(self) -> BenchConfig:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {self.dtype!r}")
        for p in self.patterns or ():
            if p not in PATTERNS:
                raise ValueError(f"patterns: unknown {p!r}; expected some of {list(PATTERNS)}")
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"modes: unknown {m!r}; expected some of {list(MODES)}")
        for p in self.peers:
            if p not in PEERS:
                raise ValueError(f"peers: unknown {p!r}; expected some of {list(PEERS)}")
        for name, value in (("batch", self.batch), ("heads", self.heads), ("head_dim", self.head_dim),
                            ("threads", self.threads), ("decode_tokens", self.decode_tokens)):
            check_int(name, value)
        if self.kv_heads is not None and (self.kv_heads < 1 or self.heads % self.kv_heads):
            raise ValueError(f"kv_heads: expected a divisor of heads={self.heads}, got {self.kv_heads!r}")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.lengths):
            raise ValueError(f"lengths: expected sequence lengths >= 2, got {list(self.lengths)}")
        self.lengths = tuple(sorted(set(self.lengths)))
        if not 0 < self.cross_ratio < 1:
            raise ValueError(f"cross_ratio: expected a float in (0, 1), got {self.cross_ratio!r}")
        from .quality import TASKS

        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"tasks: unknown {t!r}; expected some of {sorted(TASKS)}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def quick(**overrides: Any) -> BenchConfig:
    return replace(BenchConfig(), **overrides).validate()


def full(**overrides: Any) -> BenchConfig:
    base = BenchConfig(
        profile="full",
        lengths=(256, 512, 1024, 2048, 4096, 8192),
        primary_pattern_only=False,
        threads=os.cpu_count() or 1,
        decode_tokens=16,
        min_run_time=0.5,
        warmup=2,
        retries=3,
        peers=PEERS,
        peer_modes=("forward", "forward_backward"),
        mechanism_budget=900.0,
        deadline=None,
        tasks=("mqar", "selective_copy", "passkey", "icl_regression", "listops", "char_lm", "digits"),
        quality_steps=1500,
        quality_budget=90.0,
        seeds=(0, 1, 2),
        real=True,
    )
    return replace(base, **overrides).validate()


PROFILES = {"quick": quick, "full": full}
