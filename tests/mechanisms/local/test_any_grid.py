"""Every 2-D (grid) mechanism on grids of any size: a 13x17 grid and the paper's own sizes run (fast == reference
where a module has both forms); where a window, block, group or region count does not divide the grid, the padding
the official code adds is masked out, checked against explicit per-query computations; and a grid that already
divides is computed exactly as before (padding never changes the outputs at real positions)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import registry
from attnzoo.mechanisms.local.crossformer_lsda import CrossFormerLSDA
from attnzoo.mechanisms.local.halonet import halo_fast, halo_reference
from attnzoo.mechanisms.local.hat import ocab_fast, ocab_reference
from attnzoo.mechanisms.local.neighborhood_2d import na2d
from attnzoo.mechanisms.sparse.biformer import BiLevelRoutingAttention, route_regions
from attnzoo.testing import assert_close

F64 = torch.float64

# (mechanism, build options, paper sizes) -- dims kept small; the sizes are the papers' feature grids
GRID_CASES = {
    "neighborhood_2d": ({"kernel_size": 7}, [(56, 56), (28, 28)]),  # NAT stage 1/2 at 224 px
    "biformer": ({"n_win": 7, "topk": 4}, [(56, 56), (14, 14)]),  # BiFormer-T stages 1, 3
    "hat": ({"window_size": 16, "shift_size": 8, "compress_ratio": 2, "squeeze_factor": 4}, [(64, 64)]),  # SR 64x64
    "halonet": ({"block_size": 8, "halo_size": 3}, [(32, 32), (16, 16)]),  # HaloNet stages at 256 px
    "crossformer_lsda": ({"group_size": 7}, [(56, 56), (14, 14)]),  # CrossFormer stages 1, 3
    "transnext_aggregated": ({"window_size": 3, "pool_size": 7, "cpb_hidden": 16}, [(56, 56), (28, 28)]),
    "criss_cross": ({"qk_reduction": 2}, [(97, 97)]),  # CCNet: 769 px / 8
    "agent_layer": ({"agents": 49}, [(56, 56), (14, 14)]),  # Agent-Swin/PVT stage grids
    "spectformer": ({}, [(14, 14)]),  # 224 / 16; the learned filter is built for the grid (height/width options)
    "maniqa_sstb": ({"window_size": 4, "mlp_dim": 16}, [(28, 28)]),  # MANIQA: 224 / 8, window 4
    "emov2_i2rmb": ({"window_size": 7, "exp_ratio": 2.0}, [(14, 14), (28, 28)]),  # EMOv2-5M stages 3, 2 (224 px)
}


def _grid_mechanisms():
    return sorted({m.name for m in registry.mechanisms() if m.kind == "grid"} | {"maniqa_sstb", "emov2_i2rmb"})


def test_every_grid_mechanism_has_a_case():
    assert set(_grid_mechanisms()) == set(GRID_CASES)


def _build(name, size, dtype=torch.float32, seed=0):
    opts, _ = GRID_CASES[name]
    mech = registry.get(name)
    opts = dict(opts)
    if name == "spectformer":
        opts.update(height=size[0], width=size[1])
    heads = 1 if name == "spectformer" else 2
    torch.manual_seed(seed)
    m = attnzoo.build(name, 16, heads, **opts).to(dtype).eval()
    shape = (1, 16, *size) if mech.kind == "channel" else (1, *size, 16)
    return m, torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("name", sorted(GRID_CASES))
def test_runs_on_13x17_with_fast_equal_reference(name):
    m, x = _build(name, (13, 17), F64)
    if hasattr(m, "backend"):
        m.backend = "reference"
        ref = m(x)
        m.backend = "fast"
        got = m(x)
        assert_close(got, ref, F64, f"{name} on 13x17: fast vs reference")
    else:
        got = m(x)
    assert got.shape == x.shape and torch.isfinite(got).all()


@pytest.mark.parametrize("name,size", [(n, s) for n in sorted(GRID_CASES) for s in GRID_CASES[n][1]])
def test_runs_on_the_papers_sizes(name, size):
    m, x = _build(name, size)
    with torch.no_grad():
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


# ----------------------------------------------------------------------------------------------------------------
# Explicit oracles of the masked padding
# ----------------------------------------------------------------------------------------------------------------
def _qkv(B, h, H, W, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, H, W, d, generator=g, dtype=F64) for _ in range(3))


def test_neighborhood_smaller_than_the_kernel_sees_every_real_token():
    """A grid shorter than the kernel: padded to the kernel (NATTEN's module), padded keys masked, so every query
    attends to all real tokens, with the bias read at the true offsets: na2d with the kernel cut to the grid and
    the centre of the bias table."""
    q, k, v = _qkv(1, 2, 5, 9, 4)
    rpb = torch.randn(2, 13, 13, dtype=F64)  # kernel 7
    want = na2d(q, k, v, kernel_size=(5, 7), rpb=rpb[:, 6 - 4:6 + 5, :], layout="heads_first")
    for backend in ("reference", "fast"):
        got = na2d(q, k, v, kernel_size=7, rpb=rpb, layout="heads_first", backend=backend)
        assert_close(got, want, F64, f"na2d 5x9 with kernel 7 ({backend})")


def test_neighborhood_dilated_small_grid_against_loop():
    q, k, v = _qkv(1, 1, 5, 4, 3, seed=1)
    got = na2d(q, k, v, kernel_size=3, dilation=2, layout="heads_first")  # 3 * 2 > 5 and > 4: padded to 6 x 6
    out = torch.zeros_like(q)
    for r, c in itertools.product(range(5), range(4)):
        keys = [(r2, c2) for r2 in range(5) for c2 in range(4) if (r2 - r) % 2 == 0 and (c2 - c) % 2 == 0]
        s = torch.stack([(q[0, 0, r, c] * k[0, 0, a, b]).sum() for a, b in keys]) * 3 ** -0.5
        out[0, 0, r, c] = s.softmax(0) @ torch.stack([v[0, 0, a, b] for a, b in keys])
    assert_close(got, out, F64, "dilated neighbourhood on a grid smaller than kernel * dilation")


def _halo_loop(q, k, v, rh, rw, block, halo, scale, mask_padding):
    """Per query: keys of its block's halo window; keys in the block-multiple padding never, keys outside the
    padded grid as zeros unless mask_padding."""
    B, h, H, W, d = q.shape
    Hb, Wb = -(-H // block) * block, -(-W // block) * block
    off = block + halo - 1
    out = torch.zeros_like(q)
    for qr, qc in itertools.product(range(H), range(W)):
        br, bc = qr // block * block, qc // block * block
        logits, vals = [], []
        for kr, kc in itertools.product(range(br - halo, br + block + halo), range(bc - halo, bc + block + halo)):
            in_grid = 0 <= kr < Hb and 0 <= kc < Wb
            real = 0 <= kr < H and 0 <= kc < W
            if (in_grid and not real) or (not in_grid and mask_padding):
                continue
            kk = k[:, :, kr, kc] if real else torch.zeros_like(k[:, :, 0, 0])
            vv = v[:, :, kr, kc] if real else torch.zeros_like(v[:, :, 0, 0])
            logits.append((q[:, :, qr, qc] * (kk + rh[kr - qr + off] + rw[kc - qc + off])).sum(-1) * scale)
            vals.append(vv)
        out[:, :, qr, qc] = torch.einsum("bhn,bhnd->bhd", torch.stack(logits, -1).softmax(-1), torch.stack(vals, 2))
    return out


@pytest.mark.parametrize("mask_padding", [True, False])
def test_halo_padding_against_loop(mask_padding):
    q, k, v = _qkv(1, 2, 5, 7, 3, seed=2)
    g = torch.Generator().manual_seed(3)
    rh, rw = (torch.randn(2 * (3 + 1) - 1, 3, generator=g, dtype=F64) for _ in range(2))
    want = _halo_loop(q, k, v, rh, rw, 3, 1, 0.7, mask_padding)
    for fn in (halo_fast, halo_reference):
        got = fn(q, k, v, rh, rw, block=3, halo=1, scale=0.7, mask_padding=mask_padding)
        assert_close(got, want, F64, f"{fn.__name__} on 5x7 with block 3")


def test_ocab_padding_against_loop():
    """OCAB on a grid the window does not divide: query windows of the padded grid, keys of the overlapping
    window; keys of the window-multiple padding never attended, the unfold border stays zero keys."""
    M, Mo = 2, 4
    q, k, v = _qkv(1, 1, 3, 5, 2, seed=4)
    table = torch.randn((M + Mo - 1) ** 2, 1, dtype=F64)
    pad, span, Hm, Wm = (Mo - M) // 2, M + Mo - 1, 4, 6
    out = torch.zeros_like(q)
    for r, c in itertools.product(range(3), range(5)):
        br, bc = r // M * M, c // M * M
        logits, vals = [], []
        for r2, c2 in itertools.product(range(br - pad, br - pad + Mo), range(bc - pad, bc - pad + Mo)):
            real = 0 <= r2 < 3 and 0 <= c2 < 5
            if not real and 0 <= r2 < Hm and 0 <= c2 < Wm:
                continue  # the window-multiple padding
            kk = k[0, 0, r2, c2] if real else torch.zeros(2, dtype=F64)
            vals.append(v[0, 0, r2, c2] if real else torch.zeros(2, dtype=F64))
            idx = (r2 - r + pad + M - 1) * span + c2 - c + pad + M - 1
            logits.append((q[0, 0, r, c] * kk).sum() * 0.5 + table[idx, 0])
        out[0, 0, r, c] = torch.stack(logits).softmax(0) @ torch.stack(vals)
    for fn in (ocab_fast, ocab_reference):
        assert_close(fn(q, k, v, table, window=M, overlap=Mo, scale=0.5), out, F64, f"{fn.__name__} on 3x5")


def test_crossformer_padding_against_loop():
    torch.manual_seed(5)
    for mode, opts in (("sda", {"group_size": 3}), ("lda", {"interval": 2})):
        m = CrossFormerLSDA(4, 1, mode=mode, dpb_dim=4, **opts).double()
        x = torch.randn(1, 5, 4, 4, dtype=F64)
        q, k, v = m.qkv(x).view(1, 5, 4, 3, 4).unbind(3)
        Hp, Wp = (6, 6) if mode == "sda" else (6, 4)
        Gh, Gw = (3, 3) if mode == "sda" else (Hp // 2, Wp // 2)
        table = m.pos.table(Gh, Gw, F64, x.device)  # (1, 2Gh-1, 2Gw-1)

        def group(r, c, mode=mode):  # (group id, in-group row, in-group col) on the padded grid
            if mode == "sda":
                return (r // 3, c // 3), r % 3, c % 3
            return (r % 2, c % 2), r // 2, c // 2

        out = torch.zeros(1, 5, 4, 4, dtype=F64)
        for r, c in itertools.product(range(5), range(4)):
            g, y, xx = group(r, c)
            keys = [(r2, c2) for r2 in range(5) for c2 in range(4) if group(r2, c2)[0] == g]
            s = torch.stack([(q[0, r, c] * k[0, a, b]).sum() * 0.5 + table[0, y - group(a, b)[1] + Gh - 1,
                                                                          xx - group(a, b)[2] + Gw - 1]
                             for a, b in keys])
            out[0, r, c] = s.softmax(0) @ torch.stack([v[0, a, b] for a, b in keys])
        want = m.proj(out)
        for backend in ("reference", "fast"):
            m.backend = backend
            assert_close(m(x), want, F64, f"crossformer {mode} on 5x4 ({backend})")


def test_biformer_auto_pad_against_masked_dense_attention():
    """5x7 grid, 2x2 regions: padded to 6x8 (regions of 3x4), region means over real tokens only, routing among
    regions with real tokens, attention to the real tokens of the routed regions."""
    torch.manual_seed(6)
    m = BiLevelRoutingAttention(4, 1, n_win=2, topk=2, side_dwconv=3).double()
    x = torch.randn(1, 5, 7, 4, dtype=F64)
    q, k, v = m.qkv(x).split([4, 4, 4], dim=-1)  # (1, 5, 7, 4)
    region = lambda r, c: (r // 3) * 2 + c // 4
    regs = torch.tensor([[region(r, c) for c in range(7)] for r in range(5)]).view(-1)  # (35,)
    qf, kf, vf = q.reshape(35, 4), k.reshape(35, 4), v.reshape(35, 4)
    qm = torch.stack([qf[regs == i].mean(0) for i in range(4)])
    km = torch.stack([kf[regs == i].mean(0) for i in range(4)])
    r_idx = route_regions(qm.unsqueeze(0), km.unsqueeze(0), 2, 0.5)[0]  # (4, 2)
    allowed = torch.zeros(4, 4, dtype=torch.bool)
    allowed[torch.arange(4).view(4, 1), r_idx] = True
    mask = allowed[regs][:, regs]  # (35, 35)
    s = (qf @ kf.T * 0.5).masked_fill(~mask, float("-inf"))
    att = (s.softmax(-1) @ vf).view(1, 5, 7, 4)
    lepe = m.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    want = m.wo(att + lepe)
    for backend in ("reference", "fast"):
        m.backend = backend
        assert_close(m(x), want, F64, f"biformer auto_pad ({backend})")


# ----------------------------------------------------------------------------------------------------------------
# Divisible grids: the padding never changes real outputs
# ----------------------------------------------------------------------------------------------------------------
def test_all_valid_key_masks_change_nothing():
    """The padding masks, when nothing is padding, leave every form's output bit-for-bit where it was."""
    from attnzoo.mechanisms.local.neighborhood_2d import na2d_dense_reference, na2d_tiled

    q, k, v = _qkv(1, 2, 6, 8, 3, seed=7)
    ones = torch.ones(6, 8, dtype=torch.bool)
    for fn in (na2d_tiled, na2d_dense_reference):
        for dil in (1, 2):
            a = fn(q, k, v, kernel_size=3, dilation=dil)
            b = fn(q, k, v, kernel_size=3, dilation=dil, key_valid=ones)
            assert torch.equal(a, b), (fn.__name__, dil)
    m = CrossFormerLSDA(6, 2, group_size=3, dpb_dim=4).double()
    x = torch.randn(1, 6, 6, 6, dtype=F64)
    qq, kk, vv = m.qkv(x).view(1, 6, 6, 3, 2, 3).permute(3, 0, 4, 1, 2, 5)
    table = m.pos.table(3, 3, F64, x.device)
    from attnzoo.mechanisms.local.crossformer_lsda import lsda_fast

    a = lsda_fast(qq, kk, vv, table, mode="sda", Gh=3, Gw=3, Ih=2, Iw=2, scale=0.5)
    b = lsda_fast(qq, kk, vv, table, mode="sda", Gh=3, Gw=3, Ih=2, Iw=2, scale=0.5, key_valid=ones[:, :6])
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["neighborhood_2d", "biformer", "hat", "halonet", "crossformer_lsda",
                                  "maniqa_sstb", "emov2_i2rmb"])
