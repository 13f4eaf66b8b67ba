"""Window attention kernel (attnzoo.kernels.window): an explicit per-query loop of the Swin rule (shifted windows on
the zero-padded grid, padded keys excluded) and of strided windows; fast == dense reference (outputs and gradients);
a grid that divides the window is computed exactly as before (no padding path); padding never changes the outputs
of real tokens of a divisible grid."""

import itertools

import pytest
import torch

from attnzoo.kernels.window import padded_length, relative_index, window_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _qkv(B, h, H, W, d, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, H, W, d, generator=g, dtype=F64).requires_grad_(grad) for _ in range(3))


def _loop(q, k, v, M, s, strided, table, scale):
    """Query by query on the padded grid: keys in the same window (rolled by -s; Swin regions if shifted, or the
    strided window), real keys only, Swin bias table[(dy + M1 - 1)(2 M2 - 1) + dx + M2 - 1]."""
    B, h, H, W, d = q.shape
    (m1, m2), (s1, s2) = M, s
    hp, wp = padded_length(H, m1), padded_length(W, m2)
    n1, n2 = hp // m1, wp // m2

    def key(r, c):  # (group, local row, local col) of a padded-grid position
        if strided:
            return (r % n1, c % n2), r // n1, c // n2
        rs, cs = (r - s1) % hp, (c - s2) % wp
        reg = lambda x, n, m, sh: (x >= n - m) + (x >= n - sh) if sh else 0
        return (rs // m1, cs // m2, reg(rs, hp, m1, s1), reg(cs, wp, m2, s2)), rs % m1, cs % m2

    out = torch.zeros(B, h, H, W, v.shape[-1], dtype=q.dtype)
    for r, c in itertools.product(range(H), range(W)):
        gq, ly, lx = key(r, c)
        logits, vals = [], []
        for r2, c2 in itertools.product(range(H), range(W)):  # real keys only
            gk, ly2, lx2 = key(r2, c2)
            if gk != gq:
                continue
            logit = (q[:, :, r, c] * k[:, :, r2, c2]).sum(-1) * scale
            if table is not None:
                logit = logit + table[(ly - ly2 + m1 - 1) * (2 * m2 - 1) + lx - lx2 + m2 - 1]
            logits.append(logit)
            vals.append(v[:, :, r2, c2])
        p = torch.stack(logits, -1).softmax(-1)
        out[:, :, r, c] = torch.einsum("bhn,bhnd->bhd", p, torch.stack(vals, 2))
    return out


CASES = [  # (H, W, window, shift, strided)
    (8, 8, (4, 4), (0, 0), False),  # divides
    (8, 8, (4, 4), (2, 2), False),  # shifted, divides
    (7, 10, (4, 3), (0, 0), False),  # padded
    (7, 10, (4, 3), (2, 1), False),  # shifted and padded
    (13, 17, (7, 7), (3, 3), False),
    (3, 5, (4, 4), (0, 0), False),  # window larger than the grid
    (9, 9, (3, 3), (0, 0), True),  # strided, divides
    (7, 10, (3, 4), (0, 0), True),  # strided, padded
]


@pytest.mark.parametrize("H,W,M,s,strided", CASES)
def test_reference_and_fast_match_explicit_loop(H, W, M, s, strided):
    q, k, v = _qkv(1, 2, H, W, 3, seed=H * W)
    table = torch.randn((2 * M[0] - 1) * (2 * M[1] - 1), 2, dtype=F64)
    want = _loop(q, k, v, M, s, strided, table, 0.5)
    for backend in ("reference", "fast"):
        got = window_attention(q, k, v, window=M, shift=s, strided=strided, table=table, scale=0.5, backend=backend)
        assert_close(got, want, F64, f"window attention {backend} vs loop {(H, W, M, s, strided)}")


@pytest.mark.parametrize("H,W,M,s,strided", [CASES[1], CASES[3], CASES[7]])
def test_fast_gradients_match_reference(H, W, M, s, strided):
    q, k, v = _qkv(2, 2, H, W, 4, seed=1, grad=True)
    table = torch.randn((2 * M[0] - 1) * (2 * M[1] - 1), 2, dtype=F64, requires_grad=True)
    g = torch.randn(2, 2, H, W, 4, dtype=F64)
    grads = {}
    for backend in ("reference", "fast"):
        out = window_attention(q, k, v, window=M, shift=s, strided=strided, table=table, backend=backend)
        grads[backend] = torch.autograd.grad(out, (q, k, v, table), g)
    for a, b, name in zip(grads["fast"], grads["reference"], ("q", "k", "v", "table")):
        assert_close(a, b, F64, f"gradient of {name}")


def test_padding_never_changes_real_outputs_of_a_divisible_grid():
    """A divisible grid embedded in a larger zero-padded one: with masking the real tokens do not see the padding,
    so the outputs of the 8 x 8 grid are those of the same grid alone (contiguous, unshifted windows)."""
    q, k, v = _qkv(1, 2, 8, 8, 4, seed=3)
    alone = window_attention(q, k, v, window=4)
    big = [torch.nn.functional.pad(t, (0, 0, 0, 3, 0, 2)) for t in (q, k, v)]  # 10 x 11, padded windows at the edge
    embedded = window_attention(*big, window=4)[:, :, :8, :8]
    assert_close(embedded[:, :, :8, :8], alone, F64, "real outputs beside extra (zero) tokens in other windows")


def test_divisible_grid_is_plain_window_attention():
    q, k, v = _qkv(1, 1, 6, 6, 4, seed=4)
    got = window_attention(q, k, v, window=3)
    # by hand: each 3x3 block is softmax attention over its own 9 tokens
    want = torch.zeros_like(got)
    for i in range(2):
        for j in range(2):
            blk = lambda t, i=i, j=j: t[:, :, 3 * i:3 * i + 3, 3 * j:3 * j + 3].reshape(1, 1, 9, 4)
            p = (blk(q) @ blk(k).transpose(-1, -2) * 0.5).softmax(-1)
            want[:, :, 3 * i:3 * i + 3, 3 * j:3 * j + 3] = (p @ blk(v)).view(1, 1, 3, 3, 4)
    assert_close(got, want, F64, "blocks")


def test_relative_index_and_errors():
    idx = relative_index((2, 3))
    assert idx.shape == (6, 6) and idx[0, 0] == (2 - 1) * 5 + 2 and idx.max() < 3 * 5
    q, k, v = _qkv(1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="shift"):
        window_attention(q, k, v, window=2, shift=2)
    with pytest.raises(ValueError, match="shift"):
        window_attention(q, k, v, window=2, shift=1, strided=True)
    with pytest.raises(ValueError, match="table"):
        window_attention(q, k, v, window=2, table=torch.zeros(8, 1, dtype=F64))
    with pytest.raises(ValueError, match="backend"):
        window_attention(q, k, v, window=2, backend="flex")
    with pytest.raises(ValueError, match="q, k, v"):
        window_attention(q, k[:, :, :3], v, window=2)
