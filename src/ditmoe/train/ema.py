"""Exponential moving average of model weights (results are reported with the EMA weights)."""

from __future__ import annotations

import copy

import torch


class EMA:
    """Keeps a frozen copy of the model; `update` moves it towards the live weights.

    The copy is a full module so it can be sampled from, saved and exported directly.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = [p for p in self.model.parameters()]
        live = [p.detach() for p in model.parameters()]
        # lerp towards the live weights: e <- e + (1 - decay) (p - e) == decay e + (1 - decay) p.
        torch._foreach_lerp_(ema_params, [p.to(e.dtype) for p, e in zip(live, ema_params)], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(sd)
