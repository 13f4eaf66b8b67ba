"""IR-Diffusion's Isolation Attention (P038): subject-a queries give zero weight to subject-b keys (target and
reference), background is shared, and a single subject (or no ids) is plain extended self-attention (torch MHA over
[target; reference], copied weights)."""

import torch
from torch import nn

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    iso = attnzoo.build("ir_diffusion", 16, 4).double()
    g = torch.Generator().manual_seed(2)
    x, ref = torch.randn(1, 6, 16, generator=g, dtype=F64), torch.randn(1, 5, 16, generator=g, dtype=F64)
    ids = torch.tensor([[0, 0, 1, 1, -1, -1]])
    ref_ids = torch.tensor([[0, 1, 1, -1, 0]])
    return iso, x, ref, ids, ref_ids


def test_subjects_are_isolated_and_background_is_shared():
    iso, x, ref, ids, ref_ids = _setup()
    base = iso(x, ref, subject_ids=ids, context_subject_ids=ref_ids)
    ref2 = ref.clone()
    ref2[:, 1:3] += 5.0  # subject 1's reference tokens
    moved = iso(x, ref2, subject_ids=ids, context_subject_ids=ref_ids)
    assert_close(moved[:, :2], base[:, :2], F64, "subject 0 ignores subject 1's reference")
    assert (moved[:, 2:4] - base[:, 2:4]).abs().max() > 1e-3  # subject 1 reads them
    assert (moved[:, 4:] - base[:, 4:]).abs().max() > 1e-3  # background sees everything
    plain = iso(x, ref)
    assert (plain[:, :2] - base[:, :2]).abs().max() > 1e-3  # isolation is what differs from plain attention


def test_one_subject_or_no_ids_is_plain_extended_self_attention():
    iso, x, ref, _, _ = _setup()
    mha = nn.MultiheadAttention(16, 4, batch_first=True, bias=False).double()
    with torch.no_grad():
        name = iso.attn.names[0]
        w = torch.cat([iso.attn.q_proj.weight, iso.attn.k_proj[name].weight, iso.attn.v_proj[name].weight])
        mha.in_proj_weight.copy_(w)
        mha.out_proj.weight.copy_(iso.attn.o_proj.weight)
    both = torch.cat([x, ref], 1)
    want = mha(x, both, both, need_weights=False)[0] + iso.attn.o_proj.bias
    assert_close(iso(x, ref), want, F64, "no ids")
    zeros = torch.zeros(1, 6, dtype=torch.long)
    assert_close(iso(x, ref, subject_ids=zeros, context_subject_ids=torch.zeros(1, 5, dtype=torch.long)), want,
                 F64, "one subject")
