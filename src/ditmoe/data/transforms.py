"""Pixel transforms shared by the image datasets and the latent extractor.

Every dataset in this package hands the model float32 tensors (C, H, W) in [-1, 1]; uint8 -> float
happens as late as possible so that in-memory datasets stay 4x smaller.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """The ADM-style centre crop that DiT and DiT-MoE train with, pixel for pixel.

    Box-filter halvings while the short side is at least twice the target (a cheap anti-alias for
    large photos), one bicubic resize that brings the short side to ``image_size``, then the
    centre square (offsets rounded down). Images smaller than the target are upscaled.
    """
    img = pil_image
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    factor = image_size / min(img.size)
    width, height = round(img.width * factor), round(img.height * factor)
    img = img.resize((width, height), resample=Image.BICUBIC)
    left, top = (width - image_size) // 2, (height - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def uint8_to_tensor(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 image (H, W), (H, W, C) numpy or (..., C, H, W) torch -> float32 in [-1, 1].

    numpy input is taken as HWC (what PIL gives) and returned as CHW; a torch input keeps its
    layout.
    """
    if isinstance(arr, np.ndarray):
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if not arr.flags.writeable:  # np.asarray(PIL image) is read-only; torch warns on those
            arr = arr.copy()
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    else:
        t = arr
    return t.to(torch.float32).div_(127.5).sub_(1.0)


def tensor_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `uint8_to_tensor` for torch tensors: [-1, 1] float -> uint8 (rounded, clamped)."""
    return ((x.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def pad_to(images: np.ndarray, size: int, value: int = 0) -> np.ndarray:
    """Pad (N, H, W[, C]) images symmetrically to (size, size); the odd pixel goes right/bottom."""
    n, h, w = images.shape[:3]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}: they are larger")
    top, left = (size - h) // 2, (size - w) // 2
    pads = [(0, 0), (top, size - h - top), (left, size - w - left)] + [(0, 0)] * (images.ndim - 3)
    return np.pad(images, pads, mode="constant", constant_values=value)


def resize_uint8(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Antialiased bilinear resize of (N, H, W) uint8 images to (N, size, size) uint8."""
    out = np.empty((images.shape[0], size, size), dtype=np.uint8)
    for s in range(0, images.shape[0], chunk):
        x = torch.from_numpy(images[s : s + chunk]).unsqueeze(1).float()
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s : s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).squeeze(1).numpy()
    return out


__all__ = ["center_crop_arr", "uint8_to_tensor", "tensor_to_uint8", "pad_to", "resize_uint8"]
