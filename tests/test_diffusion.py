"""Gaussian diffusion and rectified flow: official parity, schedules, respacing, loss terms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditmoe.diffusion import GaussianDiffusion, RectifiedFlow, create_diffusion, space_timesteps
from ditmoe.diffusion.gaussian import cosine_betas, linear_betas
from ditmoe.samplers import ddim_sample
from tolerances import EPS32, TINY_DIT_CHAIN, TINY_DIT_K, assert_close_fp32

FIXTURES = Path(__file__).parent / "fixtures" / "official"


@pytest.fixture(scope="module")
def official():
    from ditmoe.convert import load_official

    model = load_official(str(FIXTURES / "official_tiny_moe.safetensors"))
    model.eval()
    return model, load_file(str(FIXTURES / "official_tiny_diffusion.safetensors"))


# ------------------------------------------------------------------------ official parity
def test_training_losses_match_official(official):
    model, f = official
    diffusion = create_diffusion()
    with torch.no_grad():
        terms = diffusion.training_losses(model, f["x0"], f["t"], noise=f["noise"], model_kwargs={"y": f["y"]})
    for key in ("loss", "mse", "vb"):
        assert terms[key].shape == (6,)
        # The official fp32 values from another CPU: the tiny DiT's fp32 chain plus the loss's own reduction.
        assert_close_fp32(terms[key], f[key], TINY_DIT_K, TINY_DIT_CHAIN + 1, key)


def test_ddim10_trajectory_matches_official(official):
    model, f = official
    diffusion = create_diffusion("ddim10")
    out = ddim_sample(lambda x, t: model(x, t, f["y"]), diffusion, f["zT"], eta=0.0, clip_denoised=False)
    # Ten network calls in sequence, each the tiny DiT's fp32 chain; the DDIM updates add no reduction.
    assert_close_fp32(out, f["ddim10_eta0"], TINY_DIT_K, 10 * TINY_DIT_CHAIN)


# ------------------------------------------------------------------------ schedules
def test_linear_schedule_scales_with_T():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(2e-2)
    b4 = linear_betas(4000)  # scaled by 1000/T
    assert b4[0] == pytest.approx(2.5e-5) and b4[-1] == pytest.approx(5e-3)


def test_cosine_schedule():
    b = cosine_betas(1000)
    assert (b > 0).all() and (b <= 0.999).all()
    ac = np.cumprod(1 - b)
    assert (np.diff(ac) < 0).all() and ac[-1] < 1e-4


def test_tables_are_float64_and_gather_to_tensor_dtype():
    d = create_diffusion()
    assert d.sqrt_recipm1_alphas_cumprod.dtype == np.float64
    t = torch.tensor([0, 999])
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(2, 4, 8, 8, dtype=dtype)
        g = d.extract("sqrt_alphas_cumprod", t, x)
        assert g.dtype == dtype and g.shape == (2, 1, 1, 1)
    g64 = d.extract("sqrt_alphas_cumprod", t, torch.zeros(2, 3, dtype=torch.float64)).flatten()
    np.testing.assert_array_equal(g64.numpy(), d.sqrt_alphas_cumprod[[0, 999]])


def test_q_sample_formula():
    d = create_diffusion()
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 500, 999])
    ac = torch.from_numpy(d.alphas_cumprod)[t].view(-1, 1, 1, 1)
    ref = ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double()  # float64
    terms = ac.sqrt() * x0.double().abs() + (1 - ac).sqrt() * noise.double().abs()
    # fp32: two coefficients rounded from float64, two products and a sum, each one rounding of
    # at most EPS32 / 2 relative to the terms: within 2 * EPS32 * (|a x0| + |b noise|).
    assert ((d.q_sample(x0, t, noise).double() - ref).abs() <= 2 * EPS32 * terms).all()


# ------------------------------------------------------------------------ respacing
def test_space_timesteps():
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    s = space_timesteps(1000, "250")
    assert len(s) == 250 and min(s) == 0 and max(s) == 999
    s = space_timesteps(1000, "10,20,30")
    assert len(s) == 60
    assert len([i for i in s if i < 334]) == 10 and len([i for i in s if 334 <= i < 667]) == 20
    assert space_timesteps(1000, 1000) == set(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim7000")
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respaced_process_keeps_alpha_bar_and_maps_timesteps():
    base = create_diffusion()
    d = base.respace("ddim10")
    assert d.num_timesteps == 10
    np.testing.assert_array_equal(d.timestep_map, np.arange(0, 1000, 100))
    # float64: alpha_bar re-derived through at most 1000 products, <= 1000 * 2^-53 = 1.1e-13 relative.
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[::100], rtol=1e-12)
    # Respacing a respaced process composes the maps.
    dd = d.respace({0, 5, 9})
    np.testing.assert_array_equal(dd.timestep_map, [0, 500, 900])
    np.testing.assert_allclose(dd.alphas_cumprod, base.alphas_cumprod[[0, 500, 900]], rtol=1e-12)

    seen = []

    def model(x, t, **kw):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    x0 = torch.randn(2, 4, 2, 2)
    d.training_losses(model, x0, torch.tensor([0, 9]))
    d.p_mean_variance(model, x0, torch.tensor([3, 7]))
    assert seen[0].tolist() == [0, 900] and seen[1].tolist() == [300, 700]


# ------------------------------------------------------------------------ loss terms
def test_vb_vanishes_for_the_true_posterior():
    # eps = the true noise and v = -1 (variance = posterior variance) make p equal q(x_{t-1}|x_t,x0):
    # the KL is 0 for every t >= 1 (t = 0 is the decoder NLL instead).
    d = create_diffusion()
    x0, noise = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    model = lambda x, t: torch.cat([noise, -torch.ones_like(noise)], dim=1)  # noqa: E731
    terms = d.training_losses(model, x0, t, noise=noise)
    assert terms["mse"].abs().max() < 1e-20
    assert terms["vb"].abs().max() < 1e-9  # float64 rounding of log-variance terms of size ~10: about 1e-15
    # t = 0: the decoder NLL in bits is positive.
    terms0 = d.training_losses(model, x0, torch.zeros(4, dtype=torch.long), noise=noise)
    assert (terms0["vb"] > 0).all()


def test_vb_trains_only_the_variance_half():
    d = create_diffusion()
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, t: out, x0, torch.tensor([3, 400]), noise=noise)
    (g,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert g[:, :3].abs().max() == 0 and g[:, 3:].abs().max() > 0
    assert torch.equal(terms["loss"], terms["mse"] + terms["vb"])  # the same one fp32 addition


def test_fixed_variance_loss_is_mse_and_aux_passthrough():
    d = create_diffusion(learn_sigma=False)
    assert d.model_var_type == "fixed_large" and not d.learn_sigma
    x0 = torch.randn(2, 3, 4, 4)
    aux = torch.tensor([0.1, 0.2])
    terms = d.training_losses(lambda x, t: (torch.zeros_like(x), aux), x0, torch.tensor([0, 5]))
    assert torch.equal(terms["vb"], torch.zeros(2)) and torch.equal(terms["loss"], terms["mse"])
    assert terms["aux"] is aux


def test_bad_arguments():
    with pytest.raises(ValueError):
        GaussianDiffusion(linear_betas(10), model_var_type="learned")
    with pytest.raises(ValueError):
        create_diffusion(noise_schedule="sqrt")
    with pytest.raises(ValueError):
        RectifiedFlow(time_dist="beta")


# ------------------------------------------------------------------------ rectified flow
def test_flow_path_and_target():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = RectifiedFlow.interpolate(x0, t, noise)
    # t in {0, 1}: exact (1 * x + 0 * y). t = 1/4: 0.75 and 0.25 are exact in fp32, two products
    # and a sum rounded once each, within 1.5 * EPS32 * (|x0| + |noise|) < 1e-5 (assert_close's fp32 atol).
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(RectifiedFlow.target(x0, noise), noise - x0)


def test_flow_time_distributions():
    g = torch.Generator().manual_seed(0)
    t = RectifiedFlow("logit_normal", mean=0.5, std=0.7).sample_t(200_000, generator=g)
    assert t.dtype == torch.float32 and (t > 0).all() and (t < 1).all()
    logit = torch.log(t / (1 - t))
    # Standard errors at n = 2e5: 0.7 / sqrt(n) = 0.0016 for the mean, 0.7 / sqrt(2n) = 0.0011 for the std.
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.7) < 0.01
    u = RectifiedFlow("uniform").sample_t(200_000, generator=g)
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002


def test_flow_training_losses():
    flow = RectifiedFlow()
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    seen = {}

    def perfect(x, tt, y=None):
        seen["t"], seen["y"] = tt, y
        # A learn_sigma network: 2C channels, the second half is ignored.
        return torch.cat([noise - x0, torch.full_like(x0, 7.0)], dim=1)

    terms = flow.training_losses(perfect, x0, t, noise=noise, model_kwargs={"y": torch.arange(4)})
    # The prediction is noise - x0 exactly as the target is computed: a zero difference, no rounding.
    assert terms["loss"].shape == (4,) and terms["loss"].abs().max() < 1e-10
    assert torch.equal(seen["t"], t) and seen["t"].dtype == torch.float32  # unscaled t in [0, 1]
    zero = flow.training_losses(lambda x, tt: torch.zeros_like(x), x0, t, noise=noise)
    # Against float64: a fp32 mean of 3 * 4 * 4 = 48 squares of rounded differences (chain 2, tolerances.py).
    assert_close_fp32(zero["mse"], ((noise.double() - x0.double()) ** 2).mean(dim=(1, 2, 3)), 48, chain=2)
    # t and noise are drawn when not given, from the generator when one is passed.
    a = flow.training_losses(lambda x, tt: x, x0, generator=torch.Generator().manual_seed(3))
    b = flow.training_losses(lambda x, tt: x, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["loss"], b["loss"]) and math.isfinite(a["loss"].sum().item())


@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_flow_loss_of_each_prediction_in_closed_form(prediction):
    """A network whose guess is off by a known delta has a known velocity MSE. Velocity networks:
    mean(delta^2). Data networks (x0 + delta), whose velocity is (x_t - x0_hat) / max(t, T_MIN):
    mean(delta^2) / t^2 from T_MIN up; below it the clamped division leaves (t / T_MIN - 1)(noise - x0)."""
    from ditmoe.diffusion.flow import DATA_PREDICTION_T_MIN as T_MIN

    g = torch.Generator().manual_seed(0)
    x0, noise, delta = (torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.01, T_MIN, 0.3, 0.9], dtype=torch.float64)
    flow = RectifiedFlow(prediction=prediction)

    def net(xt, tt):
        return (noise - x0 + delta) if prediction == "velocity" else (x0 + delta)

    loss = flow.training_losses(net, x0, t, noise)["loss"]
    tb = t.view(-1, 1, 1, 1)
    if prediction == "velocity":
        err = delta
    else:
        err = (tb / tb.clamp(min=T_MIN) - 1) * (noise - x0) - delta / tb.clamp(min=T_MIN)
    want = (err ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, want, rtol=1e-12, atol=0)
    if prediction == "data":
        assert torch.allclose(loss[1:], (delta ** 2).mean(dim=(1, 2, 3))[1:] / t[1:] ** 2, rtol=1e-12)


def test_flow_prediction_is_refused_for_ddpm():
    from ditmoe.config import ModelConfig, TrainConfig
    from ditmoe.train.loop import build_process

    with pytest.raises(ValueError, match="flow_prediction data is for flow models"):
        build_process(TrainConfig(process="ddpm"), ModelConfig(flow_prediction="data"))
    with pytest.raises(ValueError, match="flow_prediction"):
        ModelConfig(flow_prediction="eps").validate()
