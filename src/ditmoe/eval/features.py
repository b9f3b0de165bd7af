"""Feature extractor interface shared by every metric.

A `FeatureExtractor` turns a batch of images into a dict of float32 numpy arrays:

- ``pool``    (N, F): global features, used for FID and precision/recall
- ``spatial`` (N, S): optional spatial features, used for sFID
- ``logits``  (N, K): optional class logits, used for the Inception Score and class agreement

Images come in one of two conventions (see `to_uint8_nhwc`):

- uint8 arrays or tensors, NHWC (or NHW for grey), values 0..255: what the ADM `.npz` files hold;
- floating tensors or arrays, NCHW in [-1, 1]: what a diffusion model samples. They are
  quantised exactly as DiT's ``sample_ddp.py`` does before they are saved, so that evaluating
  samples in memory gives the same numbers as evaluating the ``.npz`` written from them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

ImageBatch = Union[np.ndarray, torch.Tensor]

__all__ = [
    "FeatureExtractor",
    "ModuleFeatureExtractor",
    "cache_dir",
    "extractor_digest",
    "to_uint8_nhwc",
]


def cache_dir() -> Path:
    """Folder for cached weights and statistics: ``$DITMOE_CACHE`` or ``~/.cache/ditmoe``."""
    env = os.environ.get("DITMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ditmoe"


def to_uint8_nhwc(images: ImageBatch) -> np.ndarray:
    """Bring images to uint8 (N, H, W, C).

    uint8 input is taken as NHWC (NHW for grey, which gets C = 1). Floating input is taken as NCHW
    in [-1, 1] and quantised like DiT's sampler: ``clamp(127.5 * x + 128, 0, 255)`` truncated.
    """
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            arr = images.detach().cpu().numpy()
        elif images.is_floating_point():
            x = images.detach().float().cpu()
            if x.dim() == 3:  # (N, H, W) grey
                x = x.unsqueeze(1)
            arr = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        else:
            raise TypeError(f"unsupported image dtype {images.dtype}")
    else:
        arr = np.asarray(images)
        if np.issubdtype(arr.dtype, np.floating):
            return to_uint8_nhwc(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
        if arr.dtype != np.uint8:
            raise TypeError(f"images must be uint8 NHWC or float NCHW in [-1, 1], got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, H, W, C) with C in (1, 3), got {arr.shape}")
    return np.ascontiguousarray(arr)


class FeatureExtractor:
    """Base class: subclasses set `name` and implement `_forward` on one batch.

    `_forward` receives a uint8 tensor (N, C, H, W) on `self.device` and returns a dict of
    tensors (N, ...) with the keys described in the module docstring.
    """

    name: str = "feature-extractor"
    #: whether `_forward` returns "spatial" / "logits"
    has_spatial: bool = False
    has_logits: bool = False

    def __init__(self, batch_size: int = 64, device: Union[str, torch.device] = "cpu") -> None:
        self.batch_size = batch_size
        self.device = torch.device(device)

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # (N, C, H, W) uint8
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: ImageBatch, batch_size: Optional[int] = None,
                 progress: bool = False) -> dict[str, np.ndarray]:
        """Features of all images, computed in batches; values are float32 numpy arrays."""
        arr = to_uint8_nhwc(images)
        bs = batch_size or self.batch_size
        out: dict[str, list[np.ndarray]] = {}
        starts = range(0, len(arr), bs)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"features ({self.name})", unit="batch")
        for s in starts:
            # A fresh copy with standard strides: `.contiguous()` would keep odd strides of the
            # size-1 channel dim of grey images, which steer convs to other kernels (channels-last)
            # with other rounding; the same images must give the same features however stored.
            x = torch.from_numpy(arr[s:s + bs]).permute(0, 3, 1, 2)
            x = x.clone(memory_format=torch.contiguous_format).to(self.device)  # (N, C, H, W)
            for k, v in self._forward(x).items():
                out.setdefault(k, []).append(v.detach().float().reshape(v.shape[0], -1).cpu().numpy())
        if not out:  # no images: keep the keys callers look for, with zero rows
            return {"pool": np.zeros((0, 0), np.float32)}
        return {k: np.concatenate(v, axis=0) for k, v in out.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ModuleFeatureExtractor(FeatureExtractor):
    """Wrap any `nn.Module` that maps a uint8 (N, C, H, W) batch to (N, F) features.

    `preprocess` (optional) runs first, e.g. to cast and rescale. Useful for custom networks and
    for tests that compare against other libraries with the same module.
    """

    def __init__(self, module: nn.Module, name: str = "custom-module",
                 preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 batch_size: int = 64, device: Union[str, torch.device] = "cpu") -> None:
        super().__init__(batch_size=batch_size, device=device)
        self.module = module.to(self.device).eval()
        self.name = name
        self.preprocess = preprocess

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(images) if self.preprocess is not None else images
        return {"pool": self.module(x)}


def extractor_digest(ext: FeatureExtractor) -> str:
    """sha256 (first 16 hex digits) of the extractor's name and weights: names, dtypes, shapes and
    bytes of its network's state dict, so the same weights give the same digest wherever they live."""
    h = hashlib.sha256(ext.name.encode())
    module = next((getattr(ext, a) for a in ("model", "net", "module")
                   if isinstance(getattr(ext, a, None), torch.nn.Module)), None)
    if module is not None:
        for key, value in sorted(module.state_dict().items()):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{t.dtype}:{tuple(value.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
