"""Triton kernels: adaptive double normalization, forward, forward + JVP, and backward.

Per batch element b, with x seen as (B, R, C) (R positions, C channels; scm-reference.md §5):
    y = n s^ + b^,   n = xhat w + bias,   s^ = pnorm(scale_b),   b^ = pnorm(shift_b)
    pnorm(a) = rs_a a,   rs_a = 1 / sqrt(mean_c(a^2) + eps)
    xhat = (x - mu) rstd,   rstd = 1 / sqrt(var + eps)   over a norm set: the C channels of one position
    (layer; rms: mu = 0, var = mean(x^2)) or the C/G channels of group g at all R positions (group).
Per channel the forward folds everything but xhat into
    alpha = s^ w,   beta = s^ bias + b^,   y = xhat alpha + beta.
    (rs_a and k_a from a / m, m a power of two >= max|a| once that exceeds 2^32: exact scaling, and
    mean_c(a^2) cannot overflow fp32, as it would past |a| ~ 1e19.)
Tangents (tx, tscale, tshift): t_pnorm(a) = rs_a (ta - k_a a), k_a = rs_a^2 mean_c(a ta), and
    t_xhat = rstd (tx - mean(tx) - xhat rstd cov),   cov = mean((x - mu) tx)   (rms: no mean(tx))
    ty = t_xhat alpha + xhat gamma + delta,   gamma = t_s^ w,   delta = t_s^ bias + t_b^.
Backward, with g = dy alpha (the gradient of xhat) and per (b, channel) sums over positions
    A = sum_R dy xhat,   Bs = sum_R dy:
    dx = rstd (g - mean(g) - xhat mean(g xhat))   (rms: no mean(g))
    d s^ = w A + bias Bs,   d b^ = Bs,   d scale = rs_s (d s^ - k scale), k = rs_s^2 mean_c(scale d s^)
    (same for shift),   d weight = sum_B s^ A,   d bias = sum_B s^ Bs.

Kernels (all math in fp32; x, scale, shift, weight, bias may each be fp32/fp16/bf16):
  row mode (layer, rms): a program owns consecutive tiles of BLOCK_R positions of one batch
    element. SINGLE: the whole row is one tile (BLOCK_C >= C): exact two-pass statistics in
    registers and per-channel coefficients computed once per program. Otherwise (C too wide for
    registers) the row is read in BLOCK_C chunks twice: statistics merged across chunks (Chan et
    al.), then the outputs. Channels-first tiles span at least 32 bytes of positions (their
    contiguous axis). Backward: dx per tile (chunked rows: row sums of g and g xhat first, then dx);
    A and Bs summed over the program's positions into fp32 partials (B, P, 2, C), P programs per
    batch element (chunked rows add each tile's sums into the zeroed partials).
  group mode: one program per (b, g) loops over all R positions and the group's channels:
    pass 1 merges tile statistics (Chan et al.: mean, M2 and, for the tangent, mean(tx) and the
    co-moment of (x, tx)), pass 2 writes y (and ty). Backward pass 1 sums g, g xhat, A and Bs
    (complete per (b, channel): P = 1), pass 2 writes dx.
  finish: one program per batch element sums the partials over P and applies the pnorm backward;
    d weight and d bias leave it per batch element and the launcher sums them over B.
Chan merge of sets a, b (sizes na, nb, n = na + nb, f = nb / n, d = mean_b - mean_a):
    mean = mean_a + d f,   M2 = M2a + M2b + d^2 na f,   co-moment: Ca + Cb + d (tmean_b - tmean_a) na f.
The layer/group statistics are those of x - x0 (x0: the first element of the row or group; mu = x0 +
mean(x - x0)): the differences are exact, so mu and d carry no rounding error of order eps |mu|, which
for |mu| >> sigma would bias xhat (and, through d^2, the variance) by far more than fp32 rounding.
Memory layout: channels_last, element (b, r, c) at (b R + r) C + c; channels-first (B, C, *spatial),
at (b C + c) R + r. CHANNELS_LAST is a constexpr so that the compiler sees which axis is contiguous.
"""
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LAYER, RMS, GROUP = 0, 1, 2

# Tile sizes in elements (read at call time, so tests may shrink them). TILE: the target of a tile;
# MAX_TILE: the largest tile that holds whole rows in registers (above it rows are chunked), per
# kernel kind; fwd_jvp keeps about twice the live values. Interpreter runs use small tiles so that
# small test shapes cover several tiles, several programs per batch element and chunked rows.
TILE = 256 if INTERPRET else 4096
MAX_TILE = ({"fwd": 512, "fwd_jvp": 512, "bwd": 512} if INTERPRET
            else {"fwd": 8192, "fwd_jvp": 4096, "bwd": 8192})
