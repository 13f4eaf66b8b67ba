"""Quality tasks: generated sequence tasks, real English text and real 8x8 digits, all offline.

Every task yields ``(x, y)`` batches from a seeded ``torch.Generator`` and a fixed evaluation set (its own
seed, the same for every mechanism and training seed). Token tasks are laid out so that no target appears in
the input: the same data trains causal (decoder) and non-causal (encoder) models; targets are ``-100``
(ignored) except at the positions to predict.

- ``mqar``: multi-query associative recall (Zoology, arXiv 2312.04927): key-value pairs, then keys queried
  again at random later positions; predict each queried key's value. Varies pairs and length.
- ``selective_copy``: data tokens scattered among blanks; after a separator, output them in order
  (Mamba, arXiv 2312.00752, Sec. 3.1).
- ``passkey``: a 5-digit passkey hidden at a random position in repeating filler text, at least
  ``min_distance`` tokens before the question; recall it at the end (Landmark Attention, arXiv 2305.16300).
- ``icl_regression``: in-context linear regression (CATALOG P037): tokens [x_i, y_i] then query tokens
  [x_q, 0]; predict y_q. Reported as MSE / mean y_q^2, beside least squares on the same context.
- ``listops``: ListOps-style nested MAX/MIN/MED/SM expressions over digits (Nangia & Bowman 2018, LRA);
  classify the value (read out at a final CLS token).
- ``char_lm``: character (byte) language modelling on real English text that ships with an installed
  package: gensim's ``lee_background.cor`` when gensim is installed, else Python's ``pydoc_data.topics``;
  bits per character on a held-out tail. Causal mechanisms only.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images), for grid and channel mechanisms.
- ``skimage_patches``: grayscale 16x16 patches of ten of scikit-image's bundled sample photographs (astronaut,
  camera, coffee, ...); the class is the source image. Training crops come from the top 75% of each image, the
  fixed evaluation crops from the bottom 25% (disjoint pixels), so the task asks what a texture/structure looks
  like, not which crop was seen. A larger real-pixel task than digits (256 tokens, 10 classes), offline.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE = -100
EVAL_SEED = 12345


@dataclass
class Task:
    """Base class. ``input`` is "tokens" (long (B, L)), "vectors" (float (B, L, F)) or "image"
    (float (B, side, side) grayscale); ``output`` is "tokens" (per-position classes, y (B, L) with -100 ignored),
    "scalar" (per-position regression, y (B, L) with NaN ignored) or "class" (y (B,))."""

    config: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    input: str = "tokens"
    output: str = "tokens"
    metric: str = "accuracy"
    higher_is_better: bool = True
    needs_causal: bool = False
    readout: str = "last"  # for "class" outputs: "last" token or "mean" over tokens
    vocab: int = 0
    classes: int = 0
    features: int = 0
    seq_len: int = 0
    eval_size: int = 256
    side: int = 0  # image tasks: the side of the square images (seq_len = side * side pixels)

    def sample(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "_eval"):
            self._eval = self.sample(self.eval_size, torch.Generator().manual_seed(EVAL_SEED))
        return self._eval

    def score(self, out: torch.Tensor, y: torch.Tensor) -> float:
        """The task metric of model output ``out`` against targets ``y``."""
        if self.output == "scalar":
            keep = ~torch.isnan(y)
            err = ((out[keep] - y[keep]) ** 2).mean()
            return float(err / (y[keep] ** 2).mean())
        if self.output == "class":
            return float((out.argmax(-1) == y).float().mean())
        keep = y != IGNORE
        return float((out.argmax(-1)[keep] == y[keep]).float().mean())

    def baselines(self) -> dict[str, float]:
        """Reference points for the metric (chance, closed-form predictors)."""
        return {}

    def config_id(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.config.items()))


# --------------------------------------------------------------------------------------------------------
def _choose(batch: int, population: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(batch, k) distinct indices in [0, population) per row, random order."""
    return torch.argsort(torch.rand(batch, population, generator=g), dim=1)[:, :k]


