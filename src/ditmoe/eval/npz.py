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

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .features import ImageBatch, to_uint8_nhwc

__all__ = ["load_reference_stats", "load_samples_npz", "save_reference_stats", "save_samples_npz"]

PathLike = Union[str, Path]


def _atomic_savez(path: PathLike, arrays: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object stops numpy from appending ".npz" to the name
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


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
    """Read (images uint8 (N, H, W, C), labels (N,) or None) from an ADM-style sample file."""
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise KeyError(f"{path}: no 'arr_0' (images) in {f.files}")
        images = to_uint8_nhwc(f["arr_0"])
        labels = f["arr_1"].astype(np.int64) if "arr_1" in f.files else None
    return images, labels


def save_reference_stats(path: PathLike, mu: np.ndarray, sigma: np.ndarray, *, extractor: str,
                         mu_s: Optional[np.ndarray] = None, sigma_s: Optional[np.ndarray] = None,
                         features: Optional[np.ndarray] = None, radii: Optional[np.ndarray] = None,
                         num_images: Optional[int] = None) -> Path:
    """Cache reference statistics computed with the extractor named `extractor`."""
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
    return _atomic_savez(path, arrays)


def load_reference_stats(path: PathLike, load_images: bool = False) -> dict[str, Any]:
    """Read a statistics cache or an ADM reference batch.

    Returns the arrays present among mu, sigma, mu_s, sigma_s, features, radii, num_images
    (an int), ``extractor`` (str, or None for files that do not record it, such as ADM's
    reference batches, whose statistics come from the TensorFlow Inception graph) and, with
    `load_images`, ``images`` from ``arr_0``.
    """
    out: dict[str, Any] = {"extractor": None}
    with np.load(path) as f:
        for key in ("mu", "sigma", "mu_s", "sigma_s", "features", "radii"):
            if key in f.files:
                out[key] = f[key]
        if "num_images" in f.files:
            out["num_images"] = int(f["num_images"])
        if "extractor" in f.files:
            out["extractor"] = str(f["extractor"])
        if load_images and "arr_0" in f.files:
            out["images"] = to_uint8_nhwc(f["arr_0"])
        out["has_images"] = "arr_0" in f.files
    return out
