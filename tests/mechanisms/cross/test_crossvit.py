"""CrossViT fusion (P060): the CLS row of softmax attention over the concatenated sequence; parity with the official
CrossAttention / CrossAttentionBlock / MultiScaleBlock fusion (IBM/CrossViT models/crossvit.py, written out below
from its source) on copied weights; patch-permutation invariance; masks."""

import pytest
import torch
from torch import nn

from attnzoo.mechanisms.cross.crossvit import CrossViTFusion, CrossViTMultiScaleFusion
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


# --- the official fusion, written out from IBM/CrossViT models/crossvit.py (timm is not importable here) -------
class OfficialCrossAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        h = self.num_heads
        q = self.wq(x[:, 0:1]).reshape(B, 1, h, C // h).permute(0, 2, 1, 3)
        k = self.wk(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        v = self.wv(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, 1, C))


class OfficialCrossAttentionBlock(nn.Module):  # has_mlp=False, drop_path=0 (the released configs' fusion)
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OfficialCrossAttention(dim, num_heads, qkv_bias)

    def forward(self, x):
        return x[:, 0:1, ...] + self.attn(self.norm1(x))


class OfficialFusion(nn.Module):  # the fusion part of MultiScaleBlock (after the branch blocks)
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        nb = len(dim)
        self.projs = nn.ModuleList([nn.Sequential(nn.LayerNorm(dim[d], eps=1e-6), nn.GELU(),
                                                  nn.Linear(dim[d], dim[(d + 1) % nb])) for d in range(nb)])
        self.fusion = nn.ModuleList([OfficialCrossAttentionBlock(dim[(d + 1) % nb], num_heads[(d + 1) % nb], qkv_bias)
                                     for d in range(nb)])
        self.revert_projs = nn.ModuleList([nn.Sequential(nn.LayerNorm(dim[(d + 1) % nb], eps=1e-6), nn.GELU(),
                                                         nn.Linear(dim[(d + 1) % nb], dim[d])) for d in range(nb)])

    def forward(self, outs_b):
        proj_cls = [proj(x[:, 0:1]) for x, proj in zip(outs_b, self.projs)]
        outs = []
        for i in range(2):
            tmp = torch.cat((proj_cls[i], outs_b[(i + 1) % 2][:, 1:, ...]), dim=1)
            tmp = self.fusion[i](tmp)
            outs.append(torch.cat((self.revert_projs[i](tmp[:, 0:1, ...]), outs_b[i][:, 1:, ...]), dim=1))
        return outs


def _copy(ours: CrossViTFusion, proj, block, revert):
    ours.proj.load_state_dict(proj.state_dict())
    ours.norm1.load_state_dict(block.norm1.state_dict())
    for name in ("wq", "wk", "wv"):
        getattr(ours, name).load_state_dict(getattr(block.attn, name).state_dict())
    ours.out.load_state_dict(block.attn.proj.state_dict())
    ours.revert.load_state_dict(revert.state_dict())


def test_parity_with_the_official_multiscale_fusion():
    torch.manual_seed(0)
    dims, heads = (24, 36), (2, 3)
    official = OfficialFusion(dims, heads).double()
    for p in official.parameters():  # LayerNorm starts at (1, 0): perturb so every parameter matters
        nn.init.normal_(p, std=0.3) if p.dim() == 1 else None
    ours = CrossViTMultiScaleFusion(dims, heads).double()
    for i in range(2):
        _copy(ours.fusion[i], official.projs[i], official.fusion[i], official.revert_projs[i])
    g = _g(1)
    xs = [torch.randn(2, 1 + 16, dims[0], generator=g, dtype=F64),
          torch.randn(2, 1 + 9, dims[1], generator=g, dtype=F64)]
    for got, want, what in zip(ours(xs), official(xs), ("small branch", "large branch")):
        assert_close(got, want, F64, f"official parity, {what}")


def test_cls_row_of_attention_over_the_concatenated_sequence_and_patches_unchanged():
    torch.manual_seed(0)
    m = CrossViTFusion(16, 2, context_dim=12).double()
    g = _g(2)
    x = torch.randn(3, 1 + 5, 16, generator=g, dtype=F64)
    ctx = torch.randn(3, 7, 12, generator=g, dtype=F64)
    y = m(x, ctx)
    assert torch.equal(y[:, 1:], x[:, 1:])
    f_cls = m.proj(x[:, :1])
    seq = m.norm1(torch.cat([f_cls, ctx], 1))  # (B, 1 + M, c): the concatenated sequence

    def heads(t):
        return t.view(3, -1, 2, 6).transpose(1, 2)

    full = softmax_attention(heads(m.wq(seq)), heads(m.wk(seq)), heads(m.wv(seq)))  # every row attends
    cls_row = full[:, :, :1].transpose(1, 2).reshape(3, 1, 12)
    assert_close(y[:, :1], m.revert(f_cls + m.out(cls_row)), F64, "CLS row of full attention")


def test_invariant_to_permuting_the_other_branch_and_masks_hide_tokens():
    torch.manual_seed(0)
    m = CrossViTFusion(16, 2, context_dim=12).double()
    g = _g(3)
    x = torch.randn(2, 4, 16, generator=g, dtype=F64)
    ctx = torch.randn(2, 7, 12, generator=g, dtype=F64)
    p = torch.randperm(7, generator=g)
    assert_close(m(x, ctx[:, p]), m(x, ctx), F64, "permuted patches")
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 4:] = False
    assert_close(m(x, ctx, key_padding_mask=mask), m(x, ctx[:, :4]), F64, "masked tail == dropped tail")
    assert (m(x, ctx) - m(x, ctx[:, :4])).abs().max() > 1e-4


def test_validation():
    m = CrossViTFusion(16, 2, context_dim=12)
    with pytest.raises(ValueError, match="context: CrossViT's fusion needs"):
        m(torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match=r"context: expected \(B, N, 12\)"):
        m(torch.randn(2, 4, 16), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="heads: context_dim"):
        CrossViTFusion(16, 5, context_dim=12)
    with pytest.raises(ValueError, match="causal"):
        CrossViTFusion(16, 2, causal=True)
