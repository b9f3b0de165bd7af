"""DDIM sampling (Song et al. 2021) for any eta: 0 is the deterministic ODE-like sampler,
1 matches the DDPM posterior variance of the (respaced) process."""

from __future__ import annotations

import torch

from ..diffusion.gaussian import GaussianDiffusion
from .ddpm import DenoiseFn, StepCallback, step_iter


@torch.no_grad()
def ddim_sample(fn: DenoiseFn, diffusion: GaussianDiffusion, noise: torch.Tensor, *, eta: float = 0.0,
                clip_denoised: bool = False, generator: torch.Generator | None = None, progress: bool = False,
                on_step: StepCallback | None = None) -> torch.Tensor:
    """DDIM from x_T = noise over the steps of `diffusion` (use a "ddimN" respacing for N steps).

    x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev).
    """
    if not 0 <= eta <= 1:
        # Above 1 the noise variance can exceed 1 - abar_prev and the deterministic coefficient
        # sqrt(1 - abar_prev - sigma^2) turns NaN.
        raise ValueError(f"DDIM eta must be in [0, 1] (0 deterministic, 1 DDPM-like noise), got {eta}")
    x = noise
    n = x.shape[0]
    steps = list(range(diffusion.num_timesteps))[::-1]
    for step, i in enumerate(step_iter(steps, progress, len(steps), "ddim")):
        t = torch.full((n,), i, device=x.device, dtype=torch.long)
        if on_step is not None:
            on_step(step, int(diffusion.timestep_map[i]))
        out = diffusion.p_mean_variance(fn, x, t, clip_denoised=clip_denoised)
        x0 = out["pred_xstart"]
        # eps is re-derived from the (possibly clipped) x0 so the update stays consistent with it.
        eps = diffusion.predict_eps_from_x0(x, t, x0)
        abar = diffusion.extract("alphas_cumprod", t, x)
        abar_prev = diffusion.extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        x = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        if i > 0 and eta > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x
