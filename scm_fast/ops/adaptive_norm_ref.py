"""Reference adaptive double normalization (scm-reference.md §5) in plain PyTorch.

    y = norm(x) * pnorm(scale) + pnorm(shift),    pnorm(a) = a / sqrt(mean_c(a^2) + eps)    (1)

scale and shift are (B, C); pnorm runs over their C channels (no "+1" on the scale). x is
channels-last, tokens (B, L, C) or (B, C), or channels-first, feature maps (B, C, *spatial); either
way it is seen as (B, R, C) with R positions. norm(x) = xhat * weight + bias (affine optional;
rms takes a weight only), with the statistics over a "norm set":
    layer  xhat = (x - mu) / sqrt(var + eps)     set: the C channels of one position      (2)
    rms    xhat = x / sqrt(mean(x^2) + eps)       set: the C channels of one position      (3)
    group  xhat = (x - mu) / sqrt(var + eps)     set: the C/G channels of group g, all R   (4)
var is the biased variance; the same eps is used inside both norms. rs_a is computed from a / m, m = 1
or, once max|a| >= 2^32, a power of two >= max|a| (exact scaling): pnorm(a) stays O(1) up to fp32's
limit, where mean(a^2) alone overflows past |a| ~ 1e19. rstd = 1 / sqrt(var + eps)
(rms: 1 / sqrt(mean(x^2) + eps)) and mu (0 for rms) are the statistics the kernels save, fp32
(fp64 for fp64 inputs), shaped (B, R) for layer/rms and (B, G) for group.

The kernels implement these closed forms (means over the norm set, sums over positions):
  tangent  t_pnorm(a) = rs_a (ta - pnorm(a) mean_c(pnorm(a) ta)),  rs_a = 1 / sqrt(mean_c(a^2) + eps)
           t_xhat = rstd (tx - mean(tx) - xhat rstd cov),  cov = mean((x - mu) tx)  (rms: no mean(tx))
           ty = (t_xhat w) s^ + n t_s^ + t_b^,   n = xhat w + bias,  s^ = pnorm(scale), b^ = pnorm(shift)
  backward g_xhat = dy s^ w;  dx = rstd (g_xhat - mean(g_xhat) - xhat mean(g_xhat xhat))  (rms: no mean(g_xhat))
           d s^ = sum_R dy n,  d b^ = sum_R dy,  d scale = rs_s (d s^ - s^ mean_c(s^ d s^)) (same for shift)
           d weight = sum_{B,R} dy s^ xhat,  d bias = sum_{B,R} dy s^
`adaptive_double_norm_ref` computes y by composition (autograd and torch.func supply the
derivatives the tests compare against); the `*_reference` functions at the end implement the op
schemas with the closed forms in torch ops (the reference backend, and fp64).
"""
import math

import torch

from scm_fast.precision import accumulation_dtype

NORMS = {"layer": 0, "rms": 1, "group": 2}


def _compute_dtype(x):
    return accumulation_dtype(x)


def _pow2_at_least(a):
    """Per row, a constant: 1, or once max|a| >= 2^32 a power of two >= it (a / it is exact, its square finite)."""
    amax = a.detach().abs().amax(-1, keepdim=True)
    mantissa = torch.frexp(amax).mantissa  # amax = mantissa 2^e, mantissa in [0.5, 1): amax / mantissa = 2^e
    return torch.where(amax >= 2.0 ** 32, amax / mantissa, torch.ones_like(amax))


def rs_of(a, eps):
    """rs_a = 1 / sqrt(mean_c(a^2) + eps) of (B, C) vectors, (B, 1), without overflow (module docstring)."""
    m = _pow2_at_least(a)
    return torch.rsqrt((a / m).square().mean(-1, keepdim=True) + eps / m.square()) / m


def pnorm(a, eps):
    """Pixel norm over the channels of a (B, C) vector, eq. (1)."""
    return a * rs_of(a, eps)


