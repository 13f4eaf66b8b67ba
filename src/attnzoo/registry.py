"""The registry: one `Mechanism` record per attention mechanism.

The record is the single source of truth about a mechanism's capabilities. The README table,
``attnzoo list``, the conformance tests' parametrization and the benchmark all read it.

A mechanism file registers itself at import time with :func:`register`; every module under
``attnzoo.mechanisms`` is imported when the registry is first read, so adding a mechanism means adding
one file and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionError, UnknownMechanismError, UnsupportedPatternError, suggest

PATTERNS: tuple[str, ...] = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")
"""The four patterns of the Comprehensive Attention Benchmark (CAB, arXiv 2210.07661).

``causal`` is aligned bottom-right everywhere in attnzoo: query ``i`` of ``Nq`` sees key ``j`` of ``Nk``
iff ``j <= i + (Nk - Nq)``. For self attention (Nq == Nk) that is the usual lower triangle; for
Nq < Nk it is KV-cache decoding and chunked prefill.
"""

FAMILIES: tuple[str, ...] = (
    "core", "dense", "heads", "linear", "memory", "local", "sparse", "cross", "vision", "reduce", "analysis",
)
KINDS: tuple[str, ...] = ("sequence", "grid", "channel", "pooling", "fusion")
"""What a mechanism consumes: ``sequence`` = SDPA-layout q/k/v (or (B, N, C) tokens for its module);
``grid`` = token grids (B, H, W, C) channels-last; ``channel`` = CNN maps (B, C, H, W);
``pooling`` = (B, N, C) -> (B, M, C) with learned queries; ``fusion`` = two token streams."""

_MISSING = object()


@dataclass(frozen=True)
class CrossSpec:
    """How a mechanism with a cross pattern takes its context (ARCHITECTURE.md, "Cross-attention").

    Read by the conformance suite's cross checks, ``attnzoo bench`` and ``attnzoo info``. A record with a cross
    pattern and no spec gets :meth:`Mechanism.cross_spec`'s default: one unnamed context (the ``k``/``v`` of a
    functional call, or ``forward(x, context)``), positions = indices (bottom-right causal).

    - ``sources``: the named context streams a module takes, ``forward(x, context={name: (B, M_s, C_s)},
      key_padding_mask={name: (B, M_s)})``; ``()`` = one context tensor (B, M, C).
    - ``positions``: causal cross by position: ``forward(..., q_pos=(Nq,), context_pos={name: (M_s,)})`` (a pooling
      module, whose queries are its own, takes ``context_pos`` and reports ``query_positions(...)``); a query
      sees a context token iff the token's position is <= its own. Replaces the index-based causality checks.
    - ``context_permutation_invariant``: permuting the context tokens (with their positions and masks) leaves
      every output unchanged (the paper's attention has no order over the context).
    - ``query_independent``: each query's output depends only on that query and the context, so queries can be
      decoded one at a time against a cached context (False e.g. when queries are pooled or sorted together).
    - ``cache``: the module decodes against a :class:`attnzoo.state.context.ContextCache` (``state=``).
    - ``source_mass``: ``forward(..., return_source_mass=True)`` also returns each source's attention mass.
    - ``mode``: how several sources combine, ``"separate"`` or ``"joint"``; None when a ``mode`` option decides.
    """

    sources: tuple[str, ...] = ()
    positions: bool = False
    context_permutation_invariant: bool = False
    query_independent: bool = True
    cache: bool = False
    source_mass: bool = False
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in (None, "separate", "joint"):
            raise ValueError(f"mode: expected None, 'separate' or 'joint', got {self.mode!r}")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources: duplicate names {list(self.sources)}")

    def as_dict(self) -> dict[str, Any]:
        return {"sources": list(self.sources), "positions": self.positions,
                "context_permutation_invariant": self.context_permutation_invariant,
                "query_independent": self.query_independent, "cache": self.cache,
                "source_mass": self.source_mass, "mode": self.mode}


@dataclass(frozen=True)
class Option:
    """One mechanism option: its default, type and valid range, checked by :meth:`validate`."""

    name: str
    default: Any
    type: type | tuple[type, ...] = int
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    allow_none: bool = False
    doc: str = ""

    def validate(self, value: Any, mechanism: str) -> Any:
        where = f"{self.name} (option of mechanism {mechanism!r})"
        if value is None:
            if self.allow_none or self.default is None:
                return None
            raise OptionError(f"{where}: expected {self.describe()}, got None")
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        # bool is an int subclass: never let True pass as a window size, or 1 as a flag.
        if isinstance(value, bool) and bool not in types:
            raise OptionError(f"{where}: expected {self.describe()}, got {value!r}")
        if not isinstance(value, types):
            if float in types and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            else:
                raise OptionError(f"{where}: expected {self.describe()}, got {value!r} ({type(value).__name__})")
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{where}: expected one of {list(self.choices)}, got {value!r}")
        if self.low is not None and value < self.low:
            raise OptionError(f"{where}: expected {self.describe()}, got {value!r}")
        if self.high is not None and value > self.high:
            raise OptionError(f"{where}: expected {self.describe()}, got {value!r}")
        return value

    def describe(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        s = " or ".join(t.__name__ for t in types)
        if self.choices is not None:
            s += f" in {list(self.choices)}"
        if self.low is not None and self.high is not None:
            s += f" in [{self.low}, {self.high}]"
        elif self.low is not None:
            s += f" >= {self.low}"
        elif self.high is not None:
            s += f" <= {self.high}"
        if self.allow_none:
            s += " or None"
        return s


@dataclass(frozen=True)
class Mechanism:
    """Capabilities and entry points of one attention mechanism.

    Functional entry points (``kind == "sequence"``), all on SDPA-layout tensors
    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv):

    - ``reference(q, k, v, *, causal, key_padding_mask, scale, **options) -> (B, Hq, Nq, Dv)``:
      readable, correct in float64, trainable.
    - ``fast(...)``: same signature, the efficient algorithm of the paper; must agree with reference.
    - ``fast_supports(q, k, v, causal, key_padding_mask, options) -> str | None``: None when ``fast``
      handles these inputs, else the reason it does not (``backend="auto"`` then uses reference).
    - ``init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, **options)`` -> a decode state
      and ``step(q, k, v, state, *, scale, key_padding_mask=None, **options) -> out``: causal decoding;
      q/k/v hold the T >= 1 new tokens, the state is updated in place.

    ``prefix_invariant=False`` declares that a causal output at position i depends on later *queries* or on
    the total length (e.g. HyperAttention's causal recursion sorts the queries of a half into LSH blocks),
    so it is not a function of the prefix alone; the conformance suite then skips the prefix-invariance
    check (the key/value causality check still runs) and the record says so.

    ``test_options``/``test_sizes`` are the options and sizes (fields of ``attnzoo.testing.Sizes``) the
    conformance suite uses, chosen so that the mechanism's structure is exercised at tiny sizes (a window
    smaller than the sequence, more than one block). ``supports_key_padding=False`` declares that a
    key-padding mask raises instead of being honoured (it is never silently dropped).

    A module mechanism with a fast form sets ``fast`` (to the fast function, any signature) and gives its
    module a ``backend`` attribute ("auto", "reference" or "fast") read at forward time, so the
    conformance suite can compare the two forms.

    ``mask(nq, nk, *, causal, heads, kv_heads, **options) -> predicate``, for mechanisms whose attention pattern
    is a static mask (independent of the content): the ``(b, h, q_idx, kv_idx) -> bool`` predicate of
    ``attnzoo.masks`` (True = attend, bottom-right aligned) such that the reference equals softmax attention under
    it. ``heads``/``kv_heads`` are the call's query and key/value head counts (None: the mechanism's default, e.g.
    one window per MoA head); per-head patterns (MoA, S2-Attention, SinkLoRA) read ``h``, others ignore it. The
    predicate's ``heads`` attribute, when set, says how many heads it defines. ``attnzoo bench`` uses it to run
    FlexAttention and masked dense SDPA beside the mechanism, ``attnzoo.analysis.mask_plot`` to draw it.

    ``case_options(*, n, side, heads, causal) -> dict``: options (and, under the key ``"heads"``, a head count)
    that a benchmark or training case of ``n`` tokens (a ``side`` x ``side`` grid for grid kinds) needs where
    the defaults cannot fit every size (a window count that must divide the grid, token projections built
    for one length, a single-head design). Options a user gives explicitly win; see :meth:`fit_case`.

    ``decode_prefill(**options) -> int``, for a causal mask with a bidirectional region that token-by-token
    decoding cannot give (Croc's visual span, AKI's image + prompt): decoding from an empty state must take
    positions ``[0, P)`` in its first step (the prompt's prefill; a step that cuts the region raises), then it may go
    token by token. The conformance and reliability suites prefill that much; None = any step size from position 0.

    ``cross`` (:class:`CrossSpec`) says how a mechanism with a cross pattern takes its context: named sources,
    causal by position, context permutation invariance, decoding against a cached context, source mass.

    Mechanisms with their own parameters give ``module``: a class or factory
    ``module(dim, heads, *, kv_heads=None, causal=False, **options) -> nn.Module`` whose forward is
    ``forward(x, context=None, *, key_padding_mask=None, state=None)`` (sequence kind) or
    ``forward(x)`` (grid/channel kinds).
    """

    name: str
    family: str
    title: str
    arxiv: str
    code: str
    summary: str
    patterns: tuple[str, ...]
    exact: bool
    complexity: str
    kind: str = "sequence"
    catalog: str = ""
    aliases: tuple[str, ...] = ()
    state: str | None = None
    reference: Callable[..., Any] | None = None
    fast: Callable[..., Any] | None = None
    fast_supports: Callable[..., str | None] | None = None
    step: Callable[..., Any] | None = None
    init_state: Callable[..., Any] | None = None
    module: Callable[..., Any] | None = None
    mask: Callable[..., Any] | None = None
    options: tuple[Option, ...] = ()
    permutation_equivariant: bool = False
    supports_key_padding: bool = True
    prefix_invariant: bool = True
    test_options: Mapping[str, Any] = field(default_factory=dict)
    test_sizes: Mapping[str, int] = field(default_factory=dict)
    case_options: Callable[..., dict[str, Any]] | None = None
    decode_prefill: Callable[..., int] | None = None
    cross: CrossSpec | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad:
            raise ValueError(f"patterns of {self.name!r}: unknown {bad}; expected a subset of {list(PATTERNS)}")
        if self.family not in FAMILIES:
            raise ValueError(f"family of {self.name!r}: expected one of {list(FAMILIES)}, got {self.family!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind of {self.name!r}: expected one of {list(KINDS)}, got {self.kind!r}")
        if self.reference is None and self.module is None:
            raise ValueError(f"{self.name!r}: a mechanism needs a reference function or a module")
        if (self.step is None) != (self.init_state is None):
            raise ValueError(f"{self.name!r}: step and init_state come together")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name!r}: duplicate option names {names}")

    @property
    def functional(self) -> bool:
        """True when ``attnzoo.attention(q, k, v, mechanism=name)`` applies (no own parameters)."""
        return self.kind == "sequence" and self.reference is not None

    @property
    def decodable(self) -> bool:
        return self.step is not None or (self.state is not None and self.module is not None)

    def cross_spec(self) -> CrossSpec | None:
        """The record's :class:`CrossSpec`, the default one for a record with a cross pattern and none, or None
        when it has no cross pattern."""
        if self.cross is not None:
            return self.cross
        if not any(p.endswith("cross") for p in self.patterns):
            return None
        return CrossSpec(context_permutation_invariant=self.permutation_equivariant)

    def supports(self, pattern: str) -> bool:
        return pattern in self.patterns

    def check_pattern(self, pattern: str) -> None:
        if pattern not in self.patterns:
            raise UnsupportedPatternError(
                f"mechanism {self.name!r} does not support pattern {pattern!r}; "
                f"it supports {list(self.patterns)}"
            )

    def fit_case(self, given: Mapping[str, Any], *, n: int, side: int | None, heads: int,
                 causal: bool) -> tuple[dict[str, Any], int]:
        """(options, heads) for a case of ``n`` tokens / a ``side`` x ``side`` grid: ``case_options`` under the
        explicitly ``given`` options (which win). Without ``case_options``: (given, heads)."""
        if self.case_options is None:
            return dict(given), heads
        fit = dict(self.case_options(n=n, side=side, heads=heads, causal=causal))
        heads = int(fit.pop("heads", heads))
        return {**fit, **given}, heads  # validated where they are used (resolve_options / build)

    def min_prefill(self, options: Mapping[str, Any]) -> int:
        """Positions a decode from an empty state must take in its first step under ``options`` (resolved):
        ``decode_prefill(**options)``, or 1 when the record declares none."""
        return 1 if self.decode_prefill is None else max(1, int(self.decode_prefill(**options)))

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``given`` against the declared options and fill in defaults."""
        known = {o.name: o for o in self.options}
        unknown = [k for k in given if k not in known]
        if unknown:
            hint = suggest(unknown[0], known)
            expected = sorted(known) if known else "none"
            raise OptionError(
                f"{unknown[0]}: unknown option of mechanism {self.name!r} (options: {expected}).{hint}"
            )
        out = {}
        for name, opt in known.items():
            out[name] = opt.validate(given[name], self.name) if name in given else opt.default
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "family": self.family,
            "kind": self.kind,
            "catalog": self.catalog,
            "title": self.title,
            "arxiv": self.arxiv,
            "code": self.code,
            "summary": self.summary,
            "patterns": list(self.patterns),
            "exact": self.exact,
            "prefix_invariant": self.prefix_invariant,
            "state": self.state,
            "complexity": self.complexity,
            "forms": self.forms(),
            "options": [
                {"name": o.name, "default": o.default, "valid": o.describe(), "doc": o.doc} for o in self.options
            ],
            "cross": None if self.cross_spec() is None else self.cross_spec().as_dict(),
            "notes": self.notes,
        }

    def forms(self) -> list[str]:
        forms = []
        if self.reference is not None:
            forms.append("reference")
        if self.fast is not None:
            forms.append("fast")
        if self.step is not None:
            forms.append("step")
        if self.module is not None:
            forms.append("module")
        return forms


