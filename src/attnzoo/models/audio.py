"""Speech I/O for the audio models: WAV reading, band-limited resampling (numpy/torch, no audio library), speech
synthesis with the espeak-ng program, and word error rate.

espeak-ng is a Debian package (``apt-get install espeak-ng``; ``scripts/install_espeak.sh`` installs it for the
tests); :func:`synthesize` raises a FileNotFoundError naming the package when it is missing.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch

from ..errors import check_int


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(samples float32 in [-1, 1), sample rate) of a mono PCM WAV file (8, 16 or 32-bit)."""
    with wave.open(str(path), "rb") as w:
        channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if channels != 1:
        raise ValueError(f"{path}: expected a mono WAV file, got {channels} channels (mix them down first)")
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        dt = np.dtype("<i2" if width == 2 else "<i4")
        x = np.frombuffer(raw, dtype=dt).astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise ValueError(f"{path}: expected 8, 16 or 32-bit PCM samples, got {8 * width}-bit")
    return x, rate


def resample(x: np.ndarray | torch.Tensor, orig_rate: int, new_rate: int, *, zero_crossings: int = 24,
             rolloff: float = 0.95, beta: float = 8.6) -> np.ndarray:
    """Band-limited resampling of a 1-D signal from ``orig_rate`` to ``new_rate`` Hz (float32 numpy array).

    Windowed-sinc interpolation: output sample m sits at input time t = m * orig / new and is the sum over input
    samples k of x[k] h(t - k), with h a sinc low-pass at ``rolloff`` times the lower Nyquist frequency (an
    anti-aliasing filter when downsampling), Kaiser-windowed (``beta``) over ``zero_crossings`` zero crossings on
    each side. Samples beyond the ends count as zeros.
    """
    orig_rate, new_rate = check_int("orig_rate", orig_rate), check_int("new_rate", new_rate)
    sig = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if sig.dim() != 1:
        raise ValueError(f"x: expected a 1-D signal, got shape {tuple(sig.shape)}")
    if orig_rate == new_rate:
        return sig.to(torch.float32).numpy()
    fc = rolloff * min(1.0, new_rate / orig_rate)  # cutoff, in cycles per input sample x 2
    half = math.ceil(zero_crossings / fc)  # taps on each side of the output time
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g  # output m sits at input time m * down / up
    n_out = math.ceil(sig.numel() * new_rate / orig_rate)
    m = torch.arange(n_out, dtype=torch.long)
    base, phase = (m * down) // up, (m * down) % up  # (M,): floor of the time, and its fraction x up
    offs = torch.arange(-half + 1, half + 1)  # (taps,)
    # The filter depends on the fraction only: one row per phase (up rows), or per output when there are fewer.
    rows = torch.arange(up) if up <= n_out else phase
    u = rows.to(torch.float64).view(-1, 1) / up - offs.to(torch.float64).view(1, -1)  # (P, taps) distances
    window = torch.special.i0(beta * torch.sqrt(torch.clamp(1 - (u / half) ** 2, min=0.0))) / torch.special.i0(
        torch.tensor(beta, dtype=torch.float64))
    table = fc * torch.sinc(fc * u) * window  # (P, taps)
    h = table[phase] if up <= n_out else table  # (M, taps)
    idx = base.view(-1, 1) + offs.view(1, -1)  # (M, taps) input sample indices
    valid = (idx >= 0) & (idx < sig.numel())
    vals = sig[idx.clamp(0, sig.numel() - 1)] * valid  # (M, taps)
    return (vals * h).sum(dim=1).to(torch.float32).numpy()


def synthesize(text: str, *, voice: str = "en-us", words_per_minute: int = 150, rate: int = 16000) -> np.ndarray:
    """Speech for ``text`` from espeak-ng, resampled to ``rate`` Hz: float32 samples in [-1, 1)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed: apt-get install espeak-ng (or scripts/install_espeak.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "-w", str(path), text], check=True,
                       capture_output=True)
        x, sr = read_wav(path)
    return resample(x, sr, rate)


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation (apostrophes inside words kept): the units of :func:`word_error_rate`."""
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def word_error_rate(hypothesis: str, reference: str) -> tuple[float, int, int]:
    """(word error rate, word edits, reference words): the Levenshtein distance between the normalized word
    sequences (substitutions, insertions and deletions count 1) over the reference length."""
    hyp, ref = normalize_words(hypothesis), normalize_words(reference)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    edits = prev[-1]
    return (edits / len(ref) if ref else float(edits > 0)), edits, len(ref)
