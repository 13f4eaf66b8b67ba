"""Modality masks (Croc, EE-MLLM, AKI, prefix-LM, modality blocks, packed multimodal documents): each predicate
against a hand-written dense matrix; per-row spans; bottom-right offsets; the FlexAttention form; the Hugging Face
4-D form; validation."""

import pytest
import torch

from attnzoo import masks


def dense(pred, nq, nk, B=1):
    return masks.materialize(pred, B, 1, nq, nk)[:, 0]


def rows(*text):
    """A mask written out by hand, one string of 0/1 per query row."""
    return torch.tensor([[c == "1" for c in r] for r in text])


def test_croc_by_hand():
    # visual tokens at 2, 3, 4 see each other; everything else causal
    want = rows("10000000",
                "11000000",
                "11111000",
                "11111000",
                "11111000",
                "11111100",
                "11111110",
                "11111111")
    assert torch.equal(dense(masks.croc(2, 5), 8, 8)[0], want)


def test_croc_at_start_is_prefix_lm_and_text_rows_are_causal():
    for p in (0, 1, 4, 9):
        assert torch.equal(dense(masks.croc(0, p), 9, 9), dense(masks.prefix_lm(p), 9, 9))
    got, causal = dense(masks.croc(3, 6), 10, 10)[0], dense(masks.causal(), 10, 10)[0]
    text = [0, 1, 2, 6, 7, 8, 9]
    assert torch.equal(got[text], causal[text])
    assert torch.equal(dense(masks.croc(4, 4), 10, 10), dense(masks.causal(), 10, 10))  # empty span


def test_ee_mllm_by_hand():
    # [[I, 0], [1, causal]] after one leading text token: visual 1..3 see only themselves
    want = rows("100000",
                "010000",
                "001000",
                "000100",
                "111110",
                "111111")
    assert torch.equal(dense(masks.ee_mllm(1, 4), 6, 6)[0], want)


def test_aki_by_hand_matches_the_official_block():
    # text 0, image 1..2, prompt 3..4, answer 5..6: image rows also see the prompt columns
    want = rows("1000000",
                "1101100",
                "1111100",
                "1111000",
                "1111100",
                "1111110",
                "1111111")
    assert torch.equal(dense(masks.aki(1, 3, 5), 7, 7)[0], want)
    # the official construction: lower triangle, then mask[image_start:text_start, text_start:text_end] = 1
    official = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    official[1:3, 3:5] = True
    assert torch.equal(want, official)
    # no prompt (or no image): plain causal
    assert torch.equal(dense(masks.aki(1, 3, 3), 7, 7), dense(masks.causal(), 7, 7))
    assert torch.equal(dense(masks.aki(2, 2, 6), 7, 7), dense(masks.causal(), 7, 7))


def test_bottom_right_offset_is_the_tail_of_the_full_mask():
    for pred_at in (lambda o: masks.croc(2, 6, offset=o), lambda o: masks.ee_mllm(2, 6, offset=o),
                    lambda o: masks.aki(2, 5, 8, offset=o)):
        full = dense(pred_at(0), 10, 10)
        for nq in (1, 4, 7):
            assert torch.equal(dense(pred_at(10 - nq), nq, 10), full[:, 10 - nq :])


def test_per_row_spans_equal_each_row_alone():
    starts, ends, pends = torch.tensor([1, 3, 0]), torch.tensor([4, 3, 6]), torch.tensor([6, 7, 6])
    for make in (lambda s, e, p: masks.croc(s, e), lambda s, e, p: masks.ee_mllm(s, e),
                 lambda s, e, p: masks.aki(s, e, p)):
        batched = dense(make(starts, ends, pends), 8, 8, B=3)
        for b in range(3):
            one = dense(make(int(starts[b]), int(ends[b]), int(pends[b])), 8, 8)[0]
            assert torch.equal(batched[b], one)


