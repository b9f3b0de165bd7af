"""ODE samplers for rectified flow: integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data).

The time grid is uniform in t, optionally warped by the shift t' = s t / (1 + (s - 1) t), which
for s > 1 spends more steps near the noise end (as in SD3). The network sees t in [0, 1]; its
own `timestep_scale` maps that to the embedding's range (see `ditmoe.diffusion.flow`).
A network output with 2C channels (learn_sigma) is cut to its first C: the velocity, or for a
model that predicts data (`prediction="data"`) the clean image, turned into the velocity.
"""

from __future__ import annotations

import torch

from ..diffusion.flow import velocity_from_output
from .ddpm import DenoiseFn, StepCallback, step_iter


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = shift t / (1 + (shift - 1) t); keeps 0 -> 0 and 1 -> 1."""
    if shift <= 0:
        raise ValueError(f"time shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def flow_timesteps(steps: int, shift: float = 1.0, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """steps + 1 decreasing times from 1 to 0 (computed in float64, then cast)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        t = shift_time(t, shift)
    return t.to(device=device, dtype=dtype)


def _velocity(fn: DenoiseFn, x: torch.Tensor, t: float, step: int, on_step: StepCallback | None,
              prediction: str) -> torch.Tensor:
    if on_step is not None:
        on_step(step, t)
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    # Under autocast the network returns bf16/fp16; integrate in x's dtype.
    return velocity_from_output(fn(x, tt), x, t, prediction)


@torch.no_grad()
def euler_sample(fn: DenoiseFn, noise: torch.Tensor, steps: int, *, shift: float = 1.0, progress: bool = False,
                 on_step: StepCallback | None = None, prediction: str = "velocity") -> torch.Tensor:
    """Explicit Euler: `steps` network evaluations, at t = t_0 = 1, ..., t_{steps-1} (never at 0)."""
    ts = flow_timesteps(steps, shift).tolist()
    x = noise
    for i in step_iter(range(steps), progress, steps, "euler"):
        x = x + (ts[i + 1] - ts[i]) * _velocity(fn, x, ts[i], i, on_step, prediction)
    return x


@torch.no_grad()
def heun_sample(fn: DenoiseFn, noise: torch.Tensor, steps: int, *, shift: float = 1.0, progress: bool = False,
                on_step: StepCallback | None = None, prediction: str = "velocity") -> torch.Tensor:
    """Heun (explicit trapezoid): 2 evaluations per step, the last one at t = 0.

    Unlike EDM's sigma parameterisation, the flow velocity is finite at t = 0, so the last step
    keeps its correction (second order all the way).
    """
    ts = flow_timesteps(steps, shift).tolist()
    x = noise
    for i in step_iter(range(steps), progress, steps, "heun"):
        dt = ts[i + 1] - ts[i]
        d1 = _velocity(fn, x, ts[i], i, on_step, prediction)
        d2 = _velocity(fn, x + dt * d1, ts[i + 1], i, on_step, prediction)
        x = x + dt * 0.5 * (d1 + d2)
    return x
