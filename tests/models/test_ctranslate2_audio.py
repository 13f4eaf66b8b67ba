"""The CTranslate2 model.bin reader on files written here from the format's description (header, every dtype,
scalars, aliases, errors), and the speech helpers: resampling against analytic sines (accuracy, anti-aliasing,
against scipy's polyphase resampler), WAV reading, word error rate by hand."""

import struct
import wave

import numpy as np
import pytest
import torch

from attnzoo.models.audio import normalize_words, read_wav, resample, word_error_rate
from attnzoo.models.ctranslate2 import read_ctranslate2


def _string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def write_ct2(path, variables, aliases=(), version=6, spec="TestSpec", revision=2):
    """CTranslate2's ModelSpec._serialize layout, written out from its description."""
    ids = {np.float32: 0, np.int8: 1, np.int16: 2, np.int32: 3, np.float16: 4}
    out = struct.pack("<I", version) + _string(spec) + struct.pack("<I", revision) + struct.pack("<I", len(variables))
    for name, arr in variables:
        if isinstance(arr, torch.Tensor):  # bfloat16: the upper 16 bits of float32
            raw, dims, tid = (arr.float().numpy().view(np.uint32) >> 16).astype("<u2").tobytes(), arr.shape, 5
        else:
            raw, dims, tid = arr.astype(arr.dtype.newbyteorder("<")).tobytes(), arr.shape, ids[arr.dtype.type]
        out += _string(name) + struct.pack("<B", len(dims)) + b"".join(struct.pack("<I", d) for d in dims)
        out += struct.pack("<B", tid) + struct.pack("<I", len(raw)) + raw
    out += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases)
    path.write_bytes(out)
    return path


def test_reader_round_trips_every_dtype_scalars_and_aliases(tmp_path):
    g = np.random.default_rng(0)
    w16 = g.standard_normal((5, 3)).astype(np.float16)
    variables = [("a/weight", w16), ("a/bias", g.standard_normal(5).astype(np.float32)),
                 ("a/num_heads", np.array(6, dtype=np.int16)), ("a/flag", np.array(1, dtype=np.int8)),
                 ("a/ids", np.arange(4, dtype=np.int32)), ("b/bf", torch.tensor([1.5, -2.25, 3.0]).bfloat16())]
    m = read_ctranslate2(write_ct2(tmp_path / "model.bin", variables, aliases=[("b/tied", "a/weight")]))
    assert (m.binary_version, m.spec, m.revision) == (6, "TestSpec", 2)
    assert m["a/weight"].dtype == torch.float16 and torch.equal(m["a/weight"], torch.from_numpy(w16))
    assert m["a/bias"].dtype == torch.float32 and m.scalar("a/num_heads") == 6 and m.scalar("a/flag") == 1
    assert m["a/ids"].tolist() == [0, 1, 2, 3] and m["b/bf"].tolist() == [1.5, -2.25, 3.0]
    assert m["b/tied"] is m["a/weight"] and "b/tied" in m and m.aliases == {"b/tied": "a/weight"}
    assert read_ctranslate2(tmp_path).spec == "TestSpec"  # a directory holding model.bin


def test_reader_errors(tmp_path):
    ok = write_ct2(tmp_path / "ok.bin", [("x", np.zeros(3, np.float32))]).read_bytes()
    (tmp_path / "cut.bin").write_bytes(ok[:-6])
    with pytest.raises(ValueError, match="truncated CTranslate2 model"):
        read_ctranslate2(tmp_path / "cut.bin")
    (tmp_path / "tail.bin").write_bytes(ok + b"\0\0")
    with pytest.raises(ValueError, match="bytes after the last alias"):
        read_ctranslate2(tmp_path / "tail.bin")
    with pytest.raises(ValueError, match="binary version 5"):
        read_ctranslate2(write_ct2(tmp_path / "v5.bin", [], version=5))
    with pytest.raises(ValueError, match="alias 'y' points to a missing variable"):
        read_ctranslate2(write_ct2(tmp_path / "alias.bin", [("x", np.zeros(1, np.float32))], aliases=[("y", "z")]))
    m = read_ctranslate2(tmp_path / "ok.bin")
    with pytest.raises(KeyError, match="no such variable"):
        m["nope"]


def _sines(t, freqs):
    return sum(np.sin(2 * np.pi * f * t + i) for i, f in enumerate(freqs))


@pytest.mark.parametrize("orig,new", [(22050, 16000), (16000, 22050), (48000, 16000), (8000, 16000)])
def test_resample_reproduces_band_limited_signals(orig, new):
    freqs = [220.0, 1300.0, 3100.0]
    x = _sines(np.arange(orig) / orig, freqs)
    y = resample(x, orig, new)
    assert y.dtype == np.float32 and len(y) == int(np.ceil(orig * new / orig))
    want = _sines(np.arange(len(y)) / new, freqs)
    edge = new // 20  # the signal is zero beyond its ends
    assert np.abs(y - want)[edge:-edge].max() < 2e-4


def test_resample_removes_what_the_new_rate_cannot_hold_and_agrees_with_scipy():
    sr = 22050
    t = np.arange(sr) / sr
    aliased = resample(np.sin(2 * np.pi * 10000 * t), sr, 16000)  # above the new Nyquist frequency (8 kHz)
    assert np.abs(aliased[800:-800]).max() < 1e-3  # > 60 dB down
    scipy_signal = pytest.importorskip("scipy.signal")
    x = _sines(t, [440.0, 2500.0])
    theirs = scipy_signal.resample_poly(x, 320, 441)  # 22050 * 320 / 441 = 16000
    ours = resample(x, sr, 16000)
    assert np.abs(ours - theirs[: len(ours)])[800:-800].max() < 3e-3
    with pytest.raises(ValueError, match="x: expected a 1-D signal"):
        resample(np.zeros((2, 5)), sr, 16000)
    with pytest.raises(ValueError, match="new_rate: expected an int"):
        resample(x, sr, 0)


def test_read_wav(tmp_path):
    x = (np.sin(np.arange(100) / 5) * 20000).astype("<i2")
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(22050), w.writeframes(x.tobytes())
    y, sr = read_wav(tmp_path / "a.wav")
    assert sr == 22050 and np.allclose(y, x / 32768.0)
    with wave.open(str(tmp_path / "b.wav"), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(8000), w.writeframes(np.zeros(8, "<i2").tobytes())
    with pytest.raises(ValueError, match="expected a mono WAV file, got 2 channels"):
        read_wav(tmp_path / "b.wav")


def test_word_error_rate_by_hand():
    assert normalize_words("Hello, World! It's  fine-tuned.") == ["hello", "world", "it's", "fine", "tuned"]
    assert word_error_rate("the cat sat", "The cat sat.") == (0.0, 0, 3)
    assert word_error_rate("the bat sat down", "the cat sat") == (2 / 3, 2, 3)  # one substitution, one insertion
    assert word_error_rate("cat", "the cat sat") == (2 / 3, 2, 3)  # two deletions
    assert word_error_rate("", "") == (0.0, 0, 0)
