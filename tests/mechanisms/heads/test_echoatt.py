"""Oracles of EchoAtt (P125): sharing disabled equals independent residual attention layers; with sharing
every later layer is exactly A_leader V_l W_O^l (the leader's matrix reused); one layer is x + MHA(x); the
shared layers have no query/key projections and cache no keys."""

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.heads.echoatt import EchoAttention, attention_probs
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _mha_from(group: EchoAttention, layer: int, qk_layer: int):
    mha = attnzoo.build("softmax", group.dim, group.heads, kv_heads=group.kv_heads, causal=group.causal,
                        backend="reference").double()
    with torch.no_grad():
        mha.q_proj.weight.copy_(group.q_proj[qk_layer].weight)
        mha.k_proj.weight.copy_(group.k_proj[qk_layer].weight)
        mha.v_proj.weight.copy_(group.v_proj[layer].weight)
        mha.o_proj.weight.copy_(group.o_proj[layer].weight)
    return mha


@pytest.mark.parametrize("causal", [False, True])
def test_sharing_disabled_is_independent_layers(causal):
    torch.manual_seed(0)
    g = EchoAttention(16, 4, kv_heads=2, layers=3, share=False, causal=causal).double()
    x = torch.randn(2, 7, 16, dtype=F64)
    mask = torch.tensor([[True] * 7, [True, True, False, True, True, False, True]])
    h = x
    for layer in range(3):
        h = h + _mha_from(g, layer, layer)(h, key_padding_mask=mask)
    assert_close(g(x, key_padding_mask=mask), h, F64, "EchoAtt share=False vs independent layers")


@pytest.mark.parametrize("causal", [False, True])
def test_sharing_reuses_the_exact_leader_matrix(causal):
    torch.manual_seed(1)
    g = EchoAttention(16, 4, kv_heads=2, layers=3, causal=causal).double()
    assert len(g.q_proj) == len(g.k_proj) == 1, "shared layers have no W_Q, W_K"
    x = torch.randn(2, 6, 16, dtype=F64)
    ctx = None if causal else torch.randn(2, 9, 16, dtype=F64)
    src0 = x if ctx is None else ctx
    q = g.q_proj[0](x).view(2, 6, 4, 4).transpose(1, 2)
    k = g.k_proj[0](src0).view(2, -1, 2, 4).transpose(1, 2)
    A = attention_probs(q, k, causal=causal, key_padding_mask=None, scale=0.5)  # (B, H, N, M)
    # The probabilities are softmax attention's: A V == softmax_attention(q, k, V) for any V.
    v_probe = torch.randn(2, 2, k.shape[2], 3, dtype=F64)
    assert_close(A @ v_probe.repeat_interleave(2, 1), softmax_attention(q, k, v_probe, causal=causal, scale=0.5), F64,
                 "attention_probs vs softmax attention")
    h = x
    for layer in range(3):
        src = h if ctx is None else ctx
        v = g.v_proj[layer](src).view(2, -1, 2, 4).transpose(1, 2).repeat_interleave(2, 1)
        h = h + g.o_proj[layer]((A @ v).transpose(1, 2).reshape(2, 6, 16))
    assert_close(g(x, ctx), h, F64, "EchoAtt vs manual reuse of the leader's matrix")
    assert torch.equal(g.last_attention, A.detach())


def test_one_layer_is_residual_mha():
    torch.manual_seed(2)
    g = EchoAttention(16, 4, layers=1, causal=True).double()
    x = torch.randn(1, 5, 16, dtype=F64)
    assert_close(g(x), x + _mha_from(g, 0, 0)(x), F64, "EchoAtt layers=1 vs x + MHA(x)")


def test_between_modules_run_between_layers():
    torch.manual_seed(3)
    g = EchoAttention(16, 4, layers=2).double()
    x = torch.randn(1, 5, 16, dtype=F64)
    base = g(x)
    g.between[0] = torch.nn.Linear(16, 16).double()
    assert (g(x) - base).abs().max() > 1e-6


def test_decode_cache_keeps_leader_keys_only():
    torch.manual_seed(4)
    g = EchoAttention(16, 4, kv_heads=2, layers=3, causal=True).double().eval()
    x = torch.randn(2, 7, 16, dtype=F64)
    full = g(x)
    state = g.init_state(2)
    y, state = g(x[:, :3], state=state)
    outs = [y]
    for t in range(3, 7):
        y, state = g(x[:, t : t + 1], state=state)
        outs.append(y)
    assert_close(torch.cat(outs, 1), full, F64, "decode vs forward")
    assert len(state.shapes) == 1 + 3, "one key buffer (leader) + one value buffer per layer"
    indep = EchoAttention(16, 4, kv_heads=2, layers=3, causal=True, share=False)
    assert len(indep.init_state(2).shapes) == 2 * 3

