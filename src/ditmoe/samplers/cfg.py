"""Classifier-free guidance as a wrapper: (model, labels) -> fn(x, t) for any sampler.

out = uncond + scale * (cond - uncond) on the prediction channels (eps or velocity) only; the
rest of the output (a learned-sigma half) comes from the conditional branch. Both branches go
through the network as ONE batch of 2N, which is what the official code does and what keeps
the routing statistics of a MoE batch comparable with it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .ddpm import DenoiseFn


def guided(model: Callable[..., torch.Tensor], y: torch.Tensor, null_label: int, scale: float,
           channels: str | int = "all", interval: tuple[float, float] | None = None) -> DenoiseFn:
    """Guided denoiser fn(x (N, ...), t (N,)) for a class-conditional model(x, t, y).

    Args:
        y: labels (N,) of the conditional branch; the unconditional one uses `null_label`.
        channels: "all" guides the first C output channels (C = x's channels, the standard);
            an int k guides only the first k (3 reproduces the official DiT / DiT-MoE code,
            whose remaining prediction channel then follows the conditional branch).
        interval: (lo, hi) in the sampler's time (what fn receives: the original timestep for
            DDPM/DDIM, t in [0, 1] for flows). Guidance applies where lo <= t <= hi; elsewhere
            the output is the conditional one, and a step with no guided sample evaluates only
            the conditional branch (batch N) to save the work.
    """
    if channels != "all" and (not isinstance(channels, int) or channels < 1):
        raise ValueError(f"channels must be 'all' or a positive int, got {channels!r}")
    if interval is not None and interval[0] > interval[1]:
        raise ValueError(f"guidance interval {interval} has lo > hi")

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        labels = y.to(x.device)
        if interval is None:
            active = torch.ones(n, dtype=torch.bool, device=x.device)
        else:
            active = (t >= interval[0]) & (t <= interval[1])
        # Guidance scale 1 is the conditional model; skip the second branch.
        if scale == 1.0 or not bool(active.any()):
            return model(x, t, labels)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)]))
        cond, uncond = out[:n], out[n:]
        k = x.shape[1] if channels == "all" else min(int(channels), out.shape[1])
        g = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
        if not bool(active.all()):
            g = torch.where(active.view(-1, *([1] * (g.ndim - 1))), g, cond[:, :k])
        return torch.cat([g, cond[:, k:]], dim=1)

    return fn


def conditional(model: Callable[..., torch.Tensor], y: torch.Tensor) -> DenoiseFn:
    """Unguided fn(x, t) = model(x, t, y)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> Any:
        return model(x, t, y.to(x.device))

    return fn
