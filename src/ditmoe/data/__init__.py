"""Data sources: embedded MNIST, scikit-learn digits, image folders, VAE latent caches.

`build_dataset(source, **kw)` is the one entry point the trainer needs; it returns a dataset whose
items are (x float32 (C, H, W), y int64) and a `DatasetInfo` that sizes the model. Submodules load
on first use, so importing this package does not import torch, PIL or diffusers.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch.utils.data import Dataset

_LAZY = {
    "MNISTDataset": "mnist",
    "DigitsDataset": "mnist",
    "ArrayImageDataset": "mnist",
    "load_mnist": "mnist",
    "mnist_path": "mnist",
    "MNIST_PIP": "mnist",
    "ImageFolderDataset": "folder",
    "scan_image_folder": "folder",
    "IMG_EXTENSIONS": "folder",
    "center_crop_arr": "transforms",
    "uint8_to_tensor": "transforms",
    "tensor_to_uint8": "transforms",
    "VAE": "vae",
    "load_vae": "vae",
    "sample_latent": "vae",
    "SD_SCALING_FACTOR": "vae",
    "extract_latents": "latents",
    "LatentDataset": "latents",
    "read_latent_metadata": "latents",
    "is_latent_cache": "latents",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class DatasetInfo:
    """What the model and the trainer need to know about a dataset.

    ``image_size`` and ``channels`` describe what the model sees: pixels for image sources,
    latents (e.g. 32 and 4 for 256-pixel images) for a latent cache, where ``pixel_size`` and
    ``scaling_factor`` describe the VAE side.
    """

    image_size: int
    channels: int
    num_classes: int
    class_names: list[str]
    is_latent: bool
    source: str
    num_items: int
    pixel_size: int | None = None
    scaling_factor: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_NAMED = {"mnist": "mnist", "digits": "digits", "sklearn_digits": "digits"}
_KWARGS = {
    "mnist": {"split", "image_size", "flip"},
    "digits": {"split", "image_size", "flip"},
    "folder": {"image_size", "flip", "allow_upscale", "verify", "channels", "num_threads", "progress"},
    "latent": {"image_size", "flip", "in_memory"},
}


def _check_kwargs(kind: str, kw: dict[str, Any]) -> None:
    unknown = set(kw) - _KWARGS[kind]
    if unknown:
        raise TypeError(f"build_dataset: unknown option(s) {sorted(unknown)} for a {kind} source; "
                        f"accepted: {sorted(_KWARGS[kind])}")


def build_dataset(source: str | os.PathLike, **kw: Any) -> tuple["Dataset", DatasetInfo]:
    """Make the dataset named by ``source`` and describe it.

    ``source``: "mnist" (default options: split="train", image_size=32), "digits" /
    "sklearn_digits" (split="train", image_size=16), a path to an image folder with one subfolder
    per class (image_size=256, flip=True, allow_upscale=False, ...), or a path to a latent cache
    file made by `extract_latents` (flip=True, in_memory=False). Unknown options raise TypeError.

    The same options can be passed whatever the source (the trainer passes the model's
    ``image_size`` and ``flip``): ``flip`` is ignored for digit sources, since a mirrored digit is
    not a digit (construct `MNISTDataset(flip=True)` directly to force it), and for a latent cache
    ``image_size`` is the expected latent size, checked against the file.
    """
    key = str(source)
    if key.lower() in _NAMED:
        from .mnist import DigitsDataset, MNISTDataset

        kind = _NAMED[key.lower()]
        _check_kwargs(kind, kw)
        kw.pop("flip", None)
        ds = (MNISTDataset if kind == "mnist" else DigitsDataset)(**kw)
        return ds, DatasetInfo(
            image_size=ds.image_size, channels=ds.channels, num_classes=ds.num_classes,
            class_names=list(ds.class_names), is_latent=False, source=kind, num_items=len(ds),
            pixel_size=ds.image_size, extra={"split": ds.split},
        )

    path = Path(key).expanduser()
    if path.is_file():
        from .latents import LatentDataset

        _check_kwargs("latent", kw)
        size = kw.pop("image_size", None)
        ds = LatentDataset(path, **kw)  # raises with instructions if the file is not a latent cache
        if size is not None and size != ds.image_size:
            raise ValueError(
                f"latent cache '{path}' holds {ds.image_size}x{ds.image_size} latents ({ds.channels} channels, "
                f"from {ds.pixel_size}x{ds.pixel_size} images) but image_size={size} was asked for. Use a model "
                f"with input size {ds.image_size}, or extract a cache from images of "
                f"{size * ds.pixel_size // ds.image_size} px."
            )
        return ds, DatasetInfo(
            image_size=ds.image_size, channels=ds.channels, num_classes=ds.num_classes,
            class_names=list(ds.class_names), is_latent=True, source=str(path), num_items=len(ds),
            pixel_size=ds.pixel_size, scaling_factor=ds.scaling_factor,
            extra={"vae": ds.meta.get("vae", ""), "images_from": ds.meta.get("source", "")},
        )
    if path.is_dir():
        from .folder import ImageFolderDataset

        _check_kwargs("folder", kw)
        kw.setdefault("image_size", 256)
        ds = ImageFolderDataset(path, **kw)
        return ds, DatasetInfo(
            image_size=ds.image_size, channels=ds.channels, num_classes=ds.num_classes,
            class_names=list(ds.class_names), is_latent=False, source=str(path), num_items=len(ds),
            pixel_size=ds.image_size, extra={"skipped": list(ds.skipped)},
        )
    raise FileNotFoundError(
        f"data source '{key}' is neither a built-in dataset ({', '.join(sorted(_NAMED))}) nor an existing "
        "path. Give an image folder (one subfolder per class) or a latent cache file made by extract_latents."
    )


def folder_options(source: str | os.PathLike, allow_upscale: bool = False, grayscale: bool = False,
                   verify: str = "fast") -> dict[str, Any]:
    """`build_dataset` options for the image-folder settings of a training config.

    An image folder gets them all; any other source gets none, and a non-default folder setting
    for it is a ValueError (it would otherwise be silently ignored).
    """
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return {"allow_upscale": allow_upscale, "channels": 1 if grayscale else 3, "verify": verify}
    if str(source).lower() not in _NAMED and not path.is_file():
        return {}  # build_dataset says that the source does not exist
    given = [flag for flag, on in (("--allow-upscale true", allow_upscale), ("--grayscale true", grayscale),
                                   (f"--verify-images {verify}", verify != "fast")) if on]
    if given:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to image folders, but --data "
                         f"{source} is not a folder (a built-in dataset or a latent cache, which is checked and "
                         "sized when it is made); drop the option(s)")
    return {}


__all__ = ["build_dataset", "folder_options", "DatasetInfo", *sorted(_LAZY)]