def test_modality_blocks_and_multimodal_documents():
    # two documents packed: [t, i, i, t | i, i, t, t]; every image run is its own bidirectional block
    mod = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0]])
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    assert masks.blocks_from_modalities(mod).tolist() == [[-1, 0, 0, -1, 1, 1, -1, -1]]
    want = rows("10000000",
                "11100000",
                "11100000",
                "11110000",
                "00001100",
                "00001100",
                "00001110",
                "00001111")
    assert torch.equal(dense(masks.multimodal(mod, document_ids=doc), 8, 8)[0], want)
    # without documents: the second image also sees the first document (causal)
    got = dense(masks.multimodal(mod), 8, 8)[0]
    assert got[4].tolist() == [True] * 6 + [False] * 2
    # adjacent images of different types / documents are separate blocks
    assert masks.blocks_from_modalities(torch.tensor([[1, 1, 2, 2]]), bidirectional=(1, 2)).tolist() == [[0, 0, 1, 1]]
    assert masks.blocks_from_modalities(torch.tensor([[1, 1, 1]]), document_ids=torch.tensor([[0, 0, 1]])).tolist() \
        == [[0, 0, 1]]
    # one image run is Croc
    one = torch.tensor([[0, 0, 1, 1, 1, 0, 0]])
    assert torch.equal(dense(masks.multimodal(one), 7, 7), dense(masks.croc(2, 5), 7, 7))
    assert torch.equal(dense(masks.modality_blocks(masks.blocks_from_modalities(one)), 7, 7),
                       dense(masks.croc(2, 5), 7, 7))


def test_validation_names_the_argument():
    with pytest.raises(ValueError, match="visual_start, visual_end: expected visual_start <= visual_end"):
        masks.croc(5, 2)
    with pytest.raises(ValueError, match="visual_start: positions must be >= 0"):
        masks.croc(torch.tensor([-1, 2]), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="visual_end: expected an int or a 1-D integer tensor"):
        masks.ee_mllm(0, torch.tensor([1.5]))
    with pytest.raises(TypeError, match="visual_start: expected an int"):
        masks.croc(True, 3)
    with pytest.raises(ValueError, match="visual_end, prompt_end"):
        masks.aki(1, 4, 3)
    with pytest.raises(ValueError, match="visual_start: expected one position per batch row"):
        masks.check_bounds(2, visual_start=torch.tensor([0, 1, 2]), visual_end=4)
    with pytest.raises(ValueError, match="modality_ids: expected an integer tensor"):
        masks.multimodal(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="document_ids: expected the shape of modality_ids"):
        masks.multimodal(torch.zeros(1, 3, dtype=torch.long), document_ids=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_agrees():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from attnzoo.reference import softmax_attention
    n = 256
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(3))
    for pred in (masks.croc(torch.tensor([30, 100]), torch.tensor([150, 220])), masks.ee_mllm(40, 170),
                 masks.aki(20, 130, 200)):
        bm = masks.block_mask(pred, 2, None, n, n)
        out = flex.flex_attention(q, k, v, block_mask=bm)
        ref = softmax_attention(q.double(), k.double(), v.double(), attn_mask=masks.materialize(pred, 2, 1, n, n))
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_hugging_face_forms():
    pad = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    pred = masks.croc(torch.tensor([2, 1]), torch.tensor([4, 3]))
    m = masks.hf_mask(pred, 2, 6, 6, attention_mask=pad)
    assert m.shape == (2, 1, 6, 6) and m.dtype == torch.bool
    assert torch.equal(m, masks.materialize(pred, 2, 1, 6, 6) & pad.bool().view(2, 1, 1, 6))
    f = masks.hf_mask(pred, 2, 6, 6, attention_mask=pad, dtype=torch.float32)
    assert torch.equal(f == 0, m) and float(f.min()) == torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="attention_mask: expected a 2-D padding mask"):
        masks.hf_mask(pred, 2, 6, 6, attention_mask=pad[:, :5])
    # the predicate is a transformers mask function: their own mask factory composes and materializes it
    mu = pytest.importorskip("transformers.masking_utils")
    both = mu.and_masks(mu.causal_mask_function, masks.ee_mllm(1, 3))
    got = mu.sdpa_mask(batch_size=1, q_length=5, kv_length=5, mask_function=both, allow_is_causal_skip=False)
    assert torch.equal(got[0, 0], dense(masks.ee_mllm(1, 3), 5, 5)[0])