GROUP_MAX_BLOCK_C = 32 if INTERPRET else 1024  # channels of a group tile
FINISH_BLOCK_C = 64 if INTERPRET else 1024  # channels per chunk of the finishing kernel
MAX_FINISH_P = 32  # more partials per batch element are first summed by torch (a parallel reduction)
WAVES = 4  # row mode: aim for WAVES x (number of SMs) programs
INT64_MIN_NUMEL = 2 ** 31  # from this many elements per batch element on, offsets inside it are int64


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(offs_r, offs_c, R, C, c_end, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr):
    """Offsets of (position, channel) tiles inside one batch element, and the in-bounds mask."""
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < c_end)
    if INT64:  # R * C >= 2^31
        offs_r = offs_r.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    if CHANNELS_LAST:
        off = offs_r[:, None] * C + offs_c[None, :]
    else:
        off = offs_r[:, None] + offs_c[None, :] * R
    return off, mask


@triton.jit
def _first_channel(X, x_base, offs_r, c, R, C, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr):
    """x[b, offs_r, c] as fp32, (BLOCK_R,) (0 outside R): the shift that keeps chunked sums exact."""
    off, mask = _tile_offsets(offs_r, c + tl.arange(0, 1), R, C, C, CHANNELS_LAST, INT64)
    return tl.sum(tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32), 1)


