"""Pieces the cross-attention recipes of this family share (no paper of their own): an attention sublayer with its
residual and layer norm where a paper puts them (post-norm as torch's ``nn.TransformerDecoderLayer``, pre-norm as a
pre-LN transformer, or none), a two-layer MLP, zero initialisation, and the checks of a recipe's inputs.

Every attention here runs on :class:`attnzoo.cross.CrossAttention` / :func:`attnzoo.cross_attention` (the multi-source
contract); a recipe file composes these pieces and says which paper's layout it follows.
"""

from __future__ import annotations

import torch
from torch import nn

from ...cross import CrossAttention
from ...errors import check_bool, check_choice, check_float, check_int, check_module_input

NORMS: tuple[str, ...] = ("post", "pre", "none")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (zero-initialised adapters: the host layer is unchanged at start)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


class MLP(nn.Module):
    """``Linear(dim, hidden) -> activation -> Linear(hidden, out)`` (out = dim unless given)."""

    def __init__(self, dim: int, hidden: int, *, out: int | None = None, activation: str = "relu",
                 bias: bool = True) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("hidden", hidden)
        check_choice("activation", activation, tuple(ACTIVATIONS))
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, dim if out is None else check_int("out", out), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttentionSublayer(nn.Module):
    """One attention sublayer with its residual: ``norm="post"``: ``LN(x + A(x, c))`` (torch's post-norm layers),
    ``"pre"``: ``x + A(LN(x), c)``, ``"none"``: ``x + A(x, c)``; ``residual=False`` returns ``A`` alone (then ``norm``
    must be ``"none"``).

    ``A`` is :class:`~attnzoo.cross.CrossAttention` with q/k/v/out projections (``bias`` as torch's
    ``nn.MultiheadAttention``); ``context_dim=None`` makes it self-attention (``forward(x)``: keys and values from x).
    ``zero_out`` zero-initialises the output projection (the sublayer starts as the identity). ``attn.scale`` can be
    overridden by a recipe whose paper scales scores differently.
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, self_attention: bool = False,
                 norm: str = "post", residual: bool = True, bias: bool = True, out_bias: bool | None = None,
                 eps: float = 1e-5, zero_out: bool = False, head_dim: int | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.norm_kind = check_choice("norm", norm, NORMS)
        self.residual = check_bool("residual", residual)
        self.self_attention = check_bool("self_attention", self_attention)
        if not self.residual and norm != "none":
            raise ValueError(f"norm: a sublayer without residual returns the attention alone; expected 'none', got "
                             f"{norm!r}")
        if self_attention and context_dim is not None:
            raise ValueError("context_dim: a self-attention sublayer takes its keys from x; got a context width")
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        self.attn = CrossAttention(dim, heads, context_dim=self.context_dim, bias=bias, out_bias=out_bias,
                                   head_dim=head_dim)
        self.norm = nn.LayerNorm(dim, eps=check_float("eps", eps, low=0.0, low_open=True)) if norm != "none" else None
        if check_bool("zero_out", zero_out):
            zero_(self.attn.o_proj)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, pair_masks: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, M, context_dim) (None for self-attention), key_padding_mask (B, M or N) bool,
        pair_masks (B|1, N, M) bool -> (B, N, dim)."""
        if self.self_attention:
            if context is not None:
                raise ValueError("context: this sublayer is self-attention (its keys come from x); got a context")
        elif context is None:
            raise ValueError("context: this cross-attention sublayer needs a context (B, M, context_dim)")
        h = self.norm(x) if self.norm_kind == "pre" else x
        a = self.attn(h, h if self.self_attention else context, key_padding_mask=key_padding_mask,
                      pair_masks=pair_masks)
        if not self.residual:
            return a
        y = x + a
        return self.norm(y) if self.norm_kind == "post" else y


