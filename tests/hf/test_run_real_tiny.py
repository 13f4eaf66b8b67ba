"""``run_real`` end to end on a tiny random Llama (GQA) and BERT with a character tokenizer (no model
package, a few seconds): perplexity from one shared forward equals independent per-length forwards, exact
softmax equals SDPA, a mechanism that raises is recorded per stage, unregistered rows are skipped, cache
bytes are the DynamicCache's exact size, MiniLM cosines, the deadline and checkpoints."""

import math

import pytest
import torch

from attnzoo import models, registry
from attnzoo.bench import real
from attnzoo.bench.results import validate

transformers = pytest.importorskip("transformers")

TEXT = ". ".join(f"Sentence number {i} talks about topic {i % 7} and goes on for a while to be long enough"
                 for i in range(120))
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 8


class CharTok:
    """Characters -> ids 3..99, a BOS of 1 when add_special_tokens; right padding with attention_mask."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True, padding=False, truncation=False):
        texts = [text] if isinstance(text, str) else list(text)
        seqs = [([1] if add_special_tokens else []) + [3 + ord(c) % 97 for c in t] for t in texts]
        if return_tensors is None:
            return {"input_ids": seqs[0] if isinstance(text, str) else seqs}
        n = max(map(len, seqs))
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        am = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], am[i, : len(s)] = torch.tensor(s), 1
        return {"input_ids": ids, "attention_mask": am}


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=512, attn_implementation="sdpa",
                                  initializer_range=0.3)  # attention that matters at random init
    torch.manual_seed(1)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _broken(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    raise RuntimeError("broken on purpose")


@pytest.fixture
def tiny_models(monkeypatch):
    llama, bert = tiny_llama(), tiny_bert()
    monkeypatch.setattr(models, "load_smollm2", lambda dtype=torch.float32: (llama, CharTok()))
    monkeypatch.setattr(models, "load_minilm", lambda dtype=torch.float32: (bert, CharTok()))
    monkeypatch.setattr(real.rows, "corpus_text", lambda: ("tiny corpus", TEXT))
    registry.mechanisms()  # load the registry before adding to it
    registry.register(registry.Mechanism(
        name="bench_real_broken", family="core", title="t", arxiv="", code="", summary="raises",
        patterns=("noncausal_self", "causal_self", "causal_cross"), exact=False, complexity="-", reference=_broken))
    monkeypatch.setattr(real.rows, "ROWS", [*real.ROWS[:3], real.Row("bench_real_broken"),
                                       real.Row("not_registered_yet", {"x": 1})])
    yield llama
    registry.unregister("bench_real_broken")


def _cfg(**kw):
    base = dict(lengths=(64, 128), passkey_depths=(0.5,), prefill=40, new_tokens=3, minilm_sentences=8,
                options={"sliding_window": {"window": 16}, "sink_window": {"window": 16, "sinks": 2}},
                encoder_options={"sliding_window": {"window": 4}, "sink_window": {"window": 4, "sinks": 1}})
    base.update(kw)
    return real.RealConfig(**base)


def test_run_real_tiny(tiny_models, monkeypatch):
    import attnzoo.hf as azhf

    calls = []
    attention = azhf.attention

    def counting(*a, mechanism, **k):  # the rows really run attnzoo inside the model
        calls.append(mechanism)
        return attention(*a, mechanism=mechanism, **k)

    monkeypatch.setattr(azhf, "attention", counting)
    saved = []
    sec = real.run_real(_cfg(checkpoint=lambda s: saved.append(len(s["rows"]))))
    assert {"softmax", "sliding_window", "sink_window"} <= set(calls)
    rows = {r["mechanism"]: r for r in sec["rows"]}
    assert list(rows) == ["sdpa", "softmax", "sliding_window", "sink_window", "bench_real_broken",
                          "not_registered_yet"]
    assert saved[:6] == [1, 2, 3, 4, 5, 6]
    # perplexity: the shared forward at 128 gives 64 exactly as an independent forward of the first 64 tokens
    ids = CharTok()(TEXT, return_tensors="pt")["input_ids"]
    model = tiny_models
    model.set_attn_implementation("sdpa")
    for n in (64, 128):
        with torch.no_grad():
            logits = model(ids[:, :n]).logits[0].double()
        want = math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:n]).item())
        assert rows["sdpa"]["perplexity"][str(n)] == pytest.approx(want, rel=1e-5)
        assert rows["softmax"]["perplexity"][str(n)] == pytest.approx(want, rel=1e-5)
    assert rows["sdpa"]["perplexity_forwards"].startswith("one forward at the longest length")
    assert 0 <= sec["exact_max_abs_logit_diff"] < 1e-4
    assert rows["softmax"]["max_abs_logit_diff_vs_sdpa"] == sec["exact_max_abs_logit_diff"]
    assert rows["softmax"]["logit_diff_tokens"] == 128
    for n in ("64", "128"):  # a 16-token window drops context the dense model uses
        assert abs(rows["sliding_window"]["perplexity"][n] / rows["sdpa"]["perplexity"][n] - 1) > 1e-4
    # passkey: one case per (length, depth), the prompt at least as long as asked
    cases = rows["sdpa"]["passkey_cases"]
    assert [c["length"] for c in cases] == [64, 128] and all(c["tokens"] >= c["length"] for c in cases)
    assert set(rows["sdpa"]["passkey_accuracy"]) == {"64", "128"}
    assert rows["softmax"]["passkey_accuracy"] == rows["sdpa"]["passkey_accuracy"]
    # decoding: the DynamicCache holds keys and values of every token; the window state is bounded
    tokens = 40 + real.DECODE_WARMUP + 3
    assert rows["sdpa"]["cache_bytes"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * 4
    assert rows["sdpa"]["decode_mode"] == "transformers DynamicCache"
    assert rows["sliding_window"]["decode_mode"] == "attnzoo window decode state"
    assert 0 < rows["sliding_window"]["cache_bytes"] < rows["sdpa"]["cache_bytes"]
    assert all(r["decode_tokens_per_s"] > 0 and r["decode_threads"] == 1 for r in sec["rows"][:4])
    assert len(rows["sdpa"]["decoded_ids"]) == real.DECODE_WARMUP + 3 + 1
    assert rows["softmax"]["decode_matches_sdpa"] is True  # the exact decode state reproduces SDPA's tokens
    # a mechanism that raises: every stage's error is in its row
    broken = rows["bench_real_broken"]
    assert set(broken["errors"]) == {"perplexity", "passkey", "decode"}
    assert all("broken on purpose" in m for m in broken["errors"].values())
    assert rows["not_registered_yet"]["skipped"] == "not registered"
    assert "illama_soft_mask" in [x["mechanism"] for x in sec["not_evaluated"]]
    # MiniLM: exact attention is the reference; a 4-token window is not
    mini = {r["mechanism"]: r for r in sec["minilm"]}
    assert mini["softmax"]["cosine_min"] > 0.99999
    assert mini["sliding_window"]["cosine_mean"] < 0.9999
    assert "broken on purpose" in mini["bench_real_broken"]["error"]
    assert mini["not_registered_yet"]["skipped"] == "not registered"
    validate(real.results_document(sec, {"date": "d", "hostname": "h", "torch": "t", "attnzoo": "a", "threads": 1,
                                         "cpu": {"model": "m", "flags": [], "logical_cores": 1}, "python": "3"},
                                   command="pytest", profile="real", duration_s=1.0))
    # without sharing: the same perplexities from one forward per length (the rows are prefix-invariant)
    again = real.run_real(_cfg(mechanisms=("sliding_window",), share_prefix=False, minilm=False,
                               stages=("perplexity",)))
    row = again["rows"][1]
    assert row["perplexity_forwards"] == "one forward per length"
    for n in ("64", "128"):
        assert row["perplexity"][n] == pytest.approx(rows["sliding_window"]["perplexity"][n], rel=1e-6)


def test_run_real_deadline_skips_rows(tiny_models):
    sec = real.run_real(_cfg(deadline=0.0))
    assert all(r["skipped"].startswith("the run's deadline of 0 s") for r in sec["rows"] if r["mechanism"] not in
               ("not_registered_yet",))
    assert sec["stopped"].startswith("the run's deadline") and sec["minilm"][0]["skipped"]


def test_row_options_the_mechanism_does_not_have_are_an_error_in_the_row(tiny_models, monkeypatch):
    monkeypatch.setattr(real.rows, "ROWS", [real.Row("sliding_window", {"windw": 16})])
    sec = real.run_real(_cfg(options={}, encoder_options={}, minilm=False))
    err = sec["rows"][1]["errors"]["setup"]
    assert "windw" in err and "--option" in err


def test_token_nll_in_chunks_equals_one_cross_entropy(tiny_models):
    model = tiny_models
    model.set_attn_implementation("sdpa")
    ids = CharTok()(TEXT, return_tensors="pt")["input_ids"][:, :61]
    hidden = real.hidden_states(model, ids)
    with torch.no_grad():
        logits = model(ids).logits[0]
    want = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    got = real.token_nll(model, hidden, ids, chunk=7)
    assert got.shape == (60,) and torch.allclose(got.float(), want, rtol=1e-5, atol=1e-6)
    assert real.max_logit_diff(model, hidden, hidden, chunk=7) == 0.0


def test_passkey_correct_is_teacher_forced_greedy(tiny_models):
    """An answer made of the model's own greedy choices counts; one changed token does not."""
    model = tiny_models
    model.set_attn_implementation("sdpa")
    ids, n_answer = real.passkey_prompt(CharTok(), 64, 0.5, 12345)
    assert n_answer == len(" 12345") and ids.shape[1] >= 64
    ids = ids.clone()
    for i in range(n_answer):  # make answer token i the greedy choice given everything before it
        pos = ids.shape[1] - n_answer + i
        with torch.no_grad():
            ids[0, pos] = model(ids[:, :pos]).logits[0, -1].argmax()
    assert real.passkey_correct(model, ids, n_answer)
    ids[0, -2] = (ids[0, -2] + 1) % 101
    assert not real.passkey_correct(model, ids, n_answer)


