"""Structured masks through the transformers adapter, on tiny random models (float64): explicit 4-D modality
masks (Croc, AKI, EE-MLLM, per-row spans, padding) run by their attnzoo mechanisms equal the model's own sdpa and
eager attention under the same mask; a mechanism never runs under a mask other than the model's; the exact
softmax routes a model's own sliding-window layers through attnzoo's sliding_window; prefill with the structured
mask then cached decoding equals the full masked forward."""

import pytest
import torch

import attnzoo.hf as azhf
from attnzoo import masks

transformers = pytest.importorskip("transformers")


def llama(impl="sdpa"):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation=impl)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(torch.float64)


def ids(b, n, seed=0):
    return torch.randint(3, 101, (b, n), generator=torch.Generator().manual_seed(seed))


N = 21
PAD = torch.ones(2, N, dtype=torch.long)
PAD[1, :3] = 0  # left padding of the second row: its layout starts 3 positions later
CASES = {
    "croc": dict(visual_start=torch.tensor([2, 5]), visual_end=torch.tensor([9, 12])),
    "aki": dict(visual_start=torch.tensor([2, 5]), visual_end=torch.tensor([9, 12]), prompt_end=torch.tensor([14, 17])),
    "ee_mllm": dict(visual_start=torch.tensor([2, 5]), visual_end=torch.tensor([9, 12])),
}


def predicate(name, opts, offset=0):
    return getattr(masks, name)(*opts.values(), offset=offset)


@pytest.mark.parametrize("name", list(CASES))
def test_modality_mask_equals_the_models_own_attention_under_the_same_4d_mask(name):
    opts, x = CASES[name], ids(2, N)
    mask = masks.hf_mask(predicate(name, opts), 2, N, N, attention_mask=PAD)  # (2, 1, N, N) bool
    model = llama("sdpa")
    with torch.no_grad():
        ref = model(x, attention_mask=mask).logits
        model.set_attn_implementation("eager")  # additive form; on the unpadded row (eager turns empty rows to NaN)
        first = {k: v[:1] for k, v in opts.items()}
        eager = model(x[:1], attention_mask=masks.hf_mask(predicate(name, first), 1, N, N, dtype=torch.float64)).logits
        model.set_attn_implementation(azhf.register(name, **opts))
        got = model(x, attention_mask=mask).logits
        model.set_attn_implementation(azhf.register("softmax"))
        exact = model(x, attention_mask=mask).logits  # the exact mechanism applies the dense mask as given
    keep = PAD.bool()
    for other, what in ((got, name), (exact, "softmax")):
        assert (other - ref)[keep].abs().max().item() < 1e-10, what
    assert (eager - ref[:1]).abs().max().item() < 1e-6  # eager takes its softmax in float32
    # the structure matters: the same model under its plain causal mask differs
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        causal = model(x, attention_mask=PAD).logits
    assert (causal - ref)[keep].abs().max().item() > 1e-4


def test_a_mechanism_never_runs_under_another_mask():
    x = ids(1, N)
    model = llama(azhf.register("croc", visual_start=2, visual_end=9))
    with pytest.raises(azhf.HFIntegrationError, match="not inside the mask"):
        model(x)  # the model asks for causal attention; Croc would let the image see later tokens
    wrong = masks.hf_mask(masks.croc(3, 9), 1, N, N)
    with pytest.raises(azhf.HFIntegrationError, match="not equal to the mask"):
        model(x, attention_mask=wrong)  # a 4-D Croc mask over another span
    model.set_attn_implementation(azhf.register("linear"))
    with pytest.raises(azhf.HFIntegrationError, match="not causal=True \\+ key padding"):
        model(x, attention_mask=masks.hf_mask(masks.croc(2, 9), 1, N, N))  # no declared mask: plain models only
    bias = torch.zeros(1, 1, N, N, dtype=torch.float64)
    bias[..., 0] = -0.5
    model.set_attn_implementation(azhf.register("softmax"))
    with pytest.raises(azhf.HFIntegrationError, match="additive bias, not a mask"):
        model(x, attention_mask=bias)


def test_ee_mllm_inside_a_plain_causal_model_is_the_training_free_variant():
    """EE-MLLM's mask lies inside causal: on a plain model it runs (EE-MLLM-F) and equals the explicit mask."""
    x, opts = ids(2, N), dict(visual_start=4, visual_end=11)
    model = llama("sdpa")
    with torch.no_grad():
        ref = model(x, attention_mask=masks.hf_mask(masks.ee_mllm(4, 11), 2, N, N)).logits
        model.set_attn_implementation(azhf.register("ee_mllm", **opts))
        got = model(x).logits
    assert (got - ref).abs().max().item() < 1e-10


def test_prefill_with_the_structured_mask_then_cached_decoding():
    """Prefill the multimodal prompt with its 4-D Croc mask, then decode with a KV cache: every step's logits equal
    the full forward under the Croc mask (new tokens are causal)."""
    prompt, total = 12, 18
    x = ids(1, total, seed=3)
    opts = dict(visual_start=2, visual_end=8)
    full_mask = masks.hf_mask(masks.croc(2, 8), 1, total, total)
    model = llama("sdpa")
    with torch.no_grad():
        ref = model(x, attention_mask=full_mask).logits
        model.set_attn_implementation(azhf.register("croc", **opts))
        cache = transformers.DynamicCache()
        out = model(x[:, :prompt], attention_mask=masks.hf_mask(masks.croc(2, 8), 1, prompt, prompt),
                    past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(prompt, total):
            out = model(x[:, t : t + 1], attention_mask=torch.ones(1, t + 1, dtype=torch.long), past_key_values=cache,
                        use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - ref).abs().max().item() < 1e-10


def test_exact_softmax_routes_the_models_own_sliding_window_through_attnzoo(monkeypatch):
    """A tiny Gemma-3 (sliding layers of window 5, one global layer): softmax on attnzoo equals its sdpa, and its
    sliding layers run attnzoo's sliding_window with the same window (the convention p-w+1..p matches)."""
    cfg = transformers.Gemma3TextConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=5,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                        max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval().double()
    x = ids(2, 23)
    am = torch.ones(2, 23, dtype=torch.long)
    am[1, :4] = 0
    with torch.no_grad():
        ref = model(x, attention_mask=am).logits
    calls = []
    real = azhf.attention
    monkeypatch.setattr(azhf, "attention", lambda *a, **kw: calls.append((kw["mechanism"], kw.get("window")))
                        or real(*a, **kw))
    model.set_attn_implementation(azhf.register("softmax"))
    with torch.no_grad():
        got = model(x, attention_mask=am).logits
    assert (got - ref)[am.bool()].abs().max().item() < 1e-10
    assert calls == [("sliding_window", 5), ("sliding_window", 5), ("softmax", None)]
