"""TCPA: Token Coordinated Prompt Attention -- each token of a prompted ViT attends only to the prompts assigned to it.

Paper: "Token Coordinated Prompt Attention is Needed for Visual Prompting", Liu, Zou, Hua, Zhou, arXiv 2505.02406
(ICML 2025). Official code: https://github.com/zhoujiahuan1991/ICML2025-TCPA (models/TCPA.py ``Pool_TCPA``,
models/VFPT_TCPA.py ``forward_attn``). CATALOG P047.
Deep visual prompting with two prompt pools per layer, CLS prompts P_c and image prompts P_i, each prompt with a key.
The [CLS] token picks its top-k CLS prompts and every image token its top-k image prompts by cosine similarity of the
token to the prompt keys; prompts are extra keys/values (they issue no queries) and the attention of a token is
restricted to the tokens and its own prompts: ``O = (softmax(Q [K_x; K_p]^T / sqrt(d)) * M) [V_x; V_p]``, M = 1 on
token columns and on the token's assigned prompts, 0 elsewhere. The pull loss ``mean(1 - cos)`` of the selected keys
trains the keys (``aux_loss``).

Confirmed against the official code: the mask multiplies the softmax *after* it is computed, without renormalising
(``attn = attn.softmax(-1) ... attn = attn * mask``): unassigned prompts still take their share of the normaliser and
that mass is dropped -- kept as ``renormalize=False`` (``True`` gives the masked softmax the CATALOG describes). CLS
sees no image prompts and image tokens no CLS prompts; selection uses the block input (before ``norm1``) against the
layer's keys (uniform(-1, 1) init), the prompts pass through the block's ``norm1`` and ``qkv`` like tokens (``norm``),
the outputs of the prompt rows are dropped; defaults of the official scripts: pools of 18, top 10, prompts of length 1,
ViT-B (width 768, 12 heads, qkv bias, LayerNorm eps 1e-6). VFPT's Fourier transform of the prompts and the optional
ADVP value affine of the repository are outside TCPA. On the contract: the no-renormalisation form is one joint softmax
over the keys twice -- assigned copies with their values, unassigned copies with scale 0 -- so each token's normaliser
holds every key once (one fused SDPA call).

Example:
    >>> import torch, attnzoo
    >>> tcpa = attnzoo.build("tcpa", 32, 4, pool_size_cls=4, pool_size_image=6, topk_cls=2, topk_image=3)
    >>> tokens = torch.randn(2, 1 + 9, 32)                         # [CLS; 9 patches]
    >>> tcpa(tokens).shape, tcpa.aux_loss.shape
    (torch.Size([2, 10, 32]), torch.Size([]))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...cross import cross_attention
from ...errors import check_bool, check_int, check_key_padding_mask, check_module_input
from ...registry import Mechanism, Option, register
from ._blocks import plain_heads


class TokenCoordinatedPromptAttention(nn.Module):
    """``x (B, 1 + N, dim)`` ([CLS; patches], the block input) -> ``(B, 1 + N, dim)`` the attention output (before the
    block's residual). ``key_padding_mask`` (B, 1 + N) masks token keys; ``aux_loss`` after a forward is the pull loss
    of the selected prompt keys."""

    def __init__(self, dim: int, heads: int, *, pool_size_cls: int = 18, pool_size_image: int = 18, topk_cls: int = 10,
                 topk_image: int = 10, len_prompts: int = 1, renormalize: bool = False, norm: bool = True,
                 qkv_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"heads: dim ({dim}) must be divisible by heads, got {heads}")
        self.pool_size_cls, self.pool_size_image = (check_int("pool_size_cls", pool_size_cls),
                                                    check_int("pool_size_image", pool_size_image))
        self.topk_cls = check_int("topk_cls", topk_cls, high=pool_size_cls)
        self.topk_image = check_int("topk_image", topk_image, high=pool_size_image)
        self.len_prompts = check_int("len_prompts", len_prompts)
        self.renormalize = check_bool("renormalize", renormalize)
        self.keys_cls = nn.Parameter(torch.empty(pool_size_cls, dim).uniform_(-1, 1))
        self.keys_image = nn.Parameter(torch.empty(pool_size_image, dim).uniform_(-1, 1))
        self.prompts_cls = nn.Parameter(torch.empty(pool_size_cls, len_prompts, dim).uniform_(-1, 1))
        self.prompts_image = nn.Parameter(torch.empty(pool_size_image, len_prompts, dim).uniform_(-1, 1))
        self.norm1 = nn.LayerNorm(dim, eps=eps) if check_bool("norm", norm) else nn.Identity()
        self.qkv = nn.Linear(dim, 3 * dim, bias=check_bool("qkv_bias", qkv_bias))
        self.proj = nn.Linear(dim, dim)
        self.aux_loss: torch.Tensor | None = None

    def _select(self, tokens: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(assigned (..., pool) bool, pull loss): each token's top-k prompts by cosine similarity to the keys."""
        sim = F.normalize(tokens, dim=-1) @ F.normalize(keys, dim=-1).t()  # (..., pool)
        top = sim.topk(k, dim=-1)
        assigned = torch.zeros_like(sim, dtype=torch.bool).scatter(-1, top.indices, True)
        return assigned, (1 - top.values).mean()

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_module_input(self, x, channels=self.dim)
        B, T, _ = x.shape
        if T < 2:
            raise ValueError(f"x: expected [CLS; at least one patch] (B, 1 + N, dim), got shape {tuple(x.shape)}")
        check_key_padding_mask(key_padding_mask, B, T, device=x.device)
        L = self.len_prompts
        cls_pick, loss_c = self._select(x[:, 0], self.keys_cls, self.topk_cls)  # (B, Pc)
        img_pick, loss_i = self._select(x[:, 1:], self.keys_image, self.topk_image)  # (B, N, Pi)
        self.aux_loss = loss_c + loss_i
        Pc, Pi = self.pool_size_cls * L, self.pool_size_image * L
        prompts = torch.cat([self.prompts_cls.reshape(Pc, self.dim), self.prompts_image.reshape(Pi, self.dim)])
        h = self.norm1(torch.cat([x, prompts.unsqueeze(0).expand(B, -1, -1)], dim=1))  # (B, T + P, dim)
        q, k, v = (t.view(B, -1, self.heads, self.dim // self.heads).transpose(1, 2)
                   for t in self.qkv(h).chunk(3, dim=-1))  # (B, H, T + P, hd) each
        assigned = torch.zeros(B, T, T + Pc + Pi, dtype=torch.bool, device=x.device)  # (B, T, T + P)
        assigned[:, :, :T] = True  # every token sees every token
        assigned[:, 0, T : T + Pc] = cls_pick.repeat_interleave(L, dim=-1)  # CLS: its CLS prompts
        assigned[:, 1:, T + Pc :] = img_pick.repeat_interleave(L, dim=-1)  # patches: their image prompts
        kpm = None if key_padding_mask is None else torch.cat(
            [key_padding_mask, key_padding_mask.new_ones(B, Pc + Pi)], dim=1)  # prompts are never padding
        q = q[:, :, :T]  # the prompts issue no queries
        if self.renormalize:
            out = cross_attention(q, {"keys": (k, v)}, masks=None if kpm is None else {"keys": kpm},
                                  pair_masks={"keys": assigned})
        else:  # softmax over every key, assigned ones kept: unassigned copies take normaliser mass with value 0
            out = cross_attention(q, {"assigned": (k, v), "dropped": (k, v)}, mode="joint",
                                  masks=None if kpm is None else {"assigned": kpm, "dropped": kpm},
                                  pair_masks={"assigned": assigned, "dropped": ~assigned},
                                  scales={"dropped": 0.0})
        return self.proj(out.transpose(1, 2).reshape(B, T, self.dim))  # (B, T, dim)


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("tcpa", kv_heads, causal)
    return TokenCoordinatedPromptAttention(dim, heads, **TCPA.resolve_options(options))


TCPA = register(Mechanism(
    name="tcpa",
    aliases=("token_coordinated_prompt_attention",),
    family="cross",
    catalog="P047",
    title="Token Coordinated Prompt Attention is Needed for Visual Prompting",
    arxiv="2505.02406",
    code="https://github.com/zhoujiahuan1991/ICML2025-TCPA",
    summary="Prompted ViT attention where CLS sees only its top-k CLS prompts and each patch only its top-k image "
            "prompts (cosine to prompt keys); official post-softmax mask without renormalisation.",
    patterns=("noncausal_self",),
    exact=True,
    complexity="time O(T (T + P) d), memory O(T (T + P)) for the assignment mask (P prompts)",
    module=_module,
    options=(
        Option("pool_size_cls", 18, int, low=1, doc="CLS prompt pool size (official 18)"),
        Option("pool_size_image", 18, int, low=1, doc="image prompt pool size (official 18)"),
        Option("topk_cls", 10, int, low=1, doc="CLS prompts per [CLS] token (official 10)"),
        Option("topk_image", 10, int, low=1, doc="image prompts per patch token (official 10)"),
        Option("len_prompts", 1, int, low=1, doc="tokens per prompt (official 1)"),
        Option("renormalize", False, bool, doc="renormalise over the visible keys (official: no, mask after softmax)"),
        Option("norm", True, bool, doc="the block's norm1 on tokens and prompts inside the layer"),
        Option("qkv_bias", True, bool, doc="qkv bias (ViT-B: yes)"),
        Option("eps", 1e-6, float, low=0.0, doc="layer-norm epsilon (timm ViT: 1e-6)"),
    ),
    test_options={"pool_size_cls": 4, "pool_size_image": 5, "topk_cls": 2, "topk_image": 3},
    notes="with every prompt assigned to every token (top-k = pool) and renormalize it is VPT-deep attention; the "
          "official no-renormalisation output equals masking the explicit softmax; aux_loss trains the prompt keys.",
))
