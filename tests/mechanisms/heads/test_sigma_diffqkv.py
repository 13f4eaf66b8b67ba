"""Oracles of Sigma DiffQKV (P116): equal K/V heads is GQA/MHA; an explicit per-head loop with the paper's
head mapping floor(i n / n_q); the folded key up-projection equals the explicit one; augmented Q by hand;
selective V fetching with k = all is exact and top-1 picks one value; the cache holds fewer K than V heads."""

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.heads.sigma_diffqkv import (
    DiffKVCache,
    DiffQKVAttention,
    diffqkv_decode,
    diffqkv_fast,
    diffqkv_reference,
)
from attnzoo.testing import assert_close

F64 = torch.float64


def _gqa_copy(m: DiffQKVAttention, kv_heads: int, causal: bool):
    ref = attnzoo.build("softmax", m.dim, m.heads, kv_heads=kv_heads, causal=causal, backend="reference").double()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(ref, name).weight.copy_(getattr(m, name).weight)
    return ref


@pytest.mark.parametrize("kv", [2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_equal_key_value_heads_is_gqa_or_mha(kv, causal, backend):
    torch.manual_seed(0)
    m = DiffQKVAttention(16, 4, kv_heads=kv, causal=causal, backend=backend).double()
    assert m.key_heads == m.value_heads == kv and m.k_up is None
    ref = _gqa_copy(m, kv, causal)
    x = torch.randn(2, 7, 16, dtype=F64)
    mask = torch.tensor([[True] * 7, [True, True, False, True, False, True, True]])
    assert_close(m(x, key_padding_mask=mask), ref(x, key_padding_mask=mask), F64, "DiffQKV n_k = n_v vs GQA")
    if not causal:
        ctx = torch.randn(2, 9, 16, dtype=F64)
        assert_close(m(x, ctx), ref(x, ctx), F64, "DiffQKV n_k = n_v vs GQA, cross")


def test_head_mapping_explicit_loop():
    g = torch.Generator().manual_seed(1)
    B, nq, nk, nv, N, hd, dk = 2, 8, 2, 4, 6, 5, 3
    q = torch.randn(B, nq, N, hd, generator=g, dtype=F64)
    k = torch.randn(B, nk, N, dk, generator=g, dtype=F64)
    v = torch.randn(B, nv, N, hd, generator=g, dtype=F64)
    w = torch.randn(hd, dk, generator=g, dtype=F64)
    out = diffqkv_reference(q, k, v, k_up=w, causal=True, key_padding_mask=None, scale=0.4)
    want = torch.empty_like(out)
    for b in range(B):
        for i in range(nq):
            ki, vi = (i * nk) // nq, (i * nv) // nq  # Sigma Eq. 3
            for t in range(N):
                s = torch.stack([q[b, i, t] @ (w @ k[b, ki, j]) for j in range(t + 1)]) * 0.4
                p = torch.softmax(s, 0)
                want[b, i, t] = (p.unsqueeze(1) * v[b, vi, : t + 1]).sum(0)
    assert_close(out, want, F64, "DiffQKV reference vs explicit loop")
    fast = diffqkv_fast(q, k, v, k_up=w, causal=True, key_padding_mask=None, scale=0.4)
    assert_close(fast, want, F64, "DiffQKV fast (k_up folded into q) vs explicit loop")
    state = DiffKVCache(B, nk, dk, nv, hd, dtype=F64)
    keys, values, _ = state.append(k, v)
    dec = diffqkv_decode(q, keys, values, k_up=w, key_padding_mask=None, scale=0.4)
    assert_close(dec, want, F64, "DiffQKV grouped decode (no K/V copy) vs explicit loop")


def test_augmented_q_hand_computed():
    torch.manual_seed(2)
    m = DiffQKVAttention(8, 2, key_heads=1, value_heads=2, aug_q_dim=12).double()
    x = torch.randn(1, 3, 8, dtype=F64)
    q0 = x @ m.q_proj.weight.T
    h = torch.nn.functional.silu(q0 @ m.q_gate.weight.T) * (q0 @ m.q_up.weight.T)
    want = (h @ m.q_down.weight.T).view(1, 3, 2, 4).transpose(1, 2)
    assert_close(m.queries(x), want, F64, "augmented Q")


def test_selective_v_fetching():
    torch.manual_seed(3)
    x = torch.randn(2, 9, 16, dtype=F64)
    exact = DiffQKVAttention(16, 4, key_heads=1, value_heads=2, causal=True).double()
    allk = DiffQKVAttention(16, 4, key_heads=1, value_heads=2, causal=True, v_topk=9).double()
    allk.load_state_dict(exact.state_dict())
    assert_close(allk(x), exact(x), F64, "v_topk >= N is exact")
    # top-1: each output row is exactly the value row of its highest score.
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 4, 3, generator=g, dtype=F64)
    k = torch.randn(1, 1, 4, 3, generator=g, dtype=F64)
    v = torch.randn(1, 1, 4, 2, generator=g, dtype=F64)
    out = diffqkv_reference(q, k, v, k_up=None, causal=False, key_padding_mask=None, scale=1.0, v_topk=1)
    best = (q @ k.transpose(-1, -2)).argmax(-1)  # (1, 2, 4)
    assert_close(out, v[0, 0][best], F64, "v_topk = 1 picks the best value row")
    with pytest.raises(ValueError, match="backend"):
        DiffQKVAttention(16, 4, v_topk=2, backend="fast").double()(x)


def test_cache_holds_fewer_key_heads_and_decodes():
    torch.manual_seed(5)
    m = DiffQKVAttention(32, 8, key_heads=1, value_heads=4, key_dim=2, causal=True).double().eval()
    x = torch.randn(2, 10, 32, dtype=F64)
    full = m(x)
    state = m.init_state(2)
    y1, state = m(x[:, :6], state=state)
    outs = [y1]
    for t in range(6, 10):
        y, state = m(x[:, t : t + 1], state=state)
        outs.append(y)
    assert_close(torch.cat(outs, 1), full, F64, "prefill + decode vs causal forward")
    assert state.keys.shape == (2, 1, 10, 2) and state.values.shape == (2, 4, 10, 4)
    with torch.no_grad():
        s2 = m.init_state(2)
        m(x, state=s2)  # no autograd: storage written in place, capacity 16 (doubling from 16)
    assert s2.nbytes() == 2 * 16 * (1 * 2 + 4 * 4) * 8
    s2.crop(4)
    assert s2.keys.shape[2] == 4
    s2.reorder(torch.tensor([1, 1]))
    assert torch.equal(s2.keys[0], s2.keys[1])


def test_defaults_and_errors():
    m = DiffQKVAttention(512, 32)
    assert (m.key_heads, m.value_heads) == (4, 16)  # Sigma 1.5B: 32 query, 4 key, 16 value heads
    with pytest.raises(ValueError, match="key_heads"):
        DiffQKVAttention(16, 4, key_heads=3)
    with pytest.raises(ValueError, match="value_heads"):
        DiffQKVAttention(16, 4, value_heads=0)
    with pytest.raises(ValueError, match="k"):
        DiffKVCache(1, 1, 2, 2, 4).append(torch.randn(1, 2, 3, 2), torch.randn(1, 2, 3, 4))
