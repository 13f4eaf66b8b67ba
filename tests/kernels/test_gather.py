"""The block-gather attention kernel against an explicit per-row loop (outputs, lse and every gradient)."""

import pytest
import torch

from attnzoo.kernels.gather import gather_attention
from attnzoo.testing import assert_close


def _loop(qb, k, v, bias, index, run, scale, slot, qpos, kpm, pm):
    B, Hk, M, R, _ = qb.shape
    outs, lses = [], []
    for b in range(B):
        for h in range(Hk):
            for m in range(M):
                idx = (index[b, h, m].unsqueeze(-1) * run + torch.arange(run)).flatten()
                for r in range(R):
                    keep = slot[b, 0, m] & (idx <= qpos[0, 0, m, r]) & kpm[b, idx] & pm[b, h, m, r]
                    s = (qb[b, h, m, r] @ k[b, h, idx].T) * scale + bias[b, h, idx]
                    s = s.masked_fill(~keep, float("-inf"))
                    if keep.any():
                        outs.append(torch.softmax(s, -1) @ v[b, h, idx])
                        lses.append(torch.logsumexp(s, -1))
                    else:
                        outs.append(torch.zeros(v.shape[-1], dtype=v.dtype))
                        lses.append(torch.tensor(float("-inf"), dtype=v.dtype))
    return torch.stack(outs).view(B, Hk, M, R, -1), torch.stack(lses).view(B, Hk, M, R)


@pytest.mark.parametrize("run", [1, 3])
def test_matches_explicit_loop_with_every_mask_repeated_indices_and_lse_gradient(run):
    g = torch.Generator().manual_seed(0)
    B, Hk, M, R, D, Dv, Nk, Lr = 2, 2, 3, 4, 5, 3, 12, 3
    L = Lr * run
    dt = torch.float64
    qb = torch.randn(B, Hk, M, R, D, generator=g, dtype=dt, requires_grad=True)
    k = torch.randn(B, Hk, Nk, D, generator=g, dtype=dt, requires_grad=True)
    v = torch.randn(B, Hk, Nk, Dv, generator=g, dtype=dt, requires_grad=True)
    bias = torch.randn(B, Hk, Nk, generator=g, dtype=dt, requires_grad=True)
    index = torch.randint(0, Nk // run, (B, Hk, M, Lr), generator=g)  # repeats on purpose
    slot = torch.rand(B, 1, M, L, generator=g) > 0.2
    qpos = torch.randint(0, Nk, (1, 1, M, R), generator=g)
    qpos[0, 0, 0, 0] = -1  # a row that sees no key
    kpm = torch.rand(B, Nk, generator=g) > 0.3
    pm = torch.rand(B, Hk, M, R, L, generator=g) > 0.2
    out, lse = gather_attention(qb, k, v, index, scale=0.7, key_bias=bias, slot_mask=slot, qpos=qpos,
                                key_padding_mask=kpm, pair_mask=pm, run=run)
    want_out, want_lse = _loop(qb, k, v, bias, index, run, 0.7, slot, qpos, kpm, pm)
    assert_close(out, want_out, dt, "out")
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (out[~finite] == 0).all()
    assert_close(lse[finite], want_lse[finite], dt, "lse")
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * go).sum() + (lse.where(finite, 0) * gl).sum(), (qb, k, v, bias))
    want = torch.autograd.grad((want_out * go).sum() + (want_lse.where(finite, 0) * gl).sum(), (qb, k, v, bias))
    for name, a, b in zip(("q", "k", "v", "key_bias"), got, want):
        assert torch.isfinite(a).all()
        assert_close(a, b, dt, f"grad {name}")


def test_gradcheck_with_callable_pair_mask():
    g = torch.Generator().manual_seed(1)
    qb = torch.randn(1, 2, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 3, (1, 2, 2, 2), generator=g)
    pm = torch.rand(1, 2, 2, 3, 4, generator=g) > 0.3
    pm[..., 0] = True
    fn = lambda qb, k, v: gather_attention(qb, k, v, index, scale=0.5, pair_mask=lambda s, e: pm[:, :, s:e],
                                           run=2)[0]
    assert torch.autograd.gradcheck(fn, (qb, k, v))


def test_errors():
    q = torch.randn(1, 1, 1, 2, 3)
    k = torch.randn(1, 1, 5, 3)
    with pytest.raises(TypeError, match="index"):
        gather_attention(q, k, k, torch.zeros(1, 1, 1, 2, dtype=torch.int32), scale=1.0)
    with pytest.raises(ValueError, match="run"):
        gather_attention(q, k, k, torch.zeros(1, 1, 1, 2, dtype=torch.int64), scale=1.0, run=2)


@pytest.mark.parametrize("B", [1, 2])
def test_keys_sliced_from_a_larger_buffer_are_read_in_place(B):
    """A decode cache hands over k/v as a slice (along the keys) of a buffer with spare capacity: the gather
    reads its rows through a strided view instead of copying the cache; same result as contiguous inputs."""
    g = torch.Generator().manual_seed(5)
    Hk, M, R, D, Dv, run, n, cap = 2, 3, 2, 4, 3, 2, 10, 16
    qb = torch.randn(B, Hk, M, R, D, generator=g, dtype=torch.float64)
    kbuf = torch.randn(B, Hk, cap, D, generator=g, dtype=torch.float64)
    vbuf = torch.randn(B, Hk, cap, Dv, generator=g, dtype=torch.float64)
    index = torch.randint(0, n // run, (B, Hk, M, 3), generator=g)
    k, v = kbuf[:, :, :n], vbuf[:, :, :n]
    assert not k.is_contiguous()
    got, lse = gather_attention(qb, k, v, index, scale=0.5, run=run)
    want, lse_w = gather_attention(qb, k.contiguous(), v.contiguous(), index, scale=0.5, run=run)
    assert_close(got, want, torch.float64, "strided keys")
    assert_close(lse, lse_w, torch.float64, "strided keys lse")
