"""TrigFlow: the diffusion parametrisation sCM trains in (scm-reference.md §1, §2, §4).

    x_t = cos(t) x0 + sin(t) z,   z ~ N(0, sigma_d^2 I),   t in [0, pi/2]
    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)        (denoiser, f(x, 0) = x)
    dx_t/dt = sigma_d F(x_t / sigma_d, t)                               (PF-ODE)
    v_t = cos(t) z - sin(t) x0                                          (its target velocity)

A network `F(x_in, t, **cond)` is called on x_in = x_t / sigma_d with c_noise(t) = t. Times are
tensors of shape (B,); helpers broadcast them over the non-batch dims.
"""
import math

import torch

SIGMA_D = 0.5
SIGMA_MAX = 80.0  # EDM's sigma_max: consistency sampling starts at t_max = arctan(sigma_max / sigma_d) [P §5.2]
T_MID = 1.1       # the 2-step sampler's intermediate time [P §5.2]


def t_max(sigma_d=SIGMA_D):
    """arctan(sigma_max / sigma_d): ~1.5646 at sigma_d = 0.5, ~1.5614 at 0.75."""
    return math.atan(SIGMA_MAX / sigma_d)


T_MAX = t_max(SIGMA_D)


def bcast(t, x):
    """t (B,) viewed as (B, 1, ..., 1) against x."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def noisy(x0, z, t):
    """x_t = cos t x0 + sin t z."""
    t = bcast(t, x0)
    return torch.cos(t) * x0 + torch.sin(t) * z


def target_velocity(x0, z, t):
    """v_t = dx_t/dt = cos t z - sin t x0."""
    t = bcast(t, x0)
    return torch.cos(t) * z - torch.sin(t) * x0


class BatchGenerator:
    """Random draws for a batch split over ranks. Every call draws the values of the GLOBAL batch
    (rows = world_size x the local rows asked for) from one generator seeded alike on all ranks and
    returns this rank's rows [rank * b, (rank + 1) * b): noise and times do not depend on the world
    size, so a run on N processes computes what one process computes on the same global batch."""

    def __init__(self, seed, rank=0, world_size=1, device="cpu"):
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(device).manual_seed(seed)

    def _rows(self, draw, shape, dtype, device):
        shape = tuple(shape)
        full = draw((shape[0] * self.world_size, *shape[1:]), generator=self.generator,
                    device=self.generator.device, dtype=dtype)
        return full[self.rank * shape[0]:(self.rank + 1) * shape[0]].to(device)

    def randn(self, shape, dtype=None, device=None):
        return self._rows(torch.randn, shape, dtype, device)

    def rand(self, shape, dtype=None, device=None):
        return self._rows(torch.rand, shape, dtype, device)

    def get_state(self):
        return self.generator.get_state()

    def set_state(self, state):
        self.generator.set_state(state)


def randn(shape, generator=None, device=None, dtype=None):
    """torch.randn with a torch.Generator, a BatchGenerator or None (the global generator)."""
    if isinstance(generator, BatchGenerator):
        return generator.randn(shape, dtype, device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def rand(shape, generator=None, device=None, dtype=None):
    """torch.rand with a torch.Generator, a BatchGenerator or None."""
    if isinstance(generator, BatchGenerator):
        return generator.rand(shape, dtype, device)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def sample_time(n, P_mean, P_std, sigma_d=SIGMA_D, generator=None, device=None):
    """t = arctan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2) [P Alg. 1], shape (n,), fp32."""
    tau = randn((n,), generator, device) * P_std + P_mean
    return torch.atan(torch.exp(tau) / sigma_d)


def denoise(F_out, x_t, t, sigma_d=SIGMA_D):
    """f = cos t x_t - sin t sigma_d F."""
    t = bcast(t, x_t)
    return torch.cos(t) * x_t - torch.sin(t) * sigma_d * F_out


def ddim_step(x_s, F_out, s, t, sigma_d=SIGMA_D):
    """The exact first-order step s -> t: x_t = cos(s - t) x_s - sin(s - t) sigma_d F(x_s, s)."""
    d = bcast(s - t, x_s)
    return torch.cos(d) * x_s - torch.sin(d) * sigma_d * F_out


# ---- converting teachers trained in other parametrisations -----------------------------------
def from_edm(denoiser, sigma_d=SIGMA_D):
    """F for an EDM denoiser D(x_sigma, sigma): t = arctan(sigma / sigma_d), x_t = cos t x_sigma, so
    f(x_t, t) = D(x_t / cos t, sigma_d tan t) and F = (cos t x_t - f) / (sigma_d sin t), t > 0."""
    def F(x_in, t, **cond):
        x_t = sigma_d * x_in
        tb = bcast(t, x_t)
        x0 = denoiser(x_t / torch.cos(tb), sigma_d * torch.tan(t), **cond)
        return (torch.cos(tb) * x_t - x0) / (sigma_d * torch.sin(tb))
    return F


def from_flow_matching(velocity, sigma_d=SIGMA_D):
    """F for a flow-matching model v(x_fm, t_fm) with x_fm = (1 - t_fm) x0 + t_fm eps [SANA-Sprint
    Prop. 3.1]: t_fm = sin t / (sin t + cos t), x_fm = (x_t / sigma_d) n, n = sqrt(t_fm^2 + (1 - t_fm)^2),
    F = [(1 - 2 t_fm) x_fm + (1 - 2 t_fm + 2 t_fm^2) v] / n. Assumes the flow model's data has unit
    scale relative to x_t / sigma_d (as in SANA-Sprint)."""
    def F(x_in, t, **cond):
        t_fm = torch.sin(t) / (torch.sin(t) + torch.cos(t))
        tb = bcast(t_fm, x_in)
        n = torch.sqrt(tb ** 2 + (1 - tb) ** 2)
        x_fm = x_in * n
        v = velocity(x_fm, t_fm, **cond)
        return ((1 - 2 * tb) * x_fm + (1 - 2 * tb + 2 * tb ** 2) * v) / n
    return F


def vp_timestep(alphas_cumprod, sigma):
    """The (fractional) timestep tau of a discrete VP schedule at which the EDM noise level
    sqrt((1 - abar) / abar) equals sigma: abar(tau) is the linear interpolation of alphas_cumprod
    (decreasing) between integer steps, inverted here exactly; sigma beyond the schedule's range is
    clamped to its ends."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64, device=sigma.device)
    target = (1.0 / (1.0 + sigma.double() ** 2)).clamp(float(abar[-1]), float(abar[0]))
    i = torch.searchsorted(-abar, -target, right=True).clamp(1, len(abar) - 1)  # abar[i - 1] >= target >= abar[i]
    lo, hi = abar[i - 1], abar[i]
    frac = torch.where(lo > hi, (lo - target) / (lo - hi), torch.zeros_like(target))
    return (i - 1 + frac).to(sigma.dtype)


