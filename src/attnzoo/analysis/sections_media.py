"""Analysis sections on DINOv2 ViT-S/14 (P019 importance, P113 attention flow / rollout over scikit-image's sample
images, [CLS] and patch sinks), Whisper tiny.en (cross-attention alignment heads as word timings) and any functional
mechanism on random inputs (maps and sinks of its effective operator)."""

from __future__ import annotations

from typing import Any

import torch

from .. import registry
from .context import Context, figure
from .sections_text import importance_section

# --------------------------------------------------------------------------------------------------------
# DINOv2
# --------------------------------------------------------------------------------------------------------
IMAGES = ("astronaut", "chelsea", "coffee", "rocket")
CLIP = 0.98  # display quantile of the heatmaps


def _images(quick: bool):
    import numpy as np
    from skimage import data

    names = IMAGES[:2] if quick else IMAGES
    return names, [np.asarray(getattr(data, n)()) for n in names]


def _padded_view(img, size: int = 224):
    """The image as the model sees it (resized, padded centred to size x size), float in [0, 1]."""
    import numpy as np

    from ..models.dinov2 import IMAGENET_MEAN, IMAGENET_STD, preprocess_image

    x = preprocess_image(img, size)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return np.clip((x * std + mean).permute(1, 2, 0).numpy(), 0, 1)


def _grid(model) -> tuple[int, int]:
    p = model.config.patch_size
    return 224 // p, 224 // p


def dinov2_importance(ctx: Context) -> dict[str, Any]:
    from .importance import view_loss

    model, prep = ctx.model("dinov2")
    names, imgs = _images(ctx.quick)
    pixels = torch.cat([prep(im) for im in imgs])
    gh, gw = _grid(model)
    yx = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1).reshape(-1, 2)
    bins = [0, 1, 2, 3, 4, 6, 8, 12, 16, 23]
    res = importance_section(ctx, model, view_loss(pixels), lambda m: m(pixel_values=pixels[:1]), bins=bins,
                             positions=yx, skip=1, unit="patches")
    res["loss"] = f"mean (1 - cosine) between the [CLS] embeddings of {len(names)} images and their mirror images"
    res["images"] = list(names)
    return res


