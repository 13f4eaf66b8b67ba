"""Oracles of EMOv2's i2RMB (P070): parity with the official ``iiRMB`` + ``EW_MHSA_Hybrid`` forward (written out from
zhangzjn/EMOv2 ``model/lib_emo/emo2.py``) with copied weights on grids the window divides; window attention equals
dense attention under the block mask and spanning attention under the strided mask; exp 1, no depthwise conv, no
norm/act = a plain window attention block; padded grids mask the padding (real outputs of a divisible grid are
unchanged); fast == reference; both layouts agree."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import attnzoo
from attnzoo.mechanisms.vision.emov2 import ImprovedInvertedResidualBlock
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def official_hybrid(x, qk_conv, v_conv, num_head, dim_head, window_size):
    """``EW_MHSA_Hybrid.forward`` (attn_pre=False), written out; v_conv includes its activation."""
    B, C, H, W = x.shape
    pad_r = (window_size - W % window_size) % window_size
    pad_b = (window_size - H % window_size) % window_size
    x = F.pad(x, (0, pad_r, 0, pad_b, 0, 0))
    n1, n2 = (H + pad_b) // window_size, (W + pad_r) // window_size
    x_remote = rearrange(x, 'b c (h1 n1) (w1 n2) -> (b n1 n2) c h1 w1', n1=n1, n2=n2).contiguous()
    qk = qk_conv(x)
    qk_remote = rearrange(qk, 'b c (h1 n1) (w1 n2) -> (b n1 n2) c h1 w1', n1=n1, n2=n2).contiguous()
    qk_close = rearrange(qk, 'b c (n1 h1) (n2 w1) -> (b n1 n2) c h1 w1', n1=n1, n2=n2).contiguous()
    b, c, h, w = x_remote.shape
    qk_remote = rearrange(qk_remote, 'b (qk heads dim_head) h w -> qk b heads (h w) dim_head', qk=2,
                          heads=num_head, dim_head=dim_head).contiguous()
    qk_close = rearrange(qk_close, 'b (qk heads dim_head) h w -> qk b heads (h w) dim_head', qk=2,
                         heads=num_head, dim_head=dim_head).contiguous()
    scale = dim_head ** -0.5
    attn_remote = ((qk_remote[0] @ qk_remote[1].transpose(-2, -1)) * scale).softmax(dim=-1)
    attn_close = ((qk_close[0] @ qk_close[1].transpose(-2, -1)) * scale).softmax(dim=-1)
    v = v_conv(x)
    v_remote = rearrange(v, 'b c (h1 n1) (w1 n2) -> (b n1 n2) c h1 w1', n1=n1, n2=n2).contiguous()
    v_close = rearrange(v, 'b c (n1 h1) (n2 w1) -> (b n1 n2) c h1 w1', n1=n1, n2=n2).contiguous()
    v_remote = rearrange(v_remote, 'b (heads dim_head) h w -> b heads (h w) dim_head', heads=num_head).contiguous()
    x_spa_remote = attn_remote @ v_remote
    x_spa_remote = rearrange(x_spa_remote, 'b heads (h w) dim_head -> b (heads dim_head) h w', heads=num_head, h=h,
                             w=w).contiguous()
    x_spa_remote = rearrange(x_spa_remote, '(b n1 n2) c h1 w1 -> b c (h1 n1) (w1 n2)', n1=n1, n2=n2).contiguous()
    v_close = rearrange(v_close, 'b (heads dim_head) h w -> b heads (h w) dim_head', heads=num_head).contiguous()
    x_spa_close = attn_close @ v_close
    x_spa_close = rearrange(x_spa_close, 'b heads (h w) dim_head -> b (heads dim_head) h w', heads=num_head, h=h,
                            w=w).contiguous()
    x_spa_close = rearrange(x_spa_close, '(b n1 n2) c h1 w1 -> b c (n1 h1) (n2 w1)', n1=n1, n2=n2).contiguous()
    x_spa = x_spa_remote + x_spa_close
    if pad_r > 0 or pad_b > 0:
        x_spa = x_spa[:, :, :H, :W].contiguous()
    return x_spa


def official_iirmb(m, x, window_size):
    """``iiRMB.forward`` (norm 'ln_2d', hybrid eop, dw_ks > 0, has_skip), with our module's weights."""
    shortcut = x
    x = m.norm(x)  # LayerNorm2d: the same LayerNorm over channels
    v_conv = lambda t: F.gelu(m.v(t))
    x = official_hybrid(x, m.qk, v_conv, m.heads, m.dim // m.heads, window_size)
    x_l = m.conv_local(x)
    x = x + x_l
    x = m.proj(x)
    return shortcut + x * m.gamma


def _randomize(m):
    with torch.no_grad():
        m.gamma.normal_(0, 1)
        bn = m.conv_local[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("size,window", [((14, 14), 7), ((8, 12), 4)])
def test_parity_with_official_iirmb(size, window):
    torch.manual_seed(0)
    m = ImprovedInvertedResidualBlock(32, 2, exp_ratio=4.0, window_size=window).eval()  # dim_head 16
    _randomize(m)
    x = torch.randn(2, 32, *size)
    want = official_iirmb(m, x, window)
    for backend in ("fast", "reference"):
        m.backend = backend
        assert (m(x) - want).abs().max().item() < 1e-5, backend


def test_official_padding_attends_zero_tokens_ours_masks_them():
    """On a grid the window does not divide the official code lets the zero padding into the softmax; ours
    excludes it: the two differ, and ours equals the explicit masked computation."""
    torch.manual_seed(1)
    m = ImprovedInvertedResidualBlock(8, 2, exp_ratio=2.0, window_size=4).double().eval()
    _randomize(m)
    x = torch.randn(1, 8, 5, 6, dtype=F64)
    assert (m(x) - official_iirmb(m, x, 4)).abs().max() > 1e-6
    # ours, by hand: masked dense attention on the padded grid (8 x 8: windows of 4, strided windows of 2 x 2 steps)
    y = m.norm(x)
    qk = F.pad(m.qk(y), (0, 2, 0, 3))  # (B, 2C, 8, 8), padded
    v = F.pad(F.gelu(m.v(y)), (0, 2, 0, 3))
    r = torch.arange(8).repeat_interleave(8)
    c = torch.arange(8).repeat(8)
    real = ((r < 5) & (c < 6)).view(1, 64)
    close = ((r // 4).view(-1, 1) == (r // 4).view(1, -1)) & ((c // 4).view(-1, 1) == (c // 4).view(1, -1))
    span = ((r % 2).view(-1, 1) == (r % 2).view(1, -1)) & ((c % 2).view(-1, 1) == (c % 2).view(1, -1))
    q_ = qk[:, :8].reshape(1, 2, 4, 64).transpose(-1, -2)
    k_ = qk[:, 8:].reshape(1, 2, 4, 64).transpose(-1, -2)
    v_ = v.reshape(1, 2, 8, 64).transpose(-1, -2)
    a = sum(softmax_attention(q_, k_, v_, attn_mask=(mk & real).view(1, 1, 64, 64)) for mk in (close, span))
    a = a.transpose(-1, -2).reshape(1, 16, 8, 8)[:, :, :5, :6]
    want = x + m.gamma * m.proj(a + m.conv_local(a))
    assert_close(m(x), want, F64, "i2RMB on a padded grid vs masked dense computation")


def test_plain_window_attention_block_limit():
    torch.manual_seed(2)
    m = ImprovedInvertedResidualBlock(8, 2, exp_ratio=1.0, window_size=3, attention="window", dw_kernel=0,
                                      norm="none", act="none", layer_scale=1.0).double()
    x = torch.randn(1, 8, 6, 6, dtype=F64)
    t = x.flatten(2).transpose(1, 2)  # (B, 36, 8)
    wq, wk = m.qk.weight.view(16, 8).split(8)
    bq, bk = m.qk.bias.split(8)
    heads = lambda z: z.view(1, 36, 2, 4).transpose(1, 2)
    q, k, v = heads(t @ wq.T + bq), heads(t @ wk.T + bk), heads(t @ m.v.weight.view(8, 8).T + m.v.bias)
    r = torch.arange(6).repeat_interleave(6)
    c = torch.arange(6).repeat(6)
    block = ((r // 3).view(-1, 1) == (r // 3).view(1, -1)) & ((c // 3).view(-1, 1) == (c // 3).view(1, -1))
    att = softmax_attention(q, k, v, attn_mask=block.view(1, 1, 36, 36)).transpose(1, 2).reshape(1, 36, 8)
    want = t + att @ m.proj.weight.view(8, 8).T
    assert_close(m(x), want.transpose(1, 2).reshape(1, 8, 6, 6), F64, "window attention block")


def test_spanning_attention_is_the_strided_mask():
    torch.manual_seed(3)
    m = ImprovedInvertedResidualBlock(4, 1, exp_ratio=1.0, window_size=2, attention="spanning", dw_kernel=0,
                                      norm="none", act="none", layer_scale=1.0).double()
    x = torch.randn(1, 4, 6, 4, dtype=F64)
    a = m.mix(x)  # (B, C, H, W)
    t = x.flatten(2).transpose(1, 2)
    q = (t @ m.qk.weight.view(8, 4)[:4].T + m.qk.bias[:4]).unsqueeze(1)
    k = (t @ m.qk.weight.view(8, 4)[4:].T + m.qk.bias[4:]).unsqueeze(1)
    v = (t @ m.v.weight.view(4, 4).T + m.v.bias).unsqueeze(1)
    r = torch.arange(6).repeat_interleave(4)
    c = torch.arange(4).repeat(6)
    # 6 rows / window 2 = 3 windows along H: rows {0, 3}, {1, 4}, {2, 5}; 4 cols / 2 = 2: cols {0, 2}, {1, 3}
    strided = ((r % 3).view(-1, 1) == (r % 3).view(1, -1)) & ((c % 2).view(-1, 1) == (c % 2).view(1, -1))
    want = softmax_attention(q, k, v, attn_mask=strided.view(1, 1, 24, 24)).squeeze(1)
    assert_close(a, want.transpose(1, 2).reshape(1, 4, 6, 4), F64, "spanning attention")


@pytest.mark.parametrize("size", [(13, 17), (14, 14), (3, 5)])
def test_any_grid_size_fast_equals_reference(size):
    torch.manual_seed(4)
    m = ImprovedInvertedResidualBlock(8, 2, exp_ratio=2.0, window_size=7, layer_scale=1.0).double().eval()
    x = torch.randn(1, 8, *size, dtype=F64)
    m.backend = "reference"
    ref = m(x)
    m.backend = "fast"
    assert_close(m(x), ref, F64, f"i2RMB {size}")


def test_channels_last_layouts_agree():
    torch.manual_seed(5)
    m = ImprovedInvertedResidualBlock(8, 2, exp_ratio=2.0, window_size=3, layer_scale=1.0).eval()
    cl = ImprovedInvertedResidualBlock(8, 2, exp_ratio=2.0, window_size=3, layer_scale=1.0,
                                       channels_last=True).eval()
    cl.load_state_dict(m.state_dict())
    x = torch.randn(2, 8, 7, 9)
    base = m(x)
    assert (m(x.contiguous(memory_format=torch.channels_last)) - base).abs().max().item() < 1e-5
    assert (cl(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2) - base).abs().max().item() < 1e-5


def test_build_and_errors():
    m = attnzoo.build("emov2_i2rmb", 160, 5)  # EMOv2-5M stage 3: 160 channels, dim_head 32, exp 4
    assert m.mid == 640 and m.window_size == 7 and isinstance(m.conv_local[0], nn.Conv2d)
    with pytest.raises(ValueError, match="heads"):
        ImprovedInvertedResidualBlock(10, 4)
    with pytest.raises(ValueError, match="dw_kernel"):
        ImprovedInvertedResidualBlock(8, 2, dw_kernel=4)
    with pytest.raises(ValueError, match="attention"):
        ImprovedInvertedResidualBlock(8, 2, attention="global")
