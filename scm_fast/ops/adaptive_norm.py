"""Adaptive double normalization that propagates tangents in one fused pass (scm-reference.md §5).

    y = norm(x) * pnorm(scale) + pnorm(shift),    pnorm(a) = a / sqrt(mean_c(a^2) + eps)

sCM replaces AdaGN / adaLN with this: the scale and shift vectors (from the time and class
embedding) are pixel-normalised over their channels, which bounds their size whatever the
embedding does. Under sCM both x and the time embedding (so scale and shift) carry tangents; one
kernel computes y and its tangent together. The math, the statistics and the closed-form
derivatives are in adaptive_norm_ref.py; the C++ (csrc/adaptive_norm.cpp) and Triton
(kernels/adaptive_norm.py) kernels implement them.
"""
import math

import torch
import torch.autograd.forward_ad as fwAD

from scm_fast.ops import _registry, _transforms
from scm_fast.ops.adaptive_norm_ref import (NORMS, adaptive_double_norm_ref, adaptive_norm_bwd_reference,
                                            adaptive_norm_fwd_jvp_reference, adaptive_norm_fwd_reference, pnorm)
from scm_fast.precision import accumulation_dtype

__all__ = ["adaptive_double_norm", "adaptive_double_norm_ref"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- validation at the public API ------------------------------------------------------------
def _check_float(name, t, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_args(x, scale, shift, weight, bias, norm, num_groups, eps, channels_last):
    """Validated (norm code, num_groups, eps, channels_last)."""
    _check_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (B, L, C), (B, C) or (B, C, *spatial), got shape {tuple(x.shape)}")
    for name, t in (("scale", scale), ("shift", shift)):
        _check_float(name, t, x.device)
        if t.dim() != 2 or t.shape[0] != x.shape[0]:
            raise ValueError(f"{name} must be (B, C) with B = x.shape[0] = {x.shape[0]}, got {tuple(t.shape)}")
    if scale.shape != shift.shape:
        raise ValueError(f"scale and shift must have the same shape, got {tuple(scale.shape)} and {tuple(shift.shape)}")
    C = scale.shape[1]
    if C < 1:
        raise ValueError("scale and shift must have at least one channel")
    if channels_last is None:
        channels_last = x.dim() <= 3
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool or None, got {channels_last!r}")
    cdim = -1 if channels_last else 1
    if x.shape[cdim] != C:
        where = "last (tokens, channels_last=True)" if channels_last else "at dim 1 (feature maps, channels_last=False)"
        raise ValueError(f"x {tuple(x.shape)} must have its C = {C} channels {where}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")
    if norm == "group":
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
            raise ValueError(f"norm='group' needs num_groups, a positive int dividing C = {C}, got {num_groups!r}")
    elif num_groups is not None:
        raise ValueError(f"num_groups applies to norm='group' only, got num_groups={num_groups!r} with norm={norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if not math.isfinite(eps):
        raise ValueError(f"eps must be a positive float, got {eps!r}: it must be finite")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _check_float(name, p, x.device)
        if p.shape != (C,):
            raise ValueError(f"{name} must be (C,) = ({C},), got {tuple(p.shape)}")
    if norm == "rms" and bias is not None:
        raise ValueError("norm='rms' has no bias (RMSNorm's affine is a weight only); pass bias=None")
    return NORMS[norm], num_groups or 1, float(eps), channels_last


# ---- kernels behind the dispatcher -----------------------------------------------------------
def _kernels():
    from scm_fast.kernels import adaptive_norm
    return adaptive_norm


def _triton_fwd(x, scale, shift, weight, bias, norm, groups, eps, cl):
    return _kernels().adaptive_norm_fwd(x, scale, shift, weight, bias, norm, groups, eps, cl)


def _triton_fwd_jvp(x, scale, shift, tx, tscale, tshift, weight, bias, norm, groups, eps, cl):
    return _kernels().adaptive_norm_fwd(x, scale, shift, weight, bias, norm, groups, eps, cl, tx, tscale, tshift)


def _triton_bwd(grad_y, x, scale, shift, weight, bias, mean, rstd, norm, groups, eps, cl):
    return _kernels().adaptive_norm_bwd(grad_y, x, scale, shift, weight, bias, mean, rstd, norm, groups, eps, cl)


def _stats_like(x, scale, norm, groups, cl):
    B, C = scale.shape
    n = groups if norm == NORMS["group"] else x.numel() // max(1, B * C)
    dtype = accumulation_dtype(x)
    return x.new_empty(B, n, dtype=dtype)


def _fake_fwd(x, scale, shift, weight, bias, norm, groups, eps, cl):
    stats = _stats_like(x, scale, norm, groups, cl)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_fwd_jvp(x, scale, shift, tx, tscale, tshift, weight, bias, norm, groups, eps, cl):
    return (*_fake_fwd(x, scale, shift, weight, bias, norm, groups, eps, cl), torch.empty_like(x))


def _fake_bwd(grad_y, x, scale, shift, weight, bias, mean, rstd, norm, groups, eps, cl):
    def like(p):
        return x.new_empty(0) if p is None else torch.empty_like(p)
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(shift), like(weight), like(bias)


_registry.define("adaptive_norm_fwd", adaptive_norm_fwd_reference, _triton_fwd, _fake_fwd)
_registry.define("adaptive_norm_fwd_jvp", adaptive_norm_fwd_jvp_reference, _triton_fwd_jvp, _fake_fwd_jvp)
_registry.define("adaptive_norm_bwd", adaptive_norm_bwd_reference, _triton_bwd, _fake_bwd)


# ---- autograd --------------------------------------------------------------------------------
def _backward(ctx, grad_y):
    _transforms.check_backward(ctx.uses, grad_y)
    x, scale, shift, weight, bias, mean, rstd = ctx.saved_tensors
    with torch.no_grad():  # first order only (_transforms.first_order)
        gx, gs, gb, gw, gbias = _registry.call("adaptive_norm_bwd", grad_y.contiguous(), x, scale, shift, weight,
                                               bias, mean, rstd, *ctx.config)
    grads = gx, gs, gb, (gw if weight is not None else None), (gbias if bias is not None else None)
    return _transforms.first_order(ctx.uses, grads, (grad_y, x, scale, shift, weight, bias))


def _affine_tangent(x, scale, mean, rstd, tw, tbias, config):
    """Tangent of y along the inner norm's weight and bias: (xhat tw + tbias) pnorm(scale)."""
    norm, groups, eps, cl = config
    dtype = mean.dtype
    x3 = x.to(dtype).reshape(x.shape[0], -1, x.shape[-1]) if cl else x.to(dtype).reshape(*x.shape[:2], -1).transpose(1, 2)
    B, R, C = x3.shape
    if norm == NORMS["group"]:
        xg = x3.reshape(B, R, groups, C // groups)
        xhat = ((xg - mean[:, None, :, None]) * rstd[:, None, :, None]).reshape(B, R, C)
    else:
        xhat = (x3 - mean[..., None]) * rstd[..., None]
    t = xhat * (0 if tw is None else tw.to(dtype)) + (0 if tbias is None else tbias.to(dtype))
    t = t * pnorm(scale.to(dtype), eps)[:, None, :]
    return (t.reshape(x.shape) if cl else t.transpose(1, 2).reshape(x.shape)).to(x.dtype)


class _AdaptiveNorm(torch.autograd.Function):
    """(y, mean, rstd) of (x, scale, shift, weight, bias). Its jvp is exact for every input."""

    @staticmethod
    def forward(x, scale, shift, weight, bias, config, uses):
        return _registry.call("adaptive_norm_fwd", x, scale, shift, weight, bias, *config)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, shift, weight, bias, config, uses = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        # not detached: a gradient of the backward must reach the inputs' graph (_transforms.first_order)
        ctx.save_for_backward(x, scale, shift, weight, bias, mean.detach(), rstd.detach())
        ctx.save_for_forward(x, scale, shift, weight, bias, mean, rstd)
        ctx.config, ctx.uses = config, uses

    @staticmethod
    def backward(ctx, grad_y, _gm, _gr):
        return *_backward(ctx, grad_y), None, None

    @staticmethod
    def jvp(ctx, tx, tscale, tshift, tw, tbias, *_):
        _transforms.check_jvp(ctx.uses, (tx, tscale, tshift, tw, tbias))
        x, scale, shift, weight, bias, mean, rstd = ctx.saved_tensors
        tangents = _transforms.zeros_for_none((x, scale, shift), (tx, tscale, tshift))
        with torch.no_grad():  # the kernel has no autograd; _differentiable_tangent gives ty its gradient
            ty = _registry.call("adaptive_norm_fwd_jvp", x, scale, shift, *tangents, weight, bias, *ctx.config)[3]
            if tw is not None or tbias is not None:
                ty = ty + _affine_tangent(x, scale, mean, rstd, tw, tbias, ctx.config)
        ty = _differentiable_tangent(ctx, ty, (x, scale, shift, weight, bias), (*tangents, tw, tbias))
        return ty, None, None


class _AdaptiveNormFused(torch.autograd.Function):
    """(y, mean, rstd, ty) in one kernel launch; ty has no graph here (jvp gives the tangent one). With
    `tangents_of_inputs` (tx, tscale, tshift) ARE the forward-AD tangents of (x, scale, shift) and
    the weight and bias carry none, so jvp returns the ty already computed."""

    @staticmethod
    def forward(x, scale, shift, tx, tscale, tshift, weight, bias, config, tangents_of_inputs, uses):
        return _registry.call("adaptive_norm_fwd_jvp", x, scale, shift, tx, tscale, tshift, weight, bias, *config)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, shift, _, _, _, weight, bias, config, tangents_of_inputs, uses = inputs
        _, mean, rstd, ty = output
        ctx.mark_non_differentiable(mean, rstd, ty)
        ctx.save_for_backward(*(None if t is None else t.detach() for t in (x, scale, shift, weight, bias, mean, rstd)))
        ctx.save_for_forward(x, scale, shift, weight, bias, *([ty] if tangents_of_inputs else []))
        ctx.config, ctx.fused, ctx.uses = config, tangents_of_inputs, uses
        ctx.set_materialize_grads(False)  # no zero tangents for tx, tscale, tshift (a full x-sized fill)

    @staticmethod
    def backward(ctx, grad_y, _gm, _gr, _gt):
        if grad_y is None:
            return (None,) * 11
        gx, gs, gb, gw, gbias = _backward(ctx, grad_y)
        return gx, gs, gb, None, None, None, gw, gbias, None, None, None

    @staticmethod
    def jvp(ctx, gx, gscale, gshift, _gtx, _gts, _gth, gw, gbias, *_):
        _transforms.check_jvp(ctx.uses, (gx, gscale, gshift, gw, gbias))
        if gx is None and gscale is None and gshift is None:
            return None, None, None, None
        x, scale, shift, weight, bias, *fused = ctx.saved_tensors
        tangents = _transforms.zeros_for_none((x, scale, shift), (gx, gscale, gshift))
        if ctx.fused:
            (ty,) = fused
        else:  # an outer forward AD over explicit-tangent code
            with torch.no_grad():  # as in _AdaptiveNorm.jvp
                ty = _registry.call("adaptive_norm_fwd_jvp", x, scale, shift, *tangents, weight, bias,
                                    *ctx.config)[3]
        ty = _differentiable_tangent(ctx, ty, (x, scale, shift, weight, bias), (*tangents, None, None))
        return ty, None, None, None


def _differentiable_tangent(ctx, ty, primals, tangents):
    """ty as the forward-AD tangent, differentiable w.r.t. (x, scale, shift, weight, bias) and their
    tangents by autograd through the reference (_transforms.differentiable_tangent)."""
    config = ctx.config

    def reference(x, scale, shift, weight, bias, tx, tscale, tshift, tw, tbias):
        _, mean, rstd, t = adaptive_norm_fwd_jvp_reference(x, scale, shift, tx, tscale, tshift, weight, bias, *config)
        if tw is not None or tbias is not None:
            t = t + _affine_tangent(x, scale, mean, rstd, tw, tbias, config)
        return t

    return _transforms.differentiable_tangent(ty, reference, (*primals, *tangents))


# ---- public API ------------------------------------------------------------------------------
def _tangent(t):
    return fwAD.unpack_dual(t).tangent if t is not None else None


@torch.compiler.disable  # torch.compile drops a custom jvp (pytorch 192985): keep the op eager
def adaptive_double_norm(x, scale, shift, *, norm="layer", num_groups=None, eps=1e-6, weight=None, bias=None,
                         channels_last=None):
    """y = norm(x) * pnorm(scale) + pnorm(shift), pnorm(a) = a / sqrt(mean_c(a^2) + eps).

    x: tokens (B, L, C) or (B, C) (channels_last=True, the default for x.dim() <= 3) or feature maps
    (B, C, *spatial) (channels_last=False, the default for x.dim() >= 4). scale, shift: (B, C).
    norm: "layer" (LayerNorm over C per token/pixel), "rms" (RMSNorm over C) or "group" (GroupNorm
    with num_groups groups of C / num_groups channels over all positions). weight (C,) and bias (C,)
    are the inner norm's optional elementwise affine (rms: weight only).
    Choices the paper leaves open (scm-reference.md §5): no "+1" on the scale (a zero scale gives a
    zero output, not x); one eps, inside both square roots: 1 / sqrt(var + eps) and
    1 / sqrt(mean_c(a^2) + eps); biased variance.
    Computes in fp32 (fp64 for fp64 x) and returns x.dtype; scale and shift may have another dtype
    than x (e.g. an fp32 time embedding with bf16 activations).
    Differentiable in reverse mode and in forward mode (torch.func.jvp, torch.autograd.forward_ad):
    with tangents on any of x, scale, shift one fused pass computes y and its tangent. The tangent
    is differentiable w.r.t. the inputs and their tangents (autograd through the reference; second
    order for TVM / MeanFlow losses); double backward of y, jvp of grad and jvp of jvp raise a
    RuntimeError (scm_fast.ops._transforms); adaptive_double_norm_ref differentiates to any order.
    eps is a positive finite float; B = 0 or no positions give empty results. pnorm stays exact for
    huge scale / shift (|a| past 1e19, where mean(a^2) overflows fp32); x itself must keep x^2 finite
    (|x| below ~1e19), as for PyTorch's own fp32 norms.
    """
    config = _check_args(x, scale, shift, weight, bias, norm, num_groups, eps, channels_last)
    _transforms.check_call("adaptive_double_norm", (x, scale, shift, weight, bias))
    x, scale, shift = x.contiguous(), scale.contiguous(), shift.contiguous()
    weight, bias = (None if p is None else p.contiguous() for p in (weight, bias))
    uses = _transforms.Uses("adaptive_double_norm")
    has_t = any(_tangent(t) is not None for t in (x, scale, shift))
    if has_t and _tangent(weight) is None and _tangent(bias) is None:
        tangents = [torch.zeros_like(t) if _tangent(t) is None else _tangent(t).contiguous() for t in (x, scale, shift)]
        return _AdaptiveNormFused.apply(x, scale, shift, *tangents, weight, bias, config, True, uses)[0]
    return _AdaptiveNorm.apply(x, scale, shift, weight, bias, config, uses)[0]

