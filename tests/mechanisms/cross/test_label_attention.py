"""KeNet label attention (P018) and CrossTune (P068), one implementation: labels as queries equal reference
cross-attention; permuting labels permutes outputs; token order does not matter; document and knowledge are two
sources; CrossTune's given label descriptions and softmax over labels."""

import pytest
import torch

from attnzoo import build
from attnzoo.mechanisms.cross.label_attention import LabelAttention, LabelWiseScores
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _reference(m, labels, sources):
    """sum over sources of softmax(L W_q (H W_k)^T / sqrt(d)) H W_v, then W_o: labels are the queries."""
    a = m.attn
    B, c, _ = labels.shape

    def heads(t):
        return t.view(B, -1, a.heads, a.head_dim).transpose(1, 2)

    q = heads(a.q_proj(labels))
    out = sum(softmax_attention(q, heads(a.k_proj[n](h)), heads(a.v_proj[n](h))) for n, h in sources.items())
    return a.o_proj(out.transpose(1, 2).reshape(B, c, -1))


def test_labels_as_queries_equal_reference_cross_attention_over_document_and_knowledge():
    torch.manual_seed(0)
    m = LabelAttention(12, 3, num_labels=5, context_dims={"document": 12, "knowledge": 8}).double()
    g = _g(1)
    doc = torch.randn(2, 7, 12, generator=g, dtype=F64)
    know = torch.randn(2, 4, 8, generator=g, dtype=F64)
    labels = m.labels.unsqueeze(0).expand(2, -1, -1)
    got = m(doc, context={"knowledge": know})
    assert_close(got, _reference(m, labels, {"document": doc, "knowledge": know}), F64, "two sources")
    assert_close(m(doc), _reference(m, labels, {"document": doc}), F64, "document only")
    assert (got - m(doc)).abs().max() > 1e-4  # the knowledge contributes


def test_label_permutation_equivariance_and_token_order_invariance():
    torch.manual_seed(0)
    m = build("crosstune", 12, 3).double()
    g = _g(2)
    x = torch.randn(2, 6, 12, generator=g, dtype=F64)
    labels = torch.randn(4, 12, generator=g, dtype=F64)  # label-description embeddings, given per call
    y = m(x, labels=labels)
    p = torch.randperm(4, generator=g)
    assert_close(m(x, labels=labels[p]), y[:, p], F64, "labels permuted")
    assert_close(m(x[:, torch.randperm(6, generator=g)], labels=labels), y, F64, "tokens permuted")
    probs = m.probabilities(m.relatedness(y, labels))
    assert_close(probs.sum(-1), torch.ones(2, dtype=F64), F64, "softmax over labels")
    with pytest.raises(ValueError, match="labels: this layer has no learned labels"):
        m(x)


def test_multi_label_scores_and_padding():
    torch.manual_seed(0)
    m = build("label_attention", 12, 3, num_labels=5).double()
    scorer = LabelWiseScores(5, 12).double()
    g = _g(3)
    x = torch.randn(2, 6, 12, generator=g, dtype=F64)
    y = m(x)
    logits = scorer(y)
    assert_close(logits, (y * scorer.weight).sum(-1) + scorer.bias, F64, "label-wise linear")
    probs = m.probabilities(logits)
    assert ((probs > 0) & (probs < 1)).all() and (probs.sum(-1) - 1).abs().max() > 1e-3  # independent sigmoids
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    assert_close(m(x, key_padding_mask=mask), m(x[:, :4]), F64, "padding")
