"""CrossTune: label descriptions cross-attend to a black-box model's input representation; softmax over labels.

Paper: "CrossTune: Black-Box Few-Shot Classification with Label Enhancement", Luo, Zhang, Zhang, Li,
arXiv 2403.12468 (LREC-COLING 2024). Official code: none found. CATALOG P068.
The input text's token representations H (from a frozen black-box language model) and the embeddings of each
label's description L_c meet in a cross-attention; each label gets a relatedness score and a softmax over labels
gives the class; training adds ChatGPT-generated examples filtered by a switch mechanism (not part of the attention).

(?) From the abstract and summaries ("multi-head cross-attention" between the input representation and the label
descriptions): labels are the queries (their descriptions' embeddings, given per call) over the input tokens;
the relatedness of label c is ``L_c . R_c / sqrt(d)`` with ``R_c`` its attended input vector; softmax over labels.
This is KeNet's label attention (P018) with given labels and ``task="single_label"``: the implementation is
:class:`attnzoo.mechanisms.cross.label_attention.LabelAttention` (one implementation, two records).
"""

from __future__ import annotations

from typing import Any

from ...registry import CrossSpec, Mechanism, Option, register
from .label_attention import LabelAttention


def _module(dim: int, heads: int, **options: Any):
    opts = CROSSTUNE.resolve_options(options)
    return LabelAttention(dim, heads, task="single_label", **opts)


CROSSTUNE = register(Mechanism(
    name="crosstune",
    aliases=("label_enhanced_cross_attention",),
    family="cross",
    kind="pooling",
    catalog="P068",
    title="CrossTune: Black-Box Few-Shot Classification with Label Enhancement",
    arxiv="2403.12468",
    code="(none found)",
    summary="Label-description embeddings are the queries of a cross-attention over the input's token "
            "representations; each label's relatedness, softmax over labels (KeNet's composition, labels given).",
    patterns=("noncausal_cross",),
    exact=True,
    complexity="time O(c n d), memory O(c + n) fused",
    module=_module,
    options=(
        Option("num_labels", None, int, low=1, allow_none=True,
               doc="None: the label descriptions are given per call (labels=...); an int learns that many"),
        Option("bias", False, bool, doc="biases in the projections"),
    ),
    test_options={"num_labels": 4},
    cross=CrossSpec(context_permutation_invariant=True),
    notes="(?) from the abstract; the same implementation as label_attention (P018) with the label descriptions "
          "given per call (forward(x, labels=...)) and a softmax over labels.",
))
