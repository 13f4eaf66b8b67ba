"""The run of ``attnzoo bench real``: load SmolLM2, then for each row of :data:`.rows.ROWS` (after the model's own
SDPA) its three stages (:mod:`.stages`), each stage's error recorded in the row, a checkpoint after every row,
rows not started by the deadline recorded as skipped; then MiniLM's embeddings for the non-causal forms."""

from __future__ import annotations

import time
from typing import Any

import torch

from ... import registry
from . import rows
from .stages import (
    DECODE_WARMUP,
    decode_stage,
    minilm_sentences,
    passkey_key,
    passkey_prompt,
    passkey_stage,
    perplexity_stage,
)


def run_real(cfg: rows.RealConfig | None = None) -> dict[str, Any]:
    """Run the real-model evaluation; returns the ``real_model`` section of results.json."""
    from attnzoo import models

    cfg = (cfg or rows.RealConfig()).validate()
    pr = cfg.progress
    t_start = time.monotonic()
    corpus_name, text = rows.corpus_text()
    sdpa = rows.Row("sdpa", note="the model's own attention (torch SDPA): the baseline")
    plan = [(sdpa, {}, {}, None), *rows.plan(cfg)]
    active = [p for p in plan if p[3] is None]
    n_passkey = len(cfg.lengths) * len(cfg.passkey_depths) * cfg.passkey_seeds
    minilm_rows = rows.plan(cfg) if cfg.minilm else []
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

    table: list[dict[str, Any]] = []
    section: dict[str, Any] = {
        "model": rows.MODEL_NAME, "encoder": rows.MINILM_NAME if cfg.minilm else None, "corpus": corpus_name,
        "corpus_tokens": int(all_ids.shape[1]), "config": cfg.as_dict(), "lengths": list(cfg.lengths),
        "passkey_depths": list(cfg.passkey_depths), "prefill": cfg.prefill, "new_tokens": cfg.new_tokens,
        "decode_warmup": DECODE_WARMUP, "dtype": str(cfg.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "exact_max_abs_logit_diff": None, "rows": table, "minilm": [],
        "not_evaluated": rows.unevaluated(), "duration_s": 0.0, "interrupted": False, "stopped": None,
    }

    def save() -> None:
        section["duration_s"] = time.monotonic() - t_start
        if cfg.checkpoint is not None:
            cfg.checkpoint(section)

    def late() -> str | None:
        if cfg.deadline is not None and time.monotonic() - t_start > cfg.deadline:
            return f"the run's deadline of {cfg.deadline:.0f} s had passed before this row started"
        return None

    memo: dict[str, Any] = {"sdpa_hidden": {}}  # what later rows compare with
    try:
        for row_spec, dec, _enc, skip in plan:
            skip = skip or late()
            if skip and section["stopped"] is None and skip.startswith("the run's deadline"):
                section["stopped"] = skip
            table.append(decoder_row(cfg, model, all_ids, prompts, row_spec, dec, skip, memo, section))
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


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:1000]


def _label(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    return f"{name}(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"


def decoder_row(cfg: rows.RealConfig, model, all_ids, prompts, row_spec: rows.Row, dec: dict[str, Any],
                skip: str | None, memo: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    """Perplexity, passkey and decoding of one row, each stage's error recorded in the row."""
    import attnzoo.hf as azhf

    pr = cfg.progress
    name = row_spec.mechanism
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
    # progress ticks: a stage left out ticks now; a stage that fails ticks what it had not ticked yet
    # (perplexity: its lengths, passkey: nothing, decode: its one tick)
    stages = [
        ("perplexity", len(cfg.lengths), len(cfg.lengths),
         lambda: perplexity_stage(cfg, model, all_ids, name, shared, row, memo, section)),
        ("passkey", n_passkey, 0, lambda: passkey_stage(cfg, model, prompts, name, row)),
        ("decode", 1, 1, lambda: decode_stage(cfg, model, all_ids, name, mech, dec, row, memo)),
    ]
    for stage, ticks, _, _ in stages:
        if stage not in cfg.stages:
            pr.tick(ticks)
    for stage, _, ticks_on_error, run in stages:
        if stage not in cfg.stages:
            continue
        t0 = time.monotonic()
        if stage == "decode":
            pr.message(f"{name}: decoding")
        try:
            run()
        except Exception as e:  # noqa: BLE001 - a mechanism that fails on the real model is reported, not hidden
            row["errors"][stage] = _err(e)
            pr.tick(ticks_on_error)
        else:
            if stage == "decode":
                pr.tick()
        row["seconds"][stage] = time.monotonic() - t0
    return row


def run_minilm(cfg: rows.RealConfig, text: str) -> list[dict[str, Any]]:
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
    for row_spec, _, enc, skip in rows.plan(cfg):
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