def test_stages(tiny_models):
    sec = real.run_real(_cfg(stages=("decode",), minilm=False, mechanisms=("softmax",)))
    sdpa, soft = sec["rows"]
    assert "perplexity" not in soft and "passkey_accuracy" not in soft and soft["errors"] == {}
    assert soft["decode_tokens_per_s"] > 0 and soft["decode_matches_sdpa"] is True
    assert sec["exact_max_abs_logit_diff"] is None
    with pytest.raises(ValueError, match="stages"):
        real.RealConfig(stages=("perplexity", "nope")).validate()


@pytest.mark.parametrize("mechanism", ["sdpa", "sliding_window"])
def test_decode_speed_passes_the_cache_under_the_installed_name(tiny_models, mechanism):
    """transformers 5.24 renamed the cache argument (past_key_values -> cache); the decode stage uses the installed
    name, so no deprecated alias is passed (it goes away in 5.40), and a swapped mechanism's state is the cache."""
    import warnings

    import attnzoo.hf as azhf

    model = tiny_models
    model.set_attn_implementation("sdpa")
    if mechanism != "sdpa":
        azhf.swap_attention(model, mechanism, window=16)
    ids = CharTok()(TEXT, return_tensors="pt")["input_ids"][:, :40]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = real.decode_speed(model, ids, 2)
    full = LAYERS * 2 * KV_HEADS * HEAD_DIM * (40 + real.DECODE_WARMUP + 2) * 4
    assert out["cache_bytes"] == full if mechanism == "sdpa" else 0 < out["cache_bytes"] < full
