"""From a checkpoint to images: load the right weights, sample in batches, write grids and .npz.

Each image i gets its own start noise from a generator seeded by (seed, i), so an image does not
depend on the batch size or on how many processes share the work; under torchrun rank r draws
images r, r + W, r + 2W, ...
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import kernels
from .config import PROCESS_SAMPLERS, recorded_sampling


@dataclass
class LoadedModel:
    model: torch.nn.Module
    process: str  # "flow" or "ddpm"
    weights: str  # "ema", "model" or "file"
    source: str
    sampling: dict[str, Any] | None = None  # the run's recorded {"sampler", "steps", "cfg_scale"}, if any


def load_for_sampling(ckpt: str | os.PathLike, weights: str = "ema", process: str | None = None,
                      device: str | torch.device = "cpu") -> LoadedModel:
    """Load a training checkpoint (.pt; EMA weights unless weights="model"), a model saved by this
    package, a model folder (`ditmoe.save_pretrained`'s or a diffusers DiTTransformer2DModel's;
    `weights` does not apply, a folder holds one set), or an official checkpoint, and work out which process (flow / ddpm) it was trained with:
    `process` when given, else what the file records (training checkpoints, files written by
    `ditmoe convert`), else the config.json of the run it sits in, else "ddpm" (the official
    DDPM checkpoints; pass process="flow" for the released rectified-flow ones). `sampling` is
    the sampler, steps and guidance the run recorded (from the file, else the run's config.json).
    """
    from .convert import load_model_and_info, run_train_config_near

    if process not in (None, "flow", "ddpm"):
        raise ValueError(f"process must be 'flow' or 'ddpm', got {process!r}")
    path = Path(ckpt)
    model, info = load_model_and_info(path, weights)
    run_train = None if path.is_dir() else run_train_config_near(path)
    process = process or info.get("process") or (run_train or {}).get("process") or "ddpm"
    sampling = info.get("sampling") or recorded_sampling(run_train)
    if sampling and sampling["sampler"] not in PROCESS_SAMPLERS[process]:
        sampling = None  # recorded for another process than the one asked for
    return LoadedModel(kernels.apply(model.eval().to(device)), process, info["weights"], str(path), sampling)


def image_noise(indices: list[int], shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Start noise (N, C, H, W): image i from its own generator seeded by (seed, i)."""
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out).to(device)


def generate(model: torch.nn.Module, process: str, labels: torch.Tensor, *, sampler: str | None = None,
             steps: int | None = None, cfg_scale: float = 1.0, cfg_channels: str | int = "all", seed: int = 0,
             batch_size: int = 64, indices: list[int] | None = None, shift: float = 1.0, eta: float = 0.0,
             precision: str = "auto", decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
             recorder: Any = None, progress: bool = True) -> torch.Tensor:
    """Sample one image per label; returns images in [-1, 1] (N, C, H, W) on the CPU.

    `indices` (default 0..N-1) are the global image numbers that seed each image's noise.
    With a routing `recorder`, every model call is attributed to its sampling step and labels.
    """
    from .config import default_sampler, default_steps
    from .samplers import sample

    sampler = sampler or default_sampler(process)
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1 (None = the sampler's default), got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    steps = steps or default_steps(sampler)
    cfg = model.config
    device = next(model.parameters()).device
    indices = list(range(len(labels))) if indices is None else indices
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    from .precision import resolve_precision

    amp_dtype = resolve_precision(precision, device, cfg)
    batches = range(0, len(labels), batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(labels), desc=f"sample ({sampler}, {steps} steps)", unit="img", dynamic_ncols=True)
    out = []
    for start in batches:
        y = labels[start:start + batch_size].to(device)
        noise = image_noise(indices[start:start + batch_size], shape, seed, device)
        if recorder is not None:
            null = torch.full_like(y, cfg.num_classes)
            recorder.set_labels(torch.cat([y, null]) if cfg_scale != 1.0 else y)
        gen = torch.Generator(device=device).manual_seed(seed * 7_368_787 + indices[start])
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            x = sample(model, process, sampler, steps, labels=y, cfg_scale=cfg_scale, noise=noise, generator=gen,
                       cfg_channels=cfg_channels, shift=shift, eta=eta,
                       on_step=recorder.on_step if recorder is not None else None)
        x = x.float()
        if decode is not None:
            x = decode(x)
        out.append(x.clamp(-1, 1).cpu())
        if bar is not None:
            bar.update(len(y))
    if bar is not None:
        bar.close()
    return torch.cat(out) if out else torch.empty(0, *shape)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), the ADM evaluation-suite layout (C = 1 or 3)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int, pad: int = 2) -> Path:
    """uint8 (N, H, W, C) -> one PNG, `nrow` images per row."""
    from PIL import Image

    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


def save_singles(images: np.ndarray, labels: np.ndarray, folder: str | os.PathLike, offset: int = 0) -> None:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{offset + i:06d}_class{int(y)}.png")


def save_npz(images: np.ndarray, labels: np.ndarray, path: str | os.PathLike) -> Path:
    """ADM-suite .npz: arr_0 = uint8 NHWC images; arr_1 = the requested class labels."""
    from .weights_io import atomic_write

    path = Path(path)
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object stops numpy from appending ".npz" to the name
            np.savez(f, arr_0=images, arr_1=labels)

    atomic_write(path, write)
    return path


def parse_classes(spec: str, num_classes: int, per_class: int) -> torch.Tensor:
    """"all" -> every class `per_class` times (class-major); "3,5,7" -> those classes."""
    if spec == "all":
        classes = list(range(num_classes))
    else:
        try:
            classes = [int(c) for c in spec.split(",") if c.strip()]
        except ValueError as e:
            raise ValueError(f"--classes must be 'all' or comma-separated integers, got {spec!r}") from e
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"classes {bad} out of range: this model has classes 0..{num_classes - 1}")
        if not classes:
            raise ValueError(f"--classes {spec!r} names no class: pass 'all' or comma-separated ids such as 1,7")
    if per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {per_class}")
    return torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