def check_pair(module: nn.Module, x: object, context: object, *, channels: int, context_channels: int,
               name: str = "context") -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, channels) and the other stream (B, M, context_channels) of a two-stream recipe: the module's dtype and
    device, the same batch (nothing is broadcast)."""
    check_module_input(module, x, channels=channels)
    if context is None:
        raise ValueError(f"{name}: this recipe attends from x to a second token stream (B, M, {context_channels}); "
                         "got none")
    check_module_input(module, context, name=name, channels=context_channels)
    assert isinstance(x, torch.Tensor) and isinstance(context, torch.Tensor)
    if context.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: batch {context.shape[0]} does not match x's batch {x.shape[0]}")
    return x, context


def _placed(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``t`` has ``shape`` and sits on ``device`` (x's)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (x's), got {t.device}")
    return t


def check_ids(name: str, ids: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An integer tensor of ``shape`` on ``device`` (subject ids, panel ids, modality ids, ...)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name}: expected an integer tensor of shape {shape}, got {type(ids).__name__}")
    if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name}: expected an integer tensor, got dtype {ids.dtype}")
    return _placed(name, ids, shape, device)


def check_bool_mask(name: str, mask: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A bool tensor of ``shape`` on ``device``; a float mask is refused with the conversion in the message."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool tensor of shape {shape}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        hint = (" (an additive 0/-inf mask converts with `mask == 0`, 0/1 weights with `mask > 0`)"
                if mask.is_floating_point() else "")
        raise TypeError(f"{name}: expected dtype torch.bool, got {mask.dtype}{hint}")
    return _placed(name, mask, shape, device)


def plain_heads(mechanism: str, kv_heads: object, causal: object, *, causal_ok: bool = False) -> bool:
    """The ``kv_heads``/``causal`` a sequence recipe's factory receives from :func:`attnzoo.build`: ``kv_heads`` must be
    None (these recipes have no grouped-query form) and ``causal`` False unless the recipe has a causal pattern."""
    check_bool("causal", causal)
    if kv_heads is not None:
        raise ValueError(f"kv_heads: {mechanism} has no grouped-query form; expected None, got {kv_heads!r}")
    if causal and not causal_ok:
        raise ValueError(f"causal: {mechanism} is non-causal; build it with causal=False")
    return bool(causal)


class EncoderBlock(nn.Module):
    """torch's ``nn.TransformerEncoderLayer`` (post-norm, no dropout) on attnzoo's attention: ``x = LN1(x + SA(x))``,
    ``x = LN2(x + FF(x))``. :meth:`load_torch` copies a torch layer's weights (parity tests, ported checkpoints)."""

    def __init__(self, dim: int, heads: int, *, ffn: int = 2048, activation: str = "relu", eps: float = 1e-5) -> None:
        super().__init__()
        self.self_attn = AttentionSublayer(dim, heads, self_attention=True, eps=eps)
        self.ff = MLP(dim, check_int("ffn", ffn), activation=activation)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), key_padding_mask (B, N) bool (True = a real token) -> (B, N, dim)."""
        x = self.self_attn(x, key_padding_mask=key_padding_mask)
        return self.norm2(x + self.ff(x))

    @torch.no_grad()
    def load_torch(self, layer: nn.TransformerEncoderLayer) -> EncoderBlock:
        """Copy the weights of a post-norm ``torch.nn.TransformerEncoderLayer``. Returns self."""
        if not isinstance(layer, nn.TransformerEncoderLayer) or layer.norm_first:
            raise TypeError("layer: expected a post-norm torch.nn.TransformerEncoderLayer (norm_first=False)")
        self.self_attn.attn.load_multihead_attention(layer.self_attn)
        for mine, theirs in ((self.self_attn.norm, layer.norm1), (self.norm2, layer.norm2),
                             (self.ff.fc1, layer.linear1), (self.ff.fc2, layer.linear2)):
            mine.load_state_dict(theirs.state_dict())
        return self


class DecoderBlock(nn.Module):
    """torch's ``nn.TransformerDecoderLayer`` (post-norm, no dropout) on attnzoo's attention: ``x = LN1(x + SA(x))``,
    ``x = LN2(x + CA(x, memory))``, ``x = LN3(x + FF(x))``; ``self_attention=False`` drops the first sublayer.
    ``causal=True`` makes the self-attention causal (a decoder over a sequence). :meth:`load_torch` copies a torch
    layer's weights (parity tests, ported checkpoints)."""

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, ffn: int = 2048,
                 activation: str = "relu", self_attention: bool = True, causal: bool = False, eps: float = 1e-5
                 ) -> None:
        super().__init__()
        self.causal = check_bool("causal", causal)
        self.self_attn = (AttentionSublayer(dim, heads, self_attention=True, eps=eps)
                          if check_bool("self_attention", self_attention) else None)
        if causal and self.self_attn is None:
            raise ValueError("causal: applies to the self-attention sublayer; this block has none")
        self.cross_attn = AttentionSublayer(dim, heads, context_dim=context_dim, eps=eps)
        self.ff = MLP(dim, check_int("ffn", ffn), activation=activation)
        self.norm3 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                x_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), memory (B, M, context_dim); key_padding_mask (B, M) masks memory tokens, x_padding_mask
        (B, N) masks x's own tokens as self-attention keys."""
        if self.self_attn is not None:
            pairs = None
            if self.causal:
                n = x.shape[1]
                pairs = torch.ones(n, n, dtype=torch.bool, device=x.device).tril().unsqueeze(0)  # (1, N, N)
            x = self.self_attn(x, key_padding_mask=x_padding_mask, pair_masks=pairs)
        x = self.cross_attn(x, memory, key_padding_mask=key_padding_mask)
        return self.norm3(x + self.ff(x))

    @torch.no_grad()
    def load_torch(self, layer: nn.TransformerDecoderLayer) -> DecoderBlock:
        """Copy the weights of a post-norm ``torch.nn.TransformerDecoderLayer``. Returns self."""
        if not isinstance(layer, nn.TransformerDecoderLayer) or layer.norm_first:
            raise TypeError("layer: expected a post-norm torch.nn.TransformerDecoderLayer (norm_first=False)")
        if self.self_attn is None:
            raise ValueError("layer: a torch decoder layer has a self-attention sublayer; this block has none")
        self.self_attn.attn.load_multihead_attention(layer.self_attn)
        self.cross_attn.attn.load_multihead_attention(layer.multihead_attn)
        for mine, theirs in ((self.self_attn.norm, layer.norm1), (self.cross_attn.norm, layer.norm2),
                             (self.norm3, layer.norm3), (self.ff.fc1, layer.linear1), (self.ff.fc2, layer.linear2)):
            mine.load_state_dict(theirs.state_dict())
        return self