_REGISTRY: dict[str, Mechanism] = {}
_ALIASES: dict[str, str] = {}
_LOADED = False


def register(mech: Mechanism) -> Mechanism:
    """Add ``mech`` to the registry; names and aliases must be unique."""
    for key in (mech.name, *mech.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"mechanism name {key!r} is already registered")
    _REGISTRY[mech.name] = mech
    for alias in mech.aliases:
        _ALIASES[alias] = mech.name
    return mech


def unregister(name: str) -> None:
    """Remove a mechanism (tests register throw-away mechanisms and remove them)."""
    mech = _REGISTRY.pop(name)
    for alias in mech.aliases:
        _ALIASES.pop(alias, None)


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module(f"{__package__}.mechanisms")
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
        importlib.import_module(info.name)


def get(name: str) -> Mechanism:
    """The record of mechanism ``name`` (or an alias); unknown names get a close-match suggestion."""
    if not isinstance(name, str):
        raise TypeError(f"mechanism: expected a mechanism name (str), got {type(name).__name__}")
    _load_all()
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise UnknownMechanismError(
            f"mechanism: unknown name {name!r}.{suggest(name, [*_REGISTRY, *_ALIASES])} "
            f"See `attnzoo list` for the {len(_REGISTRY)} registered mechanisms."
        )
    return _REGISTRY[key]


def mechanisms(family: str | None = None, kind: str | None = None) -> list[Mechanism]:
    """All registered mechanisms, sorted by family then name."""
    _load_all()
    out = sorted(_REGISTRY.values(), key=lambda m: (FAMILIES.index(m.family), m.name))
    if family is not None:
        out = [m for m in out if m.family == family]
    if kind is not None:
        out = [m for m in out if m.kind == kind]
    return out


def names() -> list[str]:
    return [m.name for m in mechanisms()]

