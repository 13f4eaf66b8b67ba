"""Analysis sections on the text models: SmolLM2-135M (P045 retrieval heads and the masking ablation, sinks with
P046 ACT and P098 VAR, P019 importance, maps) and all-MiniLM-L6-v2 (importance, maps, [CLS]/[SEP] sinks)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .context import Context, figure, nll

PARAPHRASES = (
    ("A man is playing a guitar on the stage.", "Someone performs guitar music in front of an audience."),
    ("The cat sleeps on the warm windowsill.", "A cat is napping by the sunny window."),
    ("The train to Boston leaves at noon.", "At twelve o'clock the Boston train departs."),
    ("She bought fresh vegetables at the market.", "At the market she purchased fresh produce."),
    ("Heavy rain flooded the streets overnight.", "The roads were underwater after a night of downpour."),
    ("The children built a sandcastle on the beach.", "Kids made a castle out of sand at the seaside."),
    ("He forgot his umbrella at the office.", "He left the umbrella behind at work."),
    ("The company reported record profits this year.", "This year the firm earned more than ever before."),
    ("A dog chased the ball across the park.", "The ball was chased through the park by a dog."),
    ("The museum opens its new exhibit on Monday.", "On Monday a new exhibition starts at the museum."),
    ("Scientists discovered water ice on the moon.", "Researchers found frozen water on the lunar surface."),
    ("The chef prepared a spicy curry for dinner.", "For dinner the cook made a hot curry."),
)




# --------------------------------------------------------------------------------------------------------
# SmolLM2
# --------------------------------------------------------------------------------------------------------
def smollm2_retrieval(ctx: Context) -> dict[str, Any]:
    from ..bench.real import corpus_text
    from . import plots
    from .retrieval import NEEDLES, THRESHOLD, masking_ablation, needle_case, retrieval_scores, top_heads

    model, tok = ctx.model("smollm2")
    _, text = corpus_text()
    lengths = ctx.pick((512,), (1000,), (1000, 2000))
    depths = ctx.pick((0.5,), (0.5,), (0.25, 0.75))
    needles = NEEDLES[:1] if ctx.quick else NEEDLES
    cases = [needle_case(tok, nd, q, text, n, d) for nd, q in needles for n in lengths for d in depths]
    ctx.say(f"retrieval heads: {len(cases)} needle prompts")
    det = retrieval_scores(model, tok, cases, mechanism=ctx.mechanism, options=ctx.options, progress=ctx.progress)
    scores = det["scores"]
    ks = ctx.pick((2,), (10,), (5, 10, 20))
    seeds = (0,) if ctx.quick else (0, 1, 2)
    p_lengths = (512,) if ctx.quick else (1024,)
    p_depths = (0.5,) if ctx.quick else (0.1, 0.3, 0.5, 0.7, 0.9)
    ctx.say("masking ablation on passkey")
    abl = masking_ablation(model, tok, scores, ks=ks, seeds=seeds, lengths=p_lengths, depths=p_depths,
                           mechanism=ctx.mechanism, options=ctx.options, progress=ctx.progress)
    figs = [figure(plots.layer_head_map(scores, ctx.path("retrieval_scores"),
                                         title=f"{ctx.tag}: retrieval score per head", cbar="copy-paste score",
                                         marks=top_heads(scores, max(ks))),
                    "Retrieval scores (P045)",
                    f"Mean copy-paste score over {len(cases)} needle prompts ({len(needles)} needles x lengths "
                    f"{list(lengths)} x depths {list(depths)}); red boxes: the top-{max(ks)} heads.")]
    groups = {"none masked": abl["baseline"]}
    errs = {}
    for r in abl["rows"]:
        groups[f"top-{r['k']}"] = r["top"]
        groups[f"random-{r['k']}"] = r["random_mean"]
        accs = [x["accuracy"] for x in r["random"]]
        errs[f"random-{r['k']}"] = float(torch.tensor(accs).std()) if len(accs) > 1 else 0.0
    figs.append(figure(plots.bars(groups, ctx.path("retrieval_ablation"), title=f"{ctx.tag}: passkey accuracy",
                                   ylabel="accuracy", errors=errs),
                        "Masking ablation (P045)",
                        f"Teacher-forced passkey accuracy ({len(p_lengths) * len(p_depths)} prompts: lengths "
                        f"{list(p_lengths)}, depths {list(p_depths)}) with the top-k retrieval heads' outputs zeroed "
                        f"vs k random heads (mean and std over seeds {list(seeds)})."))
    return {"cases": len(cases), "lengths": list(lengths), "depths": list(depths),
            "answers": det["answers"], "scores": scores.tolist(), "threshold": THRESHOLD,
            "retrieval_heads": int((scores > THRESHOLD).sum()), "max_score": float(scores.max()),
            "top_heads": [[l, h, float(scores[l, h])] for l, h in top_heads(scores, 20)],
            "ablation": abl, "passkey_lengths": list(p_lengths), "passkey_depths": list(p_depths), "figures": figs}


def _sink_stats(model, ids, ctx: Context, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    from .calibration import act_sinks
    from .capture import Analyzer

    first: dict[int, torch.Tensor] = {}
    hidden: dict[int, torch.Tensor] = {}
    ent: dict[int, torch.Tensor] = {}

    def hook(call):
        s = call.stats(rows=rows, sink=1, topk=1)
        first[call.layer] = s.sink_mass[0].mean(-1)  # (H,)
        ent[call.layer] = s.entropy[0].mean(-1)
        if call.streams() and call.predicate() is None:
            from ..reduce.importance import attention_received

            sums = attention_received(call.q, call.k, scale=call.scale, causal=call.causal)[0] * call.q.shape[2]
        else:
            sums = call.weights()[0].sum(1)  # (H, Nk)
        hidden[call.layer] = act_sinks(sums, nq=call.q.shape[2], causal=call.causal).sum(-1)  # (H,)

    with torch.no_grad(), Analyzer(model, ctx.mechanism, hooks=[hook], **ctx.options) as az:
        model(ids, use_cache=False, logits_to_keep=1)
    L = az.num_layers
    return {"first": torch.stack([first[i] for i in range(L)]), "hidden": torch.stack([hidden[i] for i in range(L)]),
            "entropy": torch.stack([ent[i] for i in range(L)])}


def _act_experiment(ctx: Context, model, tok) -> dict[str, Any]:
    from .calibration import ACT

    corpus = ctx.corpus_ids()
    n_cal = 256 if ctx.quick else 512
    calib = [corpus[:, 2000:2000 + n_cal]] if ctx.quick else [corpus[:, 2000:2000 + n_cal],
                                                               corpus[:, 6000:6000 + n_cal]]
    n_eval = 512 if ctx.quick else 1024
    evals = [corpus[:, 20000:20000 + n_eval]] if ctx.quick else [corpus[:, 20000:20000 + n_eval],
                                                                  corpus[:, 40000:40000 + n_eval]]
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    cand = [(l, h) for l in range(2, layers) for h in range(heads)]
    if ctx.quick:
        cand = cand[:6]
    base_cal = sum(nll(model, x, ctx.mechanism, ctx.options) for x in calib) / len(calib)
    deltas = {}
    ctx.say(f"ACT: calibrating {len(cand)} heads one at a time")
    for lh in cand:
        act = ACT([lh])
        deltas[lh] = sum(nll(model, x, ctx.mechanism, ctx.options, [act]) for x in calib) / len(calib) - base_cal
        ctx.tick()
    improving = sorted([lh for lh, d in deltas.items() if d < 0], key=lambda lh: deltas[lh])
    sets = {"all improving": improving, "top-8 improving": improving[:8]}
    p_lengths = (512,) if ctx.quick else (1024, 2048)
    p_depths = (0.5,) if ctx.quick else (0.1, 0.3, 0.5, 0.7, 0.9)

    def evaluate(hooks):
        nll = [nll(model, x, ctx.mechanism, ctx.options, hooks) for x in evals]
        from .capture import Analyzer

        hits = tot = 0
        from ..bench.real import passkey_correct, passkey_key, passkey_prompt

        with Analyzer(model, ctx.mechanism, hooks=list(hooks), **ctx.options):
            for n in p_lengths:
                for d in p_depths:
                    ids, na = passkey_prompt(tok, n, d, passkey_key(n, d, 7))
                    hits += passkey_correct(model, ids, na)
                    tot += 1
                    ctx.tick()
        return {"perplexity": [math.exp(v) for v in nll], "perplexity_mean": math.exp(sum(nll) / len(nll)),
                "passkey": hits / tot}

    rows = {"before": evaluate([])}
    for name, hs in sets.items():
        rows[name] = evaluate([ACT(hs)]) if hs else None
    return {"calibration_windows": len(calib), "calibration_tokens": n_cal, "eval_windows": len(evals),
            "eval_tokens": n_eval, "candidates": len(cand), "base_calibration_nll": base_cal,
            "deltas": [[l, h, d] for (l, h), d in deltas.items()], "improving": [list(x) for x in improving],
            "results": rows, "passkey_lengths": list(p_lengths), "passkey_depths": list(p_depths),
            "beta": 0.4, "threshold": 0.1}


def _var_experiment(ctx: Context, model, tok) -> dict[str, Any]:
    from ..bench.real import corpus_text
    from .calibration import VAR, sink_dimensions, span_sinks
    from .capture import Analyzer

    _, text = corpus_text()
    hay = tok.decode(tok(text, add_special_tokens=False)["input_ids"][3000:3000 + (120 if ctx.quick else 300)])
    fact = "The password for the blue laboratory door is crimson falcon seven."
    cut = hay.rfind(". ", 0, len(hay) // 2) + 2
    passage = hay[:cut] + fact + " " + hay[cut:]
    pre, post = "Read the marked passage, then answer.\n<passage>\n", "\n</passage>\n"
    question = "Question: What is the password for the blue laboratory door?\nAnswer: The password is"
    answer = " crimson falcon seven."
    ids_pre = tok(pre, return_tensors="pt")["input_ids"]
    ids_pas = tok(passage, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids_post = tok(post + question, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids_ans = tok(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([ids_pre, ids_pas, ids_post, ids_ans], 1)
    N = ids.shape[1]
    span = torch.zeros(N, dtype=torch.bool)
    a = ids_pre.shape[1]
    span[a:a + ids_pas.shape[1]] = True
    n_ans = ids_ans.shape[1]
    layer, hidden_layer = 2, 4  # VAR acts from layer 2; the massive activations are settled at layer 4's input
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True, use_cache=False).hidden_states[hidden_layer][0]  # (N, C)
    dims = sink_dimensions(hs[0])
    sinks = span_sinks(hs, dims, span)

    def answer_nll(hooks):
        with torch.no_grad(), Analyzer(model, ctx.mechanism, hooks=hooks, **ctx.options):
            logits = model(ids, use_cache=False).logits[0, N - n_ans - 1:N - 1].float()
        return float(torch.nn.functional.cross_entropy(logits, ids[0, N - n_ans:]))

    def span_mass(hooks):
        """Attention of the answer rows on the span's non-sink and sink tokens, mean over heads and layers >= 2."""
        got = []

        def probe(call):
            if call.layer >= layer:
                w = call.weights()[0][:, N - n_ans - 1:N - 1]  # (H, R, N) after the earlier hooks' edits
                got.append((w[..., span & ~sinks].sum(-1).mean(), w[..., sinks].sum(-1).mean()))

        with torch.no_grad(), Analyzer(model, ctx.mechanism, hooks=hooks + [probe], **ctx.options):
            model(ids, use_cache=False, logits_to_keep=1)
        return float(torch.stack([g[0] for g in got]).mean()), float(torch.stack([g[1] for g in got]).mean())

    before = answer_nll([])
    non_sink, sink_mass = span_mass([])
    rows = []
    for p in (0.3, 0.6, 0.9):
        var = VAR(span, sinks, p=p, first_layer=layer)
        after = answer_nll([var])
        heads = sum(len(x["heads"]) for x in var.log)
        rows.append({"p": p, "answer_nll": after, "image_centric_heads": heads,
                     "moved_mass_per_head": p * sink_mass})
        ctx.tick()
    toks = [tok.decode(int(t)) for t in ids[0, sinks]]
    return {"tokens": N, "span_tokens": int(span.sum()), "sink_dims": dims.tolist(), "span_sinks": int(sinks.sum()),
            "sink_tokens": toks[:20], "answer_nll_before": before, "span_non_sink_mass": non_sink,
            "span_sink_mass": sink_mass, "rows": rows, "layer_of_hidden_state": hidden_layer,
            "note": "text-only: the 'visual' span is the marked <passage> segment of a text prompt on SmolLM2"}


