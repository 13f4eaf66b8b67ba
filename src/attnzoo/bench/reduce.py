"""``attnzoo bench reduce``: token reduction at equal budgets, each method beside random selection and pooling.

For each keep ratio (default 50/25/10/5 %) and each method, in the same run:

- ``vision`` -- DINOv2 ViT-S/14 (``attnzoo.models.load_dinov2_small``) on scikit-image's sample images, 256 patches:
  FasterVLM (P057, penultimate-layer [CLS] attention), VTC-CLS (P085, [CLS] attention summed over layers), ToMe
  (similarity merging), random, pooling (2-D grid cells). ``cls_cos``: cosine of the final [CLS] embedding to the
  unpruned one when the patches entering layer ``--vision-layer`` are reduced (scores from a full pass);
  ``patch_coverage``: mean over the 256 output patch features of the best cosine to a kept/merged output token
  (how much of the patch features the kept set still represents, FasterVLM's output-side pruning).
- ``digits`` -- a tiny ViT (16 patches of 2 x 2 pixels + [CLS], 3 layers) trained here on scikit-learn's 8 x 8
  digits; patches reduced after layer ``--digits-layer`` (1) by [CLS] attention of that layer (FasterVLM-style),
  summed over layers 0..l (VTC-CLS-style), ToMe (proportional attention after merging), random, pooling: accuracy.
- ``minilm`` -- all-MiniLM-L6-v2: tokens dropped after layer ``--minilm-layer`` by [CLS] attention or mean-pool
  attention, random, pooling: cosine of the sentence embedding to the unpruned model's.
- ``smollm2`` -- SmolLM2-135M: the prompt pruned after layer ``--llm-layer`` FastV-style (last-token attention),
  random, pooling (``attnzoo.reduce.llm``): perplexity of a continuation of real text and passkey accuracy.

Every row records the tokens actually kept, the time of the reduced forward beside the full one (median of
repeats, same run) and the counted bytes of the states the reduced model holds (hidden states per layer, or the
KV cache) beside the full model's. Scores come from ``attnzoo.reduce.importance`` rows (q, K, log-sum-exp), so
every model keeps its SDPA attention. Outputs: results.json, summary.md, report.html, quality_vs_tokens.png.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..reduce import cls_attention as CA
from ..reduce.importance import attention_row
from ..reduce.select import (
    keep_count,
    merge_tokens,
    pool_assignment,
    random_indices,
    select_tokens,
    topk_indices,
)
from ..reduce.tome import bipartite_soft_matching

SCHEMA = "attnzoo.bench.reduce/1"
KEEPS = (0.5, 0.25, 0.1, 0.05)
SECTIONS = ("vision", "digits", "minilm", "smollm2")
BASELINES = ("random", "pool")
METRICS = {"vision": ("cls_cos", "patch_coverage"), "digits": ("accuracy",), "minilm": ("embedding_cos",),
           "smollm2": ("perplexity", "passkey")}


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def _row(section: str, method: str, keep: float, total: int, kept: float, **kw) -> dict[str, Any]:
    return {"section": section, "method": method, "baseline": method in BASELINES or method == "full",
            "keep": keep, "tokens_total": total, "tokens_kept": kept, **kw}


# ----------------------------------------------------------------------------------------------------- vision
VISION_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")


def _reduce_patches(method: str, patches: torch.Tensor, keep: float, *, scores: dict[str, torch.Tensor],
                    grid: tuple[int, int], seed: int):
    """(tokens (1, M, C), sizes (1, M)) of the P patches (1, P, C) reduced by ``method`` at ``keep``."""
    P = patches.shape[1]
    k = keep_count(P, keep)
    if method in ("fastervlm", "vtc_cls"):
        red = select_tokens(patches, topk_indices(scores[method], k))
    elif method == "random":
        red = select_tokens(patches, random_indices(1, P, k, generator=torch.Generator().manual_seed(seed)))
    elif method == "pool":
        a, m = pool_assignment(P, k, grid=grid)
        red = merge_tokens(patches, a.view(1, P), m)
    elif method == "tome":
        sizes, x = torch.ones(1, P, dtype=patches.dtype), patches
        assignment = torch.arange(P).view(1, P)
        while x.shape[1] > k:  # ToMe merges at most half the tokens per step
            r = min(x.shape[1] - k, x.shape[1] // 2)
            a, m = bipartite_soft_matching(x, r)
            step = merge_tokens(x, a, m, sizes)
            x, sizes = step.tokens, step.sizes
            assignment = torch.gather(a, 1, assignment)
        red = merge_tokens(patches, assignment, x.shape[1])
    else:
        raise ValueError(f"method: unknown {method!r}")
    return red.tokens, red.sizes


def _dinov2_from(model, h: torch.Tensor, start: int) -> torch.Tensor:
    for layer in model.encoder.layer[start:]:
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h
    return model.layernorm(h)


def bench_vision(keeps, *, layer: int, repeats: int, log) -> list[dict[str, Any]]:
    from skimage import data as skdata

    from ..models import load_dinov2_small

    model, preprocess = load_dinov2_small()
    rows = []
    methods = ("fastervlm", "vtc_cls", "tome", "random", "pool")
    per = {(m, kp): {"cls_cos": [], "patch_coverage": [], "kept": [], "time": []} for m in methods for kp in keeps}
    full_times = []
    C = model.config.hidden_size
    for idx, name in enumerate(VISION_IMAGES):
        log(f"vision: {name}")
        x = preprocess(getattr(skdata, name)())
        with torch.no_grad():
            cls_rows, last = CA.dinov2_cls_rows(model, x)
            hs = model(x, output_hidden_states=True).hidden_states
        P = last.shape[1] - 1
        side = int(math.isqrt(P))
        scores = {"fastervlm": CA.fastervlm_scores(cls_rows), "vtc_cls": CA.vtc_cls_scores(cls_rows)}
        full_cls = last[:, 0]
        out_patches = nn.functional.normalize(last[:, 1:], dim=-1)  # (1, P, C)
        with torch.no_grad():
            full_times.append(_median_ms(lambda h=hs[layer]: _dinov2_from(model, h, layer), repeats))
        for method in methods:
            for kp in keeps:
                with torch.no_grad():
                    h = hs[layer]
                    tok, _ = _reduce_patches(method, h[:, 1:], kp, scores=scores, grid=(side, side), seed=idx)
                    hr = torch.cat([h[:, :1], tok], dim=1)
                    out = _dinov2_from(model, hr, layer)
                    t = _median_ms(lambda hr=hr: _dinov2_from(model, hr, layer), repeats)
                    o_tok, _ = _reduce_patches(method, last[:, 1:], kp, scores=scores, grid=(side, side), seed=idx)
                cos_cls = nn.functional.cosine_similarity(out[:, 0], full_cls).item()
                cover = (out_patches @ nn.functional.normalize(o_tok, dim=-1).transpose(1, 2)).amax(-1).mean().item()
                d = per[(method, kp)]
                d["cls_cos"].append(cos_cls)
                d["patch_coverage"].append(cover)
                d["kept"].append(tok.shape[1])
                d["time"].append(t)
    L = model.config.num_hidden_layers
    full_bytes = 4 * C * (P + 1) * L
    for (method, kp), d in per.items():
        kept = statistics.mean(d["kept"])
        rows.append(_row("vision", method, kp, P, kept, cls_cos=statistics.mean(d["cls_cos"]),
                         patch_coverage=statistics.mean(d["patch_coverage"]), time_ms=statistics.mean(d["time"]),
                         time_full_ms=statistics.mean(full_times),
                         state_bytes=int(4 * C * ((P + 1) * layer + (kept + 1) * (L - layer))),
                         state_full_bytes=full_bytes, images=len(VISION_IMAGES)))
    return rows


# ----------------------------------------------------------------------------------------------------- digits
class TinyViT(nn.Module):
    """8 x 8 digits as 16 patches of 2 x 2 pixels + [CLS]; pre-norm blocks with explicit q/k/v (so [CLS] rows and
    proportional attention for merged tokens are available); classification from [CLS]."""

    def __init__(self, dim: int = 48, heads: int = 3, layers: int = 3) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.embed = nn.Linear(4, dim)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({"n1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim),
                                              "proj": nn.Linear(dim, dim), "n2": nn.LayerNorm(dim),
                                              "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                                   nn.Linear(2 * dim, dim))}))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def tokens(self, img: torch.Tensor) -> torch.Tensor:
        B = img.shape[0]
        p = img.view(B, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(B, 16, 4)  # (B, 16, 4) row-major 2 x 2 patches
        return torch.cat([self.cls.expand(B, -1, -1), self.embed(p)], dim=1) + self.pos

    def qk(self, i: int, h: torch.Tensor):
        b = self.blocks[i]
        B, N, C = h.shape
        q, k, _ = b["qkv"](b["n1"](h)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return q, k

    def block(self, i: int, h: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        b = self.blocks[i]
        B, N, C = h.shape
        q, k, v = b["qkv"](b["n1"](h)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        bias = None if sizes is None else torch.log(sizes).view(B, 1, 1, N)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, N, C)
        h = h + b["proj"](a)
        return h + b["mlp"](b["n2"](h))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h = self.tokens(img)
        for i in range(len(self.blocks)):
            h = self.block(i, h)
        return self.head(self.norm(h[:, 0]))


def train_digits_vit(seed: int = 0, epochs: int = 40, log=print) -> tuple[TinyViT, torch.Tensor, torch.Tensor]:
    from .quality.tasks import load_digits_arrays

    imgs, labels = load_digits_arrays()
    x = torch.as_tensor(imgs, dtype=torch.float32) / 16.0
    y = torch.as_tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1437], perm[1437:]
    torch.manual_seed(seed)
    model = TinyViT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=g)]
        for s in range(0, len(order), 64):
            b = order[s:s + 64]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[te]).argmax(-1) == y[te]).float().mean().item()
    log(f"digits: tiny ViT trained ({epochs} epochs), test accuracy {acc:.4f}")
    return model, x[te], y[te]


def _digits_reduced(model: TinyViT, x: torch.Tensor, method: str, keep: float, layer: int, seed: int):
    """(logits, tokens kept) with the 16 patches reduced after block ``layer``."""
    with torch.no_grad():
        h = model.tokens(x)
        rows = []
        for i in range(layer + 1):
            q, k = model.qk(i, h)
            rows.append(attention_row(q[:, :, :1], k, rows=[0]).squeeze(2))  # (B, H, 17)
            h = model.block(i, h)
        patches, B = h[:, 1:], h.shape[0]
        kk = keep_count(16, keep)
        sizes = None  # merged tokens get proportional attention
        if method == "fastervlm":
            tokens = select_tokens(patches, topk_indices(CA.cls_scores(rows[-1]), kk)).tokens
        elif method == "vtc_cls":
            tokens = select_tokens(patches, topk_indices(CA.vtc_cls_scores(rows, layers=range(len(rows))), kk)).tokens
        elif method == "random":
            tokens = select_tokens(patches, random_indices(B, 16, kk, generator=torch.Generator().manual_seed(seed))
                                   ).tokens
        elif method == "pool":
            a, m = pool_assignment(16, kk, grid=(4, 4))
            red = merge_tokens(patches, a.expand(B, 16).contiguous(), m)
            tokens, sizes = red.tokens, red.sizes
        elif method == "tome":
            tokens, sizes = patches, torch.ones(B, 16)
            while tokens.shape[1] > kk:  # ToMe merges at most half the tokens per step
                r = min(tokens.shape[1] - kk, tokens.shape[1] // 2)
                a, m = bipartite_soft_matching(tokens, r)
                st = merge_tokens(tokens, a, m, sizes)
                tokens, sizes = st.tokens, st.sizes
        else:
            raise ValueError(f"method: unknown {method!r}")
        h = torch.cat([h[:, :1], tokens], dim=1)
        if sizes is not None:  # proportional attention for merged tokens ([CLS] has size 1)
            sizes = torch.cat([torch.ones(B, 1), sizes], dim=1)
        for i in range(layer + 1, len(model.blocks)):
            h = model.block(i, h, sizes)
        return model.head(model.norm(h[:, 0])), tokens.shape[1]


def bench_digits(keeps, *, layer: int, repeats: int, epochs: int, log) -> list[dict[str, Any]]:
    model, x, y = train_digits_vit(epochs=epochs, log=log)
    with torch.no_grad():
        full_acc = (model(x).argmax(-1) == y).float().mean().item()
        full_t = _median_ms(lambda: model(x), repeats)
    L, C = len(model.blocks), model.dim
    rows = [_row("digits", "full", 1.0, 16, 16, accuracy=full_acc, time_ms=full_t, time_full_ms=full_t,
                 state_bytes=4 * C * 17 * L * len(y), state_full_bytes=4 * C * 17 * L * len(y), images=len(y))]
    for method in ("fastervlm", "vtc_cls", "tome", "random", "pool"):
        for kp in keeps:
            logits, kept = _digits_reduced(model, x, method, kp, layer, seed=1)
            acc = (logits.argmax(-1) == y).float().mean().item()
            t = _median_ms(lambda m=method, kp=kp: _digits_reduced(model, x, m, kp, layer, 1), repeats)
            rows.append(_row("digits", method, kp, 16, kept, accuracy=acc, time_ms=t, time_full_ms=full_t,
                             state_bytes=4 * C * len(y) * (17 * (layer + 1) + (kept + 1) * (L - layer - 1)),
                             state_full_bytes=4 * C * 17 * L * len(y), images=len(y)))
    return rows


# ----------------------------------------------------------------------------------------------------- MiniLM
SENTENCES = (
    "The committee postponed its decision on the new bridge until the engineers deliver their final report.",
    "A sudden storm forced the fishing boats to return to the harbour hours earlier than planned.",
    "Researchers found that the migrating birds use the earth's magnetic field to keep their course at night.",
    "The museum's new wing displays pottery, coins and tools recovered from a Roman settlement by the river.",
    "After months of negotiations the two companies agreed to share the cost of the research laboratory.",
    "Children in the village walk three kilometres every morning to reach the only school in the valley.",
    "The recipe calls for fresh basil, ripe tomatoes, a little garlic and a generous amount of olive oil.",
    "Local farmers worry that the dry summer will reduce the wheat harvest for the second year in a row.",
    "The orchestra rehearsed the symphony for weeks before the premiere in the restored concert hall.",
    "Firefighters contained the blaze before it reached the houses on the edge of the pine forest.",
    "The software update fixes a bug that caused the application to crash when opening large files.",
    "Historians still debate why the ancient city was abandoned so quickly at the height of its power.",
    "She trained for the marathon by running along the coast every evening during the winter months.",
    "The central bank raised interest rates to slow inflation, which had reached its highest level in decades.",
    "Volunteers planted two thousand trees along the river to protect the banks from erosion.",
    "The telescope captured images of a distant galaxy whose light left it billions of years ago.",
)


def bench_minilm(keeps, *, layer: int, repeats: int, log) -> list[dict[str, Any]]:
    from ..models import load_minilm
    from ..reduce.encoder import pruned_sentence_embedding

    model, tok = load_minilm()
    ids = [tok(s, return_tensors="pt").input_ids for s in SENTENCES]
    full = [pruned_sentence_embedding(model, i, layer=layer, keep=None)[0] for i in ids]
    total = statistics.mean(i.shape[1] for i in ids)
    full_t = sum(_median_ms(lambda i=i: pruned_sentence_embedding(model, i, layer=layer, keep=None), repeats)
                 for i in ids)
    C, L = model.config.hidden_size, model.config.num_hidden_layers
    full_bytes = sum(4 * C * i.shape[1] * L for i in ids)
    rows = []
    for method in ("cls", "mean", "random", "pool"):
        log(f"minilm: {method}")
        for kp in keeps:
            cos, kept, t, nbytes = [], [], 0.0, 0
            for j, (i, f) in enumerate(zip(ids, full)):
                e, n = pruned_sentence_embedding(model, i, layer=layer, keep=kp, method=method, seed=j)
                cos.append(float(e @ f))
                kept.append(n)
                t += _median_ms(lambda i=i, j=j, kp=kp, m=method: pruned_sentence_embedding(
                    model, i, layer=layer, keep=kp, method=m, seed=j), repeats)
                nbytes += 4 * C * (i.shape[1] * (layer + 1) + n * (L - layer - 1))
            rows.append(_row("minilm", method, kp, total, statistics.mean(kept), embedding_cos=statistics.mean(cos),
                             time_ms=t, time_full_ms=full_t, state_bytes=nbytes, state_full_bytes=full_bytes,
                             sentences=len(ids)))
    return rows


# ----------------------------------------------------------------------------------------------------- SmolLM2
def bench_smollm2(keeps, *, layer: int, context: int, continuation: int, passkeys: int, log
                  ) -> list[dict[str, Any]]:
    from ..models import load_smollm2
    from ..reduce.llm import decode_step, fastv_prefill
    from .real import cache_bytes, corpus_text, passkey_key, passkey_prompt

    model, tok = load_smollm2()
    _, text = corpus_text()
    all_ids = tok(text[20000:40000], return_tensors="pt").input_ids
    docs = [all_ids[:, s:s + context + continuation] for s in (0, 2 * (context + continuation))]

    def ppl(method, kp):
        nll, n, kept, t_pre, nbytes = 0.0, 0, 0, 0.0, 0
        for d in docs:
            prompt, cont = d[:, :context], d[0, context:].tolist()
            t = time.perf_counter()
            st = fastv_prefill(model, prompt, layer=layer, keep=kp, method=method)
            t_pre += time.perf_counter() - t
            kept += st.cache.get_seq_length()
            nbytes += cache_bytes(st.cache)
            logits = torch.cat([st.logits, decode_step(model, st, cont[:-1], 0)])  # (T, V)
            nll += nn.functional.cross_entropy(logits, torch.tensor(cont), reduction="sum").item()
            n += len(cont)
        return math.exp(nll / n), kept / len(docs), 1000 * t_pre / len(docs), nbytes // len(docs)

    def passkey(method, kp):
        ok = 0
        for s in range(passkeys):
            depth = (s + 0.5) / passkeys
            key = passkey_key(context, depth, s)
            ids, n_ans = passkey_prompt(tok, context, depth, key)
            prompt, ans = ids[:, :-n_ans], ids[0, -n_ans:].tolist()
            st = fastv_prefill(model, prompt, layer=layer, keep=kp, method=method)
            logits = st.logits if n_ans == 1 else torch.cat([st.logits, decode_step(model, st, ans[:-1], 0)])
            ok += int(logits.argmax(-1).tolist() == ans)
        return ok / passkeys

    rows = []
    log("smollm2: full")
    p, kept, t, nb = ppl("attention", 1.0)
    full_t, full_b = t, nb
    rows.append(_row("smollm2", "full", 1.0, context, kept, perplexity=p, passkey=passkey("attention", 1.0),
                     time_ms=t, time_full_ms=t, state_bytes=nb, state_full_bytes=nb))
    for method, label in (("attention", "fastv"), ("random", "random"), ("pool", "pool")):
        for kp in keeps:
            log(f"smollm2: {label} keep {kp}")
            p, kept, t, nb = ppl(method, kp)
            rows.append(_row("smollm2", label, kp, context, kept, perplexity=p, passkey=passkey(method, kp),
                             time_ms=t, time_full_ms=full_t, state_bytes=nb, state_full_bytes=full_b))
    return rows


# ----------------------------------------------------------------------------------------------------- report
def summary_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    out = ["# attnzoo bench reduce: token reduction at equal budgets", "",
           f"Keep ratios {cfg['keeps']}; every method beside random selection and pooling at the same budget; "
           f"{cfg['threads']} thread(s); {res['environment']['machine']}. Times are medians of repeats in this "
           "run (ratios to the full model's time in the same run are what carry over); `state` = counted bytes of "
           "the hidden states (encoders) or KV cache (SmolLM2) the reduced model holds, beside the full model.", ""]
    notes = {"vision": f"DINOv2 ViT-S/14 on {len(VISION_IMAGES)} scikit-image images (256 patches); patches "
                       f"reduced entering layer {cfg['vision_layer']}; cls_cos = final [CLS] cosine to unpruned; "
                       "patch_coverage = mean best cosine of each output patch feature to a kept/merged token.",
             "digits": "tiny ViT trained here on sklearn digits (16 patches), reduced after layer "
                       f"{cfg['digits_layer']}; test accuracy (360 images).",
             "minilm": f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences, tokens reduced after layer "
                       f"{cfg['minilm_layer']} ([CLS] kept); embedding_cos = cosine to the unpruned embedding.",
             "smollm2": f"SmolLM2-135M, {cfg['context']}-token prompts pruned after layer {cfg['llm_layer']} "
                        "(first and last prompt token kept); perplexity of the next "
                        f"{cfg['continuation']} tokens of real text; passkey accuracy ({cfg['passkeys']} depths)."}
    for section in SECTIONS:
        rows = [r for r in res["rows"] if r["section"] == section]
        if not rows:
            continue
        mets = METRICS[section]
        out += [f"## {section}", "", notes[section], "",
                "| keep | method | tokens kept / total | " + " | ".join(mets)
                + " | time ms (full) | state MiB (full) |",
                "|---|---|---|" + "---|" * len(mets) + "---|---|"]
        order = sorted(rows, key=lambda r: (-r["keep"], r["baseline"], r["method"]))
        for r in order:
            vals = " | ".join(f"{r[m]:.4f}" if isinstance(r[m], float) else str(r[m]) for m in mets)
            tag = f"{r['method']}" + (" (baseline)" if r["method"] in BASELINES else "")
            out.append(f"| {r['keep']:.2f} | {tag} | {r['tokens_kept']:.1f} / {r['tokens_total']:.0f} | {vals} | "
                       f"{r['time_ms']:.1f} ({r['time_full_ms']:.1f}) | "
                       f"{r['state_bytes'] / 2**20:.2f} ({r['state_full_bytes'] / 2**20:.2f}) |")
        out.append("")
    if res.get("errors"):
        out += ["## errors", ""] + [f"- {k}: {v}" for k, v in res["errors"].items()] + [""]
    return "\n".join(out)


def plot(res: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(s, m) for s in SECTIONS for m in METRICS[s] if any(r["section"] == s for r in res["rows"])]
    if not panels:
        return None
    cols = min(3, len(panels))
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * math.ceil(
        len(panels) / cols)), squeeze=False)
    for ax, (s, m) in zip(axes.flat, panels):
        rows = [r for r in res["rows"] if r["section"] == s]
        for method in sorted({r["method"] for r in rows if r["method"] != "full"}):
            pts = sorted((r["tokens_kept"] / r["tokens_total"], r[m]) for r in rows if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", linestyle="--" if method in BASELINES else "-", label=method)
        full = [r for r in rows if r["method"] == "full"]
        if full:
            ax.axhline(full[0][m], color="gray", linewidth=0.8, label="full")
        ax.set_xscale("log")
        ax.set_xlabel("fraction of tokens kept")
        ax.set_title(f"{s}: {m}")
        if m == "perplexity":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(res: dict[str, Any], out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {"results": os.path.join(out, "results.json"), "summary": os.path.join(out, "summary.md"),
             "report": os.path.join(out, "report.html")}
    with open(paths["results"], "w") as f:
        json.dump(res, f, indent=1)
    md = summary_markdown(res)
    with open(paths["summary"], "w") as f:
        f.write(md + "\n")
    png = plot(res, os.path.join(out, "quality_vs_tokens.png"))
    img = ""
    if png:
        paths["plot"] = png
        with open(png, "rb") as f:
            b64 = base64.b64encode(f.read()).decode()
            img = f'<img alt="quality vs kept tokens" src="data:image/png;base64,{b64}">'
    import html as _html

    body = "\n".join(f"<pre>{_html.escape(block)}</pre>" for block in md.split("\n\n"))
    with open(paths["report"], "w") as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>attnzoo bench reduce</title></head><body>"
                f"<h1>attnzoo bench reduce</h1>{img}{body}</body></html>\n")
    return paths


# ----------------------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnzoo bench reduce", description="Token reduction at equal budgets beside "
                                "random selection and pooling (DINOv2, a tiny digits ViT, MiniLM, SmolLM2).")
    p.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS), help="keep ratios (0.5 0.25 0.1 0.05)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--out", "-o", default=os.path.join("benchmarks", "results", "reduce"))
    p.add_argument("--quick", action="store_true", help="fewer repeats, shorter prompts and training")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vision-layer", type=int, default=4)
    p.add_argument("--digits-layer", type=int, default=1)
    p.add_argument("--minilm-layer", type=int, default=1)
    p.add_argument("--llm-layer", type=int, default=2)
    p.add_argument("--context", type=int, default=512, help="SmolLM2 prompt tokens (512)")
    p.add_argument("--continuation", type=int, default=64)
    p.add_argument("--passkeys", type=int, default=6)
    p.add_argument("--digits-epochs", type=int, default=None, help="training epochs of the digits ViT (40; quick 15)")
    return p


def run(a: argparse.Namespace, log=None) -> dict[str, Any]:
    log = log or (lambda msg: print(f"[bench reduce] {msg}", file=sys.stderr, flush=True))
    for kp in a.keeps:
        if not 0 < kp <= 1:
            raise ValueError(f"--keeps: expected ratios in (0, 1], got {kp}")
    torch.set_num_threads(a.threads)
    repeats = 3 if a.quick else 5
    cfg = {"keeps": a.keeps, "threads": a.threads, "quick": a.quick, "vision_layer": a.vision_layer,
           "digits_layer": a.digits_layer, "minilm_layer": a.minilm_layer, "llm_layer": a.llm_layer,
           "context": a.context, "continuation": a.continuation, "passkeys": a.passkeys, "repeats": repeats}
    res: dict[str, Any] = {"schema": SCHEMA, "config": cfg, "rows": [], "errors": {},
                           "environment": {"machine": f"{platform.machine()} {os.cpu_count()} cores",
                                           "torch": torch.__version__, "python": platform.python_version()}}
    t0 = time.time()
    jobs = {"vision": lambda: bench_vision(a.keeps, layer=a.vision_layer, repeats=repeats, log=log),
            "digits": lambda: bench_digits(a.keeps, layer=a.digits_layer, repeats=repeats,
                                           epochs=a.digits_epochs or (15 if a.quick else 40), log=log),
            "minilm": lambda: bench_minilm(a.keeps, layer=a.minilm_layer, repeats=repeats, log=log),
            "smollm2": lambda: bench_smollm2(a.keeps, layer=a.llm_layer, context=a.context,
                                             continuation=a.continuation, passkeys=a.passkeys, log=log)}
    for section in a.sections:
        try:
            res["rows"] += jobs[section]()
        except ImportError as e:  # a model package is missing: recorded, not dropped
            res["errors"][section] = f"skipped: {e}"
            log(f"{section}: skipped ({e})")
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    res = run(a)
    paths = write_outputs(res, a.out)
    print(summary_markdown(res))
    print(f"\nwrote {', '.join(paths.values())}")
    return 0
