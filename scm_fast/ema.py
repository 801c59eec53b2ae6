"""Exponential moving averages of the network weights, for sampling and evaluation (EDM2 style).

An EMA here knows nothing about the network or about distributed training: it receives a dict
name -> Tensor (plain parameters and buffers, or the local shards under FSDP2) and keeps an fp32
copy of every floating-point tensor (fp64 tensors stay fp64, as objectives.py builds targets in fp64
for fp64 data); other tensors (integer buffers) are copied as-is on update.

Two kinds:
- PowerEMA (EDM2, Karras et al. 2024, Sec. 3.1): the average at step t weights the past with the
  power profile p_t(tau) ∝ tau^gamma, 0 < tau <= t. Its width relative to t is
      sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))          [EDM2 Eq. 3]
  and it is realised by   ema_t = beta_t ema_{t-1} + (1 - beta_t) w_t,  beta_t = (1 - 1/t)^(gamma + 1)
  [EDM2 Eq. 4 with t counted in optimizer steps], so the weight of w_tau in ema_t is
  (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1). Several sigma_rel are kept side by side.
- HalfLifeEMA (EDM, Karras et al. 2022): beta = 0.5^(batch_images / half_life_nimg), with the
  optional rampup half_life_nimg = min(half_life_nimg, cur_nimg * rampup_ratio).

The averages live in the EMA's own tensors; averaged(name) returns them (no copy, no cast): load
them into a model copy (`model.load_state_dict(ema.averaged(name), strict=False)`) rather than
modifying them in place.
"""
import math

import numpy as np
import torch

__all__ = ["HalfLifeEMA", "PowerEMA", "SIGMA_REL_MAX", "make_ema", "power_function_gamma",
           "sigma_rel_of_gamma"]

# sigma_rel(gamma) decreases on gamma > 0 (d log sigma_rel^2 / d gamma = 1/(g+1) - 2/(g+2) - 1/(g+3) < 0)
# from sigma_rel(0) = sqrt(1 / 12): a positive gamma exists exactly for 0 < sigma_rel < 1/sqrt(12).
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # 0.288675...


def sigma_rel_of_gamma(gamma):
    """Relative standard deviation of the power profile tau^gamma [EDM2 Eq. 3]."""
    gamma = float(gamma)
    if not gamma > -1.0:
        raise ValueError(f"sigma_rel_of_gamma: gamma must be > -1 (an integrable profile), got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def power_function_gamma(sigma_rel):
    """The exponent gamma > 0 whose power profile has relative std sigma_rel (inverse of EDM2 Eq. 3).

    Squaring Eq. 3 and multiplying out: g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0; gamma is its
    largest real root, positive exactly when 0 < sigma_rel < SIGMA_REL_MAX = 1/sqrt(12) ~ 0.2887.
    """
    s = float(sigma_rel)
    if not 0.0 < s < SIGMA_REL_MAX:
        raise ValueError(f"power_function_gamma: sigma_rel must satisfy 0 < sigma_rel < 1/sqrt(12) = "
                         f"{SIGMA_REL_MAX:.6f} (where the power profile has gamma > 0), got {sigma_rel}")
    inv2 = s ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv2, 12.0 - inv2])
    real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots))].real
    return float(real.max())


def _check_tensors(where, tensors):
    """Validate a dict name -> Tensor passed to an EMA."""
    if not isinstance(tensors, dict) or not tensors:
        raise TypeError(f"{where}: tensors must be a non-empty dict name -> Tensor, got {type(tensors).__name__}"
                        + (" (empty)" if isinstance(tensors, dict) else ""))
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: tensors must map str -> Tensor; entry {name!r} is "
                            f"{type(name).__name__} -> {type(value).__name__}")


def _key_problems(expected, got):
    """'missing [...]; unexpected [...]' for two key collections, or '' when they agree."""
    expected, got = set(expected), set(got)
    parts = []
    if expected - got:
        parts.append(f"missing {sorted(expected - got)}")
    if got - expected:
        parts.append(f"unexpected {sorted(got - expected)}")
    return "; ".join(parts)


def _shape_problems(reference, tensors):
    """'name: expected (..), got (..)' for every tensor whose shape differs from the reference."""
    return [f"{k}: expected shape {tuple(reference[k].shape)}, got {tuple(v.shape)}"
            for k, v in tensors.items() if k in reference and tuple(v.shape) != tuple(reference[k].shape)]


def _average_dtype(tensor):
    """fp32 for bf16/fp16/fp32 tensors, fp64 for fp64; non-float tensors keep their dtype."""
    return torch.promote_types(tensor.dtype, torch.float32) if tensor.is_floating_point() else tensor.dtype


