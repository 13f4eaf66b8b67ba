"""The cross family's user guide, ``docs/cross.md``, generated from the registry: which recipe to pick for which job,
the one-line ``attnzoo.build`` call of every record, and the records that share one implementation (with the reason).

``python -m attnzoo.mechanisms.cross.guide --write`` rewrites ``docs/cross.md``; a test checks that the committed page
equals :func:`guide_markdown` and that every record of the family appears in it.

Example:
    >>> from attnzoo.mechanisms.cross.guide import guide_markdown, build_call
    >>> build_call("pmp")
    'attnzoo.build("pmp", dim, heads)'
    >>> "| `pmp` |" in guide_markdown()
    True
"""

from __future__ import annotations

import sys
from pathlib import Path

from ...registry import get, mechanisms

# (job, when to pick it, records): every record of the family is listed under at least one job (tested).
JOBS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Several named contexts (the generic layer)",
     "queries attend to named sources (text, image, audio, ...) with per-source key padding, region masks, scales, "
     "positions, separate or joint softmax, cached decoding; the contract every other recipe composes",
     ("cross_attention",)),
    ("Per-source scaling / decoupled adapters",
     "add an image (or reference) stream beside the text stream with its own weight, or mix several learners",
     ("ip_adapter", "freeedit_drra", "fcaformer", "wings")),
    ("Region masks (a source reaches only some queries)",
     "a character's audio only inside its face, a subject's tokens only inside its box, subjects isolated",
     ("hunyuan_avatar", "prime_composer", "ir_diffusion", "video_alchemist")),
    ("Per-query subsets of keys (prompts, registers, modality selection)",
     "each token sees its own assigned prompts, task registers share the softmax, one modality re-aligned",
     ("tcpa", "ic_custom", "moda")),
    ("Causal media (cross attention causal by position)",
     "text sees only the frames or media placed before it; frames appended while decoding",
     ("video_ccam", "cross_attention", "wings")),
    ("Modality masks in one decoder sequence",
     "an MLLM decoder where image tokens see each other (or the prompt) and text stays causal; KV-cache decoding",
     ("croc", "ee_mllm", "aki")),
    ("Pooling with learned queries",
     "compress a token set (instances, hidden states of all layers, image levels, video frames) into a few vectors",
     ("acmil", "multilayer_pooling", "texthawk_resa", "video_ccam", "conditional_cross_attention", "dcal_glca")),
    ("Label attention (labels as queries)",
     "one output per label or class: label embeddings or descriptions query the tokens",
     ("label_attention", "crosstune")),
    ("Late interaction and matching scores",
     "image-text similarity from token-level alignments rather than one pooled vector",
     ("filip", "rcar", "lightclip")),
    ("Residual adapters on decoder queries (zero-initialised)",
     "condition existing queries on another stream without changing the untrained model",
     ("pmp", "lightclip", "cheetor", "wings")),
    ("Two-stream fusion and co-attention",
     "exchange information between two token streams: CLS exchange, bidirectional or cascaded cross-attention, "
     "token mixing, entity and relation attention, multi-reference fusion",
     ("crossvit", "dcal_pwca", "videolights", "vlanet", "dmmi", "ssm_dta", "ssg_qa", "transrefer3d", "emma",
      "mrefsr")),
    ("Structured queries: positions, prototypes, pointers",
     "relative-position biases between boxes and keypoints, prototype matching, a pointer over objects",
     ("relationnet_bvr", "pem", "oat")),
)

# records whose module is another record's implementation with other defaults: (record, shares, why)
SHARED: tuple[tuple[str, str, str], ...] = (
    ("lightclip", "pmp", "LightCLIP's MLM fusion is PMP's residual cross-attention of one token stream over another "
                         "(pre-norm, not zero-initialised); only its word-patch matching is its own"),
    ("crosstune", "label_attention", "CrossTune's label descriptions as queries with a softmax over labels is "
                                     "KeNet's label attention composition"),
)


def build_call(name: str) -> str:
    """The one-line build call of a record, ``attnzoo.build("name", dim, heads)`` (options keep their defaults)."""
    return f'attnzoo.build("{get(name).name}", dim, heads)'


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _options(mech) -> str:
    return ", ".join(f"`{o.name}={o.default!r}`" for o in mech.options) or "-"


def family_records() -> dict:
    """{name: record} of the family's records defined in this package (throw-away test records excluded)."""
    return {m.name: m for m in mechanisms(family="cross")
            if getattr(m.module or m.reference, "__module__", "").startswith(__package__ + ".")}


def guide_markdown() -> str:
    """The page ``docs/cross.md`` (Markdown), from the registry records of family ``cross``."""
    recs = family_records()
    lines = [
        "# Cross-attention recipes: which one to pick",
        "",
        "<!-- generated by `python -m attnzoo.mechanisms.cross.guide --write`; do not edit by hand -->",
        "",
        "Every recipe runs on the multi-source contract of `attnzoo.cross` (`cross_attention`, `CrossAttention`, "
        "`LatentResampler`; see ARCHITECTURE.md, \"Cross-attention\"). Pick the job first, then the recipe; "
        "each recipe's module docstring holds its paper, the equations confirmed against the official code, and a "
        "runnable example.",
        "",
        "## By job",
        "",
    ]
    for job, when, names in JOBS:
        lines.append(f"### {job}")
        lines.append("")
        lines.append(f"{when[0].upper()}{when[1:]}.")
        lines.append("")
        for n in names:
            m = recs[n]
            lines.append(f"- `{n}`{f' ({m.catalog})' if m.catalog else ''}: {_cell(m.summary)}  ")
            lines.append(f"  `{build_call(n)}`")
        lines.append("")
    lines += ["## Shared implementations (aliases)", "",
              "| record | implementation of | why |", "|---|---|---|"]
    lines += [f"| `{a}` | `{b}` | {_cell(why)} |" for a, b, why in SHARED]
    lines += ["", "Name aliases (`attnzoo.build` accepts them too): "
              + "; ".join(f"`{m.name}`: {', '.join(f'`{a}`' for a in m.aliases)}"
                          for m in recs.values() if m.aliases) + ".", ""]
    lines += ["## Every record", "",
              "| record | CATALOG | kind | patterns | build | options (defaults) |", "|---|---|---|---|---|---|"]
    for n, m in recs.items():
        lines.append(f"| `{n}` | {m.catalog or '-'} | {m.kind} | {', '.join(m.patterns)} | `{build_call(n)}` | "
                     f"{_cell(_options(m))} |")
    lines.append("")
    return "\n".join(lines)


DOC = Path(__file__).resolve().parents[4] / "docs" / "cross.md"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = guide_markdown()
    if args == ["--write"]:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
        print(f"wrote {DOC}")
    elif not args:
        print(text, end="")
    else:
        print("usage: python -m attnzoo.mechanisms.cross.guide [--write]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
