"""Oracles of MANIQA (P002): TAB parity with the official ``TABlock`` (written out from IIGROUP/MANIQA) with copied
weights, its rows sum to 1, the 'paper' layout is the equation A v + X and is channel-permutation equivariant; SSTB
parity with the official ``BasicLayer`` + ``SwinTransformer`` residual (written out from ``models/swin.py``) on the
official sizes, window attention equals dense attention under the (shifted) block mask, any grid size runs (padded
windows) and padding never changes a divisible grid's outputs, fast == reference, both layouts agree."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.mechanisms.vision.maniqa import ScaleSwinBlock, TransposedAttention
from attnzoo.testing import assert_close

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# The official modules, written out
# ----------------------------------------------------------------------------------------------------------------
class OfficialTABlock(nn.Module):
    def __init__(self, dim, drop=0.1):
        super().__init__()
        self.c_q = nn.Linear(dim, dim)
        self.c_k = nn.Linear(dim, dim)
        self.c_v = nn.Linear(dim, dim)
        self.norm_fact = dim ** -0.5
        self.softmax = nn.Softmax(dim=-1)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x):
        _x = x
        B, C, N = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        attn = q @ k.transpose(-2, -1) * self.norm_fact
        attn = self.softmax(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, C, N)
        x = self.proj_drop(x)
        return x + _x


def window_partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)


def window_reverse(windows, ws, H, W):
    B = int(windows.shape[0] / (H * W / ws / ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


class OfficialWindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads):
        super().__init__()
        self.window_size, self.num_heads = window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        coords = torch.stack(torch.meshgrid([torch.arange(window_size[0]), torch.arange(window_size[1])],
                                            indexing="ij"))
        cf = torch.flatten(coords, 1)
        rel = (cf[:, :, None] - cf[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window_size[0] - 1
        rel[:, :, 1] += window_size[1] - 1
        rel[:, :, 0] *= 2 * window_size[1] - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rpb = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + rpb.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        return self.proj((attn @ v).transpose(1, 2).reshape(B_, N, C))


class OfficialMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OfficialSwinBlock(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, window_size, shift_size, dim_mlp):
        super().__init__()
        self.input_resolution, self.window_size, self.shift_size = input_resolution, window_size, shift_size
        if min(self.input_resolution) <= self.window_size:
            self.shift_size = 0
            self.window_size = min(self.input_resolution)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = OfficialWindowAttention(dim, (self.window_size, self.window_size), num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = OfficialMlp(dim, dim_mlp)
        if self.shift_size > 0:
            H, W = self.input_resolution
            img_mask = torch.zeros((1, H, W, 1))
            ws, ss = self.window_size, self.shift_size
            cnt = 0
            for h in (slice(0, -ws), slice(-ws, -ss), slice(-ss, None)):
                for w in (slice(0, -ws), slice(-ws, -ss), slice(-ss, None)):
                    img_mask[:, h, w, :] = cnt
                    cnt += 1
            mw = window_partition(img_mask, ws).view(-1, ws * ws)
            attn_mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        else:
            attn_mask = None
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x):
        H, W = self.input_resolution
        B, L, C = x.shape
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        xw = window_partition(x, self.window_size).view(-1, self.window_size * self.window_size, C)
        aw = self.attn(xw, mask=self.attn_mask).view(-1, self.window_size, self.window_size, C)
        x = window_reverse(aw, self.window_size, H, W)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + x.view(B, H * W, C)
        return x + self.mlp(self.norm2(x))


class OfficialBasicLayer(nn.Module):
    def __init__(self, dim, input_resolution, depth, num_heads, window_size, dim_mlp):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.blocks = nn.ModuleList([
            OfficialSwinBlock(dim, input_resolution, num_heads, window_size,
                              0 if (i % 2 == 0) else window_size // 2, dim_mlp) for i in range(depth)])

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        H, W = self.input_resolution
        x = x.transpose(1, 2).reshape(x.shape[0], -1, H, W)  # 'b (h w) c -> b c h w'
        x = F.relu(self.conv(x))
        return x.flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'


def official_stage(layer, x, scale):
    """``SwinTransformer.forward`` with one layer (eval: its dropout is the identity)."""
    B, C, H, W = x.shape
    t = x.flatten(2).transpose(1, 2)
    t = scale * layer(t) + t
    return t.transpose(1, 2).reshape(B, C, H, W)


# ----------------------------------------------------------------------------------------------------------------
# TAB
# ----------------------------------------------------------------------------------------------------------------
def test_tab_parity_with_official():
    torch.manual_seed(0)
    ours = TransposedAttention(48, tokens=7 * 8)
    official = OfficialTABlock(7 * 8).eval()
    official.load_state_dict(ours.state_dict())
    x = torch.randn(2, 48, 7, 8)
    want = official(x.flatten(2)).view(2, 48, 7, 8)
    assert (ours(x) - want).abs().max().item() < 1e-5


def test_tab_paper_layout_is_the_equation_and_rows_sum_to_one():
    torch.manual_seed(1)
    m = TransposedAttention(6, tokens=12, output_layout="paper").double()
    x = torch.randn(2, 6, 3, 4, dtype=F64)
    t = x.flatten(2)  # (B, C, N)
    q, k, v = (t @ lin.weight.T + lin.bias for lin in (m.c_q, m.c_k, m.c_v))
    a = torch.softmax(q @ k.transpose(1, 2) / 12 ** 0.5, dim=-1)
    assert torch.allclose(m.attention(x).sum(-1), torch.ones(2, 6, dtype=F64), atol=1e-12)
    assert_close(m.attention(x), a, F64, "TAB attention")
    assert_close(m(x), (a @ v + t).view(2, 6, 3, 4), F64, "TAB = A v + X")
    perm = torch.randperm(6)
    assert_close(m(x[:, perm]), m(x)[:, perm], F64, "TAB (paper layout) permutes with the channels")
    official = TransposedAttention(6, tokens=12).double()
    official.load_state_dict(m.state_dict())
    assert_close(official(x), ((a @ v).transpose(1, 2).reshape(2, 6, 12) + t).view(2, 6, 3, 4), F64,
                 "official layout")


# ----------------------------------------------------------------------------------------------------------------
# SSTB
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("res,window", [((8, 8), 4), ((12, 12), 4), ((4, 4), 4), ((3, 3), 4)])
def test_sstb_parity_with_official(res, window):
    torch.manual_seed(2)
    ours = ScaleSwinBlock(16, 4, window_size=window, depth=2, mlp_dim=24).eval()
    with torch.no_grad():
        for blk in ours.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 0.5)
    x = torch.randn(2, 16, *res)
    # the official block builds its table for min(H, W) when the grid is smaller than the window: copy the
    # corresponding entries of ours (a table for a larger window holds every offset of the smaller one)
    official = OfficialBasicLayer(16, res, 2, 4, window, 24).eval()
    state = ours.state_dict()
    m = min(min(res), window)
    if m < window:
        idx = torch.tensor([(dy + window - 1) * (2 * window - 1) + dx + window - 1
                            for dy in range(-m + 1, m) for dx in range(-m + 1, m)])
        for i in range(2):
            key = f"blocks.{i}.attn.relative_position_bias_table"
            state[key] = state[key][idx]
    missing, unexpected = official.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("relative_position_index", "attn_mask")) for k in missing), missing
    want = official_stage(official, x, 0.8)
    for backend in ("fast", "reference"):
        ours.backend = backend
        assert (ours(x) - want).abs().max().item() < 1e-5, backend


def test_sstb_window_covering_the_grid_is_dense_attention_with_bias():
    torch.manual_seed(3)
    m = ScaleSwinBlock(8, 2, window_size=4, depth=1).double()
    blk = m.blocks[0]
    x = torch.randn(1, 4, 4, 8, dtype=F64)  # (B, H, W, C) tokens, one 4x4 window
    y = blk.norm1(x).view(1, 16, 8)
    q, k, v = (y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).view(1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
    r = torch.arange(4).repeat_interleave(4)
    c = torch.arange(4).repeat(4)
    idx = (r.view(-1, 1) - r.view(1, -1) + 3) * 7 + (c.view(-1, 1) - c.view(1, -1) + 3)
    bias = blk.attn.relative_position_bias_table[idx].permute(2, 0, 1)  # (h, 16, 16)
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, dim=-1)
    att = (p @ v).transpose(1, 2).reshape(1, 4, 4, 8) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    want = x + att
    want = want + blk.mlp(blk.norm2(want))
    assert_close(blk(x, backend="fast"), want, F64, "one window = dense attention + relative bias")


@pytest.mark.parametrize("size", [(13, 17), (5, 9), (28, 28)])
def test_sstb_any_grid_size_fast_equals_reference(size):
    torch.manual_seed(4)
    m = ScaleSwinBlock(8, 2, window_size=4, mlp_dim=8).double()
    x = torch.randn(1, 8, *size, dtype=F64)
    m.backend = "reference"
    ref = m(x)
    m.backend = "fast"
    assert_close(m(x), ref, F64, f"SSTB {size} fast vs reference")


def test_sstb_padding_never_changes_a_divisible_grid():
    """The same 8 x 8 map alone and as the top-left corner of a 10 x 11 map: the unshifted first block's attention
    outputs at the 8 x 8 positions are equal (the extra positions fall in other, padded windows)."""
    torch.manual_seed(5)
    m = ScaleSwinBlock(8, 2, window_size=4, depth=1).double()
    blk = m.blocks[0]
    x = torch.randn(1, 8, 8, 8, dtype=F64)
    big = torch.randn(1, 10, 11, 8, dtype=F64)
    big[:, :8, :8] = x
    assert_close(blk(big, backend="fast")[:, :8, :8], blk(x, backend="fast"), F64, "8x8 inside 10x11")


def test_sstb_channels_last_layouts_agree():
    torch.manual_seed(6)
    m = ScaleSwinBlock(8, 2, window_size=3)
    cl = ScaleSwinBlock(8, 2, window_size=3, channels_last=True)
    cl.load_state_dict(m.state_dict())
    x = torch.randn(2, 8, 7, 9)
    base = m(x)
    assert (m(x.contiguous(memory_format=torch.channels_last)) - base).abs().max().item() < 1e-5
    assert (cl(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2) - base).abs().max().item() < 1e-5


def test_build_and_errors():
    tab = attnzoo.build("maniqa_tab", 768, 1, tokens=784)
    assert tab.tokens == 784
    with pytest.raises(ValueError, match="tokens"):
        attnzoo.build("maniqa_tab", 64, 1)
    with pytest.raises(ValueError, match="H\\*W = 784"):
        tab(torch.randn(1, 768, 27, 28))
    with pytest.raises(ValueError, match="output_layout"):
        TransposedAttention(4, tokens=4, output_layout="restormer")
    sstb = attnzoo.build("maniqa_sstb", 768, 4)
    assert sstb.window_size == 4 and len(sstb.blocks) == 2 and sstb.blocks[1].shift == 2
    with pytest.raises(ValueError, match="heads"):
        ScaleSwinBlock(10, 4)
