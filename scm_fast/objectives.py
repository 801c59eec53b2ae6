"""Training objectives on one JVP engine: TrigFlow diffusion (teachers), sCT, sCD, MeanFlow.

scm-reference.md §1-§3 and §8. A network is a callable F(x_in, t, **cond) -> F_theta with
x_in = x_t / sigma_d and t of shape (B,). The adaptive weighting head `logvar(t) -> (B,)` is a
separate module (scm_fast.models.AdaptiveWeight). Targets, tangents and losses are built in fp32
(fp64 if the data is fp64) whatever precision the network runs in.

The consistency step (sCT / sCD) [P Alg. 1]:
    one JVP of F at (x_t / sigma_d, t) along (cos t sin t dxdt, cos t sin t sigma_d)  -> F, T
        with T = sigma_d cos t sin t dF/dt (the FP16-stable "JVP rearrangement")
    g = -cos^2 t (sigma_d F^- - dxdt) - r (cos t sin t x_t + T),   r = min(1, step / H)
    g = g / (||g|| + c)
    loss = mean_B[ exp(-logvar(t)) mean_D((F - F^- - g)^2) + logvar(t) ]
In one-pass mode a single forward under torch.func.jvp yields F with its autograd graph and T;
two-pass mode runs the JVP without grad, then a second forward with grad (what public trainers do).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from scm_fast import trigflow
from scm_fast.ops import constant_tangents
from scm_fast.precision import accumulation_dtype
from scm_fast.trigflow import bcast


@dataclass
class SCMConfig:
    """Knobs of the consistency objective; defaults follow the paper's CIFAR-10 sCT settings."""
    sigma_d: float = 0.5
    P_mean: float = -1.0
    P_std: float = 1.4
    tangent_warmup: int = 10_000          # H: r = min(1, step / H); 0 disables the warmup
    tangent_norm: str = "l2"              # "l2" (public code), "rms", or "none"
    tangent_norm_c: float = 0.1           # c in g / (||g|| + c)
    rearranged_jvp: bool = True           # False: the naive tangent (dxdt / sigma_d, 1), overflows in fp16
    prior_weighting: bool = False         # extra 1 / (sigma_d tan t) on the loss (some codebases; not the paper)
    one_pass: bool = True                 # False: no-grad JVP pass, then a forward with grad
    guidance_input: bool = False          # sCD: draw s ~ U[guidance_min, guidance_max] per sample, pass it
    guidance_min: float = 1.0             #   to the teacher (its CFG scale) and to the student (an input)
    guidance_max: float = 2.0

    def __post_init__(self):
        if self.tangent_norm not in ("l2", "rms", "none"):
            raise ValueError(f"tangent_norm must be 'l2', 'rms' or 'none', got {self.tangent_norm!r}")
        if self.sigma_d <= 0 or self.P_std <= 0 or self.tangent_norm_c < 0 or self.tangent_warmup < 0:
            raise ValueError("sigma_d and P_std must be > 0, tangent_norm_c and tangent_warmup >= 0; got "
                             f"{self.sigma_d}, {self.P_std}, {self.tangent_norm_c}, {self.tangent_warmup}")


def _loss_dtype(x):
    return accumulation_dtype(x)


def _per_sample_mean(x):
    return x.flatten(1).mean(1)


def weighted_loss(err_sq, logvar):
    """mean_B[ exp(-logvar) mean_D(err^2) + logvar ] (adaptive weighting, EDM2); logvar None: plain mean."""
    per_sample = _per_sample_mean(err_sq)
    if logvar is None:
        return per_sample.mean()
    logvar = logvar.to(per_sample.dtype).reshape(-1)
    return (torch.exp(-logvar) * per_sample + logvar).mean()


