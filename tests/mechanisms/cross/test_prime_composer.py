"""PrimeComposer (P095): RCA against explicit scores with the official -inf fill (renormalised softmax); a region over
every pixel is plain cross-attention; subject tokens reach no pixel outside the region; steering replaces the object's
rows and columns of the self-attention logits and an empty region is plain attention."""

import torch

import attnzoo
from attnzoo.mechanisms.cross.prime_composer import steer_scores, steered_self_attention
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    rca = attnzoo.build("prime_composer", 16, 4, context_dim=12).double()
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 10, 16, generator=g, dtype=F64), torch.randn(2, 6, 12, generator=g, dtype=F64)
    region = torch.zeros(2, 10, dtype=torch.bool)
    region[:, 2:6] = True
    subject = torch.zeros(2, 6, dtype=torch.bool)
    subject[:, [1, 4]] = True
    return rca, x, text, region, subject


def _explicit(rca, x, text, region, subject):
    a = rca.attn
    name = a.names[0]
    q = a.q_proj(x).view(2, 10, 4, 4).transpose(1, 2)
    k = a.k_proj[name](text).view(2, 6, 4, 4).transpose(1, 2)
    v = a.v_proj[name](text).view(2, 6, 4, 4).transpose(1, 2)
    s = q @ k.transpose(-2, -1) / 2.0
    s = s.masked_fill((subject[:, None, None, :] & ~region[:, None, :, None]), float("-inf"))
    return a.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 16))


def test_rca_equals_explicit_renormalised_scores_and_the_full_region_is_plain():
    rca, x, text, region, subject = _setup()
    assert_close(rca(x, text, region=region, subject_tokens=subject), _explicit(rca, x, text, region, subject), F64,
                 "RCA")
    everywhere = torch.ones_like(region)
    assert_close(rca(x, text, region=everywhere, subject_tokens=subject), rca(x, text), F64, "R = all pixels")
    assert (rca(x, text, region=region, subject_tokens=subject) - rca(x, text)).abs().max() > 1e-4


def test_subject_tokens_reach_no_pixel_outside_the_region():
    rca, x, text, region, subject = _setup()
    base = rca(x, text, region=region, subject_tokens=subject)
    t2 = text.clone()
    t2[:, [1, 4]] += 3 * torch.randn(2, 2, 12, dtype=F64)
    moved = rca(x, t2, region=region, subject_tokens=subject)
    assert_close(moved[~region], base[~region], F64, "outside the region")
    assert (moved[region] - base[region]).abs().max() > 1e-4


def test_steering_replaces_object_rows_and_columns_and_empty_region_is_plain():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=F64) for _ in range(3))
    plain = softmax_attention(q, k, v)
    assert_close(steered_self_attention(q, k, v, q.new_zeros(1, 2, 6, 0), torch.tensor([], dtype=torch.long)), plain,
                 F64, "empty region")
    idx = torch.tensor([1, 4])
    injected = torch.randn(1, 2, 6, 2, generator=g, dtype=F64)
    s = steer_scores(q @ k.transpose(-2, -1) / 2.0, injected, idx)
    assert torch.equal(s[..., [1, 4], :], injected.transpose(-2, -1))
    assert torch.equal(s[..., [0, 2, 3, 5], :][..., [1, 4]], injected[..., [0, 2, 3, 5], :])
    got = steered_self_attention(q, k, v, injected, idx)
    assert_close(got, s.softmax(-1) @ v, F64, "steered")
    assert (got - plain).abs().max() > 1e-3