class MQAR(Task):
    """Tokens: 0 blank, keys [1, V/2), values [V/2, V)."""

    def __init__(self, pairs: int = 4, seq_len: int = 32, vocab: int = 64, eval_size: int = 256):
        if vocab < 2 * (pairs + 1):
            raise ValueError(f"vocab: expected >= 2 * (pairs + 1) = {2 * (pairs + 1)}, got {vocab}")
        if seq_len < 2 * pairs + 1:
            raise ValueError(f"seq_len: expected >= 2 * pairs + 1 = {2 * pairs + 1}, got {seq_len}")
        super().__init__(config={"pairs": pairs, "seq_len": seq_len, "vocab": vocab}, name="mqar",
                         vocab=vocab, classes=vocab, seq_len=seq_len, eval_size=eval_size)
        self.pairs = pairs

    def sample(self, batch, g):
        P, L, V = self.pairs, self.seq_len, self.vocab
        half = V // 2
        keys = _choose(batch, half - 1, P, g) + 1  # (B, P) distinct keys in [1, half)
        values = torch.randint(half, V, (batch, P), generator=g)  # (B, P)
        x = torch.zeros(batch, L, dtype=torch.long)
        x[:, 0:2 * P:2], x[:, 1:2 * P:2] = keys, values
        region = L - 2 * P
        nq = min(P, region)
        pos = 2 * P + _choose(batch, region, nq, g)  # (B, Q) query positions
        which = _choose(batch, P, nq, g)  # (B, Q) queried pair
        rows = torch.arange(batch).unsqueeze(1)
        y = torch.full((batch, L), IGNORE, dtype=torch.long)
        x[rows, pos] = keys.gather(1, which)
        y[rows, pos] = values.gather(1, which)
        return x, y

    def baselines(self):
        return {"chance": 2.0 / self.vocab}


class SelectiveCopy(Task):
    """Tokens: 0 blank, 1 separator, 2 output marker, data [3, V)."""

    def __init__(self, seq_len: int = 64, tokens: int = 8, vocab: int = 16, eval_size: int = 256):
        if seq_len < 2 * tokens + 1:
            raise ValueError(f"seq_len: expected >= 2 * tokens + 1 = {2 * tokens + 1}, got {seq_len}")
        super().__init__(config={"seq_len": seq_len, "tokens": tokens, "vocab": vocab}, name="selective_copy",
                         vocab=vocab, classes=vocab, seq_len=seq_len, eval_size=eval_size)
        self.tokens = tokens

    def sample(self, batch, g):
        L, M, V = self.seq_len, self.tokens, self.vocab
        region = L - M - 1
        data = torch.randint(3, V, (batch, M), generator=g)  # (B, M)
        pos, _ = torch.sort(_choose(batch, region, M, g), dim=1)  # (B, M) in order
        x = torch.zeros(batch, L, dtype=torch.long)
        rows = torch.arange(batch).unsqueeze(1)
        x[rows, pos] = data
        x[:, region] = 1
        x[:, region + 1:] = 2
        y = torch.full((batch, L), IGNORE, dtype=torch.long)
        y[:, region + 1:] = data
        return x, y

    def baselines(self):
        return {"chance": 1.0 / (self.vocab - 3)}


class Passkey(Task):
    """Tokens: answers 0-9, filler 10..15 (a repeating sentence), 16 KEY marker, 17 QUERY marker, 18 + i the
    question for digit i, 18 + D + 10 i + d digit d written in slot i of the key.

    The key's digits carry their slot, and the question asks for each slot with its own token, so one
    attention layer that reaches the key can answer by content; what decides the task is whether the key is
    still visible. ``min_distance``: the KEY marker lies at least this many tokens before the first
    question (beyond a window or state shorter than that, the key is gone).
    """

    FILLER = (10, 11, 12, 13, 14, 15, 13, 11)

    def __init__(self, seq_len: int = 128, digits: int = 5, min_distance: int = 0, eval_size: int = 256):
        if seq_len < 2 * digits + 4:
            raise ValueError(f"seq_len: expected >= 2 * digits + 4 = {2 * digits + 4}, got {seq_len}")
        if not 0 <= min_distance <= seq_len - digits - 1:
            raise ValueError(f"min_distance: expected 0 <= min_distance <= seq_len - digits - 1 = "
                             f"{seq_len - digits - 1}, got {min_distance}")
        vocab = 18 + digits + 10 * digits
        super().__init__(config={"seq_len": seq_len, "digits": digits, "min_distance": min_distance},
                         name="passkey", vocab=vocab, classes=vocab, seq_len=seq_len, eval_size=eval_size)
        self.digits, self.min_distance = digits, min_distance

    def sample(self, batch, g):
        L, D = self.seq_len, self.digits
        filler = torch.tensor(self.FILLER)
        phase = torch.randint(0, len(self.FILLER), (batch, 1), generator=g)
        idx = (torch.arange(L).unsqueeze(0) + phase) % len(self.FILLER)
        x = filler[idx]  # (B, L) repeating filler
        key = torch.randint(0, 10, (batch, D), generator=g)  # (B, D)
        # KEY marker at start: its digits end before the QUERY marker (L - D - 1) and the first question
        # (L - D) is at least min_distance tokens after it
        hi = min(L - 2 * D - 1, L - D - self.min_distance + 1)
        start = torch.randint(0, hi, (batch,), generator=g)  # (B,)
        rows = torch.arange(batch).unsqueeze(1)
        slots = torch.arange(D)
        x[torch.arange(batch), start] = 16
        x[rows, start.unsqueeze(1) + 1 + slots] = 18 + D + 10 * slots + key  # slot-tagged digits
        x[:, L - D - 1] = 17
        x[:, L - D:] = 18 + slots  # the question for each slot
        y = torch.full((batch, L), IGNORE, dtype=torch.long)
        y[:, L - D:] = key
        return x, y

    def baselines(self):
        return {"chance": 0.1}