def initial_logvar(objective, tangent_norm, n_dims, sigma_d=0.5, P_mean=-1.0, P_std=1.4, c=0.1):
    """Where the adaptive weight settles before the network learns: exp(-lv) e + lv is smallest at
    lv = log e, e = mean_D(err^2) of the untrained network (F = 0: the DiT's and U-Net's init).
    - diffusion: err = F - v_t / sigma_d, so e = 1 when sigma_d is the data's std -> 0.
    - sCT: F - F^- = 0 in value, so err = the normalised g, and g = cos^2 t dxdt during the warmup
      (F = 0, r ~ 0) with E[dxdt^2] = sigma_d^2: ||g|| ~ a sqrt(D) (L2) or a (RMS), a = sigma_d cos^2 t,
      and e = E_t[ ||g||^2 / (||g|| + c)^2 ] / D (L2), E_t[ a^2 / (a + c)^2 ] (RMS), E_t[a^2] (none),
      over the training times [P Alg. 1]. L2 gives about -log D (-4.2 on 8x8 digits).
    - sCD starts from the teacher, so its g is smaller than sCT's: the same value is an upper bound
      that the head lowers from (never the ~D-fold climb in weight that starting at 0 gives with L2).
    """
    if objective == "diffusion":
        return 0.0
    if tangent_norm not in ("l2", "rms", "none"):
        raise ValueError(f"tangent_norm must be 'l2', 'rms' or 'none', got {tangent_norm!r}")
    z, w = np.polynomial.hermite_e.hermegauss(64)  # E over tau ~ N(P_mean, P_std^2)
    a = sigma_d * np.cos(np.arctan(np.exp(P_mean + P_std * z) / sigma_d)) ** 2
    k = {"l2": math.sqrt(n_dims), "rms": 1.0, "none": 0.0}[tangent_norm]
    e = a ** 2 if k == 0 else (k * a) ** 2 / (k * a + c) ** 2 / k ** 2
    return math.log(float(np.sum(w * e) / np.sum(w)))


# ---- teachers: TrigFlow diffusion ------------------------------------------------------------
def diffusion_loss(F, x0, cond=None, logvar=None, *, sigma_d=0.5, P_mean=-0.8, P_std=1.6, label_dropout=0.0,
                   generator=None):
    """E[ w(t) || sigma_d F - v_t ||^2 ] / sigma_d^2 with adaptive weighting: the network predicts
    v_t / sigma_d. label_dropout: the fraction of cond["labels"] replaced by -1 (the null class) so
    that the teacher learns the unconditional F for classifier-free guidance. Returns (loss, stats)
    with stats t (B,) and the per-sample squared error."""
    cond = dict(cond or {})
    if label_dropout > 0 and "labels" in cond:
        drop = trigflow.rand(cond["labels"].shape, generator, x0.device) < label_dropout
        cond["labels"] = torch.where(drop, torch.full_like(cond["labels"], -1), cond["labels"])
    dtype = _loss_dtype(x0)
    x0 = x0.to(dtype)
    B = x0.shape[0]
    t = trigflow.sample_time(B, P_mean, P_std, sigma_d, generator, x0.device).to(dtype)
    z = sigma_d * trigflow.randn(x0.shape, generator, x0.device, dtype)
    x_t = trigflow.noisy(x0, z, t)
    out = F(x_t / sigma_d, t, **cond).to(dtype)
    err_sq = (out - trigflow.target_velocity(x0, z, t) / sigma_d).square()
    loss = weighted_loss(err_sq, None if logvar is None else logvar(t))
    return loss, {"t": t.detach(), "err": _per_sample_mean(err_sq).detach()}


# ---- sCT / sCD -------------------------------------------------------------------------------
def _jvp_pass(F, x_in, t, tx, tt, cond, one_pass):
    """(F(x_in, t) with grad, its tangent along (tx, tt) detached)."""
    def f(x_in, t):
        return F(x_in, t, **cond)

    if one_pass:
        with constant_tangents():  # detached below: no graph for it
            out, tangent = torch.func.jvp(f, (x_in, t), (tx, tt))
        return out, tangent.detach()
    with torch.no_grad():
        _, tangent = torch.func.jvp(f, (x_in, t), (tx, tt))
    return f(x_in, t), tangent


def normalize_tangent(g, kind, c):
    """g / (||g|| + c) per sample: L2 norm over the non-batch dims, or RMS."""
    if kind == "none":
        return g
    flat = g.flatten(1)
    norm = flat.norm(dim=1) if kind == "l2" else flat.square().mean(1).sqrt()
    return g / (bcast(norm, g) + c)