def vp_abar(alphas_cumprod, tau):
    """abar at fractional timesteps tau: the linear interpolation of alphas_cumprod (vp_timestep's inverse)."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64, device=tau.device)
    i = tau.double().floor().clamp(0, len(abar) - 2).long()
    frac = tau.double() - i
    return (abar[i] * (1 - frac) + abar[i + 1] * frac).to(tau.dtype)


def from_vp(model, alphas_cumprod, prediction="epsilon", sigma_d=SIGMA_D):
    """F for a discrete-time VP model (DDPM / UNet2DCondition families) predicting epsilon or v at
    timestep tau, with x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps [DDPM; v: Salimans & Ho 2022]:
    sigma = sigma_d tan t, x_vp = sqrt(abar) x_t / cos t (EDM's x_sigma scaled), tau = vp_timestep(sigma),
    x0 = (x_vp - sqrt(1 - abar) eps) / sqrt(abar) or sqrt(abar) x_vp - sqrt(1 - abar) v, then from_edm."""
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"from_vp: prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")

    def denoiser(x_sigma, sigma, **cond):
        tau = vp_timestep(alphas_cumprod, sigma)
        abar = bcast(vp_abar(alphas_cumprod, tau), x_sigma)
        a, b = torch.sqrt(abar), torch.sqrt(1 - abar)
        x_vp = a * x_sigma
        out = model(x_vp, tau, **cond)
        return (x_vp - b * out) / a if prediction == "epsilon" else a * x_vp - b * out
    return from_edm(denoiser, sigma_d)


# ---- samplers --------------------------------------------------------------------------------
def cfg(F, guidance=None, cond_key="labels", null=None):
    """Classifier-free guidance F_u + s (F_c - F_u); F_u is F with cond[cond_key] = null (-1 by
    default). s is `guidance` (a float), or, when that is None, the `guidance` keyword of each call
    (a float or a (B,) tensor: sCD draws one scale per sample)."""
    def F_cfg(x_in, t, guidance=guidance, **cond):
        F_c = F(x_in, t, **cond)
        if isinstance(guidance, (int, float)) and guidance == 1.0:
            return F_c
        F_u = F(x_in, t, **{**cond, cond_key: null if null is not None else torch.full_like(cond[cond_key], -1)})
        s = bcast(guidance, F_c) if isinstance(guidance, torch.Tensor) else guidance
        return F_u + s * (F_c - F_u)
    return F_cfg


@torch.no_grad()
def consistency_sample(F, noise, times=None, sigma_d=SIGMA_D, generator=None, **cond):
    """K-step consistency sampling: x = sigma_d noise at times[0]; x0 = f(x, t_i); re-noise to
    t_{i+1} with fresh noise. times=None is 1 step from t_max(sigma_d); (t_max(sigma_d), T_MID) is
    the paper's 2 steps."""
    times = (t_max(sigma_d),) if times is None else times
    x = sigma_d * noise
    B = noise.shape[0]
    for i, t_i in enumerate(times):
        t = torch.full((B,), float(t_i), device=noise.device)
        x0 = denoise(F(x / sigma_d, t, **cond).float(), x, t, sigma_d)
        if i + 1 == len(times):
            return x0
        z = sigma_d * torch.randn(noise.shape, generator=generator, device=noise.device)
        x = noisy(x0, z, torch.full((B,), float(times[i + 1]), device=noise.device))
    return x


def edm_time_steps(n, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_d=SIGMA_D):
    """EDM's rho-schedule of n sigmas mapped to TrigFlow times, decreasing, plus a final 0."""
    i = torch.arange(n, dtype=torch.float64)
    sigma = (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([torch.atan(sigma / sigma_d), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def ode_sample(F, noise, steps=18, solver="heun", sigma_d=SIGMA_D, **cond):
    """The teacher's PF-ODE sampler from t_max(sigma_d) to 0 on EDM's time grid (converted to TrigFlow).
    heun: EDM's 2nd-order Heun (NFE = 2 steps - 1); dpm2: DPM-Solver-2S, the exact DDIM step taken
    with F at the log-SNR midpoint t_m = arctan(sqrt(tan s tan t)) (NFE = 2 steps - 1, the last step
    to t = 0 first-order)."""
    if solver not in ("heun", "dpm2"):
        raise ValueError(f"solver must be 'heun' or 'dpm2', got {solver!r}")
    ts = edm_time_steps(steps, sigma_d=sigma_d).tolist()
    x = sigma_d * noise
    B = noise.shape[0]

    def vel(x, t):  # dx/dt
        return sigma_d * F(x / sigma_d, torch.full((B,), t, device=x.device), **cond).float()

    for s, t in zip(ts[:-1], ts[1:]):
        if solver == "heun":
            d = vel(x, s)
            x_next = x + (t - s) * d
            if t > 0:
                x_next = x + (t - s) * 0.5 * (d + vel(x_next, t))
        else:
            Fs = vel(x, s) / sigma_d
            if t > 0:
                m = math.atan(math.sqrt(math.tan(s) * math.tan(t)))
                x_mid = ddim_step(x, Fs, torch.tensor(s), torch.tensor(m), sigma_d)
                Fs = vel(x_mid, m) / sigma_d
            x_next = ddim_step(x, Fs, torch.tensor(s), torch.tensor(t), sigma_d)
        x = x_next
    return x
