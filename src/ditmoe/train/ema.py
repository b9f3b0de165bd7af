"""Exponential moving average of model weights (results are reported with the EMA weights)."""

from __future__ import annotations

import copy

import torch


def ema_decay_at(decay: float, warmup: bool, step: int) -> float:
    """Decay used for the update after optimizer step `step` (0-based), under every layout.

    With warm-up the decay is min(decay, (1 + step) / (10 + step)): a fixed 0.999 would still
    hold 25% of the random initial weights after 1400 steps, which ruins short runs; long
    runs reach the nominal decay early (0.9999 after about 90k steps, as in DiT's 400k).
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def copy_buffers(ema_model: torch.nn.Module, model: torch.nn.Module) -> None:
    """The live model's buffers into the EMA copy, by name: state such as a router's selection bias
    or inference threshold is copied, not averaged (an average of biases is no bias the model was
    trained with)."""
    live = dict(model.named_buffers())
    for name, b in ema_model.named_buffers():
        src = live.get(name)
        if src is not None and src.shape == b.shape:
            b.copy_(src)


class EMA:
    """Keeps a frozen copy of the model; `update` moves it towards the live weights.

    The copy is a full module so it can be sampled from, saved and exported directly.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return ema_decay_at(self.decay, self.warmup, step)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        decay = self.decay if step is None else self.decay_at(step)
        ema_params = [p for p in self.model.parameters()]
        live = [p.detach() for p in model.parameters()]
        # lerp towards the live weights: e <- e + (1 - decay) (p - e) == decay e + (1 - decay) p.
        torch._foreach_lerp_(ema_params, [p.to(e.dtype) for p, e in zip(live, ema_params)], 1.0 - decay)
        copy_buffers(self.model, model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(sd)
