"""Reference statistics for any image data: built-in sets by name, or an image folder.

- `load_reference_images(data, image_size, max_images)`: "mnist" (the 10k MNIST test images,
  padded to 32 px as the models train on them), "digits" (scikit-learn's 297 test digits), or a
  folder of images, one subfolder per class or flat. Every image is read before any feature is
  computed; unreadable files are refused by name.
- `build_reference(...)`: mu / sigma, sFID's spatial statistics when the extractor has them, the
  pool features and k-NN radii for precision / recall, saved with the extractor that made them
  (name, `extractor_digest` of its weights) and the image size.
- `cached_reference(...)`: the same for `ditmoe eval --ref FOLDER`, built once into the cache
  folder and reused while the folder's files (names, sizes, mtimes), the extractor's weights and
  the image size stay the same. `BUILDS` counts the statistics built in this process.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .features import FeatureExtractor, cache_dir, extractor_digest

PathLike = Union[str, Path]
NAMED = ("mnist", "digits")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")

#: How many reference statistics `build_reference` computed in this process (a hook for tests
#: and tools to tell a cache hit from a rebuild).
BUILDS = 0


# ------------------------------------------------------------------------------ images
def _is_image(name: str) -> bool:
    from ..data.folder import is_image_file

    return is_image_file(name)


def list_folder_images(root: PathLike) -> list[Path]:
    """The image files of a folder: in its class subfolders (at any depth), or directly inside it
    when it has no subfolders; sorted. Clear errors for a missing, empty or image-less folder."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"reference data {root} does not exist: pass an image folder, 'mnist' or 'digits'")
    if not root.is_dir():
        raise ValueError(f"reference data {root} is a file; pass an image folder (one subfolder per class, or the "
                         "images directly inside it), 'mnist' or 'digits' (an .npz of images or statistics goes to "
                         "ditmoe eval --ref directly)")
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    if not entries:
        raise ValueError(f"reference folder {root} is empty: it needs images (directly inside it or in one "
                         "subfolder per class)")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    if not files:
        from ..data.folder import IMG_EXTENSIONS

        raise ValueError(f"reference folder {root} holds no images (extensions {', '.join(IMG_EXTENSIONS)}) in it or "
                         "its subfolders")
    return files


def _subset(n: int, max_images: Optional[int]) -> np.ndarray:
    """A fixed random subset (seed 0) of n items, in order: every class keeps its share."""
    if max_images is None or max_images >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, max_images, replace=False))


def _read_folder(root: Path, image_size: Optional[int], max_images: Optional[int]) -> np.ndarray:
    from PIL import Image

    from ..data.transforms import center_crop_arr

    files = list_folder_images(root)
    files = [files[i] for i in _subset(len(files), max_images)]
    modes, sizes, bad = [], [], []
    for path in files:  # headers only: the channel count and sizes are decided before decoding
        try:
            with Image.open(path) as im:
                modes.append(im.mode)
                sizes.append(im.size)
        except Exception as e:  # PIL raises many types for foreign or damaged files
            bad.append(f"{path} ({type(e).__name__}: {e})")
    if bad:
        raise ValueError(f"{len(bad)} of {len(files)} image(s) under {root} cannot be read, e.g. "
                         + "; ".join(bad[:3]) + ": remove or replace them")
    grey = all(m in _GREY_MODES for m in modes)
    if image_size is None and len(set(sizes)) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(set(sizes))[:4])
        raise ValueError(f"images under {root} have different sizes ({shown}...): pass --image-size N to centre-crop "
                         "and resize them all to N x N (the size of the samples they are compared with)")
    out = []
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("L" if grey else "RGB")
                if image_size is not None and im.size != (image_size, image_size):
                    im = center_crop_arr(im, image_size)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # a header that reads but data that does not (truncated files)
            bad.append(f"{path} ({type(e).__name__}: {e})")
            continue
        out.append(arr[..., None] if grey else arr)
    if bad:
        raise ValueError(f"{len(bad)} of {len(files)} image(s) under {root} cannot be decoded, e.g. "
                         + "; ".join(bad[:3]) + ": remove or replace them")
    return np.stack(out)