def scm_loss(F, x0, step, cfg, cond=None, logvar=None, teacher=None, generator=None):
    """sCT (teacher None) or sCD (teacher: F_teacher(x_in, t, **cond), e.g. trigflow.cfg(F, s)).
    With cfg.guidance_input, s ~ U[guidance_min, guidance_max] is drawn per sample and passed as
    `guidance=s` to the teacher (trigflow.cfg(F) reads it) and to the student.

    Returns (loss, stats) with stats t (B,), the per-sample squared error, ||g|| before normalization
    and the number of non-finite tangent entries (for the fp16 ablation)."""
    cond = cond or {}
    dtype = _loss_dtype(x0)
    sd = cfg.sigma_d
    x0 = x0.to(dtype)
    B = x0.shape[0]
    t = trigflow.sample_time(B, cfg.P_mean, cfg.P_std, sd, generator, x0.device).to(dtype)
    z = sd * trigflow.randn(x0.shape, generator, x0.device, dtype)
    x_t = trigflow.noisy(x0, z, t)
    if cfg.guidance_input:
        u = trigflow.rand((B,), generator, x0.device, dtype)
        cond = {**cond, "guidance": cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * u}
    if teacher is None:
        dxdt = trigflow.target_velocity(x0, z, t)
    else:
        with torch.no_grad():
            dxdt = sd * teacher(x_t / sd, t, **cond).to(dtype)
    tb = bcast(t, x0)
    cs = torch.cos(tb) * torch.sin(tb)
    x_in = x_t / sd
    if cfg.rearranged_jvp:  # tangent (cos t sin t dxdt, cos t sin t sigma_d): the JVP is T itself
        out, T = _jvp_pass(F, x_in, t, cs * dxdt, cs.reshape(-1) * sd, cond, cfg.one_pass)
        T = T.to(dtype)
    else:  # naive: dF/dt along (dxdt / sigma_d, 1), scaled afterwards
        out, dFdt = _jvp_pass(F, x_in, t, dxdt / sd, torch.ones_like(t), cond, cfg.one_pass)
        T = sd * cs * dFdt.to(dtype)
    F_minus = out.detach().to(dtype)
    r = 1.0 if cfg.tangent_warmup == 0 else min(1.0, step / cfg.tangent_warmup)
    g = -torch.cos(tb) ** 2 * (sd * F_minus - dxdt) - r * (cs * x_t + T)
    g_norm = g.flatten(1).norm(dim=1)
    nonfinite = (~torch.isfinite(g)).sum()
    g = normalize_tangent(g, cfg.tangent_norm, cfg.tangent_norm_c)
    err_sq = (out.to(dtype) - F_minus - g).square()
    if cfg.prior_weighting:
        err_sq = err_sq / bcast(sd * torch.tan(t), err_sq)
    loss = weighted_loss(err_sq, None if logvar is None else logvar(t))
    return loss, {"t": t.detach(), "err": _per_sample_mean(err_sq).detach(), "g_norm": g_norm.detach(),
                  "nonfinite_tangent": nonfinite.detach()}


# ---- MeanFlow --------------------------------------------------------------------------------
def meanflow_loss(u, x0, cond=None, *, P_mean=-0.4, P_std=1.0, ratio_r_neq_t=0.25, power=1.0, c=1e-3,
                  generator=None, one_pass=True):
    """MeanFlow [arXiv 2505.13447]: average velocity u(z_t, r, t) with z_t = (1 - t) x + t eps,
    v = eps - x, u_tgt = v - (t - r) JVP of u at (z, r, t) along (v, 0, 1); loss ||u - sg(u_tgt)||^2
    with adaptive weight 1 / (||.||^2 + c)^power (detached). Times: logit-normal t, r; a fraction
    1 - ratio_r_neq_t of the batch has r = t (plain flow matching). `u(z, r, t, **cond)`."""
    cond = cond or {}
    dtype = _loss_dtype(x0)
    x0 = x0.to(dtype)
    B = x0.shape[0]
    dev = x0.device
    a = torch.sigmoid(trigflow.randn((B,), generator, dev) * P_std + P_mean).to(dtype)
    b = torch.sigmoid(trigflow.randn((B,), generator, dev) * P_std + P_mean).to(dtype)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = trigflow.rand((B,), generator, dev) >= ratio_r_neq_t
    r = torch.where(same, t, r)
    eps = trigflow.randn(x0.shape, generator, dev, dtype)
    z = (1 - bcast(t, x0)) * x0 + bcast(t, x0) * eps
    v = eps - x0

    def f(z, r, t):
        return u(z, r, t, **cond)

    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    if one_pass:
        with constant_tangents():  # dudt enters the target detached
            out, dudt = torch.func.jvp(f, (z, r, t), tangents)
    else:
        with torch.no_grad():
            _, dudt = torch.func.jvp(f, (z, r, t), tangents)
        out = f(z, r, t)
    u_tgt = (v - bcast(t - r, x0) * dudt.detach().to(dtype)).detach()
    err_sq = _per_sample_mean((out.to(dtype) - u_tgt).square())
    w = 1.0 / (err_sq.detach() + c) ** power
    return (w * err_sq).mean(), {"t": t, "r": r, "err": err_sq.detach()}
