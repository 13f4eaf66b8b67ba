"""Attention analysis and interpretability (CATALOG family "attention analysis/interpretability"), on the effective
attention operator of every mechanism, inside real models, at long context without an n x n matrix.

- :mod:`.operator` -- the effective operator of every registered mechanism (``Mechanism.operator``; softmax under a
  declared mask otherwise), per-source weights of cross-attention, the registry-wide table.
- :mod:`.stats` -- head statistics streamed from q, k and the log-sum-exp (entropy, sink / token-set mass, argmax,
  top-k, distances), equal to the dense ones.
- :mod:`.capture` -- :class:`~.capture.Analyzer`: a transformers model's attention calls with hooks (read, gate, mask,
  calibrate), through :mod:`attnzoo.hf` and any functional mechanism.
- :mod:`.retrieval` -- P045 retrieval heads (copy-paste score, masking ablation).
- :mod:`.calibration` -- P046 ACT and P098 VAR (dense references, streamed corrections, hooks).
- :mod:`.importance` -- P019 head importance (gate ablation, gradient) and attention-distance profiles.
- :mod:`.flow` -- P113 VL-SAM head aggregation and regularised attention flow / rollout.
- :mod:`.icl` -- P037 in-context linear regression with multi-head softmax attention and its KQ / OV structure.
- :mod:`.losses` -- P052 attention adversarial training (AT / iAT) and P027 DisenDiff's cross-attention calibration.
- :mod:`.alignment` -- Whisper's cross-attention alignment heads as a monotone word-to-audio alignment (DTW).
- :mod:`.mask_plot` -- PNGs of static masks; :mod:`.plots`, :mod:`.report`, :mod:`.run` (with :mod:`.context`,
  :mod:`.sections_text`, :mod:`.sections_media`), :mod:`.cli` --
  ``attnzoo analyze``.

P040 (Salient Relevance maps) is reading only: it is layer-wise relevance propagation for CNNs, not an attention
operator (CATALOG: out of scope), so nothing here implements it.
"""