class ICLRegression(Task):
    """Token features [x (dim), y, is_query]; targets y_q at query positions (NaN elsewhere)."""

    def __init__(self, dim: int = 4, pairs: int = 24, queries: int = 4, noise: float = 0.1, eval_size: int = 512):
        super().__init__(config={"dim": dim, "pairs": pairs, "queries": queries, "noise": noise},
                         name="icl_regression", input="vectors", output="scalar", metric="nmse",
                         higher_is_better=False, features=dim + 2, seq_len=pairs + queries, eval_size=eval_size)
        self.dim, self.pairs, self.queries, self.noise = dim, pairs, queries, noise

    def _draw(self, batch, g):
        d, N, Q = self.dim, self.pairs, self.queries
        w = torch.randn(batch, d, generator=g) / math.sqrt(d)  # (B, d), E[y^2] = 1
        xs = torch.randn(batch, N + Q, d, generator=g)  # (B, N+Q, d)
        ys = torch.einsum("bnd,bd->bn", xs, w) + self.noise * torch.randn(batch, N + Q, generator=g)
        return xs, ys

    def sample(self, batch, g):
        N = self.pairs
        xs, ys = self._draw(batch, g)
        feats = torch.zeros(batch, N + self.queries, self.dim + 2)
        feats[:, :, : self.dim] = xs
        feats[:, :N, self.dim] = ys[:, :N]
        feats[:, N:, self.dim + 1] = 1.0
        y = torch.full((batch, N + self.queries), float("nan"))
        y[:, N:] = ys[:, N:]
        return feats, y

    def baselines(self):
        """Least squares (minimum-norm) on each eval prompt's context; 1.0 is the zero predictor."""
        x, y = self.eval_set()
        N, d = self.pairs, self.dim
        X, Y = x[:, :N, :d].double(), x[:, :N, d].double()  # (B, N, d), (B, N)
        w = torch.linalg.pinv(X) @ Y.unsqueeze(-1)  # (B, d, 1)
        pred = (x[:, N:, :d].double() @ w).squeeze(-1)  # (B, Q)
        yq = y[:, N:].double()
        return {"least_squares": float(((pred - yq) ** 2).mean() / (yq ** 2).mean()), "zero": 1.0}


class ListOps(Task):
    """Tokens: digits 0-9, 10 [MAX, 11 [MIN, 12 [MED, 13 [SM, 14 ], 15 PAD, 16 CLS; class = the value."""

    OPS = {10: max, 11: min, 12: statistics.median_low, 13: lambda a: sum(a) % 10}

    def __init__(self, max_len: int = 64, max_depth: int = 3, max_args: int = 4, eval_size: int = 512):
        super().__init__(config={"max_len": max_len, "max_depth": max_depth, "max_args": max_args},
                         name="listops", output="class", vocab=17, classes=10, seq_len=max_len,
                         eval_size=eval_size)
        self.max_depth, self.max_args = max_depth, max_args

    def _expr(self, depth: int, g: torch.Generator, top: bool = False) -> tuple[list[int], int]:
        r = torch.rand(1, generator=g).item()
        if depth == 0 or (not top and r < 0.3):
            d = int(torch.randint(0, 10, (1,), generator=g))
            return [d], d
        op = int(torch.randint(10, 14, (1,), generator=g))
        k = int(torch.randint(2, self.max_args + 1, (1,), generator=g))
        toks, vals = [op], []
        for _ in range(k):
            t, v = self._expr(depth - 1, g)
            toks += t
            vals.append(v)
        return toks + [14], int(self.OPS[op](vals))

    def sample(self, batch, g):
        L = self.seq_len
        x = torch.full((batch, L), 15, dtype=torch.long)
        y = torch.empty(batch, dtype=torch.long)
        for b in range(batch):
            while True:
                toks, val = self._expr(self.max_depth, g, top=True)
                if len(toks) <= L - 1:
                    break
            x[b, L - 1 - len(toks): L - 1] = torch.tensor(toks)
            x[b, L - 1] = 16
            y[b] = val
        return x, y

    def baselines(self):
        _, y = self.eval_set()
        return {"majority": float(torch.bincount(y, minlength=10).max() / len(y))}


