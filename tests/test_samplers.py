"""Samplers: exactness on analytic Gaussian data, CFG wrapper, callbacks, bf16 ends, determinism."""

from __future__ import annotations

import math

import pytest
import torch

import ditmoe
from ditmoe.diffusion import create_diffusion
from ditmoe.samplers import (PROCESS_SAMPLERS, ddim_sample, ddpm_sample, euler_sample, flow_timesteps, guided,
                             heun_sample, sample, shift_time)
from tolerances import rel_err

# ------------------------------------------------------------------------ analytic models
# Data: 3 independent dimensions x0_d ~ N(MU_d, S_d^2); one at unit variance, one narrower and
# one wider than the noise.
MU = torch.tensor([0.5, -1.0, 1.0])
S = torch.tensor([1.0, 0.5, 2.0])
N = 20_000  # samples per dimension


def exact_eps(base):
    """E[eps | x_t] for x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, at the ORIGINAL timestep t.

    Returned as a learned-range output [eps | v = +1]: log-variance = log beta_t, i.e. DDPM's
    sigma^2 = beta, which is the exact reverse variance for unit-variance data.
    """
    abar = torch.from_numpy(base.alphas_cumprod).float()

    def fn(x, t):
        ab = abar[t].view(-1, 1)
        var = ab * S ** 2 + 1 - ab
        eps = (1 - ab).sqrt() / var * (x - ab.sqrt() * MU)
        return torch.cat([eps, torch.ones_like(eps)], dim=1)

    return fn


def exact_velocity(x, t):
    """E[noise - x0 | x_t] for x_t = (1 - t) x0 + t noise."""
    t = t.view(-1, 1)
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    r = x - (1 - t) * MU
    return t / var * r - (MU + (1 - t) * S ** 2 / var * r)


