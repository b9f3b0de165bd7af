"""Gaussian diffusion (DDPM) as used by DiT / ADM: schedules, forward process, learned-range
variance, the hybrid MSE + VB loss, and timestep respacing.

Conventions:
- The network predicts eps. With ``model_var_type="learned_range"`` it outputs 2C channels,
  ``[eps | v]``, and v in [-1, 1] interpolates, in log space, between the posterior variance
  (v = -1) and beta_t (v = 1).
- Every schedule table is computed once in float64 numpy; lookups gather in float64 and cast
  to the dtype of the tensor they multiply, which is what the reference implementation does and
  what the fixtures assume.
- A diffusion works on its own step indices ``i`` in [0, num_timesteps). A respaced diffusion
  keeps a ``timestep_map`` and calls the model with the ORIGINAL timestep ``timestep_map[i]``,
  so a network trained with 1000 steps always sees t in [0, 999].
- A model function is ``fn(x, t, **model_kwargs) -> output``; when it returns a tuple (e.g. a
  DiT called with ``return_aux=True``) the first element is the prediction and the second is
  handed back as ``terms["aux"]`` by :meth:`GaussianDiffusion.training_losses`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
import torch

ModelFn = Callable[..., Any]

MODEL_VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")


# ---------------------------------------------------------------------------- schedules
def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM linear schedule 1e-4..2e-2, scaled by 1000/T so any T gives the same process shape."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 2e-2, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule: alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return np.array(betas, dtype=np.float64)


def named_betas(name: str, num_timesteps: int) -> np.ndarray:
    if name == "linear":
        return linear_betas(num_timesteps)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'cosine'")


# ---------------------------------------------------------------------------- respacing
def space_timesteps(num_timesteps: int, spec: str | int | Iterable[int]) -> set[int]:
    """Which original timesteps a respaced process keeps.

    ``"ddimN"``: the stride-s grid ``range(0, T, s)`` with exactly N entries (DDIM's spacing).
    ``"250"`` or ``"10,20,30"``: split [0, T) into equal sections and take the given number of
    evenly spaced (rounded) steps from each. An int is the single-section form.
    """
    if isinstance(spec, int):
        spec = str(spec)
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("ddim"):
            want = int(spec[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            if want == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(f"cannot take exactly {want} equally strided steps from {num_timesteps}")
        counts = [int(c) for c in spec.split(",")]
    else:
        counts = [int(c) for c in spec]

    per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = per + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Python's round (half to even) decides ties; kept so step sets match the reference.
        steps += [start + round(j * stride) for j in range(count)]
        start += size
    return set(steps)


# ---------------------------------------------------------------------------- math helpers
def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation of Phi used by DDPM / ADM; kept (rather than erf) so the VB term
    # matches the reference numbers.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of data in [-1, 1] quantised to 256 bins of width 2/255.

    The two outermost bins extend to -inf and +inf.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _split_output(out: Any) -> tuple[torch.Tensor, Any]:
    """A model may return (prediction, aux); normalise to that pair."""
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


# ---------------------------------------------------------------------------- the process
class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with an eps-predicting network.

    Args:
        betas: float64 noise schedule of this process (already respaced if respaced).
        model_var_type: "learned_range" (2C-channel output, hybrid loss), "fixed_small"
            (posterior variance) or "fixed_large" (beta_t; first entry the posterior's).
        timestep_map: original timestep of each step index (identity if None).
        rescale_vb: multiply the VB term by T/1000 (ADM's RESCALED_MSE; a no-op at T = 1000).
    """

    def __init__(self, betas: np.ndarray, model_var_type: str = "learned_range",
                 timestep_map: Iterable[int] | None = None, rescale_vb: bool = False):
        if model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(f"unknown model_var_type {model_var_type!r}; choose one of {MODEL_VAR_TYPES}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.model_var_type = model_var_type
        self.rescale_vb = rescale_vb
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(list(timestep_map), dtype=np.int64)
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map must have one entry per step")

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.betas = betas
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at step 0; its log is clipped to the step-1 value so the
        # learned-range interpolation stays finite there.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        else:
            self.posterior_log_variance_clipped = np.log(np.maximum(self.posterior_variance, betas))
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)
        # Fixed variances: the posterior's (log clipped as above), or beta_t with the posterior's
        # value at step 0 (ADM's "fixed_large", a better decoder at t = 0).
        self.fixed_small_variance = self.posterior_variance
        self.log_fixed_small_variance = self.posterior_log_variance_clipped
        head = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.fixed_large_variance = np.append(head, betas[1:])
        self.log_fixed_large_variance = np.log(self.fixed_large_variance)
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ lookups
    @property
    def learn_sigma(self) -> bool:
        return self.model_var_type == "learned_range"

    def extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] gathered in float64, cast to like.dtype, shaped to broadcast against like."""
        dev = t.device
        if dev.type == "mps":  # no float64 there: gather on the CPU
            vals = torch.from_numpy(getattr(self, name))[t.cpu()].to(device=like.device, dtype=like.dtype)
        else:
            key = (name, dev)
            table = self._device_tables.get(key)
            if table is None:
                table = self._device_tables[key] = torch.from_numpy(getattr(self, name)).to(dev)
            vals = table[t].to(like.dtype)
        return vals.view(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Step indices of this process -> timesteps the network was trained on."""
        key = ("_timestep_map", t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = torch.from_numpy(self.timestep_map).to(t.device)
        return table[t]

    def _call_model(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None) -> tuple[torch.Tensor, Any]:
        out, aux = _split_output(model_fn(x, self.model_timesteps(t), **(model_kwargs or {})))
        # Under autocast the network returns bf16/fp16; the process arithmetic stays in x's dtype.
        return out.to(x.dtype), aux

    def sample_timesteps(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform training step indices (N,) int64."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self.extract("sqrt_alphas_cumprod", t, x0) * x0 + self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self.extract("posterior_mean_coef1", t, xt) * x0 + self.extract("posterior_mean_coef2", t, xt) * xt
        var = self.extract("posterior_variance", t, xt)
        log_var = self.extract("posterior_log_variance_clipped", t, xt)
        return mean, var, log_var

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.extract("sqrt_recip_alphas_cumprod", t, xt) * xt - self.extract("sqrt_recipm1_alphas_cumprod", t, xt) * eps

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self.extract("sqrt_recip_alphas_cumprod", t, xt) * xt - x0) / self.extract("sqrt_recipm1_alphas_cumprod", t, xt)

    # ------------------------------------------------------------------ reverse process
    def mean_variance_from_output(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                                  clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """Turn a raw network output at step index t into p(x_{t-1} | x_t) and the x0 estimate."""
        c = xt.shape[1]
        if self.model_var_type == "learned_range":
            if out.shape[1] != 2 * c:
                raise ValueError(f"learned_range expects {2 * c} output channels, got {out.shape[1]}")
            eps, v = out[:, :c], out[:, c:]
            min_log = self.extract("posterior_log_variance_clipped", t, xt)
            max_log = self.extract("log_betas", t, xt)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            var = torch.exp(log_var)
        else:
            # A 2C-channel network may still be sampled with a fixed variance: ignore its v half.
            eps = out[:, :c]
            var_name = "fixed_small_variance" if self.model_var_type == "fixed_small" else "fixed_large_variance"
            var = self.extract(var_name, t, xt).expand_as(xt)
            log_var = self.extract("log_" + var_name, t, xt).expand_as(xt)
        x0 = self.predict_x0_from_eps(xt, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, xt, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": x0, "eps": eps}

    def p_mean_variance(self, model_fn: ModelFn, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                        model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """Evaluate the network at step index t (it sees the original timestep) and form p(x_{t-1} | x_t)."""
        out, _ = self._call_model(model_fn, xt, t, model_kwargs)
        return self.mean_variance_from_output(out, xt, t, clip_denoised)

    # ------------------------------------------------------------------ training
    def _vb_terms_bits(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, pred: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample VB term in bits: KL(q(x_{t-1}|x_t,x0) || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, pred["mean"], pred["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, pred["mean"], 0.5 * pred["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                        model_kwargs: dict | None = None) -> dict[str, Any]:
        """Per-sample losses (N,): ``mse`` on eps, ``vb`` (learned sigma only, else 0), ``loss`` = sum.

        The VB term sees the eps prediction detached, so it trains only the variance (the
        "hybrid" objective of Improved DDPM, as in DiT).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out, aux = self._call_model(model_fn, xt, t, model_kwargs)
        c = x0.shape[1]
        eps = out[:, :c]
        terms: dict[str, Any] = {"mse": mean_flat((noise - eps) ** 2)}
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
            pred = self.mean_variance_from_output(frozen, xt, t, clip_denoised=False)
            vb = self._vb_terms_bits(x0, xt, t, pred)
            if self.rescale_vb:
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
        else:
            terms["vb"] = torch.zeros_like(terms["mse"])
        terms["loss"] = terms["mse"] + terms["vb"]
        if aux is not None:
            terms["aux"] = aux
        return terms

    # ------------------------------------------------------------------ respacing
    def respace(self, spec: str | int | Iterable[int] | None) -> "GaussianDiffusion":
        """A process on a subset of this one's steps (see :func:`space_timesteps`).

        New betas are chosen so the kept steps have the same alpha_bar; the model keeps seeing
        the original timesteps through the composed ``timestep_map``.
        """
        if spec is None or spec == "" or spec == self.num_timesteps:
            return self
        keep = space_timesteps(self.num_timesteps, spec) if not isinstance(spec, set) else spec
        betas, tmap, last = [], [], 1.0
        for i, abar in enumerate(self.alphas_cumprod):
            if i in keep:
                betas.append(1.0 - abar / last)
                tmap.append(int(self.timestep_map[i]))
                last = abar
        return GaussianDiffusion(np.array(betas, dtype=np.float64), self.model_var_type, tmap, self.rescale_vb)


def create_diffusion(timestep_respacing: str | int | None = None, noise_schedule: str = "linear",
                     diffusion_steps: int = 1000, learn_sigma: bool = True, sigma_small: bool = False,
                     rescale_learned_sigmas: bool = False) -> GaussianDiffusion:
    """The DiT / DiT-MoE process: 1000 linear steps, learned-range sigma, hybrid loss by default.

    ``timestep_respacing`` ("250", "ddim50", "10,20,30" or an int) gives a sampling process.
    """
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    base = GaussianDiffusion(named_betas(noise_schedule, diffusion_steps), var_type, rescale_vb=rescale_learned_sigmas)
    return base.respace(timestep_respacing)
