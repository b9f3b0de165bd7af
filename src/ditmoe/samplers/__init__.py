"""Samplers. Each takes a denoiser fn(x, t) (plus the Gaussian process for DDPM / DDIM) and
knows nothing of the network class; :func:`guided` turns a class-conditional model into such an
fn, and :func:`sample` is the front door the CLI uses.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..config import PROCESS_SAMPLERS
from ..diffusion.gaussian import GaussianDiffusion, create_diffusion, space_timesteps
from ..kernels.weight_casts import reuse_weight_casts
from .cfg import conditional, guided
from .ddim import ddim_sample
from .ddpm import DenoiseFn, StepCallback, ddpm_sample
from .ode import euler_sample, flow_timesteps, heun_sample, shift_time



def _config_of(model: Any) -> Any:
    return getattr(model, "config", None)


def sample(model: Callable[..., torch.Tensor], process_kind: str = "ddpm", sampler: str = "ddpm", steps: int = 250,
           labels: torch.Tensor | None = None, cfg_scale: float = 1.0, *, noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, seed: int | None = None,
           shape: tuple[int, ...] | None = None, null_label: int | None = None,
           cfg_channels: str | int = "all", cfg_interval: tuple[float, float] | None = None,
           eta: float = 0.0, shift: float = 1.0, clip_denoised: bool = False,
           diffusion: GaussianDiffusion | None = None, progress: bool = False,
           on_step: StepCallback | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Draw samples (N, C, H, W) from a class-conditional model(x, t, y).

    process_kind "ddpm" takes sampler "ddpm" (ancestral, respacing "<steps>") or "ddim"
    (respacing "ddim<steps>", `eta`); "flow" takes "euler" or "heun" (`steps`, `shift`).
    Labels default to the null label (unconditional). The start noise is `noise`, else drawn
    with `generator` (or a fresh one seeded by `seed`), which also drives any per-step noise:
    the same seed gives the same samples. Shape, null label and learn_sigma are read from
    ``model.config`` when not given. Interval times are in the sampler's time (see `guided`).
    """
    if process_kind not in PROCESS_SAMPLERS:
        raise ValueError(f"unknown process {process_kind!r}; choose one of {list(PROCESS_SAMPLERS)}")
    if sampler not in PROCESS_SAMPLERS[process_kind]:
        raise ValueError(f"sampler {sampler!r} does not fit process {process_kind!r}; "
                         f"choose one of {PROCESS_SAMPLERS[process_kind]}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = _config_of(model)
    if device is None:
        if noise is not None:
            device = noise.device
        elif isinstance(model, torch.nn.Module) and any(True for _ in model.parameters()):
            device = next(model.parameters()).device
        else:
            device = "cpu"
    if null_label is None:
        if cfg is None:
            raise ValueError("null_label is needed for a model without a .config")
        null_label = cfg.num_classes
    if noise is None:
        if shape is None:
            if cfg is None:
                raise ValueError("give noise or shape for a model without a .config")
            n = len(labels) if labels is not None else 1
            shape = (n, cfg.in_channels, cfg.input_size, cfg.input_size)
        if generator is None:
            generator = torch.Generator(device=device)
            if seed is not None:
                generator.manual_seed(seed)
        noise = torch.randn(shape, device=device, generator=generator)
    elif generator is None and seed is not None:
        generator = torch.Generator(device=noise.device).manual_seed(seed)
    if labels is None:
        labels = torch.full((noise.shape[0],), null_label, dtype=torch.long, device=noise.device)
    if len(labels) != noise.shape[0]:
        raise ValueError(f"{len(labels)} labels for {noise.shape[0]} samples")

    fn = guided(model, labels, null_label, cfg_scale, cfg_channels, cfg_interval) if cfg_scale != 1.0 \
        else conditional(model, labels)

    # One cast of each expert weight for the whole run, not one per network call.
    with torch.no_grad(), reuse_weight_casts():
        if process_kind == "flow":
            run = euler_sample if sampler == "euler" else heun_sample
            prediction = getattr(cfg, "flow_prediction", "velocity")  # read from model.config, as learn_sigma
            return run(fn, noise, steps, shift=shift, progress=progress, on_step=on_step, prediction=prediction)
        if diffusion is None:
            learn_sigma = bool(cfg.learn_sigma) if cfg is not None else True
            base = create_diffusion(None, learn_sigma=learn_sigma)
            diffusion = base.respace(_respacing(sampler, steps, base.num_timesteps))
        if sampler == "ddpm":
            return ddpm_sample(fn, diffusion, noise, clip_denoised=clip_denoised, generator=generator,
                               progress=progress, on_step=on_step)
        return ddim_sample(fn, diffusion, noise, eta=eta, clip_denoised=clip_denoised, generator=generator,
                           progress=progress, on_step=on_step)


def _respacing(sampler: str, steps: int, num_timesteps: int) -> str:
    """DDIM's strided grid when `steps` admits one, else evenly spaced steps."""
    if sampler == "ddim":
        spec = f"ddim{steps}"
        try:
            space_timesteps(num_timesteps, spec)
            return spec
        except ValueError:
            pass
    return str(steps)


__all__ = ["sample", "guided", "conditional", "ddpm_sample", "ddim_sample", "euler_sample", "heun_sample",
           "flow_timesteps", "shift_time", "DenoiseFn", "StepCallback", "PROCESS_SAMPLERS"]