def test_divisible_grid_takes_the_unpadded_path(name, monkeypatch):
    """On a grid the window/region/group divides, no grid padding is added (F.pad calls of the padding code; the
    query tiling of the neighbourhood kernel and the official halo/unfold borders are not grid padding)."""
    size = {"neighborhood_2d": (14, 14), "biformer": (14, 14), "hat": (16, 32), "halonet": (16, 24),
            "crossformer_lsda": (14, 21), "maniqa_sstb": (8, 12), "emov2_i2rmb": (14, 21)}[name]
    m, x = _build(name, size, F64)
    real_pad = F.pad
    calls = []

    def spy(t, pad, *a, **kw):
        import inspect

        if inspect.stack()[1].function != "to_tiles":
            calls.append(tuple(pad))
        return real_pad(t, pad, *a, **kw)

    monkeypatch.setattr(F, "pad", spy)
    with torch.no_grad():
        m(x)
    grid_pads = [p for p in calls if len(p) == 6 and p[:2] == (0, 0) and any(p[2:])]
    if name in ("hat", "halonet"):  # the halo / OCAB unfold border pad on all sides is official, always there
        grid_pads = [p for p in grid_pads if not (p[2] == p[3] == p[4] == p[5])]
    assert not grid_pads, f"{name}: padded a divisible grid: {grid_pads}"
