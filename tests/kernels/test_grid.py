"""attnzoo.kernels.grid.tile_attention against exact attention per tile, in every regime of its autograd
Function: probabilities kept or recomputed, one chunk or many, broadcast or full biases, masked rows."""

import pytest
import torch

from attnzoo.kernels import grid
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def _exact(qt, kt, vt, bias, scale):
    B, h, T, Q, D = qt.shape
    R = kt.shape[3]
    full = None if bias is None else bias.expand(B, h, T, Q, R).reshape(B, h * T, Q, R)
    out = softmax_attention(qt.reshape(B, h * T, Q, D), kt.reshape(B, h * T, R, D), vt.reshape(B, h * T, R, -1),
                            bias=None if full is None else torch.where(torch.isinf(full), 0.0, full),
                            attn_mask=None if full is None else ~torch.isneginf(full), scale=scale)
    return out.view(B, h, T, Q, -1)


@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("tile_elements", [1 << 22, 40])
@pytest.mark.parametrize("bias_kind", ["none", "shared", "full", "masked_row", "bool_mask"])
def test_tile_attention_regimes(monkeypatch, store, tile_elements, bias_kind):
    monkeypatch.setattr(grid, "_STORE_BYTES", 1 << 30 if store else 0)
    monkeypatch.setattr(grid, "_TILE_ELEMENTS", tile_elements)  # 40: one tile per chunk
    g = torch.Generator().manual_seed(0)
    B, h, T, Q, R, D = 2, 3, 5, 4, 6, 3
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)
    qt, kt, vt = mk(B, h, T, Q, D), mk(B, h, T, R, D), mk(B, h, T, R, 2)
    bias = None
    if bias_kind == "shared":
        bias = mk(1, h, 1, Q, R)
    elif bias_kind in ("full", "masked_row"):
        with torch.no_grad():
            b = torch.randn(B, h, T, Q, R, generator=g, dtype=torch.float64)
            b[torch.rand(B, h, T, Q, R, generator=g) < 0.3] = float("-inf")
            b[..., 0] = 0.5  # every row keeps a key ...
            if bias_kind == "masked_row":
                b[1, 2, 3, 1] = float("-inf")  # ... but this one: it must return zeros
        bias = b.requires_grad_(True)
    mask = None
    if bias_kind == "bool_mask":
        mask = torch.rand(1, h, T, Q, R, generator=g) > 0.3
        mask[..., 2] = True
    got = grid.tile_attention(qt, kt, vt, scale=0.7, bias=bias, mask=mask)
    ref_bias = bias if mask is None else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    want = _exact(qt, kt, vt, ref_bias, 0.7)
    assert_close(got, want, torch.float64, "tile_attention output")
    if bias_kind == "masked_row":
        assert torch.equal(got[1, 2, 3, 1], torch.zeros(2, dtype=torch.float64))
    inputs = (qt, kt, vt) + (() if bias is None else (bias,))
    gout = torch.randn(got.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, inputs, gout), torch.autograd.grad(want, inputs, gout)):
        assert_close(a, b, torch.float64, "tile_attention gradient")


def test_bias_shape_is_checked():
    qt = torch.randn(1, 2, 3, 4, 5)
    kt = torch.randn(1, 2, 3, 6, 5)
    with pytest.raises(ValueError, match="bias"):
        grid.tile_attention(qt, kt, kt, scale=1.0, bias=torch.zeros(1, 2, 2, 4, 6))
