"""P045 retrieval heads: the copy-paste score of the official detection (argmax on a needle position holding the
generated token, over the needle length). Oracles of CATALOG.md: a hard-coded copy head scores 1, a uniform head 0,
and a head's score does not depend on the other heads; head selection is deterministic."""

import pytest
import torch

from attnzoo.analysis.retrieval import copy_paste_score, random_heads, top_heads
from attnzoo.analysis.stats import weight_statistics


def _case():
    prompt = torch.tensor([5, 9, 9, 11, 12, 13, 14, 9, 3, 4])  # needle = positions 3..6: tokens 11 12 13 14
    gen = torch.tensor([11, 12, 13, 14])
    return prompt, gen, 3, 7


def test_copy_head_scores_one_uniform_head_zero():
    prompt, gen, s, e = _case()
    T, P = gen.numel(), prompt.numel()
    w = torch.full((2, 3, T, P), 1.0 / P, dtype=torch.float64)  # (L, H, T, P): uniform heads
    for t in range(T):  # layer 1, head 2: one-hot on the needle position holding the token it emits
        w[1, 2, t] = 0
        w[1, 2, t, s + t] = 1
    argmax = weight_statistics(w, topk=1).argmax  # (L, H, T): a uniform row's argmax is key 0 (not the needle)
    score = copy_paste_score(argmax, gen, prompt, s, e)
    assert score[1, 2] == 1.0
    assert score.sum() == 1.0
    # the copy head's score does not depend on the other heads
    w2 = w.clone()
    w2[0, 0, :, 4] = 2.0
    assert copy_paste_score(weight_statistics(w2, topk=1).argmax, gen, prompt, s, e)[1, 2] == 1.0


def test_copy_requires_the_same_token_inside_the_needle():
    prompt, gen, s, e = _case()
    argmax = torch.tensor([[[3, 4, 2, 1]]])  # steps 0, 1 hit; step 2 points at token 9 (outside); step 3 at 9
    assert copy_paste_score(argmax, gen, prompt, s, e).item() == pytest.approx(2 / 4)
    argmax = torch.tensor([[[4, 4, 4, 4]]])  # always position 4 (token 12): only step 1 copies it
    assert copy_paste_score(argmax, gen, prompt, s, e).item() == pytest.approx(1 / 4)


def test_head_selection():
    scores = torch.tensor([[0.1, 0.5, 0.0], [0.5, 0.2, 0.9]])
    assert top_heads(scores, 3) == [(1, 2), (0, 1), (1, 0)]
    r = random_heads(2, 3, 2, seed=0, exclude=[(1, 2), (0, 1)])
    assert len(set(r)) == 2 and not set(r) & {(1, 2), (0, 1)}
    assert r == random_heads(2, 3, 2, seed=0, exclude=[(1, 2), (0, 1)])


def test_validation():
    prompt, gen, s, e = _case()
    with pytest.raises(ValueError, match="generated"):
        copy_paste_score(torch.zeros(1, 1, 3, dtype=torch.long), gen, prompt, s, e)
    with pytest.raises(ValueError, match="start, end"):
        copy_paste_score(torch.zeros(1, 1, 4, dtype=torch.long), gen, prompt, 5, 20)
