"""Sample previews while training: a small fixed grid from the EMA weights every N steps.

Every preview samples the same labels from the same start noise (its own generators, seeded by
a fixed seed), so successive grids differ only by the weights. Sampling must leave training
untouched: the global RNG states (torch, CUDA, numpy, python; label dropout in the model draws
from the global torch stream) are saved before and restored after, so a run with previews trains
bit for bit as one without, and a resumed run as one that was never stopped.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

PREVIEW_SEED = 1234  # fixed: every preview of every run starts from the same noise
PREVIEW_STEPS = 25  # at most this many sampler steps: enough for a recognisable grid, a fraction of a full sample's cost
MAX_IMAGES = 16


def preview_labels(num_classes: int, max_images: int = MAX_IMAGES) -> torch.Tensor:
    """One image per class up to `max_images`; more classes are spread evenly (0, C/16, 2C/16, ...)."""
    n = min(num_classes, max_images)
    return torch.tensor([i * num_classes // n for i in range(n)], dtype=torch.long)


def preview_path(out: Path, step: int) -> Path:
    return Path(out) / "previews" / f"step_{step:07d}.png"


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global torch / CUDA / numpy / python RNG states (what a checkpoint records) on exit."""
    from .checkpoint import rng_state, set_rng_state

    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def precision_name(autocast_dtype: torch.dtype | None) -> str:
    """The `generate` precision string for the training run's autocast dtype."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype, "fp32")


class PreviewWriter:
    """Writes OUT/previews/step_XXXXXXX.png (and the image to the run's logger) from a model.

    `sampling`: the run's recorded {"sampler", "steps", "cfg_scale"} (TrainConfig.sampling()); the
    previews use its sampler and guidance with at most PREVIEW_STEPS steps.
    `decode`: latents -> images in [-1, 1] for a model trained on a latent cache (None for pixels).
    """

    def __init__(self, out: Path, process: str, num_classes: int, autocast_dtype: torch.dtype | None,
                 sampling: dict[str, Any], decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.out, self.process, self.decode = Path(out), process, decode
        self.sampler, self.cfg_scale = sampling["sampler"], sampling["cfg_scale"]
        self.steps = min(sampling["steps"], PREVIEW_STEPS)
        self.labels = preview_labels(num_classes)
        self.precision = precision_name(autocast_dtype)
        self.seconds: list[float] = []

    def write(self, model: torch.nn.Module, step: int, logger: Any = None) -> Path:
        """Sample the preview grid with `model` (put in eval mode and back) and write it; returns the PNG path."""
        from ..generate import generate, save_grid, to_uint8_nhwc

        t0 = time.perf_counter()
        with preserved_rng(), eval_mode(model), torch.no_grad():
            images = generate(model, self.process, self.labels, sampler=self.sampler, steps=self.steps,
                              cfg_scale=self.cfg_scale, seed=PREVIEW_SEED, batch_size=len(self.labels),
                              precision=self.precision, decode=self.decode, progress=False)
        grid_images = to_uint8_nhwc(images)
        nrow = len(self.labels) if len(self.labels) <= 10 else 8
        path = save_grid(grid_images, preview_path(self.out, step), nrow=nrow)
        if logger is not None:
            from PIL import Image

            grid = np.asarray(Image.open(path))
            logger.log_image("previews/ema", step, grid[..., None] if grid.ndim == 2 else grid)
        self.seconds.append(time.perf_counter() - t0)
        return path


def latent_decoder(data_info: Any, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decoder of a latent cache's VAE (the folder the cache records), loaded on first use.

    Raises ValueError at once when that folder is not there: previews of a latent model need it.
    """
    vae_dir = (data_info.extra or {}).get("vae", "")
    if not vae_dir or not Path(vae_dir).is_dir():
        raise ValueError(f"--sample-every on a latent cache decodes previews with the VAE that made the cache, "
                         f"which it records as {vae_dir!r}: that folder is not there. Put the VAE back there, or "
                         "train with --sample-every 0 and sample the checkpoints with `ditmoe sample --vae`")
    vae = None

    def decode(z: torch.Tensor) -> torch.Tensor:
        nonlocal vae
        if vae is None:
            from ..data import load_vae

            vae = load_vae(vae_dir, device=device, scaling_factor=data_info.scaling_factor)
        return vae.decode(z.to(device)).cpu()

    return decode


__all__ = ["PreviewWriter", "preview_labels", "preview_path", "preserved_rng", "latent_decoder", "PREVIEW_SEED",
           "PREVIEW_STEPS"]
