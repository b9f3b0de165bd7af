"""DDPM ancestral sampling: x_{t-1} ~ N(mu_theta(x_t, t), Sigma_theta(x_t, t)), step by step."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

import torch

from ..diffusion.gaussian import GaussianDiffusion

# fn(x (N, ...), t (N,)) -> network output; for Gaussian processes t is the ORIGINAL timestep.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# on_step(step_index, t): called before every network evaluation; step_index counts sampling
# steps from 0, t is the time the network is about to see (a python number).
StepCallback = Callable[[int, float], None]

_T = TypeVar("_T")


def step_iter(items: Iterable[_T], progress: bool, total: int, desc: str) -> Iterator[_T]:
    """Optionally wrap the step loop in a tqdm bar (imported only when asked for)."""
    if not progress:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, total=total, desc=desc, leave=False))


@torch.no_grad()
def ddpm_sample(fn: DenoiseFn, diffusion: GaussianDiffusion, noise: torch.Tensor, *, clip_denoised: bool = False,
                generator: torch.Generator | None = None, progress: bool = False,
                on_step: StepCallback | None = None) -> torch.Tensor:
    """Run the reverse chain of `diffusion` (respaced or not) from x_T = noise to x_0.

    The per-step noise is drawn from `generator`, so a fixed generator seed fixes the samples.
    """
    x = noise
    n = x.shape[0]
    steps = list(range(diffusion.num_timesteps))[::-1]
    for step, i in enumerate(step_iter(steps, progress, len(steps), "ddpm")):
        t = torch.full((n,), i, device=x.device, dtype=torch.long)
        if on_step is not None:
            on_step(step, int(diffusion.timestep_map[i]))
        out = diffusion.p_mean_variance(fn, x, t, clip_denoised=clip_denoised)
        if i > 0:
            z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
        else:  # the last step returns the mean: no noise is added to the final sample
            x = out["mean"]
    return x
