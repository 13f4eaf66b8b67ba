"""The transformers adapter on tiny randomly initialised Llama (GQA) and BERT models: exact attnzoo
softmax reproduces the model's SDPA outputs, masks are never dropped, and every functional mechanism
gives a padded batch the same outputs as its unpadded sequences."""

import pytest
import torch

import attnzoo
import attnzoo.hf as azhf
from attnzoo import masks

transformers = pytest.importorskip("transformers")



def llama(impl="sdpa"):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation=impl)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(torch.float64)


def bert(impl="sdpa"):
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128, attn_implementation=impl)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval().to(torch.float64)


def ids(b, n, seed=0):
    return torch.randint(3, 101, (b, n), generator=torch.Generator().manual_seed(seed))


def test_register_names_and_errors():
    assert azhf.register("softmax") == "attnzoo:softmax"
    assert azhf.register("sliding_window", window=8) == "attnzoo:sliding_window(window=8)"
    with pytest.raises(attnzoo.OptionError):
        azhf.register("sliding_window", window=0)
    with pytest.raises(attnzoo.UnknownMechanismError, match="Did you mean"):
        azhf.register("slidng_window")


def test_exact_softmax_reproduces_llama_sdpa():
    x = ids(2, 23)
    ref = llama("sdpa")(x).logits
    got = llama(azhf.register("softmax"))(x).logits
    assert (got - ref).abs().max().item() < 1e-10


def test_exact_softmax_reproduces_bert_sdpa_with_padding():
    x = ids(2, 17)
    am = torch.ones(2, 17, dtype=torch.long)
    am[1, 11:] = 0
    ref = bert("sdpa")(x, attention_mask=am).last_hidden_state
    got = bert(azhf.register("softmax"))(x, attention_mask=am).last_hidden_state
    keep = am.bool()
    assert (got - ref)[keep].abs().max().item() < 1e-10


def test_padding_is_honoured_not_dropped():
    """Changing padded tokens changes nothing for the real ones (left padding, decoder)."""
    model = llama(azhf.register("softmax"))
    x = ids(1, 12)
    am = torch.ones(1, 12, dtype=torch.long)
    am[0, :4] = 0
    a = model(x, attention_mask=am).logits
    x2 = x.clone()
    x2[0, :4] = ids(1, 4, seed=9)
    b = model(x2, attention_mask=am).logits
    assert (a[0, 4:] - b[0, 4:]).abs().max().item() < 1e-10


def _relaxes_causal(m, n=19):
    """A declared mask (with the test options) that lets a query see a later key (Croc, AKI): such a mechanism runs
    only where the model asks for its mask; tests/hf/test_structured_masks.py covers it with 4-D masks."""
    if m.mask is None:
        return False
    pred = m.mask(n, n, causal=True, **m.resolve_options(dict(m.test_options)))
    return bool((masks.materialize(pred, 1, 1, n, n)[0, 0] & ~torch.ones(n, n, dtype=torch.bool).tril()).any())


def _functional_causal():
    return [m for m in attnzoo.list_mechanisms() if m.functional and "causal_self" in m.patterns
            and not _relaxes_causal(m)]


def _functional_bidirectional():
    return [m for m in attnzoo.list_mechanisms() if m.functional and "noncausal_self" in m.patterns]


def _options(m):
    return dict(m.test_options)


def _length_dependent(mech):
    """Approximations whose computation depends on the whole sequence length (block partitions, recursive
    halving): their outputs legitimately change with the padded length. They declare prefix_invariant=False;
    for them the adapter is held to the mask contract only (padded content never matters)."""
    if not mech.prefix_invariant:
        pytest.skip(f"{mech.name} is length-dependent (prefix_invariant=False); see test_padded_content_never_matters")


@pytest.mark.parametrize("mech", _functional_causal(), ids=lambda m: m.name)
def test_padded_content_never_matters(mech):
    """For every causal functional mechanism: what sits in padded positions never reaches real tokens."""
    model = llama(azhf.register(mech.name, **_options(mech)))
    x = ids(2, 19, seed=5)
    am = torch.ones(2, 19, dtype=torch.long)
    am[1, 12:] = 0
    x2 = x.clone()
    x2[1, 12:] = ids(1, 7, seed=6)
    a, b = model(x, attention_mask=am).logits, model(x2, attention_mask=am).logits
    assert (a[0] - b[0]).abs().max().item() < 1e-10
    assert (a[1, :12] - b[1, :12]).abs().max().item() < 1e-10


