"""EMMA (P108): the [I | 0]-initialised token mixer returns the visual tokens for any instruction; with trained
weights it equals the official image_text_infusion written out; the text block is what makes it instruction-aware."""

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    m = attnzoo.build("emma", 16, 1, context_dim=12, num_image_tokens=6, num_text_tokens=4).double()
    g = torch.Generator().manual_seed(1)
    return m, torch.randn(2, 6, 16, generator=g, dtype=F64), torch.randn(2, 4, 12, generator=g, dtype=F64)


def test_initialisation_is_the_identity_for_any_instruction():
    m, v, t = _setup()
    assert torch.equal(m(v, t), v) and torch.equal(m(v, 5 * t), v)


def test_equals_the_official_infusion_and_the_text_block_matters():
    m, v, t = _setup()
    with torch.no_grad():
        m.infusion.weight.add_(0.2 * torch.randn(6, 10, dtype=F64))
        m.infusion.bias.normal_()
    text = F.gelu(m.text_projection(t))
    infused = torch.cat((v, text), dim=1)
    want = m.infusion(infused.permute(0, 2, 1)).permute(0, 2, 1)  # clip_encoder.py forward
    assert_close(m(v, t), want, F64, "official infusion")
    assert (m(v, t) - m(v, t + 1)).abs().max() > 1e-4  # the instruction reaches the visual tokens
    with torch.no_grad():
        m.infusion.weight[:, 6:] = 0  # remove the text block: instruction-blind
    assert_close(m(v, t), m(v, t + 1), F64, "text block removed")


def test_masked_instruction_tokens_contribute_nothing():
    m, v, t = _setup()
    with torch.no_grad():
        m.infusion.weight.add_(0.2 * torch.randn(6, 10, dtype=F64))
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    t2 = t.clone()
    t2[0, 2:] += 3
    assert_close(m(v, t2, key_padding_mask=mask), m(v, t, key_padding_mask=mask), F64, "padded tokens")