def _package_file(package: str, *parts: str) -> str | None:
    """Path of a data file shipped inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    return path if os.path.exists(path) else None


def english_text() -> tuple[str, str]:
    """(text, source): gensim's Lee background corpus (``gensim.test.utils.datapath('lee_background.cor')``)
    if gensim is installed, else Python's own ``pydoc_data.topics`` (always there)."""
    path = _package_file("gensim", "test", "test_data", "lee_background.cor")
    if path is None:
        try:
            from gensim.test.utils import datapath

            path = datapath("lee_background.cor")
        except Exception:  # noqa: BLE001 - gensim missing or broken: the stdlib corpus below
            path = None
    if path is not None and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(), "gensim lee_background.cor"
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"


def load_digits_arrays():
    """scikit-learn's bundled 8x8 digits as (images (1797, 8, 8) float in [0, 16], labels (1797,)).

    Reads the CSV that ``sklearn.datasets.load_digits`` reads, without importing scikit-learn (seconds per
    worker process); falls back to ``load_digits()`` if the file is not where it usually is."""
    import numpy as np

    path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    if path is not None:
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits task needs scikit-learn (pip install scikit-learn); "
                          "it reads its bundled 8x8 digits, no download") from e
    d = load_digits()
    return d.images, d.target


class CharLM(Task):
    """Bytes of English text; train on the first 90%, bits per character on windows of the last 10%."""

    def __init__(self, seq_len: int = 128, eval_windows: int = 64, source: str | None = None):
        text, src = english_text() if source is None else (source, "given")
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        split = int(0.9 * len(data))
        super().__init__(config={"seq_len": seq_len, "corpus": src}, name="char_lm", metric="bits_per_char",
                         higher_is_better=False, needs_causal=True, vocab=256, classes=256, seq_len=seq_len,
                         eval_size=eval_windows)
        self.train_data, self.held_out = data[:split], data[split:]
        self.corpus_chars = len(data)

    def sample(self, batch, g):
        start = torch.randint(0, len(self.train_data) - self.seq_len - 1, (batch,), generator=g)
        idx = start.unsqueeze(1) + torch.arange(self.seq_len + 1)
        w = self.train_data[idx]  # (B, L+1)
        return w[:, :-1], w[:, 1:]

    def eval_set(self):
        if not hasattr(self, "_eval"):
            L = self.seq_len
            n = min(self.eval_size, (len(self.held_out) - 1) // L)
            w = torch.stack([self.held_out[i * L: i * L + L + 1] for i in range(n)])  # (n, L+1)
            self._eval = (w[:, :-1], w[:, 1:])
        return self._eval

    def score(self, out, y):
        ce = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
        return float(ce / math.log(2))

    def baselines(self):
        counts = torch.bincount(self.train_data, minlength=256).double() + 1e-9
        p = counts / counts.sum()
        _, y = self.eval_set()
        return {"unigram_bpc": float(-(p[y.reshape(-1)].log2()).mean())}


class Digits(Task):
    """scikit-learn's 8x8 digits, pixel values / 16; a fixed 80/20 split."""

    def __init__(self):
        images, labels = load_digits_arrays()
        x = torch.tensor(images, dtype=torch.float32) / 16.0  # (1797, 8, 8)
        y = torch.tensor(labels, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(y))
        super().__init__(config={"images": len(y), "split": "80/20"}, name="digits", input="image", output="class",
                         readout="mean", classes=10, seq_len=64, eval_size=len(y) - cut, side=8)
        self.train = (x[perm[:cut]], y[perm[:cut]])
        self.test = (x[perm[cut:]], y[perm[cut:]])

    def sample(self, batch, g):
        i = torch.randint(0, len(self.train[1]), (batch,), generator=g)
        return self.train[0][i], self.train[1][i]

    def eval_set(self):
        return self.test

    def baselines(self):
        return {"chance": 0.1}


SKIMAGE_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "brick", "grass", "gravel")
"""The sample photographs of ``skimage_patches``: bundled with scikit-image (no download), all at least 300 px."""