@pytest.mark.parametrize("mech", _functional_causal(), ids=lambda m: m.name)
def test_padded_batch_equals_unpadded_decoder(mech):
    """Right-padded batch of two sequences == each sequence alone, for every causal functional mechanism."""
    _length_dependent(mech)
    model = llama(azhf.register(mech.name, **_options(mech)))
    a, b = ids(1, 19, seed=1), ids(1, 12, seed=2)
    batch = torch.full((2, 19), 0)
    batch[0], batch[1, :12] = a[0], b[0]
    am = torch.zeros(2, 19, dtype=torch.long)
    am[0], am[1, :12] = 1, 1
    out = model(batch, attention_mask=am).logits
    ra, rb = model(a).logits, model(b).logits
    assert (out[0] - ra[0]).abs().max().item() < 1e-9
    assert (out[1, :12] - rb[0]).abs().max().item() < 1e-9


@pytest.mark.parametrize("mech", _functional_bidirectional(), ids=lambda m: m.name)
def test_padded_batch_equals_unpadded_encoder(mech):
    _length_dependent(mech)
    model = bert(azhf.register(mech.name, **_options(mech)))
    a, b = ids(1, 15, seed=3), ids(1, 9, seed=4)
    batch = torch.full((2, 15), 0)
    batch[0], batch[1, :9] = a[0], b[0]
    am = torch.zeros(2, 15, dtype=torch.long)
    am[0], am[1, :9] = 1, 1
    out = model(batch, attention_mask=am).last_hidden_state
    ra, rb = model(a).last_hidden_state, model(b).last_hidden_state
    assert (out[0] - ra[0]).abs().max().item() < 1e-9
    assert (out[1, :9] - rb[0]).abs().max().item() < 1e-9


def test_causal_only_mechanism_on_encoder_raises():
    causal_only = [m for m in attnzoo.list_mechanisms() if m.functional and "noncausal_self" not in m.patterns]
    if not causal_only:
        pytest.skip("no causal-only functional mechanism registered")
    model = bert(azhf.register(causal_only[0].name, **_options(causal_only[0])))
    with pytest.raises(attnzoo.UnsupportedPatternError):
        model(ids(1, 8))


def test_generate_identical_exact_vs_sdpa():
    x = ids(2, 7)
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, :2] = 0  # left padding, as generate expects
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = llama("sdpa").generate(x, attention_mask=am, **kw)
    got = llama(azhf.register("softmax")).generate(x, attention_mask=am, **kw)
    assert torch.equal(got, ref)


def test_window_mechanism_matches_model_with_own_window():
    """A mechanism whose window lies inside a model's own sliding window is allowed; a wider one raises."""
    cfg = transformers.MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    ref_model = transformers.MistralForCausalLM(cfg).eval().double()
    x = ids(1, 20)
    ref = ref_model(x).logits
    ref_model.set_attn_implementation(azhf.register("sliding_window", window=6))
    got = ref_model(x).logits
    assert (got - ref).abs().max().item() < 1e-10
    ref_model.set_attn_implementation(azhf.register("softmax"))
    assert (ref_model(x).logits - ref).abs().max().item() < 1e-10  # exact: applies the model's dense mask


def _decodable():
    return [m for m in attnzoo.list_mechanisms() if m.functional and m.step is not None and "causal_self" in m.patterns
            and not _relaxes_causal(m)]


@pytest.mark.parametrize("mech", _decodable(), ids=lambda m: m.name)
def test_swap_attention_generate_matches_full_recompute(mech):
    """generate() with the mechanism's own decode state == greedy decoding by full causal forwards."""
    _length_dependent(mech)
    model = llama("sdpa")
    azhf.swap_attention(model, mech.name, **_options(mech))
    x = ids(2, 9)
    out = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = x
    for _ in range(6):  # no cache: every step a full causal forward through the same attention function
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_swap_attention_state_is_bounded_and_beam_search_works():
    model = llama("sdpa")
    azhf.swap_attention(model, "sink_window", window=4, sinks=1)
    x = ids(1, 30)
    cache = transformers.DynamicCache()
    model(x, **{azhf.cache_argument(model): cache}, use_cache=True)
    states = [layer.state for layer in cache.layers]
    assert len(states) == 2 and all(s.length <= 1 + 3 for s in states)  # sinks + window - 1, not 30
    assert cache.get_seq_length() == 30
    out = model.generate(ids(1, 5), max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_swap_attention_cache_crop_follows_the_installed_convention():
    """A swapped layer crops as the installed transformers' own DynamicLayer does (up to some 5.x release,
    crop(n >= 0) keeps n tokens; later, crop(-n) removes n, crop(0) removes none and generate() calls it between
    steps, crop(n > 0) is refused; removing more than it holds empties it). After the crops, decoding continues
    exactly as from the shorter prefix."""
    model, plain = llama("sdpa"), llama("sdpa")
    azhf.swap_attention(model, "softmax")
    arg = azhf.cache_argument(model)
    x = ids(1, 12)
    cache, ref = transformers.DynamicCache(), transformers.DynamicCache()
    model(x, **{arg: cache}, use_cache=True)
    plain(x, **{arg: ref}, use_cache=True)
    assert all(type(layer).__name__ == "AttnzooCacheLayer" for layer in cache.layers)
    for n in (-3, 0, 7, -2):
        outcome = []
        for c in (cache, ref):
            try:
                c.crop(n)
                outcome.append(c.get_seq_length())
            except ValueError:
                outcome.append("refused")
        assert outcome[0] == outcome[1], (n, outcome)
        assert all(layer.state.seq_len == ref.get_seq_length() for layer in cache.layers)
    n = cache.get_seq_length()  # 7 (transformers >= 5.1) or 0 (before: crop(0) kept none)
    got = model(x[:, n : n + 1], **{arg: cache}, use_cache=True).logits[:, -1]
    want = model(x[:, : n + 1], use_cache=False).logits[:, -1]
    assert (got - want).abs().max().item() < 1e-10


def _mistral(window):
    cfg = transformers.MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).eval().double()