def run_sampler(name: str, noise: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    base = create_diffusion()
    if name == "ddpm":
        return ddpm_sample(exact_eps(base), base.respace("250"), noise, generator=gen)
    if name == "ddim_eta0":
        return ddim_sample(exact_eps(base), base.respace("ddim250"), noise, eta=0.0)
    if name == "ddim_eta1":
        return ddim_sample(exact_eps(base), base.respace("ddim250"), noise, eta=1.0, generator=gen)
    if name == "euler":
        return euler_sample(exact_velocity, noise, 200)
    if name == "heun_shift3":
        return heun_sample(exact_velocity, noise, 25, shift=3.0)
    raise AssertionError(name)


# Tolerance = 4 Monte-Carlo standard errors + the sampler's discretisation bias.
# Standard errors with N samples: mean sigma / sqrt(N) (0.0071 sigma), variance
# sigma^2 sqrt(2 / (N - 1)) (1.0 % relative); 4 of them: 0.028 sigma and 4.0 %.
# Discretisation biases (worst dimension) measured once in float64 with these exact models, by
# 1e6-sample (ddpm, ddim eta 0 via the exact linear map x_T -> x_0) or 2e5-sample runs:
#   ddpm 250 steps, sigma^2 = beta:   mean 0.001 sigma,  variance +1.4 %
#   ddim eta 0, 250 steps:            mean 0.0075 sigma (the prior N(0, 1) vs the true x_T), variance -2.3 %
#   ddim eta 1, 250 steps:            mean 0.002 sigma,  variance -5.5 % (posterior variance under-disperses
#                                     data narrower than the noise; -3.4 % at 500 steps, -1.8 % at 1000)
#   euler 200 steps:                  mean 0 (the mean ODE is exact for Euler here), variance -1.5 %
#   heun 25 steps, shift 3:           mean 0, variance -0.5 %
# The bias allowances below round those up.
BIAS = {  # (mean in sigma, relative variance)
    "ddpm": (0.005, 0.02),
    "ddim_eta0": (0.01, 0.03),
    "ddim_eta1": (0.005, 0.065),
    "euler": (0.005, 0.02),
    "heun_shift3": (0.005, 0.01),
}


@pytest.mark.parametrize("name", list(BIAS))
def test_sampler_reproduces_gaussian_data(name):
    gen = torch.Generator().manual_seed(1234)
    noise = torch.randn(N, 3, generator=gen)
    out = run_sampler(name, noise, gen)
    assert out.shape == (N, 3) and torch.isfinite(out).all()
    mean_err = ((out.mean(0) - MU) / S).abs()
    var_err = (out.var(0) / S ** 2 - 1).abs()
    b_mean, b_var = BIAS[name]
    assert (mean_err < 4 / math.sqrt(N) + b_mean).all(), mean_err
    assert (var_err < 4 * math.sqrt(2 / (N - 1)) + b_var).all(), var_err


def test_ddim_eta1_equals_ddpm_with_posterior_variance():
    # With eta = 1 DDIM's update is algebraically DDPM's with sigma^2 = posterior variance; both
    # draw one noise per step (none at the last), so the same generator gives the same samples.
    base = create_diffusion(learn_sigma=False, sigma_small=True)
    d = base.respace("20")
    fn = lambda x, t: exact_eps(base)(x, t)[:, :3]  # noqa: E731
    for dtype in (torch.float32, torch.float64):
        noise = torch.randn(500, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
        a = ddpm_sample(fn, d, noise, generator=torch.Generator().manual_seed(1))
        b = ddim_sample(fn, d, noise, eta=1.0, generator=torch.Generator().manual_seed(1))
        assert a.dtype == b.dtype == dtype
        # Two elementwise formulas, no reductions: 20 steps of at most ~8 roundings each (eps = 2u
        # covers both sides); the map x_T -> x_0 of this data has gain <= max S = 2, inside the count.
        assert rel_err(a, b) < 20 * 8 * torch.finfo(dtype).eps, dtype


def test_time_shift():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > t[1:-1]).all() and (s.diff() > 0).all()
    ts = flow_timesteps(4, shift=3.0)
    assert ts.shape == (5,) and ts[0] == 1 and ts[-1] == 0 and (ts.diff() < 0).all()
    with pytest.raises(ValueError):
        flow_timesteps(0)


# ------------------------------------------------------------------------ CFG
class RecordingModel:
    """A fake 2C-channel network: out = [x + label, 10 + label]; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        yb = y.to(x.dtype).view(-1, 1, 1, 1)
        return torch.cat([x + yb, 10 + yb.expand_as(x)], dim=1)


def test_cfg_all_channels_vs_legacy_three():
    model = RecordingModel()
    x = torch.zeros(2, 4, 2, 2)
    t = torch.tensor([5, 5])
    y = torch.tensor([3, 1])
    null, scale = 10, 2.0
    out_all = guided(model, y, null, scale, channels="all")(x, t)
    out_3 = guided(model, y, null, scale, channels=3)(x, t)
    yv = y.float().view(-1, 1, 1, 1)
    g = null + scale * (yv - null)  # uncond + s (cond - uncond) on x + label
    assert out_all.shape == out_3.shape == (2, 8, 2, 2)
    # Small integers and a scale of 2 (below, 3): every value here is exact in fp32.
    torch.testing.assert_close(out_all[:, :4], g.expand(2, 4, 2, 2))
    torch.testing.assert_close(out_3[:, :3], g.expand(2, 3, 2, 2))
    # Legacy mode: the 4th prediction channel comes unguided from the conditional branch.
    torch.testing.assert_close(out_3[:, 3], yv[:, 0].expand(2, 2, 2))
    # The sigma half always comes from the conditional branch.
    for out in (out_all, out_3):
        torch.testing.assert_close(out[:, 4:], (10 + yv).expand(2, 4, 2, 2))


def test_cfg_one_batch_per_step():
    model = RecordingModel()
    n, steps = 3, 6
    y = torch.tensor([0, 1, 2])
    step_log = []
    noise = torch.randn(n, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    d = create_diffusion(f"ddim{steps}")
    ddim_sample(guided(model, y, 10, 4.0), d, noise, on_step=lambda i, t: step_log.append((i, t)))
    assert len(model.calls) == steps and all(c[0] == 2 * n for c in model.calls)
    assert all(torch.equal(c[2], torch.tensor([0, 1, 2, 10, 10, 10])) for c in model.calls)
    # on_step is called before each evaluation, with the original timestep the network sees.
    assert step_log == [(i, int(t)) for i, t in enumerate(d.timestep_map[::-1])]
    assert [int(c[1][0]) for c in model.calls] == [t for _, t in step_log]

    model.calls.clear()
    step_log.clear()
    heun_sample(guided(model, y, 10, 4.0), noise, steps, on_step=lambda i, t: step_log.append((i, t)))
    assert len(model.calls) == 2 * steps and all(c[0] == 2 * n for c in model.calls)
    assert [i for i, _ in step_log] == [i for i in range(steps) for _ in range(2)]
    assert step_log[0][1] == 1.0 and step_log[-1][1] == 0.0


def test_cfg_interval_leaves_outside_steps_unguided():
    y = torch.tensor([2, 5])
    lo, hi = 0.25, 0.55  # no grid time (multiples of 0.1) sits on a boundary
    model = RecordingModel()
    fn = guided(model, y, 10, 3.0, interval=(lo, hi))
    noise = torch.zeros(2, 4, 2, 2)
    euler_sample(fn, noise, 10)
    for batch, t, labels in model.calls:
        inside = lo <= float(t[0]) <= hi
        # Guided steps run both branches in one batch; the others only the conditional one.
        assert batch == (4 if inside else 2), (float(t[0]), batch)
        assert torch.equal(labels[:2], y)
    assert sum(c[0] == 4 for c in model.calls) == 3  # t = 0.5, 0.4, 0.3

    # Per-sample mask: a batch straddling the interval guides only the samples inside it.
    model.calls.clear()
    x = torch.zeros(2, 4, 2, 2)
    out = fn(x, torch.tensor([0.5, 0.9]))
    assert len(model.calls) == 1 and model.calls[0][0] == 4
    # Small integers and scale 3: exact in fp32.
    assert torch.allclose(out[0, :4], torch.tensor(10 + 3.0 * (2 - 10)))  # guided
    assert torch.allclose(out[1, :4], torch.tensor(5.0))  # conditional only


def test_cfg_rejects_bad_arguments():
    with pytest.raises(ValueError):
        guided(RecordingModel(), torch.tensor([0]), 10, 2.0, channels="some")
    with pytest.raises(ValueError):
        guided(RecordingModel(), torch.tensor([0]), 10, 2.0, interval=(0.8, 0.2))


# ------------------------------------------------------------------------ the real debug model
@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    model = ditmoe.create_model("debug").eval()
    # adaLN-Zero init makes the fresh model output exactly 0; random weights give every path signal.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, 0.08)
    return model


def test_bf16_autocast_time_range_ends_are_finite(debug_model):
    y = torch.tensor([1, 4, 10])
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    fn_seen = []

    def fn(x, t):
        fn_seen.append(t.tolist())
        out = guided(debug_model, y, 10, 4.0)(x, t)
        assert torch.isfinite(out).all(), t
        return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = create_diffusion("2")  # steps {0, 999}: the network sees t = 999, then t = 0
        outs = [ddpm_sample(fn, d, noise, generator=gen), ddim_sample(fn, d, noise, eta=0.5, generator=gen)]
        outs += [euler_sample(fn, noise, 2), heun_sample(fn, noise, 2)]  # flow t = 1, 0.5 and Heun's t = 0
    assert [999, 999, 999] in fn_seen and [0, 0, 0] in fn_seen
    assert [1.0, 1.0, 1.0] in fn_seen and [0.0, 0.0, 0.0] in fn_seen
    for out in outs:
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("process,sampler", [(p, s) for p, ss in PROCESS_SAMPLERS.items() for s in ss])
def test_fixed_seed_gives_identical_samples(debug_model, process, sampler):
    y = torch.tensor([0, 7])
    kw = dict(steps=3, labels=y, cfg_scale=2.0, eta=1.0)
    a = sample(debug_model, process, sampler, seed=11, **kw)
    b = sample(debug_model, process, sampler, seed=11, **kw)
    c = sample(debug_model, process, sampler, seed=12, **kw)
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)  # a, b: the same computation twice in one process


def test_sample_front_door(debug_model):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([3, 9])
    # The front door is the samplers composed by hand: the same calls in the same order, bit for bit.
    a = sample(debug_model, "flow", "heun", 4, labels=y, cfg_scale=1.5, noise=noise, shift=2.0, cfg_channels=3)
    b = heun_sample(guided(debug_model, y, 10, 1.5, channels=3), noise, 4, shift=2.0)
    assert torch.equal(a, b)
    a = sample(debug_model, "ddpm", "ddim", 5, labels=y, noise=noise)
    b = ddim_sample(lambda x, t: debug_model(x, t, y), create_diffusion("ddim5"), noise)
    assert torch.equal(a, b)
    steps = []
    sample(debug_model, "ddpm", "ddpm", 4, labels=y, noise=noise, seed=0, on_step=lambda i, t: steps.append(i),
           progress=True)
    assert steps == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="does not fit"):
        sample(debug_model, "flow", "ddim", 4, labels=y)
    with pytest.raises(ValueError, match="unknown process"):
        sample(debug_model, "sde", "euler", 4, labels=y)


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_rejects_eta_outside_unit_interval(eta):
    from ditmoe.diffusion.gaussian import create_diffusion
    from ditmoe.samplers import ddim_sample

    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        ddim_sample(lambda x, t: torch.zeros_like(x), create_diffusion("ddim5", learn_sigma=False),
                    torch.zeros(2, 3), eta=eta)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_data_prediction_samples_as_the_velocity_it_stands_for(sampler):
    """A data-predicting network that outputs x_t - max(t, T_MIN) v for the exact velocity v (the
    minimiser of its training loss) samples the analytic data exactly as the velocity network."""
    from ditmoe.diffusion.flow import DATA_PREDICTION_T_MIN as T_MIN

    def exact_data(x, t):
        return x - t.clamp(min=T_MIN).view(-1, 1) * exact_velocity(x, t)

    noise = torch.randn(500, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    run = euler_sample if sampler == "euler" else heun_sample
    want = run(exact_velocity, noise, 20)
    got = run(exact_data, noise, 20, prediction="data")
    assert rel_err(got, want) < 1e-12


def test_sample_reads_the_prediction_from_the_model_config():
    """`sample` samples a model that predicts data with the data-to-velocity conversion: the same
    images as the plain Euler loop over the conditional network with prediction="data"."""
    torch.manual_seed(0)
    model = ditmoe.create_model("debug", flow_prediction="data", learn_sigma=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    y = torch.tensor([1, 2])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    got = sample(model, "flow", "euler", 5, labels=y, noise=noise)
    with torch.no_grad():
        want = euler_sample(lambda x, t: model(x, t, y), noise, 5, prediction="data")
        as_velocity = euler_sample(lambda x, t: model(x, t, y), noise, 5)
    assert torch.equal(got, want)
    assert rel_err(as_velocity, want) > 0.1  # the conversion matters: a real check
