"""Datasets for the examples, benchmarks and notebooks: offline by default.

Everything here ships with an installed package (scikit-learn's digits, the standard library's
``pydoc_data.topics`` text) or is synthetic. The notebooks may fetch larger real datasets
(CIFAR-10, Shakespeare) through :func:`cifar10` and :func:`shakespeare`, which return ``None`` when
offline so the caller can fall back to the bundled data.
"""

from __future__ import annotations

import dataclasses
import urllib.request

import numpy as np

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# ------------------------------------------------------------------------------------ images


def digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 8x8 handwritten digits as ``(x_train, y_train, x_test, y_test)``.

    Images are ``(N, 8, 8, 1)`` float32 scaled to [0, 1], labels int32 in 0..9; a fixed random split.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def pixel_digits(test_fraction: float = 0.25, seed: int = 0):
    """Digits read pixel by pixel: sequences ``(N, 64, 1)``; a long-range task for an RNN."""
    x_train, y_train, x_test, y_test = digits(test_fraction, seed)
    return x_train.reshape(-1, 64, 1), y_train, x_test.reshape(-1, 64, 1), y_test


def cifar10(max_train: int | None = None):
    """CIFAR-10 via ``tensorflow_datasets`` (present on Colab), or ``None`` when unavailable/offline."""
    try:
        import tensorflow_datasets as tfds

        train, test = tfds.as_numpy(tfds.load("cifar10", split=["train", "test"], batch_size=-1))
    except Exception:  # no package, no network: the caller falls back to digits
        return None
    x_train = (train["image"] / 255.0).astype(np.float32)[:max_train]
    y_train = train["label"].astype(np.int32)[:max_train]
    return x_train, y_train, (test["image"] / 255.0).astype(np.float32), test["label"].astype(np.int32)


# -------------------------------------------------------------------------------------- text


def bundled_text() -> str:
    """About 460k characters of Python documentation from the standard library (always offline)."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def shakespeare(timeout: float = 10.0) -> str | None:
    """Tiny Shakespeare (1.1M characters) when online, else ``None``."""
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=timeout) as response:
            return response.read().decode("utf-8")
    except Exception:
        return None


@dataclasses.dataclass
class CharCorpus:
    """A character-level corpus split 90/10 into training and validation token arrays."""

    vocab: str
    train: np.ndarray
    val: np.ndarray

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1) -> CharCorpus:
        vocab = "".join(sorted(set(text)))
        lookup = {c: i for i, c in enumerate(vocab)}
        tokens = np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
        split = int(len(tokens) * (1 - val_fraction))
        return cls(vocab, tokens[:split], tokens[split:])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def batch(self, rng: np.random.Generator, batch_size: int, seq_len: int, split: str = "train"):
        """Random windows: inputs ``(batch, seq_len)`` and next-character targets of the same shape."""
        tokens = self.train if split == "train" else self.val
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
        windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
        return windows[:, :-1], windows[:, 1:]

    def decode(self, tokens) -> str:
        return "".join(self.vocab[int(t)] for t in tokens)


def char_corpus(online: bool = False) -> tuple[CharCorpus, str]:
    """``(corpus, name)``: Shakespeare when ``online`` and reachable, else the bundled text."""
    text = shakespeare() if online else None
    if text is not None:
        return CharCorpus.from_text(text), "tiny-shakespeare"
    return CharCorpus.from_text(bundled_text()), "pydoc_data.topics"


# --------------------------------------------------------------------------------- synthetic


def adding_task(rng: np.random.Generator, batch_size: int, length: int):
    """The adding problem: ``(x, y)`` with ``x (batch, length, 2)``.

    Channel 0 holds uniform random numbers, channel 1 marks two positions (one in each half of the
    sequence); the target is the sum of the two marked numbers. Predicting the constant 1 scores a
    mean squared error of about 0.167; solving it needs memory across the whole sequence.
    """
    values = rng.uniform(size=(batch_size, length)).astype(np.float32)
    marks = np.zeros((batch_size, length), np.float32)
    half = length // 2
    first = rng.integers(0, half, size=batch_size)
    second = rng.integers(half, length, size=batch_size)
    rows = np.arange(batch_size)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    y = values[rows, first] + values[rows, second]
    return np.stack([values, marks], axis=-1), y.astype(np.float32)