class _Average:
    """One running average: fp32 (fp64 for fp64) copies of the float tensors, as-is copies of the others."""

    def __init__(self, tensors):
        with torch.no_grad():
            self.tensors = {k: v.detach().to(_average_dtype(v), copy=True) for k, v in tensors.items()}
        self.float_keys = [k for k, v in tensors.items() if v.is_floating_point()]
        self.other_keys = [k for k, v in tensors.items() if not v.is_floating_point()]

    @torch.no_grad()
    def blend(self, tensors, beta):
        """ema = beta ema + (1 - beta) w = lerp(ema, w, 1 - beta); beta == 0 copies exactly."""
        dst = [self.tensors[k] for k in self.float_keys]
        src = [tensors[k].detach().to(device=d.device, dtype=d.dtype) for k, d in zip(self.float_keys, dst)]
        if dst:
            if beta == 0.0:
                torch._foreach_copy_(dst, src)
            else:
                torch._foreach_lerp_(dst, src, 1.0 - beta)
        for k in self.other_keys:
            self.tensors[k].copy_(tensors[k].detach())

    def to(self, device):
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}


class _EMABase:
    """Shared bookkeeping: named averages, validation, state_dict, to(device)."""

    kind = None

    def __init__(self, tensors, names):
        _check_tensors(type(self).__name__, tensors)
        self.names = list(names)
        self._averages = {name: _Average(tensors) for name in self.names}
        self._shapes = {k: tuple(v.shape) for k, v in tensors.items()}

    def _check_update(self, tensors):
        where = f"{type(self).__name__}.update"
        _check_tensors(where, tensors)
        if tensors.keys() != self._shapes.keys():
            raise ValueError(f"{where}: tensors do not match the ones the EMA was built with: "
                             f"{_key_problems(self._shapes, tensors)}")
        bad = [f"{k}: expected shape {s}, got {tuple(tensors[k].shape)}"
               for k, s in self._shapes.items() if tuple(tensors[k].shape) != s]
        if bad:
            raise ValueError(f"{where}: shape mismatch: " + "; ".join(bad))

    def averaged(self, name):
        """The average `name` (one of self.names) as dict name -> Tensor: the EMA's fp32 tensors, not copies."""
        if name not in self._averages:
            raise KeyError(f"{type(self).__name__}.averaged: unknown average {name!r}; available: {self.names}")
        return dict(self._averages[name].tensors)

    def to(self, device):
        """Move every average to `device`; returns self."""
        for avg in self._averages.values():
            avg.to(device)
        return self

    def _config(self):
        raise NotImplementedError

    def _counters(self):
        raise NotImplementedError

    def state_dict(self):
        """Plain dict (str, float, int, list, dict of Tensor): loads with torch.load(weights_only=True)."""
        return {"kind": self.kind, "config": self._config(), "counters": self._counters(),
                "averages": {name: dict(avg.tensors) for name, avg in self._averages.items()}}

    def load_state_dict(self, state):
        """Restore from state_dict(); ValueError naming missing/unexpected keys or shape mismatches."""
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, dict):
            raise ValueError(f"{where}: expected a dict from state_dict(), got {type(state).__name__}")
        problems = _key_problems(["kind", "config", "counters", "averages"], state)
        if problems:
            raise ValueError(f"{where}: state keys: {problems}")
        if state["kind"] != self.kind or state["config"] != self._config():
            raise ValueError(f"{where}: state is for kind={state['kind']!r} config={state['config']}, "
                             f"this EMA is kind={self.kind!r} config={self._config()}")
        problems = _key_problems(self.names, state["averages"])
        if problems:
            raise ValueError(f"{where}: averages: {problems}")
        for name, avg in self._averages.items():
            given = state["averages"][name]
            problems = _key_problems(avg.tensors, given)
            if problems:
                raise ValueError(f"{where}: average {name!r}: {problems}")
            bad = _shape_problems(avg.tensors, given)
            if bad:
                raise ValueError(f"{where}: average {name!r}: shape mismatch: " + "; ".join(bad))
        with torch.no_grad():
            for name, avg in self._averages.items():
                for k, v in state["averages"][name].items():
                    avg.tensors[k].copy_(v)
        self._load_counters(state["counters"])

    def _load_counters(self, counters):
        raise NotImplementedError


