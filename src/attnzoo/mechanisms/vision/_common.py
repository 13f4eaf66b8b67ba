"""Layout handling shared by the CNN attention modules of this family.

The modules compute on logical (B, C, H, W) maps, as timm and the papers' code do. ``channels_last=True`` takes and
returns (B, H, W, C) maps instead: the input is viewed as (B, C, H, W) with :meth:`torch.Tensor.permute` (no copy;
that view *is* a (B, C, H, W) tensor in ``torch.channels_last`` memory format) and the output is permuted back, so
both layouts run the same code and give the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import check_module_input


def channels_first(module: nn.Module, x: object, *, dim: int, channels_last: bool) -> torch.Tensor:
    """Validate ``x`` ((B, dim, H, W), or (B, H, W, dim) with ``channels_last``) and return it as (B, dim, H, W)."""
    if channels_last:
        x = check_module_input(module, x, layout="(B, H, W, C)", channels=dim, channel_axis=-1)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W) view, channels_last memory format
    return check_module_input(module, x, layout="(B, C, H, W)", channels=dim, channel_axis=1)


def restore_layout(y: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, C, H, W) -> the caller's layout."""
    return y.permute(0, 2, 3, 1) if channels_last else y


def single_head(mechanism: str, heads: object) -> None:
    """Modules without attention heads take ``heads=1`` (the registry's ``build(name, dim, heads)`` passes it)."""
    if heads != 1 or isinstance(heads, bool):
        raise ValueError(f"heads: {mechanism} has no attention heads, expected 1, got {heads!r}")


def one_head_case(*, n, side, heads, causal):
    """``case_options`` of single-head modules: benchmark and training cases build them with one head."""
    return {"heads": 1}
