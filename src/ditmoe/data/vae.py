"""Stable-Diffusion VAE wrapper (diffusers ``AutoencoderKL``) loaded from a local folder.

diffusers is imported inside the functions that need it, so `import ditmoe.data` works without
the `latent` extra. Nothing is downloaded: the folder must already hold config.json and weights.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SD_SCALING_FACTOR = 0.18215  # Stable Diffusion 1.x / sd-vae-ft-mse; DiT and DiT-MoE use it
LATENT_PIP = "pip install 'ditmoe[latent]'"


def _require_diffusers():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ModuleNotFoundError(
            f"Latent diffusion needs the 'diffusers' package for the VAE. Install it with:  {LATENT_PIP}  "
            "(or: pip install diffusers)"
        ) from e
    return AutoencoderKL


def resolve_vae_dir(vae_dir: str | os.PathLike) -> Path:
    """The folder holding the VAE's config.json; a full SD pipeline folder's `vae/` is accepted."""
    d = Path(vae_dir).expanduser()
    hint = (
        "Download a Stable Diffusion VAE to a local folder first, e.g.  "
        "huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir <folder>"
    )
    if not d.exists():
        raise FileNotFoundError(f"VAE folder '{d}' does not exist. {hint}")
    if not d.is_dir():
        raise NotADirectoryError(f"VAE path '{d}' is a file; pass the folder that holds config.json. {hint}")
    if (d / "config.json").is_file():
        return d
    if (d / "vae" / "config.json").is_file():
        return d / "vae"
    listing = sorted(p.name for p in d.iterdir())[:10]
    raise FileNotFoundError(
        f"VAE folder '{d}' has no config.json (it holds: {listing or 'nothing'}). It must be a diffusers "
        f"AutoencoderKL folder with config.json and diffusion_pytorch_model.safetensors. {hint}"
    )


class VAE:
    """Encode images in [-1, 1] to latent distributions and decode scaled latents back.

    ``encode`` returns the unscaled distribution (mean, logvar); ``sample`` turns it into the scaled
    latent z = (mean + std * eps) * scaling_factor that the diffusion model sees; ``decode`` undoes
    the scaling and returns images in [-1, 1].
    """

    def __init__(self, model: torch.nn.Module, scaling_factor: float | None = None):
        self.model = model.eval().requires_grad_(False)
        cfg = getattr(model, "config", None)
        if scaling_factor is None:
            scaling_factor = getattr(cfg, "scaling_factor", None) or SD_SCALING_FACTOR
        self.scaling_factor = float(scaling_factor)

    @classmethod
    def from_pretrained(
        cls,
        vae_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        scaling_factor: float | None = None,
    ) -> "VAE":
        """Load ``AutoencoderKL`` from a local diffusers folder (never from the network)."""
        d = resolve_vae_dir(vae_dir)
        AutoencoderKL = _require_diffusers()
        # low_cpu_mem_usage needs `accelerate`; without it diffusers would print an install hint.
        lowmem = importlib.util.find_spec("accelerate") is not None
        model = AutoencoderKL.from_pretrained(
            str(d), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=lowmem
        )
        vae = cls(model.to(device), scaling_factor)
        vae.path = str(d)
        return vae

    # ------------------------------------------------------------------ geometry
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        f = self.downsample_factor
        if image_size % f:
            raise ValueError(f"image_size {image_size} is not divisible by the VAE's downsampling factor {f}")
        return (self.latent_channels, image_size // f, image_size // f)

    # ------------------------------------------------------------------ compute
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [-1, 1] -> unscaled (mean, logvar), each (N, C, H/f, W/f) float32."""
        x = images.to(self.device, self.dtype)
        dist = self.model.encode(x).latent_dist
        return dist.mean.float(), dist.logvar.float()

    def sample(
        self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latent z = (mean + exp(logvar / 2) * eps) * scaling_factor."""
        return sample_latent(mean, logvar, self.scaling_factor, generator)

    @torch.no_grad()
    def encode_latents(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (a sample, or the mean when ``sample=False``)."""
        mean, logvar = self.encode(images)
        if not sample:
            return mean * self.scaling_factor
        return self.sample(mean, logvar, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, h*f, w*f) float32 clamped to [-1, 1]."""
        z = latents.to(self.device, self.dtype) / self.scaling_factor
        return self.model.decode(z).sample.float().clamp_(-1.0, 1.0)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "VAE":
        self.model.to(device=device, dtype=dtype)
        return self


def sample_latent(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    scaling_factor: float = SD_SCALING_FACTOR,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """z = (mean + exp(logvar / 2) * eps) * scaling_factor, computed in float32."""
    mean, logvar = mean.float(), logvar.float()
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + torch.exp(0.5 * logvar) * eps) * scaling_factor


def load_vae(
    vae_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scaling_factor: float | None = None,
) -> VAE:
    """`VAE.from_pretrained` as a function."""
    return VAE.from_pretrained(vae_dir, device=device, dtype=dtype, scaling_factor=scaling_factor)


__all__ = ["VAE", "load_vae", "sample_latent", "resolve_vae_dir", "SD_SCALING_FACTOR", "LATENT_PIP"]
