"""A 2-D Gaussian mixture with its exact TrigFlow denoiser (a distribution with a known answer).

x0 ~ sum_k pi_k N(mu_k, s^2 I); x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2 I), so given component k,
x_t ~ N(cos t mu_k, v I) with v = cos^2 t s^2 + sin^2 t sigma_d^2 and
E[x0 | x_t] = sum_k w_k(x_t) (mu_k + cos t s^2 / v (x_t - cos t mu_k)),  w_k ∝ pi_k N(x_t; cos t mu_k, v I).
The ideal network is F* = (cos t x_t - E[x0 | x_t]) / (sigma_d sin t) (from f = cos t x_t - sin t sigma_d F).
"""
import math

import torch

SIGMA_D = 0.5
MEANS = torch.tensor([[-0.6, -0.3], [0.6, -0.3], [0.0, 0.6]])
STD = 0.08


def sample(n, generator=None, dtype=torch.float32):
    k = torch.randint(len(MEANS), (n,), generator=generator)
    return (MEANS[k] + STD * torch.randn(n, 2, generator=generator)).to(dtype)


def ideal_F(x_in, t, sigma_d=SIGMA_D):
    """F*(x_t / sigma_d, t) for (B, 2) inputs and (B,) times in (0, pi/2]."""
    x_t = sigma_d * x_in
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    mu = MEANS.to(x_t)
    v = c ** 2 * STD ** 2 + s ** 2 * sigma_d ** 2                                  # (B, 1)
    d2 = ((x_t[:, None, :] - c[:, :, None] * mu[None]) ** 2).sum(-1)               # (B, K)
    logw = -d2 / (2 * v) - math.log(len(MEANS))
    w = torch.softmax(logw, dim=1)                                                  # (B, K)
    post = mu[None] + (c * STD ** 2 / v)[:, :, None] * (x_t[:, None, :] - c[:, :, None] * mu[None])
    x0_hat = (w[:, :, None] * post).sum(1)
    return (c * x_t - x0_hat) / (sigma_d * s)


def sliced_wasserstein(a, b, projections=128, seed=0):
    """Mean 1-D Wasserstein-1 distance over random directions (equal sample counts)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(2, projections, generator=g, dtype=a.dtype)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    return (pa - pb).abs().mean().item()
