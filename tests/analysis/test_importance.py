"""P019 head importance on a tiny random Llama (transformers, no download): all gates 1 is the unmodified model,
gate ablation == zeroing the head's output, the gradient score == a finite difference of the loss in the gate, and
a local head (sliding window) has its distance profile inside the window."""

import pytest
import torch

from attnzoo.analysis.capture import Analyzer, head_mask_hook
from attnzoo.analysis.importance import ablation_importance, distance_profiles, gradient_importance, lm_loss

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 61, (1, 24), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_gate_ablation_is_zeroing_the_head(tiny):
    model, ids = tiny
    loss = lm_loss(ids)
    with torch.no_grad():
        plain = float(loss(model))
    res = ablation_importance(model, loss)
    assert res["base"] == pytest.approx(plain, abs=1e-12)  # all gates 1 == the unmodified model
    assert res["delta"].shape == (2, 4)
    for layer, head in ((0, 1), (1, 3)):
        with torch.no_grad(), Analyzer(model, hooks=[head_mask_hook([(layer, head)])]):
            masked = float(loss(model))
        assert res["delta"][layer, head] == pytest.approx(masked - plain, abs=1e-12)


def test_gradient_score_is_the_derivative_in_the_gate(tiny):
    model, ids = tiny
    loss = lm_loss(ids)
    res = gradient_importance(model, loss)
    assert all(p.requires_grad for p in model.parameters())  # restored
    eps = 1e-3  # the model normalises in float32 (LlamaRMSNorm): a smaller step drowns in rounding
    for layer, head in ((0, 0), (1, 2)):
        vals = []
        for sign in (1, -1):
            gates = torch.ones(2, 4, dtype=torch.float64)
            gates[layer, head] += sign * eps

            def scale(call, g=gates):
                return call.out * g[call.layer].view(1, -1, 1, 1).to(call.out.dtype)

            with torch.no_grad(), Analyzer(model, hooks=[scale]):
                vals.append(float(loss(model)))
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert res["grad"][layer, head] == pytest.approx(fd, rel=2e-3, abs=1e-8)


def test_local_head_distance_profile_stays_in_its_window(tiny):
    model, ids = tiny
    bins = [0, 1, 2, 3, 8, 32]
    prof = distance_profiles(model, lambda m: m(ids), bins=bins, mechanism="sliding_window",
                             options={"window": 3})
    assert prof["histogram"].shape == (2, 4, 5)
    assert torch.all(prof["histogram"][..., 3:] == 0)  # window 3: distances 0, 1, 2 only
    assert torch.allclose(prof["histogram"].sum(-1), torch.ones(2, 4, dtype=torch.float64))
    assert bool((prof["mean_distance"] <= 2).all())
    full = distance_profiles(model, lambda m: m(ids), bins=bins)
    assert float(full["histogram"][..., 3:].sum()) > 0