def _to_blc(x, channels_last):
    """x as (B, R, C) (a view for channels-last, a transposed view otherwise); sizes spelled out, as
    B or R may be 0."""
    if channels_last:
        return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])).transpose(1, 2)


def _from_blc(y, like, channels_last):
    if channels_last:
        return y.reshape(like.shape)
    return y.transpose(1, 2).reshape(like.shape)


def norm_stats(x, norm, num_groups, eps, channels_last):
    """(mu, rstd) of eqs. (2)-(4): (B, R) for layer/rms, (B, G) for group."""
    x3 = _to_blc(x, channels_last).to(_compute_dtype(x))
    if norm == "rms":
        ms = x3.square().mean(-1)
        return torch.zeros_like(ms), torch.rsqrt(ms + eps)
    if norm == "layer":
        var, mu = torch.var_mean(x3, dim=-1, correction=0)
        return mu, torch.rsqrt(var + eps)
    B, R, C = x3.shape
    xg = x3.reshape(B, R, num_groups, C // num_groups)
    var, mu = torch.var_mean(xg, dim=(1, 3), correction=0)
    return mu, torch.rsqrt(var + eps)


def adaptive_double_norm_ref(x, scale, shift, weight=None, bias=None, *, norm="layer", num_groups=None,
                             eps=1e-6, channels_last=True):
    """Eq. (1) by composition, computed in fp32 (fp64 for fp64 x), returned in x.dtype."""
    dtype = _compute_dtype(x)
    x3 = _to_blc(x, channels_last).to(dtype)
    B, R, C = x3.shape
    if norm == "rms":
        xhat = x3 * torch.rsqrt(x3.square().mean(-1, keepdim=True) + eps)
    elif norm == "layer":
        var, mu = torch.var_mean(x3, dim=-1, keepdim=True, correction=0)
        xhat = (x3 - mu) * torch.rsqrt(var + eps)
    else:
        xg = x3.reshape(B, R, num_groups, C // num_groups)
        var, mu = torch.var_mean(xg, dim=(1, 3), keepdim=True, correction=0)
        xhat = ((xg - mu) * torch.rsqrt(var + eps)).reshape(B, R, C)
    n = xhat if weight is None else xhat * weight.to(dtype)
    n = n if bias is None else n + bias.to(dtype)
    y = n * pnorm(scale.to(dtype), eps)[:, None, :] + pnorm(shift.to(dtype), eps)[:, None, :]
    return _from_blc(y, x, channels_last).to(x.dtype)


# ---- the op schemas in closed form (SCM_FAST_BACKEND=reference, and fp64 inputs) -------------
_NAMES = {code: name for name, code in NORMS.items()}


def _sets(t3, norm, num_groups):
    """(view of (B, R, C) whose `dims` span each norm set, dims, stats -> broadcastable)."""
    B, R, C = t3.shape
    if _NAMES[norm] == "group":
        return t3.reshape(B, R, num_groups, C // num_groups), (1, 3), lambda s: s[:, None, :, None]
    return t3, (-1,), lambda s: s[..., None]


def _coefs(scale, shift, weight, bias, eps, dtype):
    """pnorm(scale), pnorm(shift), their rs factors, and the folded A = w s^, Bc = bias s^ + b^."""
    scale, shift = scale.to(dtype), shift.to(dtype)
    rs_s, rs_b = rs_of(scale, eps), rs_of(shift, eps)
    s_hat, b_hat = scale * rs_s, shift * rs_b
    w = 1.0 if weight is None else weight.to(dtype)
    bi = 0.0 if bias is None else bias.to(dtype)
    return s_hat, b_hat, rs_s, rs_b, w, bi


def _t_pnorm(a_hat, rs, ta):
    return rs * (ta - a_hat * (a_hat * ta).mean(-1, keepdim=True))


def adaptive_norm_fwd_reference(x, scale, shift, weight, bias, norm, num_groups, eps, channels_last, tx=None,
                            tscale=None, tshift=None):
    """The fwd / fwd_jvp schemas with the module docstring's closed forms, in fp32 (fp64)."""
    dtype = _compute_dtype(x)
    x3 = _to_blc(x, channels_last).to(dtype)
    xs, dims, bc = _sets(x3, norm, num_groups)
    if _NAMES[norm] == "rms":
        rstd = torch.rsqrt(xs.square().mean(dims) + eps)
        mu = torch.zeros_like(rstd)
    else:
        var, mu = torch.var_mean(xs, dim=dims, correction=0)
        rstd = torch.rsqrt(var + eps)
    xhat_s = (xs - bc(mu)) * bc(rstd)
    xhat = xhat_s.reshape(x3.shape)
    s_hat, b_hat, rs_s, rs_b, w, bi = _coefs(scale, shift, weight, bias, eps, dtype)
    y = xhat * (w * s_hat)[:, None] + (bi * s_hat + b_hat)[:, None]
    out = [_from_blc(y, x, channels_last).to(x.dtype), mu.contiguous(), rstd.contiguous()]
    if tx is None:
        return tuple(out)
    txs = _sets(_to_blc(tx, channels_last).to(dtype), norm, num_groups)[0]
    mt = 0 if _NAMES[norm] == "rms" else bc(txs.mean(dims))
    cov = ((xs - bc(mu)) * txs).mean(dims)
    t_xhat = (bc(rstd) * (txs - mt - xhat_s * bc(rstd * cov))).reshape(x3.shape)
    t_s, t_b = _t_pnorm(s_hat, rs_s, tscale.to(dtype)), _t_pnorm(b_hat, rs_b, tshift.to(dtype))
    ty = t_xhat * (w * s_hat)[:, None] + xhat * (w * t_s)[:, None] + (bi * t_s + t_b)[:, None]
    return (*out, _from_blc(ty, x, channels_last).to(x.dtype))


def adaptive_norm_fwd_jvp_reference(x, scale, shift, tx, tscale, tshift, weight, bias, norm, num_groups, eps,
                                channels_last):
    return adaptive_norm_fwd_reference(x, scale, shift, weight, bias, norm, num_groups, eps, channels_last, tx, tscale,
                                   tshift)


def adaptive_norm_bwd_reference(grad_y, x, scale, shift, weight, bias, mean, rstd, norm, num_groups, eps, channels_last):
    """The bwd schema with the module docstring's closed forms, from the saved statistics."""
    dtype = _compute_dtype(x)
    x3, dy3 = (_to_blc(t, channels_last).to(dtype) for t in (x, grad_y))
    xs, dims, bc = _sets(x3, norm, num_groups)
    mean, rstd = mean.to(dtype), rstd.to(dtype)
    xhat = ((xs - bc(mean)) * bc(rstd)).reshape(x3.shape)
    s_hat, b_hat, rs_s, rs_b, w, bi = _coefs(scale, shift, weight, bias, eps, dtype)
    g = dy3 * (w * s_hat)[:, None]
    gs, xh = _sets(g, norm, num_groups)[0], _sets(xhat, norm, num_groups)[0]
    mg = 0 if _NAMES[norm] == "rms" else bc(gs.mean(dims))
    dx = (bc(rstd) * (gs - mg - xh * bc((gs * xh).mean(dims)))).reshape(x3.shape)
    P, Q = (dy3 * xhat).sum(1), dy3.sum(1)  # (B, C)
    ds, db = w * P + bi * Q, Q
    grad_scale = _t_pnorm(s_hat, rs_s, ds)  # the pnorm backward has the tangent's form (symmetric Jacobian)
    grad_shift = _t_pnorm(b_hat, rs_b, db)
    empty = x.new_empty(0)
    grad_w = empty if weight is None else (s_hat * P).sum(0).to(weight.dtype)
    grad_b = empty if bias is None else (s_hat * Q).sum(0).to(bias.dtype)
    return (_from_blc(dx, x, channels_last).to(x.dtype), grad_scale.to(scale.dtype), grad_shift.to(shift.dtype),
            grad_w, grad_b)
