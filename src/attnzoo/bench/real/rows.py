"""The rows of ``attnzoo bench real`` (which mechanisms, with which options, and why) and its settings.

``ROWS`` is the one list the run and the CLI's validation read (``attnzoo.bench.real.ROWS`` is the same list
object: append to it to add a row; a test that replaces the whole list patches ``attnzoo.bench.real.rows.ROWS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ... import registry


@dataclass(frozen=True)
class Row:
    """One mechanism of the real-model table and the options it runs with.

    ``decoder``: options in SmolLM2 (chosen so that the mechanism drops context at 1k-4k tokens, from the
    paper's own settings where they do); ``encoder``: options in MiniLM (sentences of ~10-100 tokens);
    ``prefix_invariant``: with these options the causal output at position i depends on tokens <= i only
    (then shorter perplexity windows are read from the longest one); ``note``: where the options come from.
    """

    mechanism: str
    decoder: dict[str, Any] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)
    prefix_invariant: bool = True
    note: str = ""


ROWS: list[Row] = [
    Row("softmax", note="exact attention through the adapter: the fidelity row"),
    Row("sliding_window", {"window": 256}, {"window": 16}, note="window 256 (MiniLM: 16)"),
    Row("sink_window", {"window": 256, "sinks": 4}, {"window": 16, "sinks": 4},
        note="StreamingLLM: 4 sink tokens + window 256"),
    Row("moa", {"alphas": 128, "betas": 0.125, "sinks": 64, "min_span": 128, "span_multiple": 64}, {},
        prefix_invariant=False,
        note="MoA's runtime constants (64 sinks, spans >= 128 in multiples of 64) with one uniform elastic plan "
             "span = 128 + N/8 for every head (MoA's per-head profile/search is not part of attnzoo); the span "
             "depends on the length N, so each length is its own forward"),
    Row("hyperattention", {"block_size": 256, "sample_size": 256, "min_seq_len": 512},
        {"block_size": 16, "sample_size": 16, "min_seq_len": 32}, prefix_invariant=False,
        note="the paper's b = m = 256 in every layer; min_seq_len lowered from 4096 to 512 so the "
             "approximation acts at 1k-4k (the paper patches only some layers at 32k); no decode form"),
    Row("longheads", {"chunk_size": 256, "max_chunks": 4}, {},
        note="the paper's chunk 256; max_chunks 4 (a 1k budget, L = 1024) so chunk selection acts at 2k-4k"),
    Row("recycled", {"stride": 10, "top_k": 256, "start": 0}, {},
        note="a full step every 10 positions, 256 recycled keys per KV head; start 0: every position after "
             "the first is a decoding step (the strictest schedule)"),
    Row("dma", {"window": 256, "bias_scale": 0.0}, {"window": 16},
        note="training-free form: top-256 keys by value norm, pretrained logits untouched (bias_scale 0)"),
    Row("hip", {"topk": 512, "block_size_q": 32, "block_size_k": 8, "sliding_window": 128, "sinks": 4},
        {"topk": 16, "block_size_q": 8, "block_size_k": 4, "sliding_window": 8, "sinks": 1}, prefix_invariant=False,
        note="the official defaults (mask_k 512, b_q 32, b_k 8, window 128, 4 sinks); a query block's search "
             "depends on its later queries, so each length is its own forward"),
]

STAGES = ("perplexity", "passkey", "decode")
MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to float32)"
MINILM_NAME = "all-MiniLM-L6-v2"


def corpus_text() -> tuple[str, str]:
    """(name, text): gensim's Lee background corpus if gensim is installed, else Python's pydoc topics."""
    try:
        from gensim.test.utils import datapath

        with open(datapath("lee_background.cor"), encoding="utf-8") as f:
            return "gensim lee_background.cor", f.read()
    except ImportError:
        from pydoc_data.topics import topics

        return "pydoc_data.topics", "\n\n".join(topics[k] for k in sorted(topics))


class _Silent:
    def message(self, msg: str) -> None:
        pass

    def total(self, n: int) -> None:
        pass

    def tick(self, n: int = 1) -> None:
        pass


@dataclass
class RealConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_seeds: int = 1
    prefill: int = 1024
    new_tokens: int = 32
    mechanisms: tuple[str, ...] | None = None  # None = every row of ROWS ("sdpa" is always measured)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # decoder option overrides per mechanism
    encoder_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # MiniLM option overrides
    minilm: bool = True
    minilm_sentences: int = 64
    share_prefix: bool = True  # read shorter perplexity windows from the longest for prefix-invariant rows
    stages: tuple[str, ...] = STAGES  # which decoder-row measurements run
    decode_threads: int | None = 1  # torch threads while decoding one token at a time (None: torch's default)
    deadline: float | None = None  # seconds: rows (and MiniLM) not started by then are recorded as skipped
    checkpoint: Any = None  # called with the section after every row (the CLI saves results.json)
    dtype: torch.dtype = torch.float32
    progress: Any = field(default_factory=_Silent)  # .message(str), .total(int), .tick(int) (runner.Progress)

    def validate(self) -> RealConfig:
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(f"lengths: expected token counts >= 64, got {list(self.lengths)}")
        self.lengths = tuple(sorted(set(self.lengths)))
        if not self.passkey_depths or any(not 0 <= d <= 1 for d in self.passkey_depths):
            raise ValueError(f"passkey_depths: expected relative depths in [0, 1], got {list(self.passkey_depths)}")
        bad = [x for x in self.stages if x not in STAGES]
        if bad or not self.stages:
            raise ValueError(f"stages: expected some of {list(STAGES)}, got {list(self.stages)}")
        self.stages = tuple(x for x in STAGES if x in self.stages)
        if self.decode_threads is not None and (isinstance(self.decode_threads, bool)
                                                or not isinstance(self.decode_threads, int) or self.decode_threads < 1):
            raise ValueError(f"decode_threads: expected an int >= 1 or None, got {self.decode_threads!r}")
        for name in ("passkey_seeds", "prefill", "new_tokens", "minilm_sentences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.mechanisms is not None:
            known = {r.mechanism for r in ROWS} | {"sdpa"}
            unknown = [m for m in self.mechanisms if m not in known]
            if unknown:
                raise ValueError(f"mechanisms: {unknown} not in the real-model rows; expected some of "
                                 f"{sorted(known)} (add a Row to attnzoo.bench.real.ROWS for another one)")
        for label, given in (("--option", self.options), ("--encoder-option", self.encoder_options)):
            unknown = [m for m in given if m not in {r.mechanism for r in ROWS}]
            if unknown:
                raise ValueError(f"{label}: {unknown} not in the real-model rows; expected some of "
                                 f"{sorted(r.mechanism for r in ROWS)}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"lengths": list(self.lengths), "passkey_depths": list(self.passkey_depths),
                "passkey_seeds": self.passkey_seeds, "prefill": self.prefill, "new_tokens": self.new_tokens,
                "mechanisms": None if self.mechanisms is None else list(self.mechanisms),
                "options": self.options, "encoder_options": self.encoder_options, "minilm": self.minilm,
                "minilm_sentences": self.minilm_sentences, "share_prefix": self.share_prefix,
                "deadline": self.deadline, "stages": list(self.stages), "decode_threads": self.decode_threads,
                "dtype": str(self.dtype).replace("torch.", "")}


def quick_config(**overrides: Any) -> RealConfig:
    """Smoke-run settings: lengths 512 and 1024, one passkey depth, a short decode."""
    base = {"lengths": (512, 1024), "passkey_depths": (0.5,), "prefill": 256, "new_tokens": 8,
            "minilm_sentences": 16}
    return RealConfig(**{**base, **overrides}).validate()


def plan(cfg: RealConfig) -> list[tuple[Row, dict[str, Any], dict[str, Any], str | None]]:
    """(row, decoder options, encoder options, reason it is skipped or None) in table order."""
    out = []
    for row in ROWS:
        if cfg.mechanisms is not None and row.mechanism not in cfg.mechanisms:
            continue
        dec = {**row.decoder, **cfg.options.get(row.mechanism, {})}
        enc = {**row.encoder, **cfg.encoder_options.get(row.mechanism, {})}
        try:
            mech = registry.get(row.mechanism)
        except KeyError:
            out.append((row, dec, enc, "not registered"))
            continue
        skip = None if mech.functional else "has its own parameters (needs training)"
        out.append((row, dec, enc, skip))
    return out


def unevaluated() -> list[dict[str, str]]:
    """Registered functional mechanisms that have no row (so none is dropped without a word)."""
    listed = {r.mechanism for r in ROWS}
    return [{"mechanism": m.name, "reason": "no row in attnzoo.bench.real.ROWS (not a training-free replacement "
             "of softmax attention, or not chosen yet)"}
            for m in registry.mechanisms() if m.functional and m.name not in listed]
