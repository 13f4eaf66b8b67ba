"""IC-Custom's in-context multi-modal attention (ICMA): joint attention over text and a polyptych of reference and
target panels, with boundary-aware panel embeddings and task-oriented register tokens.

Paper: "IC-Custom: Diverse Image Customization via In-Context Learning", Li, Chen, Liu, Zhang, Shan, et al.,
arXiv 2507.01926. Official code: https://github.com/TencentARC/IC-Custom (src/ic_custom/models/model.py,
src/ic_custom/modules/layers.py, src/ic_custom/modules/math.py ``attention``). CATALOG P030.
The reference image(s) and the target are laid side by side as a polyptych and tokenised with the text into one
MM-DiT sequence. ICMA: (1) boundary-aware positional embeddings -- a learned ``cond`` embedding plus a per-panel
``idx`` embedding on reference-panel tokens and a ``target`` embedding on target tokens, added to their queries and
keys; (2) task-oriented register tokens -- per mask type (task) R learned key and value vectors appended to the keys
and values only; joint softmax attention over ``[text; panels]`` and the registers:
``O = softmax(Q [K; K_reg]^T / sqrt(d)) [V; V_reg]``.

Confirmed against the official code (CATALOG's "(?)"): ``cond_embedding`` (1), ``target_embedding`` (1) and
``idx_embedding`` (10 panels) are zero-initialised, summed per image token and added to the image stream's q and k
(after QK-norm, before RoPE); ``task_register_embeddings`` (24 = 3 mask types x (k, v) x 4 tokens) are zero-initialised
and concatenated to k and v after RoPE (no positions) for every query; no mask (text padding is padded with real
tokens in Flux). Stream-specific projections, modulation and RoPE are the host DiT's; here one stream's q/k/v (with
Flux's RMS QK-norm) stands for them. Zero-initialised registers are keys with score 0 that still take softmax mass (as
the official); ``key_padding_mask`` (B, N) masks padded sequence tokens (never the registers). On the contract: the
sequence and the registers are two sources of one joint softmax (one fused SDPA call).

Example:
    >>> import torch, attnzoo
    >>> icma = attnzoo.build("ic_custom", 32, 4)
    >>> x = torch.randn(1, 5 + 2 * 8, 32)                           # 5 text tokens, 2 panels of 8 tokens
    >>> panels = torch.tensor([[-1] * 5 + [1] * 8 + [0] * 8])       # text, reference panel 1, target
    >>> icma(x, panel_ids=panels, task=2).shape
    torch.Size([1, 21, 32])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...cross import cross_attention
from ...errors import check_bool, check_heads, check_int, check_key_padding_mask, check_module_input
from ...registry import Mechanism, Option, register
from ._blocks import check_ids, plain_heads


class InContextMultimodalAttention(nn.Module):
    """``x (B, N, dim)`` the joint sequence [text; polyptych] -> ``(B, N, dim)``. ``panel_ids`` (B, N) integer: -1 for
    text, 0 for target-panel tokens, p >= 1 for reference panel p (or the ``layout`` option's); ``task`` (int or (B,))
    the mask type selecting the register tokens; ``key_padding_mask`` (B, N)."""

    def __init__(self, dim: int, heads: int, *, num_registers: int = 4, num_tasks: int = 3, num_panels: int = 10,
                 layout: tuple[int, ...] | None = None, qk_norm: bool = True, bias: bool = True, eps: float = 1e-6
                 ) -> None:
        super().__init__()
        if layout is not None and (not isinstance(layout, tuple) or len(layout) < 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in layout)):
            raise TypeError(f"layout: expected (text tokens, reference panel tokens..., target tokens) as ints >= 0, "
                            f"got {layout!r}")
        self.layout = layout
        self.dim, self.heads, _, self.head_dim = check_heads(dim, heads, gqa=False)
        self.num_registers = check_int("num_registers", num_registers)
        self.num_tasks = check_int("num_tasks", num_tasks)
        self.num_panels = check_int("num_panels", num_panels)
        self.qkv = nn.Linear(dim, 3 * dim, bias=check_bool("bias", bias))
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if check_bool("qk_norm", qk_norm) else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.cond_embedding = nn.Parameter(torch.zeros(dim))
        self.target_embedding = nn.Parameter(torch.zeros(dim))
        self.idx_embedding = nn.Parameter(torch.zeros(num_panels, dim))
        self.registers = nn.Parameter(torch.zeros(num_tasks, 2, num_registers, dim))  # (task, k|v, R, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)  # (B, H, n, hd)

    def panel_embeddings(self, panel_ids: torch.Tensor) -> torch.Tensor:
        """(B, N, dim): cond + idx[p - 1] on reference panel p, target on the target panel, 0 on text."""
        ref = panel_ids > 0
        idx = self.idx_embedding[(panel_ids - 1).clamp(0, self.num_panels - 1)]  # (B, N, dim)
        emb = torch.where(ref[..., None], self.cond_embedding + idx, torch.zeros_like(idx))
        return torch.where((panel_ids == 0)[..., None], self.target_embedding.expand_as(emb), emb)

    def forward(self, x: torch.Tensor, *, panel_ids: torch.Tensor | None = None, task: int | torch.Tensor = 0,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_module_input(self, x, channels=self.dim)
        B, N, _ = x.shape
        check_key_padding_mask(key_padding_mask, B, N, device=x.device)
        if isinstance(task, torch.Tensor):
            tasks = check_ids("task", task, (B,), x.device)
        else:
            tasks = torch.full((B,), check_int("task", task, low=0), device=x.device)
        if bool((tasks < 0).any()) or bool((tasks >= self.num_tasks).any()):
            raise ValueError(f"task: expected mask types in [0, {self.num_tasks}), got {tasks.tolist()}")
        q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if panel_ids is None and self.layout is not None:
            if sum(self.layout) != N:
                raise ValueError(f"x: the layout {self.layout} describes {sum(self.layout)} tokens, got N={N}; pass "
                                 "panel_ids for another layout")
            text, *refs, target = self.layout
            ids = [-1] * text + [i + 1 for i, n in enumerate(refs) for _ in range(n)] + [0] * target
            panel_ids = torch.tensor(ids, device=x.device).expand(B, N)
        if panel_ids is not None:
            ids = check_ids("panel_ids", panel_ids, (B, N), x.device)
            if bool((ids < -1).any()) or bool((ids > self.num_panels).any()):
                raise ValueError(f"panel_ids: expected -1 (text), 0 (target) or 1..{self.num_panels} (references)")
            pe = self._heads(self.panel_embeddings(ids))  # boundary-aware embeddings on q and k
            q, k = q + pe, k + pe
        reg = self.registers[tasks.to(self.registers.device)]  # (B, 2, R, dim)
        rk, rv = self._heads(reg[:, 0]), self._heads(reg[:, 1])  # (B, H, R, hd): keys/values only
        out = cross_attention(q, {"tokens": (k, v), "registers": (rk, rv)}, mode="joint",
                              masks=None if key_padding_mask is None else {"tokens": key_padding_mask})
        return self.proj(out.transpose(1, 2).reshape(B, N, self.dim))


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    plain_heads("ic_custom", kv_heads, causal)
    return InContextMultimodalAttention(dim, heads, **IC_CUSTOM.resolve_options(options))


IC_CUSTOM = register(Mechanism(
    name="ic_custom",
    aliases=("in_context_multimodal_attention", "icma"),
    family="cross",
    catalog="P030",
    title="IC-Custom: Diverse Image Customization via In-Context Learning",
    arxiv="2507.01926",
    code="https://github.com/TencentARC/IC-Custom",
    summary="Joint attention over [text; reference and target panels] plus task-oriented register keys/values, with "
            "boundary-aware panel embeddings on queries and keys (zero-initialised, as official).",
    patterns=("noncausal_self",),
    exact=True,
    complexity="time O(N (N + R) d), memory O(N + R) fused",
    module=_module,
    options=(
        Option("num_registers", 4, int, low=1, doc="register tokens per task (official 4)"),
        Option("num_tasks", 3, int, low=1, doc="mask types with their own registers (official 3)"),
        Option("num_panels", 10, int, low=1, doc="reference panel embeddings (official 10)"),
        Option("layout", None, tuple, allow_none=True,
               doc="(text tokens, reference panel tokens..., target tokens): panel ids when none are passed"),
        Option("qk_norm", True, bool, doc="RMS QK-norm per head (Flux)"),
        Option("bias", True, bool, doc="qkv bias (Flux: yes)"),
        Option("eps", 1e-6, float, low=0.0, doc="QK-norm epsilon"),
    ),
    test_options={"num_registers": 2, "num_tasks": 2, "num_panels": 3, "layout": (2, 2, 3)},
    notes="registers masked and zero panel embeddings: plain joint attention over the sequence; registers are keys "
          "for every query in one softmax; permutation-equivariant when the panel ids travel with their tokens.",
))
