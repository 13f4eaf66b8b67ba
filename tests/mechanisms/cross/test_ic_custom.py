"""IC-Custom's ICMA (P030): joint softmax over the sequence and the task's register keys/values written out; the
official zero-initialised registers scale plain attention by Z / (Z + R) (keys with score 0, values 0); panel
embeddings go on queries and keys by panel; permutation-equivariant when the panel ids travel with their tokens."""

import torch

import attnzoo
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    m = attnzoo.build("ic_custom", 16, 4, num_registers=3, num_tasks=2, num_panels=2).double()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    ids = torch.tensor([[-1, -1, 1, 1, 2, 2, 0, 0, 0]] * 2)
    return m, x, ids


def _qkv(m, x, ids=None):
    B, N, _ = x.shape
    q, k, v = (t.view(B, N, 4, 4).transpose(1, 2) for t in m.qkv(x).chunk(3, -1))
    q, k = m.q_norm(q), m.k_norm(k)
    if ids is not None:
        pe = m.panel_embeddings(ids).view(B, N, 4, 4).transpose(1, 2)
        q, k = q + pe, k + pe
    return q, k, v


def _out(m, o):
    return m.proj(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], 16))


def test_zero_registers_scale_plain_attention_by_the_softmax_mass_they_take():
    m, x, _ = _setup()
    q, k, v = _qkv(m, x)
    plain = softmax_attention(q, k, v)
    z = torch.exp(q @ k.transpose(-2, -1) / 2.0).sum(-1, keepdim=True)  # (B, H, N, 1)
    assert_close(m(x), _out(m, plain * z / (z + 3)), F64, "zero registers: three keys of score 0")


def test_registers_and_panels_written_out_and_equivariance():
    m, x, ids = _setup()
    with torch.no_grad():
        for p in (m.registers, m.cond_embedding, m.target_embedding, m.idx_embedding):
            p.normal_(0, 0.5)
    q, k, v = _qkv(m, x, ids)
    reg = m.registers[1]  # task 1: (2, R, dim)
    rk, rv = (reg[i].view(1, 3, 4, 4).transpose(1, 2).expand(2, -1, -1, -1) for i in (0, 1))
    want = _out(m, softmax_attention(q, torch.cat([k, rk], 2), torch.cat([v, rv], 2)))
    assert_close(m(x, panel_ids=ids, task=1), want, F64, "ICMA")
    assert (m(x, panel_ids=ids, task=0) - want).abs().max() > 1e-4  # the task picks the registers
    assert (m(x, task=1) - want).abs().max() > 1e-4  # panel embeddings matter
    p = torch.tensor([6, 0, 8, 3, 1, 7, 2, 5, 4])
    assert_close(m(x[:, p], panel_ids=ids[:, p], task=1), want[:, p], F64, "permuted with panel ids")
