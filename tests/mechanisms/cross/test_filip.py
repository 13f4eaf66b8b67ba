"""FILIP (P059): token-wise late interaction equals the brute-force double loop (with padding), any chunk size gives
the same, one token each is cosine similarity, token order does not matter, the pair form is the matrix diagonal."""

import pytest
import torch
import torch.nn.functional as F

from attnzoo.mechanisms.cross.filip import FILIPLateInteraction, filip_loss, filip_similarity
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def brute(image, text, image_mask, text_mask):
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    B1, B2 = image.shape[0], text.shape[0]
    s1, s2 = torch.zeros(B1, B2, dtype=F64), torch.zeros(B1, B2, dtype=F64)
    for i in range(B1):
        for j in range(B2):
            xi = image[i][image_mask[i]]
            yj = text[j][text_mask[j]]
            s1[i, j] = sum(max(float(xk @ yr) for yr in yj) for xk in xi) / len(xi)
            s2[i, j] = sum(max(float(xk @ yr) for xk in xi) for yr in yj) / len(yj)
    return s1, s2


def test_equals_the_brute_force_double_loop_with_padding_for_every_chunk():
    g = _g(0)
    image = torch.randn(3, 7, 5, generator=g, dtype=F64)
    text = torch.randn(4, 6, 5, generator=g, dtype=F64)
    im = torch.rand(3, 7, generator=g) > 0.3
    tm = torch.rand(4, 6, generator=g) > 0.3
    im[:, 0] = True
    tm[:, 0] = True
    want = brute(image, text, im, tm)
    for chunk in (1, 3, 7, 64):
        got = filip_similarity(image, text, image_mask=im, text_mask=tm, chunk=chunk)
        assert_close(got[0], want[0], F64, f"s_i2t (chunk {chunk})")
        assert_close(got[1], want[1], F64, f"s_t2i (chunk {chunk})")
    nomask = filip_similarity(image, text)
    assert_close(nomask[0], brute(image, text, torch.ones(3, 7, dtype=bool), torch.ones(4, 6, dtype=bool))[0], F64,
                 "no mask")


def test_one_token_each_is_cosine_similarity_and_order_does_not_matter():
    g = _g(1)
    a, b = torch.randn(3, 1, 8, generator=g, dtype=F64), torch.randn(2, 1, 8, generator=g, dtype=F64)
    s1, s2 = filip_similarity(a, b)
    cos = F.cosine_similarity(a[:, None, 0], b[None, :, 0], dim=-1)
    assert_close(s1, cos, F64, "i2t cosine")
    assert_close(s2, cos, F64, "t2i cosine")
    image, text = torch.randn(2, 6, 8, generator=g, dtype=F64), torch.randn(2, 5, 8, generator=g, dtype=F64)
    base = filip_similarity(image, text)
    perm = filip_similarity(image[:, torch.randperm(6, generator=g)], text[:, torch.randperm(5, generator=g)])
    assert_close(perm[0], base[0], F64, "permuted i2t")
    assert_close(perm[1], base[1], F64, "permuted t2i")


def test_module_pairs_are_the_diagonal_and_the_loss_is_symmetric_infonce():
    torch.manual_seed(0)
    m = FILIPLateInteraction(8, context_dim=6, embed_dim=5, chunk=2).double()
    g = _g(2)
    x = torch.randn(3, 4, 8, generator=g, dtype=F64)
    c = torch.randn(3, 5, 6, generator=g, dtype=F64)
    s1, s2 = m.similarity(x, c)
    pairs = m(x, c)
    assert_close(pairs, torch.stack([s1.diagonal(), s2.diagonal()], 1), F64, "pairs")
    want = 0.5 * (F.cross_entropy(s1 / 0.1, torch.arange(3)) + F.cross_entropy(s2.t() / 0.1, torch.arange(3)))
    assert_close(filip_loss(s1, s2, temperature=0.1), want, F64, "loss")


def test_validation():
    with pytest.raises(ValueError, match="image, text: expected the same width"):
        filip_similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="text_mask: expected dtype torch.bool"):
        filip_similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 4), text_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="context: FILIP pairs"):
        FILIPLateInteraction(4)(torch.randn(2, 3, 4))
