"""Teachers of other parametrisations converted to TrigFlow's F, exactly, on an analytic model: data
x0 ~ N(mu, s^2) per coordinate, whose denoiser, noise prediction, v prediction and flow-matching
velocity are known in closed form (conditional means of a Gaussian). Each converted ideal model must
equal the ideal TrigFlow F (float64)."""
import math

import pytest
import torch

from scm_fast import trigflow

MU, S = 0.3, 0.8  # the data distribution, per coordinate
SIGMA_D = 0.6     # TrigFlow's sigma_d (need not equal S)


def cond_mean_x0(x, a, b):
    """E[x0 | a x0 + b n = x] for n ~ N(0, 1): mu + a s^2 / (a^2 s^2 + b^2) (x - a mu)."""
    return MU + a * S ** 2 / (a ** 2 * S ** 2 + b ** 2) * (x - a * MU)


def ideal_F(x_in, t):
    """TrigFlow: x_t = cos t x0 + sin t sigma_d n; F = (cos t x_t - E[x0 | x_t]) / (sigma_d sin t)."""
    x_t, tb = SIGMA_D * x_in, trigflow.bcast(t, x_in)
    f = cond_mean_x0(x_t, torch.cos(tb), SIGMA_D * torch.sin(tb))
    return (torch.cos(tb) * x_t - f) / (SIGMA_D * torch.sin(tb))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 3, generator=g, dtype=torch.float64), torch.rand(64, generator=g, dtype=torch.float64) * 1.4 + 0.1


def test_edm():
    F = trigflow.from_edm(lambda x, sigma: cond_mean_x0(x, 1.0, trigflow.bcast(sigma, x)), SIGMA_D)
    x_in, t = _inputs()
    torch.testing.assert_close(F(x_in, t), ideal_F(x_in, t), rtol=1e-10, atol=1e-10)


def test_flow_matching():
    """x_fm = (1 - tau) x0 / sigma_d + tau n (the flow model's data in units of sigma_d, as SANA-Sprint);
    v = E[n - x0 / sigma_d | x_fm]."""
    def velocity(x_fm, tau):
        tb = trigflow.bcast(tau, x_fm)
        a, b = (1 - tb) / SIGMA_D, tb  # x_fm = a x0 + b n
        x0 = cond_mean_x0(x_fm, a, b)
        return (x_fm - a * x0) / b - x0 / SIGMA_D
    F = trigflow.from_flow_matching(velocity, SIGMA_D)
    x_in, t = _inputs(1)
    torch.testing.assert_close(F(x_in, t), ideal_F(x_in, t), rtol=1e-9, atol=1e-9)


def _scaled_linear(n=1000, start=0.00085, end=0.012):
    """The alphas_cumprod of SD's scaled_linear DDPM schedule."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_vp_epsilon_and_v(prediction):
    """A VP model at fractional timesteps of SD's schedule (abar interpolated linearly, as vp_abar):
    eps = E[n | x_vp], v = sqrt(abar) eps - sqrt(1 - abar) E[x0 | x_vp]."""
    abars = _scaled_linear()

    def model(x_vp, tau):
        abar = trigflow.bcast(trigflow.vp_abar(abars, tau), x_vp)
        a, b = torch.sqrt(abar), torch.sqrt(1 - abar)
        x0 = cond_mean_x0(x_vp, a, b)
        eps = (x_vp - a * x0) / b
        return eps if prediction == "epsilon" else a * eps - b * x0
    F = trigflow.from_vp(model, abars, prediction, SIGMA_D)
    # times whose sigma = sigma_d tan t lies inside the schedule's range (0.03 .. 14.6 for SD)
    t_lo, t_hi = math.atan(0.05 / SIGMA_D), math.atan(14.0 / SIGMA_D)
    x_in = _inputs(2)[0]
    t = torch.linspace(t_lo, t_hi, 64, dtype=torch.float64)
    torch.testing.assert_close(F(x_in, t), ideal_F(x_in, t), rtol=1e-9, atol=1e-9)


def test_vp_timestep_inverts_the_schedule():
    abars = _scaled_linear()
    tau = torch.tensor([0.0, 0.5, 10.25, 500.0, 998.75, 999.0], dtype=torch.float64)
    abar = trigflow.vp_abar(abars, tau)
    sigma = torch.sqrt((1 - abar) / abar)
    torch.testing.assert_close(trigflow.vp_timestep(abars, sigma), tau, rtol=0, atol=1e-9)
    assert trigflow.vp_timestep(abars, torch.tensor([1e-6, 1e6], dtype=torch.float64)).tolist() == [0.0, 999.0]
    with pytest.raises(ValueError, match="prediction must be 'epsilon' or 'v_prediction', got 'sample'"):
        trigflow.from_vp(lambda x, t: x, abars, "sample")


def test_scheduler_configs_of_real_diffusers_pipelines(tmp_path):
    """read() a scheduler saved by diffusers: the kind, and for VP schedules diffusers' own alphas_cumprod;
    to_trigflow of the ideal model through those equals the ideal F."""
    from diffusers import DDIMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler
    from scm_fast.interop import schedulers
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "sd3" / "scheduler")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction").save_pretrained(tmp_path / "sd2" / "scheduler")
    EDMEulerScheduler().save_pretrained(tmp_path / "edm")
    flow, vp, edm = (schedulers.read(tmp_path / p) for p in ("sd3", "sd2", "edm"))
    assert (flow["kind"], flow["timestep_scale"], vp["kind"], edm["kind"]) == ("flow", 1000.0, "v_prediction", "edm")
    torch.testing.assert_close(vp["alphas_cumprod"], _scaled_linear(), rtol=1e-6, atol=0)  # float32 in diffusers
    assert schedulers.read(tmp_path) is None

    def flow_model(x, timestep):  # the diffusers convention: timestep = s * 1000
        s = trigflow.bcast(timestep / 1000, x)
        a, b = (1 - s) / SIGMA_D, s
        x0 = cond_mean_x0(x, a, b)
        return (x - a * x0) / b - x0 / SIGMA_D
    x_in, t = _inputs(3)
    F = schedulers.to_trigflow(flow_model, flow, SIGMA_D)
    torch.testing.assert_close(F(x_in, t), ideal_F(x_in, t), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="--prediction must be one of flow, epsilon, v_prediction, edm, got 'x0'"):
        schedulers.to_trigflow(flow_model, dict(kind="x0"))