def load_reference_images(data: PathLike, image_size: Optional[int] = None,
                          max_images: Optional[int] = None) -> np.ndarray:
    """Reference images, uint8 (N, H, W, C): "mnist", "digits" or an image folder (module docstring)."""
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be at least 1, got {image_size}")
    if max_images is not None and max_images < 2:
        raise ValueError(f"--max-images must be at least 2 (FID needs two images; thousands for numbers worth "
                         f"comparing), got {max_images}")
    name = str(data).lower()
    if name == "mnist":
        from ..data.mnist import load_mnist
        from ..data.transforms import pad_to, resize_uint8

        images, _ = load_mnist("test")
        size = image_size or 32  # the 28 px digits padded by background, as the models train on them
        if size != 28:
            images = pad_to(images, 32)
            if size != 32:
                images = resize_uint8(images, size)
        return images[_subset(len(images), max_images)][..., None]
    if name == "digits":
        from ..data.mnist import DigitsDataset, load_digits_uint8
        from ..data.transforms import pad_to

        size = image_size or 16
        if size < 8:
            raise ValueError(f"digits are 8x8: --image-size must be at least 8, got {size}")
        x = load_digits_uint8()[0][DigitsDataset.N_TRAIN:]  # the test split
        s = size // 8
        x = pad_to(np.repeat(np.repeat(x, s, axis=1), s, axis=2), size)
        return x[_subset(len(x), max_images)][..., None]
    return _read_folder(Path(data).expanduser(), image_size, max_images)


# -------------------------------------------------------------------------- statistics
def build_reference(data: PathLike, ext: FeatureExtractor, out: Optional[PathLike] = None,
                    image_size: Optional[int] = None, max_images: Optional[int] = None, k: int = 3,
                    progress: bool = False, images: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Statistics of the reference images with `ext`; saved to `out` (.npz) with the extractor's
    name and digest, the image size and the source when `out` is given."""
    global BUILDS
    from .evaluate import _stats_from_features
    from .npz import save_reference_stats

    if images is None:
        images = load_reference_images(data, image_size, max_images)
    stats = _stats_from_features(ext(images, progress=progress), ext.name, k)
    stats.update(extractor_digest=extractor_digest(ext), image_size=int(images.shape[1]), source=str(data))
    BUILDS += 1
    if out is not None:
        save_reference_stats(out, stats["mu"], stats["sigma"], extractor=ext.name, mu_s=stats.get("mu_s"),
                             sigma_s=stats.get("sigma_s"), features=stats["features"], radii=stats.get("radii"),
                             num_images=stats["num_images"], extractor_digest=stats["extractor_digest"],
                             image_size=stats["image_size"], source=stats["source"])
    return stats


def folder_fingerprint(root: PathLike) -> str:
    """sha256 of a folder's absolute path and of every image's relative path, size and mtime."""
    root = Path(root).expanduser().resolve()
    h = hashlib.sha256(str(root).encode())
    for path in list_folder_images(root):
        st = path.stat()
        h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def reference_cache_path(data: PathLike, ext: FeatureExtractor, image_size: Optional[int],
                         max_images: Optional[int] = None) -> Path:
    """Where `cached_reference` keeps the statistics of `data` with `ext` at `image_size`."""
    name = str(data).lower()
    source = f"named:{name}" if name in NAMED else f"folder:{folder_fingerprint(data)}"
    key = hashlib.sha256(f"{source}|{extractor_digest(ext)}|{image_size}|{max_images}".encode()).hexdigest()[:20]
    stem = name if name in NAMED else "".join(c if c.isalnum() or c in "-_" else "_"
                                              for c in Path(data).expanduser().resolve().name)[:40]
    return cache_dir() / "references" / f"{stem}-{key}.npz"


def cached_reference(data: PathLike, ext: FeatureExtractor, image_size: Optional[int] = None,
                     max_images: Optional[int] = None, progress: bool = False) -> tuple[Path, bool]:
    """(path of the statistics, whether they were built now): reused when nothing changed."""
    path = reference_cache_path(data, ext, image_size, max_images)
    if path.is_file():
        return path, False
    images = load_reference_images(data, image_size, max_images)  # errors before the cache folder is made
    build_reference(data, ext, out=path, image_size=image_size, max_images=max_images, progress=progress,
                    images=images)
    return path, True


__all__ = ["BUILDS", "NAMED", "build_reference", "cached_reference", "extractor_digest", "folder_fingerprint",
           "list_folder_images", "load_reference_images", "reference_cache_path"]
