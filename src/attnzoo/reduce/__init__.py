"""Token reduction: pruning, merging, exit and compression (CATALOG family ``reduce``), in two steps usable apart.

Score step: attention rows recomputed from q, K and the log-sum-exp without an n x n matrix (``importance``),
[CLS] attention (``cls_attention``: P057 FasterVLM, P085 VTC-CLS), text-query attention (``text_query``: P083
LSceneLLM, P065 YOPO-style), learned queries (``learned_queries``: P109 LLaVA-Mini, P100 TextMonkey, P053
MULTI-LANE), similarity (``tome``: ToMe bipartite matching, the classic baseline; ``maelre``: P048).
Select/merge step (``select``): top-k in original order, merging with a source map that unmerges, and the two
baselines of every comparison (random selection and pooling at the same budget). Exit gates: ``exit`` (P081 DyVTE).
Inside real models: ``inmodel`` (MiniLM encoder pruning, SmolLM2 FastV-style prompt pruning with a consistent KV
cache, DINOv2 [CLS] pruning). The records: ``attnzoo.reduce.reductions()``.
"""

from . import cls_attention, exit, learned_queries, maelre, text_query  # noqa: F401  (register the records)
from .cls_attention import cls_scores, dinov2_cls_rows, fastervlm, fastervlm_scores, vtc_cls, vtc_cls_scores
from .exit import VisualExitGate, exit_forward
from .importance import attention_received, attention_row, mechanism_attention_row
from .learned_queries import LLaVAMiniCompressor, MultiLaneSummary, TextMonkeyResampler, uniqueness_scores
from .maelre import MAELREStage, maelre_attention
from .registry import Reduction, get_reduction, reductions
from .select import (
    Reduced,
    keep_count,
    merge_tokens,
    pool_tokens,
    prune,
    random_indices,
    select_tokens,
    topk_indices,
    unmerge,
)
from .text_query import lscenellm_select, text_query_scores, yopo_predicate
from .tome import bipartite_soft_matching, proportional_attention, tome_merge

__all__ = [
    "LLaVAMiniCompressor", "MAELREStage", "MultiLaneSummary", "Reduced", "Reduction", "TextMonkeyResampler",
    "VisualExitGate", "attention_received", "attention_row", "bipartite_soft_matching", "cls_scores",
    "dinov2_cls_rows", "exit_forward", "fastervlm", "fastervlm_scores", "get_reduction", "keep_count",
    "lscenellm_select", "maelre_attention", "mechanism_attention_row", "merge_tokens", "pool_tokens",
    "proportional_attention", "prune", "random_indices", "reductions", "select_tokens", "text_query_scores",
    "tome_merge", "topk_indices", "unmerge", "uniqueness_scores", "vtc_cls", "vtc_cls_scores", "yopo_predicate",
]
