"""Rectified flow (the process of the released DiT-MoE XL and G checkpoints).

Path and target: ``x_t = (1 - t) x0 + t noise`` and the network regresses the constant velocity
``v = noise - x0`` with a per-sample MSE. Training times come from a logit-normal distribution
(``sigmoid(N(mean, std))``, the official recipe with mean 0, std 1) or from U(0, 1).

Time convention: everything here and in the ODE samplers uses continuous ``t`` in [0, 1], with
t = 1 pure noise and t = 0 data, and the network is called as ``fn(x, t, ...)`` with that float
t. Matching the network's timestep embedding to this range is the MODEL's business, through
``ModelConfig.timestep_scale`` (the model embeds ``t * timestep_scale``): the official flow
checkpoints were trained on t in (0, 1) fed straight into the sinusoid (scale 1), flows trained
with this package use scale 1000 so the embedding sees DDPM's range. The process never rescales t.

A network with ``learn_sigma`` outputs 2C channels; only the first C (the prediction) are used,
as in the official code.

What the network predicts (``ModelConfig.flow_prediction``): the velocity itself (the paper's
models), or the clean image x0 ("data"), from which the velocity is ``(x_t - x0) / t``. The
loss is the velocity MSE either way. Predicting data spares a patchified network the work of
carrying the full-dimensional noise through to its output (a velocity contains the noise, an
image does not), which small pixel-space models otherwise learn slowly and leave as speckle.
``1 / t`` is bounded by taking ``max(t, DATA_PREDICTION_T_MIN)``, in training and sampling alike.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .gaussian import _split_output, mean_flat

ModelFn = Callable[..., Any]

TIME_DISTS = ("logit_normal", "uniform")
DATA_PREDICTION_T_MIN = 0.05  # the velocity from a data prediction divides by max(t, this)


def velocity_from_output(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float,
                         prediction: str = "velocity") -> torch.Tensor:
    """The velocity a network output stands for (first C channels, in x_t's dtype).

    `t`: a float or (N,) times of x_t. prediction "velocity": the output itself; "data": the
    output is x0, and the velocity (x_t - x0) / max(t, DATA_PREDICTION_T_MIN).
    """
    pred = out[:, : x_t.shape[1]].to(x_t.dtype)
    if prediction == "velocity":
        return pred
    if prediction != "data":
        raise ValueError(f"unknown flow prediction {prediction!r}; choose velocity or data")
    if isinstance(t, torch.Tensor):
        t = t.to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1))).clamp(min=DATA_PREDICTION_T_MIN)
    else:
        t = max(float(t), DATA_PREDICTION_T_MIN)
    return (x_t - pred) / t


class RectifiedFlow:
    """Linear noise-to-data path, trained on the velocity MSE.

    Args:
        time_dist: "logit_normal" (t = sigmoid(N(mean, std))) or "uniform" (t ~ U(0, 1)).
        mean, std: parameters of the logit-normal's underlying normal.
        prediction: what the network outputs, "velocity" or "data" (see the module docstring).
    """

    def __init__(self, time_dist: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                 prediction: str = "velocity"):
        if time_dist not in TIME_DISTS:
            raise ValueError(f"unknown time_dist {time_dist!r}; choose one of {TIME_DISTS}")
        if std <= 0:
            raise ValueError(f"logit-normal std must be positive, got {std}")
        if prediction not in ("velocity", "data"):
            raise ValueError(f"unknown flow prediction {prediction!r}; choose velocity or data")
        self.time_dist, self.mean, self.std, self.prediction = time_dist, mean, std, prediction

    def sample_t(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times (N,) float32 in (0, 1)."""
        if self.time_dist == "uniform":
            return torch.rand(n, device=device, generator=generator)
        z = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(self.mean + self.std * z)

    @staticmethod
    def interpolate(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t noise, with t (N,) broadcast over the sample dimensions."""
        tb = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return (1 - tb) * x0 + tb * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity d x_t / d t = noise - x0."""
        return noise - x0

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, model_kwargs: dict | None = None,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        """Per-sample velocity MSE (N,) as ``loss`` and ``mse``; ``aux`` if the model returns one."""
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        xt = self.interpolate(x0, t, noise)
        out, aux = _split_output(model_fn(xt, t, **(model_kwargs or {})))
        mse = mean_flat((self.target(x0, noise) - velocity_from_output(out, xt, t, self.prediction)) ** 2)
        terms: dict[str, Any] = {"loss": mse, "mse": mse}
        if aux is not None:
            terms["aux"] = aux
        return terms