def load_skimage_gray(names=SKIMAGE_IMAGES) -> list[torch.Tensor]:
    """scikit-image's bundled sample images as grayscale float tensors (H, W) in [0, 1] (RGB -> luminance with
    skimage's rgb2gray weights 0.2125, 0.7154, 0.0721)."""
    try:
        import skimage.data as skdata
    except ImportError as e:
        raise ImportError("the skimage_patches task needs scikit-image (pip install scikit-image); it reads its "
                          "bundled sample images, no download") from e
    out = []
    for name in names:
        a = torch.as_tensor(getattr(skdata, name)())
        a = a.float() / 255.0 if a.dtype == torch.uint8 else a.float()
        if a.dim() == 3:
            a = (a[..., :3] * torch.tensor([0.2125, 0.7154, 0.0721])).sum(-1)
        out.append(a)  # (H, W)
    return out


class SkimagePatches(Task):
    """Grayscale ``patch`` x ``patch`` crops of scikit-image's sample photographs; label = source image.

    Training crops are drawn at random positions inside the top ``1 - test_fraction`` of every image, the
    evaluation set is a fixed set of crops (``eval_size``, balanced over the images) inside the bottom part, so
    train and evaluation pixels are disjoint. Pixels are standardised with the training regions' mean and std.
    """

    def __init__(self, patch: int = 16, eval_size: int = 1000, test_fraction: float = 0.25):
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction: expected a float in (0, 1), got {test_fraction!r}")
        images = load_skimage_gray()
        super().__init__(config={"patch": patch, "images": len(images), "test_fraction": test_fraction},
                         name="skimage_patches", input="image", output="class", readout="mean",
                         classes=len(images), seq_len=patch * patch, eval_size=eval_size, side=patch)
        self.train_parts, self.test_parts = [], []
        for img in images:
            cut = int(round(img.shape[0] * (1 - test_fraction)))
            if cut < patch or img.shape[0] - cut < patch or img.shape[1] < patch:
                raise ValueError(f"patch: {patch} px crops do not fit the train/test parts of a {tuple(img.shape)} "
                                 "image")
            self.train_parts.append(img[:cut])
            self.test_parts.append(img[cut:])
        train_pixels = torch.cat([t.reshape(-1) for t in self.train_parts])
        self.mean, self.std = float(train_pixels.mean()), float(train_pixels.std())

    def _crops(self, parts: list[torch.Tensor], labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        p = self.side
        out = torch.empty(len(labels), p, p)
        for i, c in enumerate(labels.tolist()):
            img = parts[c]
            r = int(torch.randint(0, img.shape[0] - p + 1, (1,), generator=g))
            col = int(torch.randint(0, img.shape[1] - p + 1, (1,), generator=g))
            out[i] = img[r:r + p, col:col + p]
        return (out - self.mean) / self.std  # (B, p, p)

    def sample(self, batch, g):
        y = torch.randint(0, self.classes, (batch,), generator=g)
        return self._crops(self.train_parts, y, g), y

    def eval_set(self):
        if not hasattr(self, "_eval"):
            g = torch.Generator().manual_seed(EVAL_SEED)
            y = torch.arange(self.eval_size) % self.classes  # balanced
            self._eval = (self._crops(self.test_parts, y, g), y)
        return self._eval

    def baselines(self):
        return {"chance": 1.0 / self.classes}


TASKS: dict[str, type[Task]] = {
    "mqar": MQAR, "selective_copy": SelectiveCopy, "passkey": Passkey, "icl_regression": ICLRegression,
    "listops": ListOps, "char_lm": CharLM, "digits": Digits, "skimage_patches": SkimagePatches,
}

def make_task(name: str, config: dict[str, Any]) -> Task:
    if name not in TASKS:
        raise ValueError(f"task: unknown {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](**config)
