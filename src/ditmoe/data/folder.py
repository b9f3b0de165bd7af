"""Image folders with one subfolder per class, checked before training starts.

Everything that can be wrong with a folder (missing, empty, no class subfolders, no images,
corrupt files, images too small) is found when the dataset is built, so a run never dies in
epoch 3 on a truncated JPEG.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import center_crop_arr, uint8_to_tensor

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VERIFY_MODES = ("fast", "full", "none")
LAYOUT_HINT = "Expected layout: <root>/<class_name>/<image>.png, one subfolder per class."


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """List (path, class index) pairs and the class names; class index = rank of the sorted name.

    Images are found at any depth below a class subfolder. Raises FileNotFoundError or ValueError
    with the fix when the folder cannot be a dataset.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Image folder '{root}' does not exist. {LAYOUT_HINT}")
    if not root.is_dir():
        raise NotADirectoryError(
            f"'{root}' is a file, not an image folder. {LAYOUT_HINT} "
            "(A latent cache must be a .safetensors file made by `extract_latents`.)"
        )
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    if not entries:
        raise ValueError(f"Image folder '{root}' is empty. {LAYOUT_HINT}")
    class_names = sorted(e.name for e in entries if e.is_dir())
    loose = sorted(e.name for e in entries if e.is_file() and is_image_file(e.name))
    if not class_names:
        what = f"{len(loose)} image(s) directly inside it (e.g. '{loose[0]}')" if loose else "no subfolders"
        raise ValueError(
            f"Image folder '{root}' has {what} but no class subfolders. {LAYOUT_HINT} "
            "Move the images into one subfolder per class; for unlabelled images use a single "
            f"subfolder, e.g. '{root / 'all'}'."
        )
    if loose:
        log.warning("ignoring %d image(s) directly inside %s: only class subfolders are read", len(loose), root)

    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, name in enumerate(class_names):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
        if not found:
            empty.append(name)
        samples.extend((p, label) for p in found)
    if not samples:
        raise ValueError(
            f"Image folder '{root}' has {len(class_names)} class subfolder(s) ({_preview(class_names)}) but no "
            f"images in any of them. Supported extensions: {', '.join(IMG_EXTENSIONS)}. {LAYOUT_HINT}"
        )
    if empty:
        # Kept (labels stay = rank of the sorted subfolder name), but most likely a mistake.
        log.warning("%d class folder(s) under %s hold no images: %s", len(empty), root, _preview(empty))
    return samples, class_names


def _preview(names: list[str], k: int = 5) -> str:
    s = ", ".join(repr(n) for n in names[:k])
    return s + (f", ... ({len(names)} in all)" if len(names) > k else "")


@dataclass
class _Check:
    ok: bool
    size: tuple[int, int] | None = None
    error: str | None = None


def _check_image(path: str, mode: str) -> _Check:
    try:
        with Image.open(path) as im:
            size = im.size  # from the header; no decode
            if mode == "fast":
                im.verify()  # structure / checksums without decoding pixels
            elif mode == "full":
                im.load()  # full decode: also catches truncated JPEG data
        return _Check(True, size)
    except Exception as e:  # PIL raises many types for bad files
        return _Check(False, None, f"{type(e).__name__}: {e}")


