"""What a benchmark run measures: :class:`BenchConfig` and the ``quick`` and ``full`` profiles.

``quick`` (the default of ``attnzoo bench``) must finish in under 5 minutes on 2 cores while touching every
registered mechanism: it measures each mechanism's primary pattern at two short lengths, single-threaded,
with short repeat budgets, and gives the efficiency stage and each mechanism an explicit time budget that
shrinks as the registry grows (``deadline``), so ~70 mechanisms still fit. Every case that a budget cut is
recorded as ``skipped`` with the reason, never silently dropped. ``full`` is the thorough run: every
pattern, lengths 256..8192 (and 16384, 32768 for the sub-quadratic families -- local, linear, sparse,
memory -- so that their efficiency length is found; forward+backward to 16384), all peers, every quality
study of :mod:`attnzoo.bench.quality.protocol` with three seeds and a learning-rate sweep, and the real
pretrained-model stage (``attnzoo bench real``) when its model packages are installed (a missing one is
recorded and printed). ``quality`` is the full profile's quality stage alone (``attnzoo bench --quality``).
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
    long_lengths: tuple[int, ...] = ()  # further lengths for the sub-quadratic families (full: 16k, 32k)
    long_families: tuple[str, ...] = ("local", "linear", "sparse", "memory")  # sequence mechanisms measured there
    long_fwd_bwd_max: int | None = 16384  # forward+backward only up to this long length (its memory)
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
    deadline: float | None = 180.0  # seconds of measuring; budgets shrink to fit (None = no limit). The quick
    # profile leaves ~2 minutes of the 5 for start-up and rendering plots of a ~70-mechanism registry (205 s of
    # measuring took 5 min 7 s of wall time on 2 cores shared at load ~2.5: start-up and plots took 94 s).
    efficiency_share: float = 0.5  # share of the deadline for the efficiency stage (quality: 40 s reserved)
    efficiency: bool = True
    quality: bool = True
    tasks: tuple[str, ...] = ("mqar", "digits")
    studies: tuple[str, ...] | None = None  # quality studies (quality/protocol.py); None = the profile's
    quality_steps: int | None = None  # training steps per quality case; None = each study's own
    quality_budget: float | None = None  # seconds of training per quality case (upper bound); None = the study's
    quality_lrs: tuple[float, ...] | None = None  # learning rates swept; None = each study's own
    quality_sweep: bool = True  # each study's option sweep (recall-vs-state points); False: its own setting only
    seeds: tuple[int, ...] = (0,)
    quality_workers: int = 1  # quality cases trained at once (each in its own fork server, `threads` each)
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
                            ("threads", self.threads), ("decode_tokens", self.decode_tokens),
                            ("quality_workers", self.quality_workers)):
            check_int(name, value)
        if self.kv_heads is not None and (self.kv_heads < 1 or self.heads % self.kv_heads):
            raise ValueError(f"kv_heads: expected a divisor of heads={self.heads}, got {self.kv_heads!r}")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.lengths):
            raise ValueError(f"lengths: expected sequence lengths >= 2, got {list(self.lengths)}")
        self.lengths = tuple(sorted(set(self.lengths)))
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.long_lengths):
            raise ValueError(f"long_lengths: expected sequence lengths >= 2, got {list(self.long_lengths)}")
        self.long_lengths = tuple(sorted(set(self.long_lengths) - set(self.lengths)))
        if not 0 < self.cross_ratio < 1:
            raise ValueError(f"cross_ratio: expected a float in (0, 1), got {self.cross_ratio!r}")
        from .quality import TASKS
        from .quality.protocol import studies

        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"tasks: unknown {t!r}; expected some of {sorted(TASKS)}")
        studies(self.study_profile(), self.tasks, self.studies)  # raises on an unknown study name
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise ValueError(f"seeds: expected one or more ints, got {list(self.seeds)}")
        if self.quality_steps is not None and (isinstance(self.quality_steps, bool) or self.quality_steps < 1):
            raise ValueError(f"quality_steps: expected an int >= 1 or None, got {self.quality_steps!r}")
        if self.quality_budget is not None and not self.quality_budget > 0:
            raise ValueError(f"quality_budget: expected seconds > 0 or None, got {self.quality_budget!r}")
        if self.quality_lrs is not None and (not self.quality_lrs or any(not lr > 0 for lr in self.quality_lrs)):
            raise ValueError(f"quality_lrs: expected learning rates > 0, got {self.quality_lrs!r}")
        return self

    def study_profile(self) -> str:
        """Which profile's quality studies run: quick's, or the full profile's (full and quality)."""
        return "quick" if self.profile == "quick" else "full"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def quick(**overrides: Any) -> BenchConfig:
    return replace(BenchConfig(), **overrides).validate()


def full(**overrides: Any) -> BenchConfig:
    base = BenchConfig(
        profile="full",
        lengths=(256, 512, 1024, 2048, 4096, 8192),
        long_lengths=(16384, 32768),
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
        seeds=(0, 1, 2),
        real=True,
    )
    return replace(base, **overrides).validate()


def quality(**overrides: Any) -> BenchConfig:
    """``attnzoo bench --quality``: the full profile's quality studies alone (no timing, no real models)."""
    base = replace(full(), profile="quality", efficiency=False, real=False, threads=1)
    return replace(base, **overrides).validate()


PROFILES = {"quick": quick, "full": full, "quality": quality}