def test_swap_attention_decoding_checks_the_models_own_mask():
    """A model whose layers have their own sliding window: the swapped decode state must compute that mask. A
    window inside the model's decodes exactly like the model; full attention (softmax's KV cache) is refused
    instead of silently attending beyond the model's window."""
    x = ids(1, 10)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = _mistral(6).generate(x, **kw)
    model = _mistral(6)
    azhf.swap_attention(model, "sliding_window", window=6)
    assert torch.equal(model.generate(x, **kw), ref)
    model = _mistral(6)
    azhf.swap_attention(model, "softmax")
    with pytest.raises(azhf.HFIntegrationError, match="sliding_window is 6"):
        model.generate(x, **kw)


def test_swap_attention_errors():
    model = llama("sdpa")
    noncausal = [m for m in attnzoo.list_mechanisms() if m.functional and "causal_self" not in m.patterns]
    if noncausal:
        with pytest.raises(azhf.HFIntegrationError, match="no causal form"):
            azhf.swap_attention(model, noncausal[0].name)
    with pytest.raises(azhf.HFIntegrationError, match="no attention modules"):
        azhf.swap_attention(bert("sdpa"), "softmax")


@pytest.mark.parametrize("name,opts", [("sink_window", {"window": 4, "sinks": 1}), ("linear", {})])
def test_swap_attention_compiled_decode_matches_eager(name, opts):
    """compile=True: each layer's one-token step runs compiled (one graph set shared by the layers; the prompt's
    prefill stays eager) and generate() returns what the eager swap returns, token for token and in logits."""
    torch._dynamo.reset()
    eager, comp = llama("sdpa"), llama("sdpa")
    azhf.swap_attention(eager, name, **opts)
    azhf.swap_attention(comp, name, compile={"backend": "eager"}, **opts)
    kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    x = ids(2, 9)
    a, b = eager.generate(x, **kw), comp.generate(x, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert max((sa - sb).abs().max().item() for sa, sb in zip(a.scores, b.scores)) < 1e-10
    rep = azhf.compile_report(comp)
    assert rep["layers"] == 2 and rep["compiled"] == 2 and rep["fallback_reason"] is None
    assert rep["graphs"] >= 1  # something was compiled: the one-token calls did go through the wrapper
    decs = [m.decoder for m in comp.modules() if isinstance(m, azhf.SwappedAttention)]
    assert [d.calls for d in decs] == [6, 6]  # the 6 one-token steps after the prompt, not the prompt itself


def test_swap_attention_compile_falls_back_to_eager_and_says_why(monkeypatch):
    """A compile failure inside generate(): the layers decode eagerly (same tokens), the report names the reason."""
    def broken(*args, **kwargs):
        raise RuntimeError("inductor is broken here")

    monkeypatch.setattr(torch, "compile", broken)
    eager, comp = llama("sdpa"), llama("sdpa")
    azhf.swap_attention(eager, "sliding_window", window=5)
    azhf.swap_attention(comp, "sliding_window", compile=True, window=5)
    x = ids(1, 8)
    with pytest.warns(RuntimeWarning, match="inductor is broken here"):
        out = comp.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, eager.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0))
    rep = azhf.compile_report(comp)
    assert rep["compiled"] == 0 and "inductor is broken here" in rep["fallback_reason"]


def test_swap_attention_compile_argument_errors():
    with pytest.raises(TypeError, match="compile: expected a bool"):
        azhf.swap_attention(llama("sdpa"), "linear", compile=1)
    with pytest.raises(TypeError, match=r"compile: unknown compile_decode options \['fast'\]"):
        azhf.swap_attention(llama("sdpa"), "linear", compile={"fast": True})
    with pytest.raises(ValueError, match="mode"):
        azhf.swap_attention(llama("sdpa"), "linear", compile={"mode": "fastest"})
    with pytest.raises(azhf.HFIntegrationError, match="no swapped attention layers"):
        azhf.compile_report(llama("sdpa"))
    model = llama("sdpa")
    azhf.swap_attention(model, "linear")
    with pytest.raises(azhf.HFIntegrationError, match="without compile=True"):
        azhf.compile_report(model)
