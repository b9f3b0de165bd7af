"""`.npz` files in the layout of the ADM evaluation suite (guided-diffusion ``evaluations/``).

Sample batches: ``arr_0`` uint8 (N, H, W, C) images and, for class-conditional samples,
``arr_1`` int64 (N,) labels (what ADM's and DiT's sampling scripts write).

Reference statistics: ``mu`` / ``sigma`` of the pool features and, when the extractor has them,
``mu_s`` / ``sigma_s`` of the spatial features (the keys of ADM's reference batches, which also
hold the images as ``arr_0``). Our caches add ``extractor`` (the extractor's name, so statistics
from one network are never compared with features of another), ``num_images``, and optionally
``features`` (N, F) and ``radii`` (N,) for precision / recall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .features import ImageBatch, to_uint8_nhwc

__all__ = ["check_reference_npz", "load_reference_stats", "load_samples_npz", "save_reference_stats",
           "save_samples_npz"]

PathLike = Union[str, Path]


def _atomic_savez(path: PathLike, arrays: dict[str, np.ndarray]) -> Path:
    from ..weights_io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object stops numpy from appending ".npz" to the name
            np.savez(f, **arrays)

    path = Path(path)
    atomic_write(path, write)
    return path


_SAMPLES_LAYOUT = ("an .npz whose arr_0 holds uint8 (N, H, W, C) images in 0..255 (C = 1 or 3) or float "
                   "(N, C, H, W) images in [-1, 1], and arr_1 the requested class labels (optional), as "
                   "`ditmoe sample` writes (OUT/samples.npz) or np.savez(path, arr_0=images, arr_1=labels)")


def _open_npz(path: PathLike, what: str):
    """np.load of an .npz that says what is wrong with a missing, foreign or damaged file."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(path.glob("*.npz"))
        hint = f"; it holds {', '.join(str(p) for p in inside[:4])}" if inside else "; it holds no .npz"
        raise ValueError(f"{what} {path} is a folder; pass the .npz file itself{hint}")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        f = np.load(path, allow_pickle=False)
    except OSError:
        raise
    except Exception as e:  # ValueError (pickled or foreign data), BadZipFile, EOFError
        with open(path, "rb") as raw:
            head = raw.read(6)
        if not head:
            why = "it is empty"
        elif not head.startswith(b"PK"):  # every .npz is a zip archive
            why = "it is not an .npz (zip) archive"
        else:
            text = str(e).strip()
            why = f"{type(e).__name__}: {text.splitlines()[0] if text else 'damaged archive'}"
        raise ValueError(f"{what} {path} is not a readable .npz file ({why}); it may be truncated or not an "
                         f".npz at all. Expected {_SAMPLES_LAYOUT}") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} {path} is a single .npy array, not an .npz; expected {_SAMPLES_LAYOUT}")
    return f


def _images_from(arr: np.ndarray, path: PathLike) -> np.ndarray:
    """arr_0 -> uint8 NHWC, refusing layouts and value ranges that would be read as other images."""
    where = f"{path}: arr_0"
    if arr.dtype == np.uint8:
        pass
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.ndim == 4 and arr.shape[1] not in (1, 3) and arr.shape[-1] in (1, 3):
            raise ValueError(f"{where} holds float images of shape {arr.shape}, which look like (N, H, W, C); "
                             "float images are read as (N, C, H, W) in [-1, 1]: store arr.transpose(0, 3, 1, 2), "
                             "or uint8 (N, H, W, C) images in 0..255")
        if arr.size and not np.isfinite(arr).all():
            raise ValueError(f"{where} holds NaN or infinite values: those samples are broken")
        if arr.size and (arr.min() < -2 or arr.max() > 2):
            raise ValueError(f"{where} holds float images with values in [{float(arr.min()):g}, {float(arr.max()):g}]; "
                             "float images are read as [-1, 1]: store 0..255 images as uint8 (arr.astype(np.uint8))")
    elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        fix = ("its values are in 0..255: store arr.astype(np.uint8)" if 0 <= lo and hi <= 255 else
               f"its values span {lo}..{hi}: scale them to 0..255 and store them as uint8")
        raise ValueError(f"{where} has dtype {arr.dtype}; images must be uint8 (N, H, W, C) or float (N, C, H, W) in "
                         f"[-1, 1] ({fix})")
    else:
        raise ValueError(f"{where} has dtype {arr.dtype}, which is not an image dtype; expected {_SAMPLES_LAYOUT}")
    try:
        images = to_uint8_nhwc(arr)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}; expected {_SAMPLES_LAYOUT}") from e
    if len(images) == 0:
        raise ValueError(f"{where} holds no images (shape {arr.shape}); evaluation needs at least 2")
    return images