class ImageFolderDataset(Dataset):
    """Class-subfolder image dataset with ADM center crop; items are (float32 (C, H, W) in [-1, 1], int64).

    Args:
        root: folder with one subfolder per class (class index = rank of sorted subfolder name).
        image_size: output height = width.
        flip: random horizontal flip with probability 0.5 (uses torch's RNG).
        allow_upscale: upscale images whose short side is below ``image_size`` instead of raising.
        verify: "fast" (PIL ``verify()``, cheap), "full" (decode every image once) or "none".
            Bad files are skipped and listed in ``self.skipped``.
        channels: 3 (RGB) or 1 (grayscale).
        num_threads: threads for the verification pass (file reads overlap).
        progress: show a progress bar for the verification pass of large folders.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        flip: bool = True,
        allow_upscale: bool = False,
        verify: str = "fast",
        channels: int = 3,
        num_threads: int = 8,
        progress: bool = True,
    ):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.flip = flip
        self.channels = channels
        self.allow_upscale = allow_upscale
        found, self.class_names = scan_image_folder(self.root)

        checks = self._check_all([p for p, _ in found], verify, num_threads, progress)
        self.skipped: list[str] = []
        self.skip_reasons: dict[str, str] = {}
        self.samples: list[tuple[str, int]] = []
        small: list[tuple[str, tuple[int, int]]] = []
        for (path, label), c in zip(found, checks):
            if not c.ok:
                self.skipped.append(path)
                self.skip_reasons[path] = c.error or "unreadable"
                continue
            if c.size is not None and min(c.size) < image_size:
                small.append((path, c.size))
            self.samples.append((path, label))
        if self.skipped:
            log.warning(
                "skipped %d unreadable image file(s) of %d under %s, e.g. %s (%s)",
                len(self.skipped), len(found), self.root, self.skipped[0], self.skip_reasons[self.skipped[0]],
            )
        if not self.samples:
            raise ValueError(
                f"All {len(found)} image file(s) under '{self.root}' are unreadable (corrupt or not images), "
                f"e.g. '{self.skipped[0]}'. Replace them with valid {', '.join(IMG_EXTENSIONS)} files."
            )
        if small and not allow_upscale:
            p, (w, h) = small[0]
            smallest = min(min(size) for _, size in small)
            raise ValueError(
                f"{len(small)} of {len(self.samples)} images under '{self.root}' are smaller than the model "
                f"input {image_size}x{image_size} (short side < {image_size}), e.g. '{p}' is {w}x{h}; the "
                f"smallest short side is {smallest}. Train at a size of at most {smallest} (ditmoe train: "
                f"--model-input-size N, a multiple of the patch size; ditmoe extract-latents: --image-size N), "
                "remove the small images, or upscale them (bicubic): ditmoe train --allow-upscale true, ditmoe "
                "extract-latents --allow-upscale, allow_upscale=True in the Python API (ImageFolderDataset, "
                "build_dataset, extract_latents)."
            )
        if small:
            log.info("%d image(s) under %s will be upscaled to %d", len(small), self.root, image_size)
        self.num_upscaled = len(small)
        self.targets = [label for _, label in self.samples]

    @staticmethod
    def _check_all(paths: list[str], mode: str, num_threads: int, progress: bool) -> list[_Check]:
        if mode == "none":
            return [_Check(True) for _ in paths]
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            it = pool.map(lambda p: _check_image(p, mode), paths, chunksize=64)
            if progress and len(paths) >= 2000:
                from tqdm.auto import tqdm

                it = tqdm(it, total=len(paths), desc="checking images", unit="img")
            return list(it)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image i cropped and scaled, without flip; raises if the file cannot be decoded."""
        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("RGB" if self.channels == 3 else "L")
        arr = np.asarray(center_crop_arr(im, self.image_size))
        return uint8_to_tensor(arr), torch.tensor(label, dtype=torch.int64)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A file that passed the cheap check can still fail to decode (truncated JPEG data): log it
        # and serve the next image rather than kill a long run.
        n = len(self.samples)
        for k in range(min(n, 16)):
            j = (i + k) % n
            try:
                x, y = self.load(j)
                break
            except Exception as e:
                log.warning("failed to decode %s (%s: %s); serving another image", self.samples[j][0], type(e).__name__, e)
        else:
            raise RuntimeError(f"16 consecutive images from index {i} under '{self.root}' failed to decode")
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, y


__all__ = ["ImageFolderDataset", "scan_image_folder", "IMG_EXTENSIONS", "is_image_file"]