@triton.jit
def _pow2_scale(amax):
    """1, or for amax >= 2^32 a power of two >= amax (at most 2^127): dividing by it is exact."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent: amax < 2^(e - 126)
    e = tl.where(e >= 127 + 32, tl.minimum(e + 1, 254), 127)
    return (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def _abs_max(A, off, C, BLOCK_C: tl.constexpr):
    offs = tl.arange(0, BLOCK_C)
    amax = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        a = tl.load(A + off + c0 + offs, mask=c0 + offs < C, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(a))
    return tl.max(amax, 0)


@triton.jit
def _rs_k(ss, st, C, eps, m):
    """(rs, k) from ss = sum (a / m)^2 and st = sum (a / m) t: rs = 1 / sqrt(mean(a^2) + eps),
    k = rs^2 mean(a t), computed without forming a^2 (r1 = rs m)."""
    r1 = tl.math.rsqrt(ss / C + eps / (m * m))
    return r1 / m, r1 * r1 * st / C / m


@triton.jit
def _pnorm_scalars(A, TA, off, C, eps, BLOCK_C: tl.constexpr, HAS_TANGENT: tl.constexpr):
    """(rs, k) of one (C,) vector a at A + off: pnorm(a) = rs a, t_pnorm(a) = rs (ta - k a); k = 0
    without tangent."""
    offs = tl.arange(0, BLOCK_C)
    m = _pow2_scale(_abs_max(A, off, C, BLOCK_C))
    ss = tl.zeros([BLOCK_C], dtype=tl.float32)
    st = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cmask = c0 + offs < C
        a = tl.load(A + off + c0 + offs, mask=cmask, other=0.0).to(tl.float32) / m
        ss += a * a
        if HAS_TANGENT:
            ta = tl.load(TA + off + c0 + offs, mask=cmask, other=0.0).to(tl.float32)
            st += a * ta
    return _rs_k(tl.sum(ss, 0), tl.sum(st, 0), C, eps, m)


@triton.jit
def _coefs(Scale, Shift, TScale, TShift, W, Bias, off_b, offs_c, cmask, rs_s, k_s, rs_h, k_h,
           HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TANGENT: tl.constexpr):
    """Per-channel (alpha, beta, gamma, delta): y = xhat alpha + beta, ty = t_xhat alpha + xhat gamma
    + delta (gamma, delta are placeholders without tangent)."""
    scale = tl.load(Scale + off_b + offs_c, mask=cmask, other=0.0).to(tl.float32)
    shift = tl.load(Shift + off_b + offs_c, mask=cmask, other=0.0).to(tl.float32)
    s_hat = scale * rs_s
    alpha = s_hat
    beta = shift * rs_h
    if HAS_W:
        w = tl.load(W + offs_c, mask=cmask, other=0.0).to(tl.float32)
        alpha = s_hat * w
    if HAS_B:
        bias = tl.load(Bias + offs_c, mask=cmask, other=0.0).to(tl.float32)
        beta += s_hat * bias
    gamma = alpha
    delta = beta
    if HAS_TANGENT:
        t_scale = tl.load(TScale + off_b + offs_c, mask=cmask, other=0.0).to(tl.float32)
        t_shift = tl.load(TShift + off_b + offs_c, mask=cmask, other=0.0).to(tl.float32)
        t_s_hat = rs_s * (t_scale - k_s * scale)
        gamma = t_s_hat
        delta = rs_h * (t_shift - k_h * shift)
        if HAS_W:
            gamma = t_s_hat * w
        if HAS_B:
            delta += t_s_hat * bias
    return alpha, beta, gamma, delta


@triton.jit
def _alpha(Scale, W, off_b, offs_c, cmask, rs_s, HAS_W: tl.constexpr):
    """Per-channel alpha = s^ w (the backward's g = dy alpha)."""
    alpha = tl.load(Scale + off_b + offs_c, mask=cmask, other=0.0).to(tl.float32) * rs_s
    if HAS_W:
        alpha *= tl.load(W + offs_c, mask=cmask, other=0.0).to(tl.float32)
    return alpha


@triton.jit
def _chan_merge(n_a, n_b, mean_a, m2_a, tmean_a, cov_a, mean_b, m2_b, tmean_b, cov_b,
                HAS_TANGENT: tl.constexpr):
    """Statistics of the union of two sets (Chan et al.); n_a may be 0."""
    f = n_b / (n_a + n_b)
    d = mean_b - mean_a
    mean = mean_a + d * f
    m2 = m2_a + m2_b + d * d * (n_a * f)
    tmean = tmean_a
    cov = cov_a
    if HAS_TANGENT:
        dt = tmean_b - tmean_a
        tmean = tmean_a + dt * f
        cov = cov_a + cov_b + d * dt * (n_a * f)
    return mean, m2, tmean, cov


@triton.jit
def _fwd_tile(x, tx, mean, rstd, tmean, cov, alpha, beta, gamma, delta, HAS_TANGENT: tl.constexpr):
    """(y, ty) of a tile; statistics and coefficients come broadcastable to the tile (ty = y without
    tangent)."""
    xhat = (x - mean) * rstd
    y = xhat * alpha + beta
    ty = y
    if HAS_TANGENT:
        t_xhat = rstd * (tx - tmean - xhat * (rstd * cov))
        ty = t_xhat * alpha + xhat * gamma + delta
    return y, ty


# ---------------------------------------------------------------------------------------------
# Forward (+ JVP)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _adanorm_row_fwd_kernel(
    X, TX, Scale, Shift, TScale, TShift, W, Bias, Y, TY, Mean, Rstd,
    R, C, eps, tiles_per_prog,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TANGENT: tl.constexpr,
    INT64: tl.constexpr,
):
    """Layer / rms norm: tiles_per_prog tiles of BLOCK_R positions of batch element program_id(1)."""
    pid = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    x_base = off_b * R * C
    sc_base = off_b * C
    rs_s, k_s = _pnorm_scalars(Scale, TScale, sc_base, C, eps, BLOCK_C, HAS_TANGENT)
    rs_h, k_h = _pnorm_scalars(Shift, TShift, sc_base, C, eps, BLOCK_C, HAS_TANGENT)
    row_start = pid * tiles_per_prog * BLOCK_R
    row_end = tl.minimum(R, row_start + tiles_per_prog * BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    if SINGLE:
        alpha, beta, gamma, delta = _coefs(Scale, Shift, TScale, TShift, W, Bias, sc_base, offs_c, offs_c < C,
                                           rs_s, k_s, rs_h, k_h, HAS_W, HAS_B, HAS_TANGENT)
        for r0 in range(row_start, row_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            off, mask = _tile_offsets(offs_r, offs_c, R, C, C, CHANNELS_LAST, INT64)
            x = tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32)
            if IS_RMS:
                mean = tl.zeros([BLOCK_R], dtype=tl.float32)
                xc = x
            else:  # mean of x - x[:, 0]: exact differences, so mu keeps no rounding of |mu| (large offsets)
                shift = tl.sum(tl.where(offs_c[None, :] == 0, x, 0.0), 1)
                xc = tl.where(mask, x - shift[:, None], 0.0)
                mean = tl.sum(xc, 1) / C
                xc = tl.where(mask, xc - mean[:, None], 0.0)
                mean += shift
            rstd = tl.math.rsqrt(tl.sum(xc * xc, 1) / C + eps)
            tl.store(Mean + off_b * R + offs_r, mean, mask=offs_r < R)
            tl.store(Rstd + off_b * R + offs_r, rstd, mask=offs_r < R)
            tx = x
            tmean = mean
            cov = mean
            if HAS_TANGENT:
                tx = tl.load(TX + x_base + off, mask=mask, other=0.0).to(tl.float32)
                cov = tl.sum(xc * tx, 1) / C
                if not IS_RMS:
                    tmean = tl.sum(tx, 1) / C
            y, ty = _fwd_tile(x, tx, mean[:, None], rstd[:, None], tmean[:, None], cov[:, None], alpha[None, :],
                              beta[None, :], gamma[None, :], delta[None, :], HAS_TANGENT)
            tl.store(Y + x_base + off, y.to(Y.dtype.element_ty), mask=mask)
            if HAS_TANGENT:
                tl.store(TY + x_base + off, ty.to(TY.dtype.element_ty), mask=mask)
    else:
        for r0 in range(row_start, row_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            shift = tl.zeros([BLOCK_R], dtype=tl.float32)
            if not IS_RMS:  # merge statistics of x - x[:, 0]: chunk means then carry no rounding of |mu|
                shift = _first_channel(X, x_base, offs_r, 0, R, C, CHANNELS_LAST, INT64)
            mean = tl.zeros([BLOCK_R], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
            tmean = tl.zeros([BLOCK_R], dtype=tl.float32)
            cov = tl.zeros([BLOCK_R], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):  # pass 1: statistics merged over channel chunks
                off, mask = _tile_offsets(offs_r, c0 + offs_c, R, C, C, CHANNELS_LAST, INT64)
                x = tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32)
                tx = x
                if HAS_TANGENT:
                    tx = tl.load(TX + x_base + off, mask=mask, other=0.0).to(tl.float32)
                if IS_RMS:
                    m2 += tl.sum(x * x, 1)
                    if HAS_TANGENT:
                        cov += tl.sum(x * tx, 1)
                else:
                    x = tl.where(mask, x - shift[:, None], 0.0)
                    n_b = tl.minimum(C - c0, BLOCK_C) * 1.0
                    mean_b = tl.sum(x, 1) / n_b
                    xc = tl.where(mask, x - mean_b[:, None], 0.0)
                    mean, m2, tmean, cov = _chan_merge(c0 * 1.0, n_b, mean, m2, tmean, cov, mean_b,
                                                       tl.sum(xc * xc, 1), tl.sum(tx, 1) / n_b,
                                                       tl.sum(xc * tx, 1), HAS_TANGENT)
            rstd = tl.math.rsqrt(m2 / C + eps)
            cov = cov / C
            mean += shift
            tl.store(Mean + off_b * R + offs_r, mean, mask=offs_r < R)
            tl.store(Rstd + off_b * R + offs_r, rstd, mask=offs_r < R)
            for c0 in range(0, C, BLOCK_C):  # pass 2: outputs (the chunks are hot in L1/L2)
                alpha, beta, gamma, delta = _coefs(Scale, Shift, TScale, TShift, W, Bias, sc_base, c0 + offs_c,
                                                   c0 + offs_c < C, rs_s, k_s, rs_h, k_h, HAS_W, HAS_B,
                                                   HAS_TANGENT)
                off, mask = _tile_offsets(offs_r, c0 + offs_c, R, C, C, CHANNELS_LAST, INT64)
                x = tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32)
                tx = x
                if HAS_TANGENT:
                    tx = tl.load(TX + x_base + off, mask=mask, other=0.0).to(tl.float32)
                y, ty = _fwd_tile(x, tx, mean[:, None], rstd[:, None], tmean[:, None], cov[:, None],
                                  alpha[None, :], beta[None, :], gamma[None, :], delta[None, :], HAS_TANGENT)
                tl.store(Y + x_base + off, y.to(Y.dtype.element_ty), mask=mask)
                if HAS_TANGENT:
                    tl.store(TY + x_base + off, ty.to(TY.dtype.element_ty), mask=mask)


@triton.jit
def _adanorm_group_fwd_kernel(
    X, TX, Scale, Shift, TScale, TShift, W, Bias, Y, TY, Mean, Rstd,
    R, C, G, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_PN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TANGENT: tl.constexpr, INT64: tl.constexpr,
):
    """Group norm: program (b, g) covers the C/G channels of group g at all R positions."""
    pid = tl.program_id(0)  # b * G + g
    off_b = (pid // G).to(tl.int64)
    Cg = C // G
    c_lo = (pid % G) * Cg
    c_end = c_lo + Cg
    x_base = off_b * R * C
    sc_base = off_b * C
    offs_c = c_lo + tl.arange(0, BLOCK_C)
    offs_rt = tl.arange(0, BLOCK_R)
    off0, mask0 = _tile_offsets(tl.arange(0, 1), c_lo + tl.arange(0, 1), R, C, C, CHANNELS_LAST, INT64)
    shift = tl.sum(tl.sum(tl.load(X + x_base + off0, mask=mask0, other=0.0).to(tl.float32), 1), 0)  # x[b, 0, c_lo]
    mean = 0.0
    m2 = 0.0
    tmean = 0.0
    cov = 0.0
    for c0 in range(0, Cg, BLOCK_C):  # pass 1: statistics merged over tiles
        n_c = tl.minimum(Cg - c0, BLOCK_C) * 1.0
        for r0 in range(0, R, BLOCK_R):
            off, mask = _tile_offsets(r0 + offs_rt, c0 + offs_c, R, C, c_end, CHANNELS_LAST, INT64)
            x = tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32)
            tx = x
            if HAS_TANGENT:
                tx = tl.load(TX + x_base + off, mask=mask, other=0.0).to(tl.float32)
            x = tl.where(mask, x - shift, 0.0)  # statistics of x - shift (see the row kernel)
            n_a = c0 * (R * 1.0) + n_c * r0  # elements merged so far (chunk-major order)
            n_b = n_c * tl.minimum(R - r0, BLOCK_R)
            mean_b = tl.sum(tl.sum(x, 1), 0) / n_b
            xc = tl.where(mask, x - mean_b, 0.0)
            mean, m2, tmean, cov = _chan_merge(n_a, n_b, mean, m2, tmean, cov, mean_b,
                                               tl.sum(tl.sum(xc * xc, 1), 0), tl.sum(tl.sum(tx, 1), 0) / n_b,
                                               tl.sum(tl.sum(xc * tx, 1), 0), HAS_TANGENT)
    n = Cg * (R * 1.0)
    rstd = tl.math.rsqrt(m2 / n + eps)
    cov = cov / n
    mean += shift
    tl.store(Mean + pid, mean)
    tl.store(Rstd + pid, rstd)
    rs_s, k_s = _pnorm_scalars(Scale, TScale, sc_base, C, eps, BLOCK_PN, HAS_TANGENT)
    rs_h, k_h = _pnorm_scalars(Shift, TShift, sc_base, C, eps, BLOCK_PN, HAS_TANGENT)
    for c0 in range(0, Cg, BLOCK_C):  # pass 2: outputs
        cmask = c0 + offs_c < c_end
        alpha, beta, gamma, delta = _coefs(Scale, Shift, TScale, TShift, W, Bias, sc_base, c0 + offs_c, cmask,
                                           rs_s, k_s, rs_h, k_h, HAS_W, HAS_B, HAS_TANGENT)
        for r0 in range(0, R, BLOCK_R):
            off, mask = _tile_offsets(r0 + offs_rt, c0 + offs_c, R, C, c_end, CHANNELS_LAST, INT64)
            x = tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32)
            tx = x
            if HAS_TANGENT:
                tx = tl.load(TX + x_base + off, mask=mask, other=0.0).to(tl.float32)
            y, ty = _fwd_tile(x, tx, mean, rstd, tmean, cov, alpha[None, :], beta[None, :], gamma[None, :],
                              delta[None, :], HAS_TANGENT)
            tl.store(Y + x_base + off, y.to(Y.dtype.element_ty), mask=mask)
            if HAS_TANGENT:
                tl.store(TY + x_base + off, ty.to(TY.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _adanorm_row_bwd_kernel(
    DY, X, Scale, W, Mean, Rstd, DX, Part,
    R, C, eps, tiles_per_prog, P,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, INT64: tl.constexpr,
):
    """Layer / rms norm: dx of tiles_per_prog tiles of BLOCK_R positions, and A = sum dy xhat,
    Bs = sum dy over them into Part[b, program_id(0)] (zero-initialised when not SINGLE)."""
    pid = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    x_base = off_b * R * C
    sc_base = off_b * C
    part_base = (off_b * P + pid) * 2 * C
    rs_s, _ = _pnorm_scalars(Scale, Scale, sc_base, C, eps, BLOCK_C, False)
    row_start = pid * tiles_per_prog * BLOCK_R
    row_end = tl.minimum(R, row_start + tiles_per_prog * BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    if SINGLE:
        alpha = _alpha(Scale, W, sc_base, offs_c, offs_c < C, rs_s, HAS_W)
        acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            off, mask = _tile_offsets(offs_r, offs_c, R, C, C, CHANNELS_LAST, INT64)
            x = tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + x_base + off, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + off_b * R + offs_r, mask=offs_r < R, other=0.0)
            rstd = tl.load(Rstd + off_b * R + offs_r, mask=offs_r < R, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * alpha[None, :]
            dx = g - xhat * (tl.sum(g * xhat, 1) / C)[:, None]
            if not IS_RMS:
                dx -= (tl.sum(g, 1) / C)[:, None]
            tl.store(DX + x_base + off, (dx * rstd[:, None]).to(DX.dtype.element_ty), mask=mask)
            acc_a += tl.sum(dy * xhat, 0)
            acc_b += tl.sum(dy, 0)
        tl.store(Part + part_base + offs_c, acc_a, mask=offs_c < C)
        tl.store(Part + part_base + C + offs_c, acc_b, mask=offs_c < C)
    else:
        for r0 in range(row_start, row_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mean = tl.load(Mean + off_b * R + offs_r, mask=offs_r < R, other=0.0)
            rstd = tl.load(Rstd + off_b * R + offs_r, mask=offs_r < R, other=0.0)
            s_g = tl.zeros([BLOCK_R], dtype=tl.float32)
            s_gx = tl.zeros([BLOCK_R], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):  # pass 1: row sums of g and g xhat
                alpha = _alpha(Scale, W, sc_base, c0 + offs_c, c0 + offs_c < C, rs_s, HAS_W)
                off, mask = _tile_offsets(offs_r, c0 + offs_c, R, C, C, CHANNELS_LAST, INT64)
                x = tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + x_base + off, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                g = dy * alpha[None, :]
                s_g += tl.sum(g, 1)
                s_gx += tl.sum(g * xhat, 1)
            m_g = s_g / C
            m_gx = s_gx / C
            for c0 in range(0, C, BLOCK_C):  # pass 2: dx, and A, Bs added to this program's partials
                cmask = c0 + offs_c < C
                alpha = _alpha(Scale, W, sc_base, c0 + offs_c, cmask, rs_s, HAS_W)
                off, mask = _tile_offsets(offs_r, c0 + offs_c, R, C, C, CHANNELS_LAST, INT64)
                x = tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + x_base + off, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                g = dy * alpha[None, :]
                dx = g - xhat * m_gx[:, None]
                if not IS_RMS:
                    dx -= m_g[:, None]
                tl.store(DX + x_base + off, (dx * rstd[:, None]).to(DX.dtype.element_ty), mask=mask)
                pa = Part + part_base + c0 + offs_c
                tl.store(pa, tl.load(pa, mask=cmask, other=0.0) + tl.sum(dy * xhat, 0), mask=cmask)
                pb = Part + part_base + C + c0 + offs_c
                tl.store(pb, tl.load(pb, mask=cmask, other=0.0) + tl.sum(dy, 0), mask=cmask)
            tl.debug_barrier()  # the next tile reads the partials back, maybe in other threads


@triton.jit
def _adanorm_group_bwd_kernel(
    DY, X, Scale, W, Mean, Rstd, DX, Part,
    R, C, G, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_PN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_W: tl.constexpr, INT64: tl.constexpr,
):
    """Group norm: dx of group (b, g), and its channels' complete A, Bs into Part[b, 0]."""
    pid = tl.program_id(0)  # b * G + g
    off_b = (pid // G).to(tl.int64)
    Cg = C // G
    c_lo = (pid % G) * Cg
    c_end = c_lo + Cg
    x_base = off_b * R * C
    sc_base = off_b * C
    part_base = off_b * 2 * C
    rs_s, _ = _pnorm_scalars(Scale, Scale, sc_base, C, eps, BLOCK_PN, False)
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    offs_c = c_lo + tl.arange(0, BLOCK_C)
    offs_rt = tl.arange(0, BLOCK_R)
    s_g = 0.0
    s_gx = 0.0
    for c0 in range(0, Cg, BLOCK_C):  # pass 1: sums of g, g xhat; A and Bs per channel
        cmask = c0 + offs_c < c_end
        alpha = _alpha(Scale, W, sc_base, c0 + offs_c, cmask, rs_s, HAS_W)
        acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            off, mask = _tile_offsets(r0 + offs_rt, c0 + offs_c, R, C, c_end, CHANNELS_LAST, INT64)
            x = tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + x_base + off, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * alpha[None, :]
            s_g += tl.sum(tl.sum(g, 1), 0)
            s_gx += tl.sum(tl.sum(g * xhat, 1), 0)
            acc_a += tl.sum(dy * xhat, 0)
            acc_b += tl.sum(dy, 0)
        tl.store(Part + part_base + c0 + offs_c, acc_a, mask=cmask)
        tl.store(Part + part_base + C + c0 + offs_c, acc_b, mask=cmask)
    n = Cg * (R * 1.0)
    m_g = s_g / n
    m_gx = s_gx / n
    for c0 in range(0, Cg, BLOCK_C):  # pass 2: dx
        alpha = _alpha(Scale, W, sc_base, c0 + offs_c, c0 + offs_c < c_end, rs_s, HAS_W)
        for r0 in range(0, R, BLOCK_R):
            off, mask = _tile_offsets(r0 + offs_rt, c0 + offs_c, R, C, c_end, CHANNELS_LAST, INT64)
            x = tl.load(X + x_base + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + x_base + off, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            dx = rstd * (dy * alpha[None, :] - m_g - xhat * m_gx)
            tl.store(DX + x_base + off, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _adanorm_bwd_finish_kernel(
    Part, Scale, Shift, W, Bias, GradScale, GradShift, Acc,
    C, P, eps,
    BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    """Batch element program_id(0): A, Bs = sums of Part[b, :] (B, P, 2, C); d scale, d shift; and
    s^ A, s^ Bs into Acc[b, 2:4] (B, 4, C) for d weight, d bias (Acc[b, 0:2] holds A, Bs)."""
    off_b = tl.program_id(0).to(tl.int64)
    sc_base = off_b * C
    acc_base = off_b * 4 * C
    offs = tl.arange(0, BLOCK_C)
    m_s = _pow2_scale(_abs_max(Scale, sc_base, C, BLOCK_C))
    m_h = _pow2_scale(_abs_max(Shift, sc_base, C, BLOCK_C))
    ss = tl.zeros([BLOCK_C], dtype=tl.float32)
    hh = tl.zeros([BLOCK_C], dtype=tl.float32)
    sd = tl.zeros([BLOCK_C], dtype=tl.float32)
    hd = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):  # pass 1: A, Bs and the pnorm sums (of scale / m_s, shift / m_h)
        c = c0 + offs
        cmask = c < C
        a = tl.zeros([BLOCK_C], dtype=tl.float32)
        bs = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p in range(0, P):
            part = Part + (off_b * P + p) * 2 * C + c
            a += tl.load(part, mask=cmask, other=0.0)
            bs += tl.load(part + C, mask=cmask, other=0.0)
        tl.store(Acc + acc_base + c, a, mask=cmask)
        tl.store(Acc + acc_base + C + c, bs, mask=cmask)
        d_s = a
        if HAS_W:
            d_s = a * tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        if HAS_B:
            d_s += bs * tl.load(Bias + c, mask=cmask, other=0.0).to(tl.float32)
        scale = tl.load(Scale + sc_base + c, mask=cmask, other=0.0).to(tl.float32) / m_s
        shift = tl.load(Shift + sc_base + c, mask=cmask, other=0.0).to(tl.float32) / m_h
        ss += scale * scale
        hh += shift * shift
        sd += scale * d_s
        hd += shift * bs
    rs_s, k_s = _rs_k(tl.sum(ss, 0), tl.sum(sd, 0), C, eps, m_s)
    rs_h, k_h = _rs_k(tl.sum(hh, 0), tl.sum(hd, 0), C, eps, m_h)
    tl.debug_barrier()  # pass 2 reads Acc back, maybe in other threads
    for c0 in range(0, C, BLOCK_C):  # pass 2: d scale, d shift, s^ A, s^ Bs
        c = c0 + offs
        cmask = c < C
        a = tl.load(Acc + acc_base + c, mask=cmask, other=0.0)
        bs = tl.load(Acc + acc_base + C + c, mask=cmask, other=0.0)
        d_s = a
        if HAS_W:
            d_s = a * tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        if HAS_B:
            d_s += bs * tl.load(Bias + c, mask=cmask, other=0.0).to(tl.float32)
        scale = tl.load(Scale + sc_base + c, mask=cmask, other=0.0).to(tl.float32)
        shift = tl.load(Shift + sc_base + c, mask=cmask, other=0.0).to(tl.float32)
        tl.store(GradScale + sc_base + c, (rs_s * (d_s - k_s * scale)).to(GradScale.dtype.element_ty), mask=cmask)
        tl.store(GradShift + sc_base + c, (rs_h * (bs - k_h * shift)).to(GradShift.dtype.element_ty), mask=cmask)
        if HAS_W:
            tl.store(Acc + acc_base + 2 * C + c, rs_s * scale * a, mask=cmask)
        if HAS_B:
            tl.store(Acc + acc_base + 3 * C + c, rs_s * scale * bs, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Launchers: tile choice (a heuristic, not autotuned), allocation, launch.
# ---------------------------------------------------------------------------------------------
# fp32 values of a tile per thread (fwd_jvp and bwd keep about twice as many tiles live as fwd).
# The group kernels' loop-carried statistics made ptxas cap 16-warp programs at 64 registers and
# spill (sm_90), so they keep 16 values a thread (8 warps for a 4096 tile).
PER_THREAD = {"fwd": 16, "fwd_jvp": 8, "bwd": 8}
GROUP_PER_THREAD = {"fwd": 16, "fwd_jvp": 16, "bwd": 16}


def num_warps_for(tile, per_thread=16):
    """About per_thread values of a tile per thread, 1 to 16 warps."""
    return max(1, min(16, tile // (32 * per_thread)))


def row_config(C, R, elem_size, channels_last, kind):
    """(BLOCK_R, BLOCK_C, SINGLE, num_warps) of the row-mode kernel `kind` (fwd, fwd_jvp, bwd).
    Channels-first tiles span at least a 32-byte sector of positions (they are the contiguous axis);
    rows wider than MAX_TILE[kind] / BLOCK_R are chunked."""
    r_cap = triton.next_power_of_2(max(R, 1))
    min_r = min(r_cap, 1 if channels_last else max(1, 32 // elem_size))
    block_c = triton.next_power_of_2(C)
    max_tile = MAX_TILE[kind]
    if block_c * min_r <= max_tile:
        block_r = max(min_r, min(TILE // block_c, r_cap))
        single = True
    else:
        block_r, block_c, single = min_r, max_tile // min_r, False
    return block_r, block_c, single, num_warps_for(block_r * block_c, PER_THREAD[kind])


def group_config(Cg, R, kind):
    """(BLOCK_R, BLOCK_C, num_warps) of the group kernel `kind` (fwd, fwd_jvp, bwd): Cg channels of a
    group, R positions."""
    block_c = min(triton.next_power_of_2(Cg), GROUP_MAX_BLOCK_C)
    block_r = max(1, min(TILE // block_c, triton.next_power_of_2(max(R, 1))))
    return block_r, block_c, num_warps_for(block_r * block_c, GROUP_PER_THREAD[kind])


def finish_config(C):
    """(BLOCK_C, num_warps) of the finishing kernel."""
    block_c = min(triton.next_power_of_2(C), FINISH_BLOCK_C)
    return block_c, num_warps_for(block_c * 4)


def pnorm_block(C):
    """Chunk of the (C,) pnorm loops in the group kernels."""
    return min(triton.next_power_of_2(C), FINISH_BLOCK_C)


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: few programs, so that they loop over several tiles


def _row_grid(B, R, block_r, device):
    """(tiles_per_prog, programs per batch element)."""
    n_tiles = triton.cdiv(R, block_r)
    per_batch = max(1, triton.cdiv(WAVES * _num_sms(device), B))
    tiles_per_prog = triton.cdiv(n_tiles, per_batch)
    return tiles_per_prog, triton.cdiv(n_tiles, tiles_per_prog)


def _layout(x, scale, norm, num_groups):
    B, C = scale.shape[0], scale.shape[1]
    R = x.numel() // (B * C) if B * C else 0
    G = num_groups if norm == GROUP else 1
    if norm == GROUP and C % G:
        raise ValueError(f"num_groups ({G}) must divide the channels ({C})")
    return B, C, R, G


def adaptive_norm_fwd(x, scale, shift, weight, bias, norm, num_groups, eps, channels_last,
                      tx=None, tscale=None, tshift=None):
    """(y, mean, rstd) or, with tangents, (y, mean, rstd, ty). mean/rstd: fp32, (B, R) for layer/rms
    (mean = 0 for rms), (B, G) for group."""
    B, C, R, G = _layout(x, scale, norm, num_groups)
    has_t = tx is not None
    y = torch.empty_like(x)
    ty = torch.empty_like(x) if has_t else y
    n_stats = G if norm == GROUP else R
    mean = torch.empty(B, n_stats, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() > 0:
        if not has_t:
            tx, tscale, tshift = x, scale, shift
        flags = dict(CHANNELS_LAST=bool(channels_last), HAS_W=weight is not None, HAS_B=bias is not None,
                     HAS_TANGENT=has_t, INT64=R * C >= INT64_MIN_NUMEL)
        args = (x, tx, scale, shift, tscale, tshift, x if weight is None else weight, x if bias is None else bias,
                y, ty, mean, rstd)
        if norm == GROUP:
            block_r, block_c, warps = group_config(C // G, R, "fwd_jvp" if has_t else "fwd")
            _adanorm_group_fwd_kernel[(B * G,)](*args, R, C, G, eps, BLOCK_R=block_r, BLOCK_C=block_c,
                                                BLOCK_PN=pnorm_block(C), num_warps=warps, **flags)
        else:
            block_r, block_c, single, warps = row_config(C, R, x.element_size(), channels_last,
                                                         "fwd_jvp" if has_t else "fwd")
            tiles_per_prog, per_batch = _row_grid(B, R, block_r, x.device)
            _adanorm_row_fwd_kernel[(per_batch, B)](*args, R, C, eps, tiles_per_prog, BLOCK_R=block_r,
                                                    BLOCK_C=block_c, SINGLE=single, IS_RMS=norm == RMS,
                                                    num_warps=warps, **flags)
    return (y, mean, rstd, ty) if has_t else (y, mean, rstd)


def adaptive_norm_bwd(grad_y, x, scale, shift, weight, bias, mean, rstd, norm, num_groups, eps, channels_last):
    """(grad_x, grad_scale, grad_shift, grad_weight, grad_bias); a missing weight/bias gets x.new_empty(0)."""
    B, C, R, G = _layout(x, scale, norm, num_groups)
    grad_x = torch.empty_like(x)
    grad_scale = torch.empty_like(scale)
    grad_shift = torch.empty_like(shift)
    has_w, has_b = weight is not None, bias is not None
    w_arg, b_arg = (weight if has_w else x), (bias if has_b else x)
    f32 = dict(device=x.device, dtype=torch.float32)
    flags = dict(CHANNELS_LAST=bool(channels_last), HAS_W=has_w, INT64=R * C >= INT64_MIN_NUMEL)
    if x.numel() == 0:
        part, P = torch.zeros(B, 1, 2, C, **f32), 1
    elif norm == GROUP:
        part, P = torch.empty(B, 1, 2, C, **f32), 1
        block_r, block_c, warps = group_config(C // G, R, "bwd")
        _adanorm_group_bwd_kernel[(B * G,)](grad_y, x, scale, w_arg, mean, rstd, grad_x, part, R, C, G, eps,
                                            BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_PN=pnorm_block(C),
                                            num_warps=warps, **flags)
    else:
        block_r, block_c, single, warps = row_config(C, R, x.element_size(), channels_last, "bwd")
        tiles_per_prog, P = _row_grid(B, R, block_r, x.device)
        part = (torch.empty if single else torch.zeros)(B, P, 2, C, **f32)
        _adanorm_row_bwd_kernel[(P, B)](grad_y, x, scale, w_arg, mean, rstd, grad_x, part, R, C, eps,
                                        tiles_per_prog, P, BLOCK_R=block_r, BLOCK_C=block_c, SINGLE=single,
                                        IS_RMS=norm == RMS, num_warps=warps, **flags)
    if P > MAX_FINISH_P:
        part, P = part.sum(1, keepdim=True), 1
    acc = torch.empty(B, 4, C, **f32)
    if B > 0:
        block_c, warps = finish_config(C)
        _adanorm_bwd_finish_kernel[(B,)](part, scale, shift, w_arg, b_arg, grad_scale, grad_shift, acc, C, P, eps,
                                         BLOCK_C=block_c, HAS_W=has_w, HAS_B=has_b, num_warps=warps)
    empty = x.new_empty(0)
    grad_w = acc[:, 2].sum(0).to(weight.dtype) if has_w else empty
    grad_b = acc[:, 3].sum(0).to(bias.dtype) if has_b else empty
    return grad_x, grad_scale, grad_shift, grad_w, grad_b