def dinov2_maps(ctx: Context) -> dict[str, Any]:
    from . import plots
    from .capture import Analyzer
    from .flow import attention_flow, patch_heatmap

    model, prep = ctx.model("dinov2")
    names, imgs = _images(ctx.quick)
    grid = _grid(model)
    flows, rolls, views, heads_last, peaks = [], [], [], None, []
    for img in imgs:
        layers: dict[int, torch.Tensor] = {}
        with torch.no_grad(), Analyzer(model, ctx.mechanism, **ctx.options) as az:
            az.hooks.append(lambda call, store=layers: store.__setitem__(call.layer, call.weights()[0].double()))
            model(pixel_values=prep(img))
        seq = [layers[i] for i in range(az.num_layers)]
        flow = attention_flow(seq, heads="meanmax", regularize=True)[0]
        roll = attention_flow(seq, heads="uniform", regularize=False)[0]
        flows.append(patch_heatmap(flow, grid, clip=CLIP).numpy())
        rolls.append(patch_heatmap(roll, grid, clip=CLIP).numpy())
        top = torch.topk(flow[1:], 3).indices
        peaks.append({"top_patches": [[int(i) // grid[1], int(i) % grid[1]] for i in top],
                      "top_share": float(flow[1:][top].sum() / flow[1:].sum())})
        views.append(_padded_view(img))
        if heads_last is None:
            heads_last = [patch_heatmap(seq[-1][h, 0], grid, clip=CLIP).numpy() for h in range(seq[-1].shape[0])]
        ctx.tick()
    figs = [
        figure(plots.overlays(views, flows, list(names), ctx.path("flow"),
                               suptitle=f"{ctx.tag}: regularised attention flow, [CLS] row (P113)"),
                "VL-SAM-style attention flow (P113)", "Heads aggregated per layer with mean-max weights, layers "
                "chained as 0.5 A + 0.5 I with the column regularisation (the identity for a bidirectional ViT); "
                "the [CLS] row over the patches, drawn over the image the model saw (colours saturate above the "
                "98th percentile: a few high-norm artifact patches hold much of the flow, see the peaks in the "
                "results)."),
        figure(plots.overlays(views, rolls, list(names), ctx.path("rollout"),
                               suptitle=f"{ctx.tag}: standard attention rollout, [CLS] row"),
                "Attention rollout", "Uniform head average, no regularisation (Abnar & Zuidema)."),
        figure(plots.overlays([views[0]] * len(heads_last), heads_last,
                               [f"head {h}" for h in range(len(heads_last))], ctx.path("cls_heads"),
                               suptitle=f"{ctx.tag}: last layer, [CLS] attention per head"),
                "Per-head [CLS] maps", f"Last-layer [CLS] attention of each head on '{names[0]}'."),
    ]
    return {"images": list(names), "grid": list(grid), "flow_peaks": peaks, "display_clip_quantile": CLIP,
            "figures": figs}


def dinov2_sinks(ctx: Context) -> dict[str, Any]:
    from . import plots
    from .capture import Analyzer

    model, prep = ctx.model("dinov2")
    names, imgs = _images(ctx.quick)
    cls_mass: dict[int, list] = {}
    top_share: dict[int, list] = {}
    for img in imgs:
        def hook(call):
            s = call.stats(sink=1, topk=1)
            cls_mass.setdefault(call.layer, []).append(s.sink_mass[0].mean(-1))
            top_share.setdefault(call.layer, []).append(s.topk_values[0, :, :, 0].mean(-1))

        with torch.no_grad(), Analyzer(model, ctx.mechanism, hooks=[hook], **ctx.options):
            model(pixel_values=prep(img))
    L = len(cls_mass)
    cls = torch.stack([torch.stack(cls_mass[i]).mean(0) for i in range(L)])
    top = torch.stack([torch.stack(top_share[i]).mean(0) for i in range(L)])
    figs = [figure(plots.layer_head_map(cls, ctx.path("sink_cls"), title=f"{ctx.tag}: mass on [CLS]",
                                         cbar="attention mass"), "[CLS] mass", "Mean attention on [CLS] per head."),
            figure(plots.layer_head_map(top, ctx.path("sink_top"), title=f"{ctx.tag}: largest weight per row",
                                         cbar="attention weight"), "Peak weight",
                    "Mean over queries of each row's largest weight (a sink patch shows as a high value).")]
    return {"images": list(names), "cls_mass": cls.tolist(), "top_weight": top.tolist(), "figures": figs}


# --------------------------------------------------------------------------------------------------------
# A mechanism on random inputs
# --------------------------------------------------------------------------------------------------------
def _mechanism_inputs(ctx: Context):
    mech = registry.get(ctx.target)
    causal = "causal_self" in mech.patterns
    n = 32 if ctx.quick else 64
    g = torch.Generator().manual_seed(ctx.seed)
    q = torch.randn(1, 4, n, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64)
    opts = {**dict(mech.test_options), **ctx.options}
    if mech.case_options is not None:
        opts = mech.fit_case(ctx.options, n=n, side=None, heads=4, causal=causal)[0]
    return mech, causal, q, k, v, opts


def mechanism_maps(ctx: Context) -> dict[str, Any]:
    from . import plots
    from .operator import effective_operator
    from .stats import weight_statistics

    mech, causal, q, k, v, opts = _mechanism_inputs(ctx)
    w = effective_operator(mech.name, q, k, v, causal=causal, **opts)
    ref = effective_operator("softmax", q, k, v, causal=causal)
    mats = [w[0, h] for h in range(4)] + [ref[0, 0]]
    titles = [f"{mech.name} head {h}" for h in range(4)] + ["softmax head 0"]
    s, r = weight_statistics(w), weight_statistics(ref)
    figs = [figure(plots.matrices(mats, titles, ctx.path("operator"), cols=5,
                                   suptitle=f"{mech.name}: effective operator on random q, k ({q.shape[2]} tokens)"),
                    "Effective operator", f"{mech.name} with options {opts}, causal={causal}; softmax for reference.")]
    return {"options": {k_: str(v_) for k_, v_ in opts.items()}, "causal": causal,
            "entropy": s.entropy[0].mean(-1).tolist(), "softmax_entropy": r.entropy[0].mean(-1).tolist(),
            "row_sum_min": float(w.sum(-1).min()), "row_sum_max": float(w.sum(-1).max()), "figures": figs}


def mechanism_sinks(ctx: Context) -> dict[str, Any]:
    from .operator import effective_operator
    from .stats import weight_statistics

    mech, causal, q, k, v, opts = _mechanism_inputs(ctx)
    q = q.clone()
    k = k.clone()
    k[:, :, 0] = 2.0 * q.mean(2)[:, ::2]  # a key every query likes: a planted sink at position 0
    w = effective_operator(mech.name, q, k, v, causal=causal, **opts)
    ref = effective_operator("softmax", q, k, v, causal=causal)
    s, r = weight_statistics(w, sink=1), weight_statistics(ref, sink=1)
    return {"options": {k_: str(v_) for k_, v_ in opts.items()}, "causal": causal,
            "sink_mass": s.sink_mass[0].mean(-1).tolist(), "softmax_sink_mass": r.sink_mass[0].mean(-1).tolist(),
            "figures": []}


# --------------------------------------------------------------------------------------------------------
# Whisper
# --------------------------------------------------------------------------------------------------------
ALIGNMENT_TEXT = "the quick brown fox jumps over the lazy dog near a quiet river bank"


def spoken_words(text: str, *, gap: float = 0.3, threshold: float = 0.01):
    """Speech of ``text`` synthesised word by word with espeak-ng, each word trimmed to its sound and followed by
    ``gap`` seconds of silence: (16 kHz audio, the true start second of each word, its end second)."""
    import numpy as np

    from ..models.audio import synthesize

    pieces, starts, ends, pos = [], [], [], 0
    for w in text.split():
        a = synthesize(w)
        loud = np.nonzero(np.abs(a) > threshold)[0]
        if len(loud) == 0:
            raise ValueError(f"text: espeak-ng produced silence for the word {w!r}")
        a = a[loud[0]:loud[-1] + 1]
        starts.append(pos / 16000)
        pos += len(a)
        ends.append(pos / 16000)
        pieces += [a, np.zeros(int(gap * 16000), dtype=np.float32)]
        pos += int(gap * 16000)
    return np.concatenate(pieces), starts, ends


def whisper_alignment(ctx: Context) -> dict[str, Any]:
    import numpy as np

    from . import plots
    from .alignment import FRAME_SECONDS, dtw, whisper_word_alignment

    model, processor = ctx.model("whisper")
    text = " ".join(ALIGNMENT_TEXT.split()[:5]) if ctx.quick else ALIGNMENT_TEXT
    audio, starts, ends = spoken_words(text)
    words = text.split()
    rows = {}
    first_layer = [(0, h) for h in range(model.config.decoder_attention_heads)]
    for name, heads in (("alignment heads", None), ("first decoder layer (control)", first_layer)):
        timings, matrix = whisper_word_alignment(model, processor, audio, text, heads=heads, return_matrix=True,
                                                 mechanism=ctx.mechanism, **ctx.options)
        err = [abs(t.start - s) for t, s in zip(timings, starts)]
        gap_starts = [0.0] + ends[:-1]  # a start counts inside its word or the silence before it (50 ms slack)
        inside = [g - 0.05 <= t.start <= e + 0.05 for g, t, e in zip(gap_starts, timings, ends)]
        rows[name] = {"heads": [list(h) for h in (heads or model.config.alignment_heads)],
                      "predicted_start": [round(t.start, 3) for t in timings],
                      "median_abs_error": float(np.median(err)), "max_abs_error": float(max(err)),
                      "within_word_or_gap": float(np.mean(inside))}
        if heads is None:
            path = dtw(-matrix)
            fig = plots.alignment(matrix, path, words, starts, [t.start for t in timings], FRAME_SECONDS,
                                  ctx.path("alignment"),
                                  title=f"{ctx.tag}: alignment heads {model.config.alignment_heads} -> DTW "
                                        f"(median start error {np.median(err):.2f} s)")
        ctx.tick()
    return {"text": text, "true_start": [round(s, 3) for s in starts], "true_end": [round(e, 3) for e in ends],
            "audio_seconds": round(len(audio) / 16000, 3), "rows": rows,
            "figures": [figure(fig, "Whisper cross-attention alignment",
                                "Whisper tiny.en's alignment heads (from its config) on speech synthesised word by "
                                "word with 0.3 s gaps: the z-scored, median-filtered cross-attention of the rows that "
                                "predict each text token, the monotone DTW path, true (dashed) and predicted word "
                                "starts.")]}
