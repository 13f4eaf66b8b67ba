"""Oracles of 2-D neighborhood attention (P066): NATTEN's window and bias rules written as an explicit loop,
hand-computed border cases, kernel = grid -> exact attention, fast == dense masked reference."""

import pytest
import torch

import attnzoo
from attnzoo.kernels import grid
from attnzoo.masks import materialize, neighborhood_2d
from attnzoo.mechanisms.local.neighborhood_2d import NeighborhoodAttention2d, na2d_dense_reference, na2d_tiled
from attnzoo.mechanisms.local.neighborhood_2d import na2d as natten_na2d
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close


def na2d(q, k, v, **kw):
    """The oracles below are written on heads-first tensors (B, heads, H, W, D)."""
    return natten_na2d(q, k, v, layout="heads_first", **kw)


def _natten_window_start(index, length, kernel, dilation):
    """NATTEN's get_window_start (C++), transcribed as the arithmetic it performs (odd kernels)."""
    ns = kernel // 2
    if dilation <= 1:
        return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
    ni = index - ns * dilation
    if ni < 0:
        return index % dilation
    if index + ns * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dilation
        return a + imodd - kernel * dilation
    return ni


def _natten_pb_start(index, length, kernel, dilation):
    """NATTEN's get_pb_start: index into the (2k-1) bias table of the first key of the window."""
    ns = kernel // 2
    if dilation <= 1:
        return ns + (index < ns) * (ns - index) + (index + ns >= length) * (length - index - 1 - ns)
    if index - ns * dilation < 0:
        return kernel - 1 - (index // dilation)
    if index + ns * dilation >= length:
        return (length - index - 1) // dilation
    return ns


def _loop_na2d(q, k, v, kernel, dilation, rpb, scale):
    """Neighborhood attention query by query, with NATTEN's index rules."""
    B, h, H, W, D = q.shape
    out = torch.zeros(B, h, H, W, v.shape[-1], dtype=q.dtype)
    for i in range(H):
        si, pi = _natten_window_start(i, H, kernel, dilation), _natten_pb_start(i, H, kernel, dilation)
        for j in range(W):
            sj, pj = _natten_window_start(j, W, kernel, dilation), _natten_pb_start(j, W, kernel, dilation)
            rows = [si + a * dilation for a in range(kernel)]
            cols = [sj + b * dilation for b in range(kernel)]
            keys = k[:, :, rows][:, :, :, cols].reshape(B, h, kernel * kernel, D)
            vals = v[:, :, rows][:, :, :, cols].reshape(B, h, kernel * kernel, -1)
            s = torch.einsum("bhd,bhnd->bhn", q[:, :, i, j], keys) * scale
            if rpb is not None:
                bias = torch.stack([rpb[:, pi + a, pj + b] for a in range(kernel) for b in range(kernel)], dim=-1)
                s = s + bias
            out[:, :, i, j] = torch.einsum("bhn,bhnd->bhd", s.softmax(-1), vals)
    return out


def _qkv(B, h, H, W, D, Dv=None, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda d: torch.randn(B, h, H, W, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
    return mk(D), mk(D), mk(Dv or D)


@pytest.mark.parametrize("H,W,kernel,dilation", [(7, 9, 3, 1), (8, 9, 5, 1), (7, 10, 3, 2), (10, 9, 3, 3),
                                                  (5, 5, 5, 1), (9, 7, 3, 2)])
def test_matches_natten_loop(H, W, kernel, dilation):
    q, k, v = _qkv(1, 2, H, W, 4, 5)
    g = torch.Generator().manual_seed(3)
    rpb = torch.randn(2, 2 * kernel - 1, 2 * kernel - 1, dtype=torch.float64, generator=g)
    want = _loop_na2d(q, k, v, kernel, dilation, rpb, 0.5)
    for backend in ("reference", "fast"):
        got = na2d(q, k, v, kernel_size=kernel, dilation=dilation, rpb=rpb, scale=0.5, backend=backend)
        assert_close(got, want, torch.float64, f"na2d {backend} vs NATTEN loop {H}x{W} k={kernel} d={dilation}")


def test_hand_computed_neighbourhoods():
    """Border shifting and dilation groups, spelled out."""
    H, W = 5, 7
    n = H * W
    mask = materialize(neighborhood_2d(H, W, 3, 1), 1, 1, n, n)[0, 0]
    assert bool((mask.sum(-1) == 9).all()), "every query must see exactly k*k keys"
    seen = lambda r, c, m=mask: {(int(i) // W, int(i) % W) for i in torch.nonzero(m[r * W + c]).flatten()}
    # Corner (0, 0): window shifted inwards to rows 0..2, cols 0..2 (not centred, not zero padded).
    assert seen(0, 0) == {(r, c) for r in range(3) for c in range(3)}
    # Bottom-right corner (4, 6): rows 2..4, cols 4..6.
    assert seen(4, 6) == {(r, c) for r in range(2, 5) for c in range(4, 7)}
    # Interior (2, 3): centred.
    assert seen(2, 3) == {(r, c) for r in range(1, 4) for c in range(2, 5)}
    # Dilation 2 on a 7-long axis: groups {0,2,4,6} and {1,3,5}.
    m2 = materialize(neighborhood_2d(1, 7, (1, 3), (1, 2)), 1, 1, 7, 7)[0, 0]
    cols = lambda c: sorted(int(i) for i in torch.nonzero(m2[c]).flatten())
    assert cols(0) == [0, 2, 4]  # group start, shifted right
    assert cols(6) == [2, 4, 6]  # group end, shifted left
    assert cols(3) == [1, 3, 5]
    assert cols(5) == [1, 3, 5]  # group {1,3,5} has exactly k members: everyone sees all of them
    assert cols(2) == [0, 2, 4]
    assert cols(4) == [2, 4, 6]


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_kernel_equal_to_grid_is_full_attention(backend):
    q, k, v = _qkv(2, 2, 5, 7, 6)
    got = na2d(q, k, v, kernel_size=(5, 7), backend=backend)  # (B, h, H, W, D)
    flat = lambda x: x.reshape(2, 2, 35, -1)
    want = softmax_attention(flat(q), flat(k), flat(v)).view(2, 2, 5, 7, -1)
    assert_close(got, want, torch.float64, f"kernel = grid ({backend}) vs exact attention")


def test_kernel_equal_to_grid_with_rpb_is_relative_bias_attention():
    H, W, kh, kw = 3, 5, 3, 5
    q, k, v = _qkv(1, 2, H, W, 4)
    rpb = torch.randn(2, 2 * kh - 1, 2 * kw - 1, dtype=torch.float64)
    bias = torch.zeros(1, 2, H * W, H * W, dtype=torch.float64)
    for i in range(H * W):
        for j in range(H * W):
            dy, dx = j // W - i // W, j % W - i % W
            bias[0, :, i, j] = rpb[:, dy + kh - 1, dx + kw - 1]
    flat = lambda x: x.reshape(1, 2, H * W, -1)
    want = softmax_attention(flat(q), flat(k), flat(v), bias=bias).view(1, 2, H, W, -1)
    for backend in ("reference", "fast"):
        got = na2d(q, k, v, kernel_size=(kh, kw), rpb=rpb, backend=backend)
        assert_close(got, want, torch.float64, f"kernel = grid with rpb ({backend})")


@pytest.mark.parametrize("H,W,kernel,dilation", [(7, 9, 3, 1), (13, 7, 3, (4, 2)), (1, 65, (1, 7), 1),
                                                  (10, 10, 5, 2), (9, 9, (3, 5), (3, 1)), (8, 9, 4, (1, 2))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_matches_reference_outputs_and_gradients(H, W, kernel, dilation, dtype):
    q, k, v = _qkv(2, 2, H, W, 4, 3, dtype=dtype, grad=True)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    rpb = (0.5 * torch.randn(2, 2 * kh - 1, 2 * kw - 1, dtype=torch.float64)).to(dtype).requires_grad_(True)
    ref = na2d(q, k, v, kernel_size=kernel, dilation=dilation, rpb=rpb, backend="reference")
    fast = na2d(q, k, v, kernel_size=kernel, dilation=dilation, rpb=rpb, backend="fast")
    assert_close(fast, ref, dtype, "fast vs reference output")
    g = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, (q, k, v, rpb), g)
    gf = torch.autograd.grad(fast, (q, k, v, rpb), g)
    for name, a, b in zip(("q", "k", "v", "rpb"), gf, gr):
        assert_close(a, b, dtype, f"fast vs reference gradient of {name}")


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (5, 4)])
def test_tile_shapes_do_not_change_the_result(tile):
    q, k, v = _qkv(1, 2, 9, 8, 4)
    rpb = torch.randn(2, 5, 5, dtype=torch.float64)
    want = na2d(q, k, v, kernel_size=3, dilation=2, rpb=rpb, backend="reference")
    got = na2d_tiled(q, k, v, kernel_size=(3, 3), dilation=(2, 2), rpb=rpb, tile=tile)
    assert_close(got, want, torch.float64, f"tile {tile}")


def test_gradcheck_fast_and_reference():
    q, k, v = _qkv(1, 1, 3, 4, 2, grad=True)
    rpb = torch.randn(1, 5, 5, dtype=torch.float64, requires_grad=True)
    for backend in ("fast", "reference"):
        fn = lambda q, k, v, rpb, b=backend: na2d(q, k, v, kernel_size=3, rpb=rpb, backend=b)
        assert torch.autograd.gradcheck(fn, (q, k, v, rpb), fast_mode=True), backend
    q, k, v = _qkv(1, 1, 3, 5, 2, grad=True)
    fn = lambda q, k, v: na2d(q, k, v, kernel_size=(3, 2), dilation=(1, 2), backend="fast")
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_grouped_query_heads_equal_repeated_kv():
    q, _, _ = _qkv(1, 4, 6, 6, 4)
    _, k, v = _qkv(1, 2, 6, 6, 4, seed=1)
    for backend in ("reference", "fast"):
        got = na2d(q, k, v, kernel_size=3, backend=backend)
        want = na2d(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), kernel_size=3, backend=backend)
        assert_close(got, want, torch.float64, f"GQA {backend}")


def test_module_fast_matches_reference_and_uses_rpb():
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(16, 4, kernel_size=3, dilation=(2, 1)).double()
    x = torch.randn(2, 7, 9, 16, dtype=torch.float64)
    m.backend = "reference"
    ref = m(x)
    m.backend = "fast"
    fast = m(x)
    assert_close(fast, ref, torch.float64, "module fast vs reference")
    with torch.no_grad():
        m.rpb.add_(1.0 * torch.randn_like(m.rpb))
    assert (m(x) - fast).abs().max() > 1e-3, "changing the relative position bias must change the output"


def test_module_built_from_registry():
    m = attnzoo.build("neighborhood_2d", 16, 2, kernel_size=5)
    assert isinstance(m, NeighborhoodAttention2d) and m.rpb.shape == (2, 9, 9)
    assert m(torch.randn(1, 6, 8, 16)).shape == (1, 6, 8, 16)


def test_errors():
    q, k, v = _qkv(1, 2, 5, 5, 4)
    # grids smaller than kernel_size * dilation are padded (masked), not refused
    assert na2d(q, k, v, kernel_size=7).shape == q.shape
    assert na2d(q, k, v, kernel_size=3, dilation=2).shape == q.shape
    with pytest.raises(ValueError, match="kernel_size"):
        na2d(q, k, v, kernel_size=0)
    with pytest.raises(ValueError, match="rpb"):
        na2d(q, k, v, kernel_size=3, rpb=torch.zeros(2, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend"):
        na2d(q, k, v, kernel_size=3, backend="flex")
    with pytest.raises(ValueError, match="k"):
        na2d(q, k[:, :, :4], v, kernel_size=3)
    with pytest.raises(ValueError, match="x"):
        NeighborhoodAttention2d(16, 2, kernel_size=3)(torch.randn(1, 5, 5, 8))
    with pytest.raises(ValueError, match="kernel_size"):
        NeighborhoodAttention2d(16, 2, kernel_size=0)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_natten_layout_heads_last_is_the_default(backend):
    """na2d takes NATTEN's own layout, (B, H, W, heads, D), by default: the same computation as heads-first on
    the permuted tensors, checked against the NATTEN loop; a heads-last tensor is never read as heads-first."""
    q, k, v = _qkv(2, 3, 7, 6, 4)  # heads-first (B, heads, H, W, D)
    rpb = torch.randn(3, 5, 5, dtype=torch.float64)
    want = _loop_na2d(q, k, v, 3, 1, rpb, 0.5)  # (B, heads, H, W, D)
    last = lambda x: x.permute(0, 2, 3, 1, 4).contiguous()  # (B, H, W, heads, D)
    got = natten_na2d(last(q), last(k), last(v), kernel_size=3, rpb=rpb, scale=0.5, backend=backend)
    assert got.shape == (2, 7, 6, 3, 4)
    assert_close(got, last(want), torch.float64, f"heads-last na2d ({backend}) vs NATTEN loop")
    with pytest.raises(ValueError, match="layout"):
        natten_na2d(q, k, v, kernel_size=3, layout="bhwd")


@pytest.mark.parametrize("store", [True, False])
def test_tiles_chunked_and_recomputed(monkeypatch, store):
    """The tiled form with tiny chunks, with the tile probabilities kept or recomputed in the backward."""
    monkeypatch.setattr(grid, "_STORE_BYTES", 1 << 30 if store else 0)
    monkeypatch.setattr(grid, "_TILE_ELEMENTS", 200)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 10, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fast = na2d_tiled(q, k, v, kernel_size=(3, 3), dilation=(2, 1), rpb=rpb)
    ref = na2d_dense_reference(q, k, v, kernel_size=(3, 3), dilation=(2, 1), rpb=rpb)
    assert_close(fast, ref, torch.float64, "na2d")
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v, rpb), gout), torch.autograd.grad(ref, (q, k, v, rpb), gout)):
        assert_close(a, b, torch.float64, "na2d gradient")