def save_samples_npz(path: PathLike, images: ImageBatch, labels: Optional[Any] = None) -> Path:
    """Write images (uint8 NHWC, or float NCHW in [-1, 1]) as ``arr_0`` and labels as ``arr_1``."""
    arrays = {"arr_0": to_uint8_nhwc(images)}
    if labels is not None:
        lab = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).astype(np.int64).reshape(-1)
        if len(lab) != len(arrays["arr_0"]):
            raise ValueError(f"{len(lab)} labels for {len(arrays['arr_0'])} images")
        arrays["arr_1"] = lab
    return _atomic_savez(path, arrays)


def load_samples_npz(path: PathLike) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read (images uint8 (N, H, W, C), labels (N,) or None) from an ADM-style sample file.

    A file that would be read as other images or labels than it holds is refused with a
    ValueError saying what to store instead.
    """
    with _open_npz(path, "samples") as f:
        if "arr_0" not in f.files:
            raise ValueError(f"samples {path} has no 'arr_0' (the images); it holds {f.files or 'nothing'}. "
                             f"Expected {_SAMPLES_LAYOUT}")
        images = _images_from(f["arr_0"], path)
        labels = None
        if "arr_1" in f.files:
            raw = f["arr_1"]
            if not (np.issubdtype(raw.dtype, np.integer) or (np.issubdtype(raw.dtype, np.floating)
                                                             and np.all(raw == np.round(raw)))):
                raise ValueError(f"{path}: arr_1 (the labels) has dtype {raw.dtype} with non-integer values; "
                                 "store the class ids as integers")
            labels = raw.astype(np.int64).reshape(-1)
            if len(labels) != len(images):
                raise ValueError(f"{path}: arr_1 holds {len(labels)} labels for {len(images)} images in arr_0")
    return images, labels


def save_reference_stats(path: PathLike, mu: np.ndarray, sigma: np.ndarray, *, extractor: str,
                         mu_s: Optional[np.ndarray] = None, sigma_s: Optional[np.ndarray] = None,
                         features: Optional[np.ndarray] = None, radii: Optional[np.ndarray] = None,
                         num_images: Optional[int] = None, extractor_digest: Optional[str] = None,
                         image_size: Optional[int] = None, source: Optional[str] = None) -> Path:
    """Cache reference statistics computed with the extractor named `extractor` (and, when given,
    the digest of its weights, the side of the images and where they came from)."""
    arrays: dict[str, np.ndarray] = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
                                     "extractor": np.asarray(extractor)}
    if mu_s is not None and sigma_s is not None:
        arrays["mu_s"], arrays["sigma_s"] = np.asarray(mu_s, np.float64), np.asarray(sigma_s, np.float64)
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    if radii is not None:
        arrays["radii"] = np.asarray(radii, np.float32)
    if num_images is not None:
        arrays["num_images"] = np.asarray(num_images, np.int64)
    if extractor_digest is not None:
        arrays["extractor_digest"] = np.asarray(extractor_digest)
    if image_size is not None:
        arrays["image_size"] = np.asarray(image_size, np.int64)
    if source is not None:
        arrays["source"] = np.asarray(source)
    return _atomic_savez(path, arrays)


def load_reference_stats(path: PathLike, load_images: bool = False) -> dict[str, Any]:
    """Read a statistics cache or an ADM reference batch.

    Returns the arrays present among mu, sigma, mu_s, sigma_s, features, radii, num_images
    (an int), ``extractor`` (str, or None for files that do not record it, such as ADM's
    reference batches, whose statistics come from the TensorFlow Inception graph),
    ``extractor_digest`` / ``image_size`` / ``source`` (None where not recorded) and, with
    `load_images`, ``images`` from ``arr_0``.
    """
    out: dict[str, Any] = {"extractor": None, "extractor_digest": None, "image_size": None, "source": None}
    with _open_npz(path, "reference") as f:
        for key in ("mu", "sigma", "mu_s", "sigma_s", "features", "radii"):
            if key in f.files:
                out[key] = f[key]
        if "num_images" in f.files:
            out["num_images"] = int(f["num_images"])
        for key in ("extractor", "extractor_digest", "source"):
            if key in f.files:
                out[key] = str(f[key])
        if "image_size" in f.files:
            out["image_size"] = int(f["image_size"])
        if load_images and "arr_0" in f.files:
            out["images"] = _images_from(f["arr_0"], path)
        out["has_images"] = "arr_0" in f.files
    return out


def check_reference_npz(path: PathLike) -> None:
    """Refuse a reference file that holds neither statistics (mu, sigma) nor images (arr_0)."""
    with _open_npz(path, "--ref") as f:
        if not ({"mu", "sigma"} <= set(f.files) or "arr_0" in f.files):
            raise ValueError(f"--ref {path} holds neither statistics (mu, sigma) nor images (arr_0), only {f.files}; "
                             "pass a reference batch (ADM's VIRTUAL_*.npz), images saved like samples, a cache "
                             "written by --save-ref-stats, or 'mnist'")
