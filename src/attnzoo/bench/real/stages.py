"""The measurements of ``attnzoo bench real`` and the three stages of a decoder row that use them.

Measurements (any causal LM of transformers): hidden states and chunked per-token losses (perplexity), the
passkey prompt and its teacher-forced check, greedy decoding speed and the bytes of its cache, MiniLM's
sentences. Stages (one row of the table, filling its dict): :func:`perplexity_stage`, :func:`passkey_stage`,
:func:`decode_stage`; :mod:`.runner` calls them in order and records a stage that raises in the row.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any

import torch

from ...registry import Mechanism
from .rows import RealConfig

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _parts(model):
    """(decoder trunk, output head) of a causal LM: hidden states and logits computed separately."""
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("model: logits with final soft-capping are not supported by the chunked loss")
    trunk = model.get_decoder() or model.base_model  # get_decoder() is None on some transformers 4.x models
    return trunk, model.get_output_embeddings()


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


def prefill(model, ids: torch.Tensor):
    """The prompt ``ids`` (1, P) through ``model`` into a new transformers cache: (cache, the greedy next token (1, 1),
    seconds), with all threads."""
    from transformers import DynamicCache

    from ...hf import cache_argument

    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(ids, **{cache_argument(model): cache}, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1), time.perf_counter() - t0


def timed_decode(model, cache, first: torch.Tensor, new_tokens: int, warmup: int = DECODE_WARMUP,
                 threads: int | None = 1) -> tuple[list[float], list[int]]:
    """Greedy decoding from ``cache``, starting with token ``first`` (1, 1): ``warmup`` untimed steps (one-off costs:
    lazy initialisation, the allocator, compiling), then ``new_tokens`` steps each timed on its own with ``threads``
    torch threads (1 by default: one-token steps are too small to gain from threads, and on a busy machine threads
    waiting for each other dominate). Returns (step seconds, the ids fed, the last greedy token included)."""
    from ...hf import cache_argument

    arg = cache_argument(model)  # "cache" (transformers >= 5.24) or "past_key_values"
    before = torch.get_num_threads()
    steps, tokens, nxt = [], [], first
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.no_grad():
            for i in range(warmup + new_tokens):
                tokens.append(int(nxt))
                t0 = time.perf_counter()
                out = model(nxt, **{arg: cache}, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)  # (1, 1)
                if i >= warmup:
                    steps.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return steps, tokens + [int(nxt)]


def decode_speed(model, ids: torch.Tensor, new_tokens: int, warmup: int = DECODE_WARMUP,
                 threads: int | None = 1) -> dict[str, Any]:
    """Greedy decoding after a prefill of ``ids`` (:func:`prefill`, then :func:`timed_decode`). tokens/s = 1 / the
    median step time (robust to bursts of other processes on a shared machine). Returns tokens/s, the mean-based
    tokens/s, prefill seconds, the greedy token ids and the cache bytes at the end."""
    cache, first, prefill_s = prefill(model, ids)
    steps, tokens = timed_decode(model, cache, first, new_tokens, warmup, threads)
    return {"decode_tokens_per_s": 1.0 / statistics.median(steps), "decode_tokens_per_s_mean": len(steps) / sum(steps),
            "decode_threads": torch.get_num_threads() if threads is None else threads, "prefill_s": prefill_s,
            "decoded_ids": tokens, "cache_bytes": cache_bytes(cache)}


def minilm_sentences(text: str, count: int) -> list[str]:
    return [s.strip() for s in text.replace("\n", " ").split(". ") if 60 < len(s.strip()) < 400][:count]


# --------------------------------------------------------------------------------------------------------
# The stages of one decoder row
# --------------------------------------------------------------------------------------------------------
def perplexity_stage(cfg: RealConfig, model, all_ids: torch.Tensor, name: str, shared: bool, row: dict[str, Any],
                     memo: dict[str, Any], section: dict[str, Any]) -> None:
    """Perplexity at every length (from one forward at the longest when ``shared``); the SDPA row keeps its
    hidden states in ``memo`` so the exact softmax row can report its max logit difference (the adapter's
    fidelity) into the row and the section."""
    pr = cfg.progress
    max_len = max(cfg.lengths)
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
        memo["sdpa_hidden"] = hid_all
    elif name == "softmax" and memo.get("sdpa_hidden"):
        pr.message("softmax: logit difference to SDPA")
        ref = memo["sdpa_hidden"]
        n = max(hid_all)
        a = hid_all[n]
        b = ref[n] if n in ref else ref[max(ref)][:n]
        diff = max_logit_diff(model, a, b)
        row["max_abs_logit_diff_vs_sdpa"] = diff
        row["logit_diff_tokens"] = n
        section["exact_max_abs_logit_diff"] = diff


def passkey_stage(cfg: RealConfig, model, prompts: dict, name: str, row: dict[str, Any]) -> None:
    """Passkey accuracy per length over the prompts ``{(length, depth, seed): (key, ids, n_answer)}``."""
    pr = cfg.progress
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


def decode_stage(cfg: RealConfig, model, all_ids: torch.Tensor, name: str, mech: Mechanism | None,
                 options: dict[str, Any], row: dict[str, Any], memo: dict[str, Any]) -> None:
    """Greedy decoding speed and cache bytes: the model's DynamicCache for SDPA, the mechanism's own decode state
    (``attnzoo.hf.swap_attention`` on a copy of the model, so nothing leaks into later rows) where it has one."""
    import attnzoo.hf as azhf

    if name == "sdpa":
        m, row["decode_mode"] = model, "transformers DynamicCache"
    elif mech.step is not None and "causal_self" in mech.patterns:
        m = copy.deepcopy(model)
        azhf.swap_attention(m, name, **options)
        row["decode_mode"] = f"attnzoo {mech.state} decode state"
    elif "causal_cross" in mech.patterns:
        m, row["decode_mode"] = model, "transformers DynamicCache (no attnzoo decode state)"
    else:
        row["decode_skipped"] = (f"no decode form (patterns {list(mech.patterns)}, no decode step): "
                                 "a prefill-only method")
        return
    row.update(decode_speed(m, all_ids[:, : cfg.prefill], cfg.new_tokens, threads=cfg.decode_threads))
    if name == "sdpa":
        memo["sdpa_decoded"] = row["decoded_ids"]
    elif memo.get("sdpa_decoded"):
        row["decode_matches_sdpa"] = row["decoded_ids"] == memo["sdpa_decoded"]
