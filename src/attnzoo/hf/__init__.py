"""Hugging Face transformers integration: any functional attnzoo mechanism inside a pretrained model.

    import attnzoo.hf
    name = attnzoo.hf.register("sliding_window", window=512)          # -> "attnzoo:sliding_window(window=512)"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    # or, on a loaded model: model.set_attn_implementation(name)

What this does that a bare ``AttentionInterface.register`` does not:

- It always registers a matching *mask function* with the attention function. transformers' own mask
  functions return ``None`` for a plain causal batch and a dense (B, 1, Nq, Nk) tensor otherwise; an
  attention function that only looks at ``attention_mask`` silently loses padding or causality. attnzoo's
  mask function returns an :class:`HFMask` that keeps the padding mask and the model's mask predicate; the
  attention function turns it into attnzoo's contract (``causal`` + ``key_padding_mask``) and *checks*
  that this is exactly the mask the model asked for.
- Structured masks are accepted, never dropped: an explicit 4-D ``attention_mask`` (bool, or eager's additive
  0 / -inf) and model-built masks with more structure than causal + padding (a model's own sliding window,
  packed sequences, image blocks). A mechanism that declares its mask (``Mechanism.mask``: ``croc``, ``aki``,
  ``ee_mllm``, ``sliding_window``, ...) runs where the model's mask equals its mask & padding (checked row by row)
  or, on a plain causal/bidirectional model, where its mask lies inside the model's (an approximation that never
  sees a hidden key). The exact ``softmax`` runs any mask exactly: causal + padding fused, the model's own causal
  sliding window through attnzoo's ``sliding_window`` (Gemma-3's local layers), anything else as the dense mask.
  Every other combination raises instead of being computed with a different mask.

      mask = attnzoo.masks.hf_mask(attnzoo.masks.croc(5, 69), 1, n, n)   # (1, 1, n, n) bool
      model.set_attn_implementation(attnzoo.hf.register("croc", visual_start=5, visual_end=69))
      model(input_ids, attention_mask=mask)                                # verified, then three fused calls
- Grouped key/value heads are passed through (attnzoo handles Hq % Hk == 0 natively; no repeat_kv).
- The output is returned in the layout transformers expects, (B, Nq, Hq, Dv).

Mechanisms with their own parameters or recurrent state do not fit the function interface; they are
swapped in as modules with :func:`swap_attention`.

Modules of this package: :mod:`.adapter` (``register``, the mask function and mask verification), :mod:`.swap`
(``swap_attention``: attnzoo decode states inside ``generate``, optionally with the one-token step compiled,
``compile_report``), :mod:`.decoder_cross` (``swap_cross_attention``:
encoder-decoder cross-attention over a ContextCache).
"""

from .adapter import (
    PREFIX,
    DenseMask,
    HFIntegrationError,
    HFMask,
    attnzoo_mask_function,
    implementation_name,
    register,
    register_all,
)
from .decoder_cross import ENCODER_SOURCE, SwappedCrossAttention, swap_cross_attention
from .swap import CACHE_ARGUMENTS, SwappedAttention, cache_argument, compile_report, swap_attention

__all__ = ["CACHE_ARGUMENTS", "ENCODER_SOURCE", "PREFIX", "DenseMask", "HFIntegrationError", "HFMask",
           "SwappedAttention", "SwappedCrossAttention", "attnzoo_mask_function", "cache_argument", "compile_report",
           "implementation_name", "register", "register_all", "swap_attention", "swap_cross_attention"]