class PowerEMA(_EMABase):
    """Power-function EMAs [EDM2 Sec. 3.1], one per sigma_rel; update once per optimizer step.
    Both kinds share `update(tensors, cur_nimg, batch_images)`."""

    kind = "power"

    def __init__(self, tensors, sigma_rels=(0.05, 0.10)):
        sigma_rels = [float(s) for s in sigma_rels]
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"PowerEMA: sigma_rels must be a non-empty list of distinct values, got {sigma_rels}")
        self.sigma_rels = sigma_rels
        self.gammas = [power_function_gamma(s) for s in sigma_rels]
        super().__init__(tensors, [f"power-{s:.3f}" for s in sigma_rels])
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"PowerEMA: sigma_rels {sigma_rels} give duplicate names {self.names} "
                             "(names keep 3 decimals)")
        self.step = 0

    @staticmethod
    def beta(step, gamma):
        """beta_t = (1 - 1/t)^(gamma + 1) [EDM2 Eq. 4]; 0 at t = 1 (the first update copies)."""
        return (1.0 - 1.0 / step) ** (gamma + 1.0)

    def update(self, tensors, cur_nimg, batch_images):
        """Fold in the weights after a step on `batch_images` images; `cur_nimg` counts them, so the
        step is t = cur_nimg / batch_images >= 1 (EDM2's PowerFunctionEMA.update(cur_nimg, batch_size))."""
        if not batch_images > 0:
            raise ValueError(f"PowerEMA.update: batch_images must be > 0, got {batch_images}")
        if not cur_nimg >= batch_images:
            raise ValueError(f"PowerEMA.update: cur_nimg must count images seen so far including this batch "
                             f"(>= batch_images = {batch_images}), got {cur_nimg}")
        self._check_update(tensors)
        step = cur_nimg / batch_images
        for name, gamma in zip(self.names, self.gammas):
            self._averages[name].blend(tensors, self.beta(step, gamma))
        self.step = round(step)

    def _config(self):
        return {"sigma_rels": list(self.sigma_rels)}

    def _counters(self):
        return {"step": self.step}

    def _load_counters(self, counters):
        self.step = int(counters["step"])


class HalfLifeEMA(_EMABase):
    """Classic EMA with a half-life in images and EDM's optional rampup."""

    kind = "halflife"

    def __init__(self, tensors, half_life_kimg=500.0, rampup_ratio=None):
        half_life_kimg = float(half_life_kimg)
        if not half_life_kimg > 0.0:
            raise ValueError(f"HalfLifeEMA: half_life_kimg must be > 0, got {half_life_kimg}")
        if rampup_ratio is not None and not float(rampup_ratio) > 0.0:
            raise ValueError(f"HalfLifeEMA: rampup_ratio must be None or > 0, got {rampup_ratio}")
        self.half_life_kimg = half_life_kimg
        self.rampup_ratio = None if rampup_ratio is None else float(rampup_ratio)
        super().__init__(tensors, [f"halflife-{half_life_kimg:g}k"])
        self.cur_nimg = 0

    def beta(self, cur_nimg, batch_images):
        """beta = 0.5^(batch_images / h), h = half_life_kimg * 1000 [min cur_nimg * rampup_ratio] (EDM)."""
        half_life_nimg = self.half_life_kimg * 1000.0
        if self.rampup_ratio is not None:
            half_life_nimg = min(half_life_nimg, cur_nimg * self.rampup_ratio)
        return 0.5 ** (batch_images / half_life_nimg)

    def update(self, tensors, cur_nimg, batch_images):
        """Fold in the weights after a step on `batch_images` images; `cur_nimg` counts them (EDM2)."""
        if not batch_images > 0:
            raise ValueError(f"HalfLifeEMA.update: batch_images must be > 0, got {batch_images}")
        if not cur_nimg >= batch_images:
            raise ValueError(f"HalfLifeEMA.update: cur_nimg must count images seen so far including this batch "
                             f"(>= batch_images = {batch_images}), got {cur_nimg}")
        self._check_update(tensors)
        self._averages[self.names[0]].blend(tensors, self.beta(cur_nimg, batch_images))
        self.cur_nimg = int(cur_nimg)

    def _config(self):
        return {"half_life_kimg": self.half_life_kimg, "rampup_ratio": self.rampup_ratio}

    def _counters(self):
        return {"cur_nimg": self.cur_nimg}

    def _load_counters(self, counters):
        self.cur_nimg = int(counters["cur_nimg"])


def make_ema(kind, tensors, sigma_rels=(0.05, 0.10), half_life_kimg=500.0, rampup_ratio=None):
    """PowerEMA for "power", HalfLifeEMA for "halflife", None for "none" (no EMA kept)."""
    if kind == "power":
        return PowerEMA(tensors, sigma_rels=sigma_rels)
    if kind == "halflife":
        return HalfLifeEMA(tensors, half_life_kimg=half_life_kimg, rampup_ratio=rampup_ratio)
    if kind == "none":
        return None
    raise ValueError(f"make_ema: kind must be one of 'power', 'halflife', 'none', got {kind!r}")
