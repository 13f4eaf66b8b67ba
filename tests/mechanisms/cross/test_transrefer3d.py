"""TransRefer3D (P021) against the official ObjEdgeGaModule written out (its MultiheadAttn = biased q/k/v/out linears;
edge queries o_i - o_j, max over j), object-order equivariance, and the edge path's effect."""

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _mha(attn, q, k, v, heads=4):
    """referit3d/models/backbone/transformer.py MultiheadAttn.forward with an attnzoo CrossAttention's weights."""
    B, D = q.shape[0], q.shape[-1]
    name = attn.names[0]
    qs, ks, vs = [lin(t).view(B, -1, heads, D // heads).transpose(1, 2) for lin, t in
                  ((attn.q_proj, q), (attn.k_proj[name], k), (attn.v_proj[name], v))]
    scores = torch.softmax(qs @ ks.transpose(-1, -2) / (D // heads) ** 0.5, dim=-1)
    return attn.o_proj((scores @ vs).transpose(1, 2).reshape(B, -1, D))


def _official(m, obj, lang):
    N = obj.shape[1]
    node = _mha(m.msa_node, obj, lang, lang)
    x_value = obj.unsqueeze(2)
    x_value = x_value - x_value.transpose(1, 2)  # [b, i, j] = o_i - o_j
    x_value = x_value.transpose(0, 1).reshape(-1, N, obj.shape[-1])  # rows (i, b)
    edge = _mha(m.msa_edge, x_value, lang.repeat(N, 1, 1), lang.repeat(N, 1, 1)).max(1)[0]
    edge = edge.reshape(N, obj.shape[0], -1).transpose(0, 1)
    xe, xn = m.norme(obj + edge), m.normq(obj + node)
    ffn = m.ffn.fc2(F.relu(m.ffn.fc1(torch.cat((xn, xe), -1))))
    return m.norm2(xn + ffn)


def _setup():
    torch.manual_seed(0)
    m = attnzoo.build("transrefer3d", 16, 4).double()
    g = torch.Generator().manual_seed(1)
    return m, torch.randn(2, 5, 16, generator=g, dtype=F64), torch.randn(2, 7, 16, generator=g, dtype=F64)


def test_equals_the_official_module_and_is_equivariant_to_object_order():
    m, obj, lang = _setup()
    base = m(obj, lang)
    assert_close(base, _official(m, obj, lang), F64, "ObjEdgeGa")
    p = torch.tensor([3, 0, 4, 1, 2])
    assert_close(m(obj[:, p], lang), base[:, p], F64, "objects permuted")


def test_the_edge_path_and_padded_partners():
    m, obj, lang = _setup()
    base = m(obj, lang)
    m.edges = lambda x, *a: torch.zeros_like(x)  # entity path alone
    assert (m(obj, lang) - base).abs().max() > 1e-4
    m2, _, _ = _setup()
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    got = m2(obj, lang, x_padding_mask=keep)
    assert_close(got[1, :3], m2(obj[1:, :3], lang[1:])[0], F64, "padded objects are no partners")
