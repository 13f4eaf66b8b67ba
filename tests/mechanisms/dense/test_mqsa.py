"""Oracles for MQSA / L-query self-attention (P039)."""

import math

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.dense.mqsa import MultiQuerySelfAttention
from attnzoo.testing import assert_close

F64 = torch.float64


def _x(b=2, n=7, dim=16, seed=0):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _mqsa(seed=0, **kw):
    torch.manual_seed(seed)
    return MultiQuerySelfAttention(16, 4, causal=True, **kw).double()


@pytest.mark.parametrize("kv", [4, 2])
def test_window_one_is_standard_causal_attention(kv):
    m = _mqsa(kv_heads=kv, long_window=1, short_window=1, alpha=0.3)
    ref = attnzoo.build("softmax", 16, 4, kv_heads=kv, causal=True).double()
    ref.load_state_dict(m.state_dict())
    x = _x(n=9)
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), ref(x), F64, backend)


def test_alpha_selects_a_branch():
    x = _x()
    for alpha, window in ((1.0, 3), (0.0, 2)):
        m = _mqsa(long_window=3, short_window=2, alpha=alpha)
        one = _mqsa(long_window=window, short_window=window, alpha=0.5)
        one.load_state_dict(m.state_dict())
        for backend in ("reference", "fast"):
            m.backend = one.backend = backend
            assert_close(m(x), one(x), F64, f"alpha={alpha} ({backend})")


def test_explicit_loop_with_padding():
    """q_t = W_Q mean of the unpadded items in [t - L + 1, t]; o = alpha o_long + (1 - alpha) o_short."""
    m = _mqsa(seed=1, long_window=3, short_window=1, alpha=0.25)
    x = _x(b=1, n=6, seed=2)
    kpm = torch.tensor([[True, True, False, True, True, True]])
    Wq, Wk, Wv = m.q_proj.weight, m.k_proj.weight, m.v_proj.weight
    want = torch.zeros(1, 6, 16, dtype=F64)
    for t in range(6):
        heads = []
        for h in range(4):
            sl = slice(4 * h, 4 * h + 4)
            branch = []
            for L in (3, 1):
                items = [s for s in range(max(0, t - L + 1), t + 1) if kpm[0, s]]
                q = sum(Wq[sl] @ x[0, s] for s in items) / len(items) if items else torch.zeros(4, dtype=F64)
                keys = [s for s in range(t + 1) if kpm[0, s]]
                logits = torch.stack([q @ (Wk[sl] @ x[0, s]) / math.sqrt(4) for s in keys])
                p = torch.softmax(logits, 0)
                branch.append(sum(p[i] * (Wv[sl] @ x[0, s]) for i, s in enumerate(keys)))
            heads.append(0.25 * branch[0] + 0.75 * branch[1])
        want[0, t] = m.o_proj.weight @ torch.cat(heads)
    for backend in ("reference", "fast"):
        m.backend = backend
        out = m(x, key_padding_mask=kpm)
        assert_close(out[kpm], want[kpm], F64, backend)


def test_weighted_pool_starts_as_mean_and_learns():
    mean = _mqsa(long_window=4, pool="mean")
    wtd = _mqsa(long_window=4, pool="weighted")
    wtd.load_state_dict(mean.state_dict(), strict=False)
    x = _x()
    assert_close(wtd(x), mean(x), F64, "zero logits = mean")
    with torch.no_grad():
        wtd.long_logits.copy_(torch.tensor([1.0, -0.5, 0.3, 2.0]))
    ref = wtd(x)
    wtd.backend = "fast"
    assert_close(wtd(x), ref, F64, "weighted: fast vs reference")
    assert (ref - mean(x)).abs().max() > 1e-4


def test_decode_with_padding_and_long_window():
    m = _mqsa(seed=3, kv_heads=2, long_window=5, short_window=2, pool="weighted").eval()
    with torch.no_grad():
        m.long_logits.normal_()
        m.short_logits.normal_()
    x = _x(n=10)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[0, 3] = kpm[1, 7] = False
    full = m(x, key_padding_mask=kpm)
    st = m.init_state(2)
    outs = [m(x[:, :2], key_padding_mask=kpm[:, :2], state=st)[0]]
    outs += [m(x[:, t : t + 1], key_padding_mask=kpm[:, t : t + 1], state=st)[0] for t in range(2, 10)]
    got = torch.cat(outs, 1)
    assert_close(got[kpm], full[kpm], F64, "decode")
    assert st.history.shape[1] == 4  # keeps L_long - 1 projected items


def test_noncausal_and_context_raise():
    with pytest.raises(ValueError, match="causal_self"):
        MultiQuerySelfAttention(16, 4, causal=False)
    with pytest.raises(ValueError, match="context"):
        _mqsa()(_x(), _x())
