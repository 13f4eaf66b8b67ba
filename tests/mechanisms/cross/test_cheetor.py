"""Cheetor's knowledge re-injection (P099): zero-initialised projections leave the LLM unchanged; the injection lands
only at the image positions and equals W_o QFormer(Q_0 + W_p h_instr, image); the instruction state is what conditions
it (ablating W_p changes the result); per-row indices equal separate calls."""

import torch

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    m = attnzoo.build("cheetor", 16, 2, context_dim=12, num_queries=3, qformer_dim=8, qformer_layers=2, ffn=16,
                      image_start=2).double()
    g = torch.Generator().manual_seed(1)
    return m, torch.randn(2, 9, 16, generator=g, dtype=F64), torch.randn(2, 7, 12, generator=g, dtype=F64)


def _randomise(m):
    with torch.no_grad():
        for lin in (m.qformer_proj, m.llm_proj):
            lin.weight.normal_(0, 0.3)
            lin.bias.normal_(0, 0.3)


def _qformer(m, q, image):
    for layer in m.layers:
        q = layer(q, image, None)
    return q


def test_zero_initialised_is_the_identity():
    m, x, image = _setup()
    assert torch.equal(m(x, image), x)


def test_injection_at_image_positions_conditioned_on_the_instruction_state():
    m, x, image = _setup()
    _randomise(m)
    out = m(x, image)
    assert_close(out[:, :2], x[:, :2], F64, "before the image")
    assert_close(out[:, 5:], x[:, 5:], F64, "after the image")
    q = m.query_tokens + m.qformer_proj(x[:, -1]).unsqueeze(1)
    assert_close(out[:, 2:5] - x[:, 2:5], m.llm_proj(_qformer(m, q, image)), F64, "the injection")
    x2 = x.clone()
    x2[:, -1] += 1.0  # another instruction state
    assert (m(x2, image)[:, 2:5] - out[:, 2:5]).abs().max() > 1e-4
    with torch.no_grad():
        m.qformer_proj.weight.zero_()
        m.qformer_proj.bias.zero_()
    unconditioned = m(x, image)
    assert (unconditioned[:, 2:5] - out[:, 2:5]).abs().max() > 1e-4  # W_p h is what makes it instruction-aware
    assert_close(unconditioned[:, 2:5] - x[:, 2:5], m.llm_proj(_qformer(m, m.query_tokens.expand(2, -1, -1), image)),
                 F64, "W_p = 0: the learned queries")


def test_per_row_positions_equal_separate_calls():
    m, x, image = _setup()
    _randomise(m)
    got = m(x, image, instruction_index=torch.tensor([8, 6]), image_start=torch.tensor([2, 4]))
    for b, (i, s) in enumerate(((8, 2), (6, 4))):
        assert_close(got[b], m(x[b:b + 1], image[b:b + 1], instruction_index=i, image_start=s)[0], F64, f"row {b}")