def smollm2_sinks(ctx: Context) -> dict[str, Any]:
    from . import plots

    model, tok = ctx.model("smollm2")
    corpus = ctx.corpus_ids()
    n = 256 if ctx.quick else 1024
    ids = corpus[:, 10000:10000 + n]
    rows = torch.arange(n // 2, n)
    ctx.say("sink statistics")
    st = _sink_stats(model, ids, ctx, rows)
    figs = [
        figure(plots.layer_head_map(st["first"], ctx.path("sink_first"), title=f"{ctx.tag}: mass on the first token",
                                     cbar="attention mass"), "First-token sink",
                f"Mean attention mass on the first token of queries {n // 2}..{n - 1} of a {n}-token window, per head "
                "(streamed from q, k and the log-sum-exp for softmax; from the effective operator otherwise)."),
        figure(plots.layer_head_map(st["hidden"].double(), ctx.path("sink_hidden"),
                                     title=f"{ctx.tag}: hidden sinks per head", cbar="tokens"),
                "Hidden sinks (ACT's rule)",
                "Tokens other than the first whose mean attention over the queries that see them exceeds 0.1."),
    ]
    out = {"window": n, "first_token_mass": st["first"].tolist(), "hidden_sinks": st["hidden"].tolist(),
           "entropy": st["entropy"].tolist(), "figures": figs}
    if ctx.reduced:  # the mechanism-switched runs report the sink statistics only
        return out
    ctx.say("ACT")
    out["act"] = _act_experiment(ctx, model, tok)
    ctx.say("VAR")
    out["var"] = _var_experiment(ctx, model, tok)
    return out


def importance_section(ctx: Context, model, loss, run, *, bins, positions=None, skip=0, unit="tokens", rows=None):
    from . import plots
    from .importance import ablation_importance, distance_profiles, gradient_importance

    ctx.say("gate ablation")
    abl = ablation_importance(model, loss, mechanism=ctx.mechanism, options=ctx.options, progress=ctx.progress)
    ctx.say("gradient scores")
    grad = gradient_importance(model, loss, mechanism=ctx.mechanism, options=ctx.options)
    ctx.say("distance profiles")
    prof = distance_profiles(model, run, bins=bins, positions=positions, skip=skip, rows=rows,
                             mechanism=ctx.mechanism, options=ctx.options)
    L = prof["histogram"].shape[0]
    figs = [
        figure(plots.layer_head_map(abl["delta"], ctx.path("importance_ablation"), cmap="RdBu_r", center=True,
                                     title=f"{ctx.tag}: loss change with the head pruned", cbar="delta loss"),
                "Head importance: gate ablation (P019)", "L(g_h = 0) - L(all gates 1), one forward per head."),
        figure(plots.layer_head_map(grad["score"], ctx.path("importance_gradient"),
                                     title=f"{ctx.tag}: |dL/dg_h|", cbar="gradient score"),
                "Head importance: gradient score (P019)", "|dL/dg_h| at g = 1, one backward."),
        figure(plots.distance_scatter(prof["mean_distance"], ctx.path("distance"), unit=unit,
                                       title=f"{ctx.tag}: mean attention distance per head"),
                "Attention distance (P019)", f"Mean distance ({unit}) between a query and the keys it attends to, "
                "weighted by attention, per head (one dot per head) against its layer."),
        figure(plots.histograms(prof["histogram"], prof["bins"], ctx.path("distance_hist"),
                                 title=f"{ctx.tag}: attention mass per distance bin",
                                 layers=sorted({0, L // 2, L - 1})),
                "Distance profiles (P019)", "Attention mass per distance bin, every head of the first, middle and "
                "last layer."),
    ]
    spear = _spearman(abl["delta"].abs().flatten(), grad["score"].flatten())
    return {"base_loss": abl["base"], "ablation": abl["delta"].tolist(), "gradient": grad["grad"].tolist(),
            "spearman_abs_ablation_vs_gradient": spear, "mean_distance": prof["mean_distance"].tolist(),
            "histogram": prof["histogram"].tolist(), "bins": prof["bins"].tolist(), "figures": figs}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def smollm2_importance(ctx: Context) -> dict[str, Any]:
    from .importance import lm_loss

    model, _ = ctx.model("smollm2")
    n = 64 if ctx.quick else 256
    ids = ctx.corpus_ids()[:, 30000:30000 + n]
    bins = [0] + [2 ** i for i in range(int(math.log2(n)) + 1)]
    res = importance_section(ctx, model, lm_loss(ids), lambda m: m(ids, use_cache=False, logits_to_keep=1), bins=bins)
    res["loss"] = f"next-token NLL of a {n}-token window"
    return res


def _maps_of(model, run, ctx: Context, layers, heads, rows_to=None):
    from .capture import Analyzer

    got: dict[int, torch.Tensor] = {}
    ent: dict[int, torch.Tensor] = {}

    def hook(call):
        w = call.weights()[0]
        ent[call.layer] = (-torch.xlogy(w, w).sum(-1)).mean(-1)
        if call.layer in layers:
            got[call.layer] = w[heads].clone()

    with torch.no_grad(), Analyzer(model, ctx.mechanism, hooks=[hook], **ctx.options) as az:
        run(model)
    return got, torch.stack([ent[i] for i in range(az.num_layers)])


def smollm2_maps(ctx: Context) -> dict[str, Any]:
    from . import plots

    model, tok = ctx.model("smollm2")
    n = 48 if ctx.quick else 96
    ids = ctx.corpus_ids()[:, 500:500 + n]
    L = model.config.num_hidden_layers
    layers = [0, L // 2, L - 1]
    heads = [0, 4, 8]
    maps, ent = _maps_of(model, lambda m: m(ids, use_cache=False, logits_to_keep=1), ctx, layers, heads)
    mats = [maps[layer][i] for layer in layers for i in range(len(heads))]
    titles = [f"L{layer} H{h}" for layer in layers for h in heads]
    figs = [figure(plots.matrices(mats, titles, ctx.path("maps"), cols=3, log=True,
                                   suptitle=f"{ctx.tag}: effective attention operator (log10)"),
                    "Attention maps", f"The effective operator of {ctx.mechanism} on a {n}-token window (rows: "
                    "queries, columns: keys), log10 scale."),
            figure(plots.layer_head_map(ent, ctx.path("entropy"), title=f"{ctx.tag}: mean row entropy",
                                         cbar="nats"), "Head entropy", "Mean entropy of each head's attention rows.")]
    return {"window": n, "entropy": ent.tolist(), "figures": figs}


# --------------------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------------------
def _minilm_batches(tok, quick: bool):
    pairs = PARAPHRASES[:4] if quick else PARAPHRASES
    a = tok([p[0] for p in pairs], padding=True, return_tensors="pt")
    b = tok([p[1] for p in pairs], padding=True, return_tensors="pt")
    return a, b


def minilm_importance(ctx: Context) -> dict[str, Any]:
    from .importance import pair_loss

    model, tok = ctx.model("minilm")
    a, b = _minilm_batches(tok, ctx.quick)
    one = tok([PARAPHRASES[0][0] + " " + PARAPHRASES[1][0] + " " + PARAPHRASES[2][0]], return_tensors="pt")
    n = one["input_ids"].shape[1]
    bins = [0] + [2 ** i for i in range(int(math.log2(n)) + 1)]
    res = importance_section(ctx, model, pair_loss(a, b), lambda m: m(**one), bins=bins)
    res["loss"] = f"mean (1 - cosine) of {a['input_ids'].shape[0]} paraphrase pairs' sentence embeddings"
    return res


def minilm_maps(ctx: Context) -> dict[str, Any]:
    from . import plots

    model, tok = ctx.model("minilm")
    batch = tok([PARAPHRASES[0][0] + " " + PARAPHRASES[4][0]], return_tensors="pt")
    layers, heads = [0, 3, 5], [0, 5, 11]
    maps, ent = _maps_of(model, lambda m: m(**batch), ctx, layers, heads)
    mats = [maps[layer][i] for layer in layers for i in range(len(heads))]
    words = tok.convert_ids_to_tokens(batch["input_ids"][0])
    figs = [figure(plots.matrices(mats, [f"L{layer} H{h}" for layer in layers for h in heads], ctx.path("maps"),
                                   cols=3, suptitle=f"{ctx.tag}: attention maps"), "Attention maps",
                    f"Effective operator on '{' '.join(words)}'."),
            figure(plots.layer_head_map(ent, ctx.path("entropy"), title=f"{ctx.tag}: mean row entropy",
                                         cbar="nats"), "Head entropy", "Mean entropy of each head's rows.")]
    return {"tokens": words, "entropy": ent.tolist(), "figures": figs}


def minilm_sinks(ctx: Context) -> dict[str, Any]:
    from . import plots
    from .capture import Analyzer

    model, tok = ctx.model("minilm")
    a, _ = _minilm_batches(tok, ctx.quick)
    cls_m: dict[int, list] = {}
    sep_m: dict[int, list] = {}
    for i in range(a["input_ids"].shape[0]):
        ids = a["input_ids"][i : i + 1, : int(a["attention_mask"][i].sum())]
        sep = int(ids.shape[1] - 1)

        def hook(call, sep=sep):
            s = call.stats(sink=1, sets={"sep": [sep]}, topk=1)
            cls_m.setdefault(call.layer, []).append(s.sink_mass[0].mean(-1))
            sep_m.setdefault(call.layer, []).append(s.set_mass["sep"][0].mean(-1))

        with torch.no_grad(), Analyzer(model, ctx.mechanism, hooks=[hook], **ctx.options):
            model(input_ids=ids)
    L = len(cls_m)
    cls = torch.stack([torch.stack(cls_m[i]).mean(0) for i in range(L)])
    sep = torch.stack([torch.stack(sep_m[i]).mean(0) for i in range(L)])
    figs = [figure(plots.layer_head_map(cls, ctx.path("sink_cls"), title=f"{ctx.tag}: mass on [CLS]",
                                         cbar="attention mass"), "[CLS] mass", "Mean attention on [CLS] per head."),
            figure(plots.layer_head_map(sep, ctx.path("sink_sep"), title=f"{ctx.tag}: mass on [SEP]",
                                         cbar="attention mass"), "[SEP] mass", "Mean attention on the final [SEP].")]
    return {"cls_mass": cls.tolist(), "sep_mass": sep.tolist(), "figures": figs}
