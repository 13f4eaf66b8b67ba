"""Whisper's cross-attention alignment heads as a monotone word-to-audio alignment.

Whisper (Radford et al., "Robust Speech Recognition via Large-Scale Weak Supervision", arXiv 2212.04356; official
code https://github.com/openai/whisper, ``whisper/timing.py``) ships, per checkpoint, a list of decoder
cross-attention heads whose attention follows the audio in time (``alignment_heads``; tiny.en: layer 1 head 0,
layer 2 heads 0 and 5, layer 3 heads 0-4). Word timestamps come from those heads' cross-attention weights of the
teacher-forced transcript:

1. the weights (heads, text tokens, audio frames) of the rows that predict the text tokens (teacher forcing: the
   row of the position before each token), renormalised over the frames that hold audio (one encoder
   frame = 20 ms; the official code takes the softmax of the scores over those frames only),
2. standardised per head and frame over the text tokens (z-score along the token axis), median-filtered along
   time (width 7), averaged over the heads,
3. a dynamic-time-warping path through ``-matrix`` (monotone: each step advances the token, the frame or both),
4. a token starts at the first frame its row takes on the path; a word starts at its first token's start and ends
   at the next word's start (the last word at its last frame).

The weights are read through :class:`attnzoo.analysis.capture.Analyzer`, so the same alignment runs with the
decoder's attention switched to any functional attnzoo mechanism (its effective operator gives the weights).
The function :func:`dtw` is the one piece of dynamic programming; it is tested against brute force over every
monotone path of small matrices.

    model, processor = attnzoo.models.load_whisper_tiny_en()
    words = whisper_word_alignment(model, processor, audio_16k, "the quick brown fox")
    # [WordTiming(word='the', start=0.02, end=0.6), ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import check_int, check_tensor

__all__ = ["WordTiming", "dtw", "median_filter", "alignment_matrix", "word_timings", "whisper_word_alignment",
           "FRAME_SECONDS"]

FRAME_SECONDS = 0.02  # one encoder frame: 2 mel frames of 10 ms


@dataclass(frozen=True)
class WordTiming:
    word: str
    start: float  # seconds
    end: float
    tokens: tuple[int, ...]


def dtw(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost monotone path through ``cost`` (N, M) from (0, 0) to (N-1, M-1), each step moving one row, one
    column or both: returns (rows, cols), two LongTensors of the path's cells in order."""
    check_tensor("cost", cost, ndim=2)
    n, m = cost.shape
    if n == 0 or m == 0:
        raise ValueError(f"cost: expected a non-empty (N, M) matrix, got shape {tuple(cost.shape)}")
    c = cost.detach().double().cpu().numpy()
    acc = np.full((n + 1, m + 1), np.inf)  # acc[i+1, j+1]: cheapest path ending at cell (i, j)
    acc[0, 0] = 0.0
    move = np.zeros((n + 1, m + 1), dtype=np.int8)  # 0: diagonal, 1: from the row above, 2: from the left
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            options = (acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
            k = int(np.argmin(options))  # ties prefer the diagonal, then the vertical move
            acc[i, j] = c[i - 1, j - 1] + options[k]
            move[i, j] = k
    rows, cols = [], []
    i, j = n, m
    while i > 0 and j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        k = move[i, j]
        if k == 0:
            i, j = i - 1, j - 1
        elif k == 1:
            i -= 1
        else:
            j -= 1
    return torch.tensor(rows[::-1], dtype=torch.long), torch.tensor(cols[::-1], dtype=torch.long)


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a centred window of ``width`` (odd) along the last axis, the edges reflected."""
    width = check_int("width", width)
    if width % 2 == 0:
        raise ValueError(f"width: expected an odd window, got {width}")
    if width == 1:
        return x
    pad = width // 2
    if x.shape[-1] <= pad:
        raise ValueError(f"x: the last axis ({x.shape[-1]}) must be longer than half the window ({pad})")
    lead = x.shape[:-1]
    y = torch.nn.functional.pad(x.reshape(-1, 1, x.shape[-1]), (pad, pad), mode="reflect")  # (R, 1, T + 2 pad)
    return y.unfold(-1, width, 1).median(-1).values.reshape(*lead, x.shape[-1])  # (..., T)


def alignment_matrix(weights: torch.Tensor, *, frames: int, filter_width: int = 7) -> torch.Tensor:
    """(tokens, frames) alignment score from cross-attention ``weights`` (heads, tokens, audio frames) of the
    alignment heads: the first ``frames`` frames renormalised (each row's softmax over the frames that hold audio,
    not over Whisper's 30 s of padding), z-scored per head and frame over the tokens, median-filtered
    along time, averaged over the heads."""
    check_tensor("weights", weights, ndim=3)
    frames = check_int("frames", frames)
    if frames > weights.shape[-1]:
        raise ValueError(f"frames: expected at most the {weights.shape[-1]} encoder frames, got {frames}")
    w = weights[..., :frames].double()  # (heads, tokens, frames)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)  # the softmax over the frames that hold audio
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
    w = (w - mean) / std.clamp_min(1e-12)
    return median_filter(w, filter_width).mean(0)  # (tokens, frames)


def word_timings(matrix: torch.Tensor, words: list[tuple[str, list[int]]]) -> list[WordTiming]:
    """Word timings from an alignment ``matrix`` (tokens, frames) whose rows are the tokens of ``words`` in order
    ((text, token ids) per word)."""
    n_tok = sum(len(t) for _, t in words)
    if matrix.shape[0] != n_tok:
        raise ValueError(f"matrix: expected {n_tok} rows (the words' tokens), got {matrix.shape[0]}")
    rows, cols = dtw(-matrix)
    first = torch.full((n_tok,), -1, dtype=torch.long)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if first[r] < 0:
            first[r] = c
    last_frame = int(cols[-1])
    out, t = [], 0
    for w, (text, toks) in enumerate(words):
        start = int(first[t])
        t += len(toks)
        end = int(first[t]) if w + 1 < len(words) else last_frame + 1
        out.append(WordTiming(text, start * FRAME_SECONDS, end * FRAME_SECONDS, tuple(toks)))
    return out


def whisper_word_alignment(model, processor, audio: np.ndarray, text: str, *, mechanism: str = "softmax",
                           heads: list[tuple[int, int]] | None = None, filter_width: int = 7,
                           return_matrix: bool = False, **options: Any):
    """Word timings of ``text`` spoken in ``audio`` (16 kHz, at most 30 s) from Whisper's alignment heads
    (``model.config.alignment_heads`` unless ``heads`` = [(decoder layer, head), ...]), the decoder's attention
    running through ``mechanism`` (with ``options``). With ``return_matrix`` also the (tokens, frames) matrix."""
    from .capture import Analyzer

    if not isinstance(audio, np.ndarray) or audio.ndim != 1 or not 0 < len(audio) <= 30 * 16000:
        raise ValueError(f"audio: expected a 1-D array of at most 30 s at 16 kHz, got "
                         f"{getattr(audio, 'shape', type(audio).__name__)}")
    if not isinstance(text, str) or not text.split():
        raise ValueError(f"text: expected the transcript as a non-empty string, got {text!r}")
    heads = [tuple(h) for h in (heads if heads is not None else model.config.alignment_heads or [])]
    layers = model.model.decoder.layers
    bad = [h for h in heads if not (0 <= h[0] < len(layers) and 0 <= h[1] < model.config.decoder_attention_heads)]
    if not heads or bad:
        raise ValueError(f"heads: expected (layer, head) pairs inside {len(layers)} decoder layers x "
                         f"{model.config.decoder_attention_heads} heads, got {heads}")
    tok = processor.tokenizer
    words = [(w, tok(" " + w, add_special_tokens=False).input_ids) for w in text.split()]
    sot = [model.config.decoder_start_token_id, tok.convert_tokens_to_ids("<|notimestamps|>")]
    ids = torch.tensor([sot + [t for _, ts in words for t in ts] + [model.config.eos_token_id]])  # (1, T)
    feats = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    cross = {id(layer.encoder_attn): i for i, layer in enumerate(layers)}
    wanted = {}
    for layer, head in heads:
        wanted.setdefault(layer, []).append(head)
    got: dict[int, torch.Tensor] = {}

    def keep(call):
        layer = cross.get(id(call.module))
        if layer in wanted:
            got[layer] = call.weights()[0, wanted[layer]]  # (h, T, 1500)

    dtype = next(model.parameters()).dtype
    with torch.no_grad(), Analyzer(model, mechanism, hooks=[keep], **options):
        model(input_features=feats.to(dtype), decoder_input_ids=ids)
    # the row that predicts a text token is the input position before it (teacher forcing): the last prompt
    # token predicts the first text token, the last text token's own row predicts the end of text and is dropped
    n_text = ids.shape[1] - len(sot) - 1
    weights = torch.cat([got[layer] for layer in sorted(wanted)])[:, len(sot) - 1:len(sot) - 1 + n_text]
    frames = len(audio) // 320  # 20 ms per encoder frame
    matrix = alignment_matrix(weights, frames=frames, filter_width=filter_width)
    timings = word_timings(matrix, words)
    return (timings, matrix) if return_matrix else timings
