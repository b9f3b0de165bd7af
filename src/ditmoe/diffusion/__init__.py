"""Diffusion processes: Gaussian DDPM (DiT / ADM) and rectified flow.

A process knows its noise schedule, forward corruption and training loss; it knows nothing of
the network class (it calls a function of ``(x, t, **kwargs)``) and nothing of samplers.
"""

from .flow import RectifiedFlow
from .gaussian import GaussianDiffusion, create_diffusion, space_timesteps

__all__ = ["GaussianDiffusion", "RectifiedFlow", "create_diffusion", "space_timesteps"]
