"""The head-family decode states: TokenBuffers two-phase writes, padding masks, crop/reorder/nbytes, and
padded prefill + decoding through DiffKVCache / EchoAttentionCache / RoutedKVCache equal to the masked forward."""

import pytest
import torch

from attnzoo.mechanisms.heads._common import TokenBuffers
from attnzoo.mechanisms.heads.attention_aware_smoe import AttentionAwareSMoE
from attnzoo.mechanisms.heads.echoatt import EchoAttention
from attnzoo.mechanisms.heads.sigma_diffqkv import DiffKVCache, DiffQKVAttention
from attnzoo.testing import assert_close

F64 = torch.float64


def test_token_buffers_two_phase_write_mask_crop_reorder():
    s = TokenBuffers(2, [(1, 3), (2, 0)], dtype=F64, names=["a", "b"])
    a = torch.randn(2, 1, 4, 3, dtype=F64)
    assert s.write(0, a).shape == (2, 1, 4, 3)
    with pytest.raises(RuntimeError, match="b"):
        s.advance(4)
    s.write(1, torch.zeros(2, 2, 4, 0, dtype=F64))
    s.advance(4, torch.tensor([[True, False, True, True], [True] * 4]))
    assert s.seq_len == s.length == 4 and s.mask.tolist()[0] == [True, False, True, True]
    pm = s.pending_mask(2, None)
    assert pm.shape == (2, 6) and pm[:, 4:].all()
    assert torch.equal(s.buffer(0), a)
    s.crop(2)
    assert s.buffer(0).shape[2] == 2 and s.mask.shape == (2, 2)
    s.reorder(torch.tensor([1, 0, 0]))
    assert s.batch == 3 and torch.equal(s.buffer(0)[1], a[0, :, :2])
    assert s.nbytes() > 0
    with pytest.raises(ValueError, match="a"):
        s.write(0, torch.randn(3, 2, 1, 3, dtype=F64))
    with pytest.raises(TypeError, match="a"):
        s.write(0, torch.randn(3, 1, 1, 3))


def test_diff_kv_cache_nbytes_counts_k_and_v_separately():
    c = DiffKVCache(1, 1, 32, 4, 64)
    with torch.no_grad():
        c.append(torch.randn(1, 1, 100, 32), torch.randn(1, 4, 100, 64))
    assert c.nbytes() == 100 * (1 * 32 + 4 * 64) * 4


@pytest.mark.parametrize("make", [
    lambda: DiffQKVAttention(16, 4, key_heads=1, value_heads=2, key_dim=2, causal=True),
    lambda: EchoAttention(16, 4, kv_heads=2, layers=2, causal=True),
    lambda: AttentionAwareSMoE(16, 4, router="similarity", causal=True),
])
def test_padded_prefill_then_decode_equals_masked_forward(make):
    torch.manual_seed(0)
    m = make().double().eval()
    x = torch.randn(2, 7, 16, dtype=F64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = False
    full = m(x, key_padding_mask=mask)
    state = m.init_state(2)
    y, state = m(x[:, :4], key_padding_mask=mask[:, :4], state=state)
    outs = [y]
    for t in range(4, 7):
        y, state = m(x[:, t : t + 1], key_padding_mask=mask[:, t : t + 1], state=state)
        outs.append(y)
    got = torch.cat(outs, 1)
    keep = mask.unsqueeze(-1)  # padded query rows may differ; real tokens may not
    assert_close(got * keep, full * keep, F64, "padded prefill + decode vs masked forward")
