// Adaptive double normalization: op schemas and C++ CPU kernels (scm-reference.md §5).
//
//   y = norm(x) * pnorm(scale) + pnorm(shift),   pnorm(a) = a / sqrt(mean_c(a^2) + eps)
//
// x is seen as (B, R, C): channels-last (tokens, element (b, r, c) at (b R + r) C + c) or channels-
// first (feature maps, at (b C + c) R + r); scale, shift are (B, C). The norm sets, the statistics
// and the closed-form tangent and backward are those of scm_fast/ops/adaptive_norm_ref.py. Per
// (b, c) the affine and the modulation fold into two coefficients:
//   y  = xhat A + Bc,              A = w s^,   Bc = bias s^ + b^                 (s^, b^ = pnorms)
//   ty = t_xhat A + xhat TA + TB,  TA = w t_s^, TB = bias t_s^ + t_b^,  t_xhat = rstd (tx - mt - xhat rstd cov)
// Backward: g = dy A, dx = rstd (g - mean(g) - xhat mean(g xhat)); per (b, c) P = sum_r dy xhat and
// Q = sum_r dy give d s^ = w P + bias Q, d b^ = Q, d w = sum_b s^ P, d bias = sum_b s^ Q.
// Layer and rms run per position ("row mode"), group per (b, group). All math in fp32 (group sums in
// fp64); one pass over each row or group set per statistic, the row in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_math.h"

namespace scm_fast {
namespace {

enum Norm { kLayer = 0, kRms = 1, kGroup = 2 };
constexpr int64_t kPosBlock = 32;    // positions per task in channels-first row mode
constexpr int64_t kRowChunk = 256;   // rows per backward task in channels-last row mode

const char* kTail = "Tensor? weight, Tensor? bias, int norm, int num_groups, float eps, bool channels_last";

struct Shape {
  int64_t B, R, C, G, Cg;
  bool cl;
  int norm;
  float eps;
};

Shape make_shape(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, int64_t norm, int64_t G,
                 double eps, bool cl) {
  TORCH_CHECK(x.device().is_cpu() && scale.device().is_cpu() && shift.device().is_cpu(),
              "adaptive_norm_*_cpu: x, scale, shift must be CPU tensors");
  TORCH_CHECK(x.dim() >= 2, "adaptive_norm: x must have at least 2 dims, got ", x.sizes());
  TORCH_CHECK(scale.dim() == 2 && scale.sizes() == shift.sizes() && scale.size(0) == x.size(0),
              "adaptive_norm: scale and shift must be (B, C) with B = x.shape[0], got x ", x.sizes(), ", scale ",
              scale.sizes(), ", shift ", shift.sizes());
  const int64_t B = x.size(0), C = scale.size(1);
  TORCH_CHECK((cl ? x.size(-1) : x.size(1)) == C, "adaptive_norm: x ", x.sizes(), " has no channel dim of size ", C,
              cl ? " last" : " at dim 1");
  TORCH_CHECK(norm >= kLayer && norm <= kGroup, "adaptive_norm: norm code must be 0 (layer), 1 (rms) or 2 (group), got ",
              norm);
  TORCH_CHECK(G >= 1 && C % G == 0 && (norm == kGroup || G == 1), "adaptive_norm: num_groups ", G,
              " must divide C = ", C, " (and be 1 unless norm is group)");
  const int64_t R = B * C == 0 ? 0 : x.numel() / (B * C);
  return {B, R, C, G, C / G, cl, int(norm), float(eps)};
}

at::Tensor f32(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// out = a rs, rs = 1 / sqrt(mean(a^2) + eps); with ta: tout = rs (ta - out mean(out ta)). Returns rs.
float pnorm(const float* a, const float* ta, float* out, float* tout, int64_t C, float eps) {
  double ss = 0;
  for (int64_t c = 0; c < C; ++c) ss += double(a[c]) * a[c];
  const float rs = float(1.0 / std::sqrt(ss / C + eps));
  for (int64_t c = 0; c < C; ++c) out[c] = a[c] * rs;
  if (ta == nullptr) return rs;
  double m = 0;
  for (int64_t c = 0; c < C; ++c) m += double(out[c]) * ta[c];
  const float mean = float(m / C);
  for (int64_t c = 0; c < C; ++c) tout[c] = rs * (ta[c] - out[c] * mean);
  return rs;
}

// Per (b, c) coefficients, all (B, C) fp32: s^, b^, A, Bc and, with tangents, TA, TB.
struct Coefs {
  std::vector<float> s, b, rs_s, rs_b, A, Bc, TA, TB;
};

Coefs make_coefs(const Shape& d, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& tscale,
                 const at::Tensor& tshift, const float* w, const float* bias) {
  const int64_t n = d.B * d.C;
  const bool tangent = tscale.defined();
  Coefs k{std::vector<float>(n), std::vector<float>(n), std::vector<float>(d.B), std::vector<float>(d.B),
          std::vector<float>(n), std::vector<float>(n), std::vector<float>(tangent ? n : 0),
          std::vector<float>(tangent ? n : 0)};
  std::vector<float> ts(tangent ? d.C : 0), tb(tangent ? d.C : 0);
  for (int64_t b = 0; b < d.B; ++b) {
    const int64_t o = b * d.C;
    k.rs_s[b] = pnorm(scale.data_ptr<float>() + o, tangent ? tscale.data_ptr<float>() + o : nullptr, &k.s[o], ts.data(),
                      d.C, d.eps);
    k.rs_b[b] = pnorm(shift.data_ptr<float>() + o, tangent ? tshift.data_ptr<float>() + o : nullptr, &k.b[o], tb.data(),
                      d.C, d.eps);
    for (int64_t c = 0; c < d.C; ++c) {
      const float wc = w ? w[c] : 1.f, bc = bias ? bias[c] : 0.f;
      k.A[o + c] = wc * k.s[o + c];
      k.Bc[o + c] = bc * k.s[o + c] + k.b[o + c];
      if (!tangent) continue;
      k.TA[o + c] = wc * ts[c];
      k.TB[o + c] = bc * ts[c] + tb[c];
    }
  }
  return k;
}

struct Io {  // fp32 data of one call; tangent pointers null without a tangent
  const float *x, *tx;
  float *y, *ty;
};

// ---- forward (+ JVP) -------------------------------------------------------------------------
// One channels-last row of C elements; coefficient arrays point at the row's batch element.
void fwd_row_cl(const float* x, const float* tx, float* y, float* ty, int64_t C, bool rms, float eps, const float* A,
                const float* Bc, const float* TA, const float* TB, float& mu_out, float& rstd_out) {
  float s = 0.f, v = 0.f;
  if (!rms) {
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += x[c];
  }
  const float mu = rms ? 0.f : s / C;
#pragma omp simd reduction(+ : v)
  for (int64_t c = 0; c < C; ++c) v += (x[c] - mu) * (x[c] - mu);
  const float rstd = 1.f / std::sqrt(v / C + eps);
  mu_out = mu, rstd_out = rstd;
  if (tx == nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - mu) * rstd * A[c] + Bc[c];
    return;
  }
  float st = 0.f, sc = 0.f;
#pragma omp simd reduction(+ : st, sc)
  for (int64_t c = 0; c < C; ++c) st += tx[c], sc += (x[c] - mu) * tx[c];
  const float mt = rms ? 0.f : st / C, rc = rstd * sc / C;  // t_xhat = rstd (tx - mt - xhat rc)
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float xh = (x[c] - mu) * rstd;
    y[c] = xh * A[c] + Bc[c];
    ty[c] = rstd * (tx[c] - mt - xh * rc) * A[c] + xh * TA[c] + TB[c];
  }
}

// Positions [r0, r0 + n) of one channels-first batch element (element (r, c) at c R + r).
void fwd_block_cf(const Io& io, int64_t R, int64_t C, int64_t r0, int64_t n, bool rms, float eps, const float* A,
                  const float* Bc, const float* TA, const float* TB, float* mu, float* rstd) {
  float s[kPosBlock] = {0.f}, v[kPosBlock] = {0.f}, st[kPosBlock] = {0.f}, sc[kPosBlock] = {0.f};
  if (!rms) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t r = 0; r < n; ++r) s[r] += io.x[c * R + r0 + r];
  }
  for (int64_t r = 0; r < n; ++r) mu[r] = rms ? 0.f : s[r] / C;
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = io.x + c * R + r0;
    for (int64_t r = 0; r < n; ++r) v[r] += (xc[r] - mu[r]) * (xc[r] - mu[r]);
    if (io.tx == nullptr) continue;
    const float* tc = io.tx + c * R + r0;
    for (int64_t r = 0; r < n; ++r) st[r] += tc[r], sc[r] += (xc[r] - mu[r]) * tc[r];
  }
  for (int64_t r = 0; r < n; ++r) {
    rstd[r] = 1.f / std::sqrt(v[r] / C + eps);
    st[r] = rms ? 0.f : st[r] / C;  // mt
    sc[r] = rstd[r] * sc[r] / C;    // rstd cov
  }
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = c * R + r0;
    for (int64_t r = 0; r < n; ++r) {
      const float xh = (io.x[o + r] - mu[r]) * rstd[r];
      io.y[o + r] = xh * A[c] + Bc[c];
      if (io.tx != nullptr) io.ty[o + r] = rstd[r] * (io.tx[o + r] - st[r] - xh * sc[r]) * A[c] + xh * TA[c] + TB[c];
    }
  }
}

// Calls f(offset, length, c0, step) for each contiguous run of group g of batch element b: element j
// of a run has channel c0 + j step (step 0: channels-first runs are one channel's positions).
template <class F>
void for_runs(const Shape& d, int64_t b, int64_t g, F f) {
  if (d.cl) {
    for (int64_t r = 0; r < d.R; ++r) f((b * d.R + r) * d.C + g * d.Cg, d.Cg, g * d.Cg, 1);
  } else {
    for (int64_t c = g * d.Cg; c < (g + 1) * d.Cg; ++c) f((b * d.C + c) * d.R, d.R, c, 0);
  }
}

void fwd_group(const Shape& d, const Io& io, const Coefs& k, int64_t b, int64_t g, float* mu_out, float* rstd_out) {
  const double n = double(d.Cg) * d.R;
  double s = 0, st = 0, v = 0, sc = 0;
  for_runs(d, b, g, [&](int64_t o, int64_t len, int64_t, int64_t) {
    for (int64_t j = 0; j < len; ++j) s += io.x[o + j];
  });
  const float mu = float(s / n);
  for_runs(d, b, g, [&](int64_t o, int64_t len, int64_t, int64_t) {
    for (int64_t j = 0; j < len; ++j) {
      const float xc = io.x[o + j] - mu;
      v += xc * xc;
      if (io.tx != nullptr) st += io.tx[o + j], sc += xc * io.tx[o + j];
    }
  });
  const float rstd = float(1.0 / std::sqrt(v / n + d.eps)), mt = float(st / n), rc = float(rstd * sc / n);
  *mu_out = mu, *rstd_out = rstd;
  const int64_t kb = b * d.C;
  for_runs(d, b, g, [&](int64_t o, int64_t len, int64_t c0, int64_t step) {
    for (int64_t j = 0; j < len; ++j) {
      const int64_t c = kb + c0 + j * step;
      const float xh = (io.x[o + j] - mu) * rstd;
      io.y[o + j] = xh * k.A[c] + k.Bc[c];
      if (io.tx != nullptr) io.ty[o + j] = rstd * (io.tx[o + j] - mt - xh * rc) * k.A[c] + xh * k.TA[c] + k.TB[c];
    }
  });
}

std::vector<at::Tensor> fwd_impl(const at::Tensor& x_, const at::Tensor& scale_, const at::Tensor& shift_,
                                 const at::Tensor* tx_, const at::Tensor* ts_, const at::Tensor* tb_,
                                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                 int64_t norm, int64_t G, double eps, bool cl) {
  const Shape d = make_shape(x_, scale_, shift_, norm, G, eps, cl);
  const bool tangent = tx_ != nullptr;
  at::Tensor x = f32(x_), tx = tangent ? f32(*tx_) : at::Tensor();
  at::Tensor w = weight.has_value() ? f32(*weight) : at::Tensor(), bi = bias.has_value() ? f32(*bias) : at::Tensor();
  const Coefs k = make_coefs(d, f32(scale_), f32(shift_), tangent ? f32(*ts_) : at::Tensor(),
                             tangent ? f32(*tb_) : at::Tensor(), ptr_or_null(w), ptr_or_null(bi));
  at::Tensor y = empty_huge(x.sizes(), x.options()), ty = tangent ? empty_huge(x.sizes(), x.options()) : at::Tensor();
  const int64_t n_stats = d.norm == kGroup ? d.G : d.R;
  at::Tensor mean = at::empty({d.B, n_stats}, x.options()), rstd = at::empty({d.B, n_stats}, x.options());
  const Io io{x.data_ptr<float>(), ptr_or_null(tx), y.data_ptr<float>(), tangent ? ty.data_ptr<float>() : nullptr};
  float *mu = mean.data_ptr<float>(), *rs = rstd.data_ptr<float>();
  const bool rms = d.norm == kRms;
  auto coef = [&](const std::vector<float>& v, int64_t b) { return v.empty() ? nullptr : v.data() + b * d.C; };
  if (d.norm == kGroup) {
    at::parallel_for(0, d.B * d.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) fwd_group(d, io, k, t / d.G, t % d.G, mu + t, rs + t);
    });
  } else if (d.cl) {
    at::parallel_for(0, d.B * d.R, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / d.R, o = row * d.C;
        fwd_row_cl(io.x + o, tangent ? io.tx + o : nullptr, io.y + o, tangent ? io.ty + o : nullptr, d.C, rms, d.eps,
                   coef(k.A, b), coef(k.Bc, b), coef(k.TA, b), coef(k.TB, b), mu[row], rs[row]);
      }
    });
  } else {
    const int64_t nblk = (d.R + kPosBlock - 1) / kPosBlock;
    at::parallel_for(0, d.B * nblk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nblk, r0 = (t % nblk) * kPosBlock, o = b * d.C * d.R;
        const Io sub{io.x + o, tangent ? io.tx + o : nullptr, io.y + o, tangent ? io.ty + o : nullptr};
        fwd_block_cf(sub, d.R, d.C, r0, std::min(kPosBlock, d.R - r0), rms, d.eps, coef(k.A, b), coef(k.Bc, b),
                     coef(k.TA, b), coef(k.TB, b), mu + b * d.R + r0, rs + b * d.R + r0);
      }
    });
  }
  std::vector<at::Tensor> out{y.to(x_.scalar_type()), mean, rstd};
  if (tangent) out.push_back(ty.to(x_.scalar_type()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaptive_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t norm, int64_t num_groups, double eps, bool channels_last) {
  auto r = fwd_impl(x, scale, shift, nullptr, nullptr, nullptr, weight, bias, norm, num_groups, eps, channels_last);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaptive_norm_fwd_jvp_cpu(
    const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& tx,
    const at::Tensor& tscale, const at::Tensor& tshift, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t norm, int64_t num_groups, double eps, bool channels_last) {
  TORCH_CHECK(tx.sizes() == x.sizes() && tscale.sizes() == scale.sizes() && tshift.sizes() == shift.sizes(),
              "adaptive_norm_fwd_jvp: tangents must match x, scale, shift in shape, got ", tx.sizes(), ", ",
              tscale.sizes(), ", ", tshift.sizes());
  auto r = fwd_impl(x, scale, shift, &tx, &tscale, &tshift, weight, bias, norm, num_groups, eps, channels_last);
  return {r[0], r[1], r[2], r[3]};
}

// ---- backward --------------------------------------------------------------------------------
struct BwdIo {
  const float *dy, *x;
  float* dx;
};

// One channels-last row; accumulates P += dy xhat, Q += dy into the task's (C,) partials. g holds
// dy A rounded once, so that g - mean(g) is exactly 0 where the row is constant (no FMA mismatch).
void bwd_row_cl(const float* dy, const float* x, float* dx, int64_t C, bool rms, float mu, float rstd, const float* A,
                float* P, float* Q, float* g) {
  float sg = 0.f, sgx = 0.f;
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t c = 0; c < C; ++c) {
    const float xh = (x[c] - mu) * rstd;
    g[c] = dy[c] * A[c];
    sg += g[c], sgx += g[c] * xh;
    P[c] += dy[c] * xh;
    Q[c] += dy[c];
  }
  const float mg = rms ? 0.f : sg / C, mgx = sgx / C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) dx[c] = rstd * (g[c] - mg - (x[c] - mu) * rstd * mgx);
}

void bwd_block_cf(const BwdIo& io, int64_t R, int64_t C, int64_t r0, int64_t n, bool rms, const float* mu,
                  const float* rstd, const float* A, float* P, float* Q) {
  float sg[kPosBlock] = {0.f}, sgx[kPosBlock] = {0.f};
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = c * R + r0;
    float p = 0.f, q = 0.f;
    for (int64_t r = 0; r < n; ++r) {
      const float xh = (io.x[o + r] - mu[r]) * rstd[r], g = io.dy[o + r] * A[c];
      sg[r] += g, sgx[r] += g * xh;
      p += io.dy[o + r] * xh, q += io.dy[o + r];
    }
    P[c] += p, Q[c] += q;
  }
  for (int64_t r = 0; r < n; ++r) sg[r] = rms ? 0.f : sg[r] / C, sgx[r] /= C;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = c * R + r0;
    for (int64_t r = 0; r < n; ++r) {
      const float xh = (io.x[o + r] - mu[r]) * rstd[r];
      io.dx[o + r] = rstd[r] * (io.dy[o + r] * A[c] - sg[r] - xh * sgx[r]);
    }
  }
}

// One (b, g): dx for the group's elements and the complete P, Q of its channels (rows of batch b).
void bwd_group(const Shape& d, const BwdIo& io, const float* A, float mu, float rstd, int64_t b, int64_t g, float* P,
               float* Q) {
  double sg = 0, sgx = 0;
  for_runs(d, b, g, [&](int64_t o, int64_t len, int64_t c0, int64_t step) {
    for (int64_t j = 0; j < len; ++j) {
      const int64_t c = c0 + j * step;
      const float xh = (io.x[o + j] - mu) * rstd, g_ = io.dy[o + j] * A[c];
      sg += g_, sgx += g_ * xh;
      P[c] += io.dy[o + j] * xh, Q[c] += io.dy[o + j];
    }
  });
  const double n = double(d.Cg) * d.R;
  const float mg = float(sg / n), mgx = float(sgx / n);
  for_runs(d, b, g, [&](int64_t o, int64_t len, int64_t c0, int64_t step) {
    for (int64_t j = 0; j < len; ++j) {
      const float xh = (io.x[o + j] - mu) * rstd;
      io.dx[o + j] = rstd * (io.dy[o + j] * A[c0 + j * step] - mg - xh * mgx);
    }
  });
}

// P, Q: (B, C) sums over positions. Returns (grad_scale, grad_shift, grad_weight, grad_bias) in fp32.
std::vector<at::Tensor> bwd_params(const Shape& d, const Coefs& k, const std::vector<double>& P,
                                   const std::vector<double>& Q, const float* w, const float* bias) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor gs = at::empty({d.B, d.C}, opts), gb = at::empty({d.B, d.C}, opts);
  at::Tensor gw = at::zeros({d.C}, opts), gbias = at::zeros({d.C}, opts);
  std::vector<float> ds(d.C), db(d.C);
  for (int64_t b = 0; b < d.B; ++b) {
    const int64_t o = b * d.C;
    double ms = 0, mb = 0;
    for (int64_t c = 0; c < d.C; ++c) {
      ds[c] = float((w ? w[c] : 1.f) * P[o + c] + (bias ? bias[c] : 0.f) * Q[o + c]);  // d s^
      db[c] = float(Q[o + c]);                                                          // d b^
      ms += double(k.s[o + c]) * ds[c], mb += double(k.b[o + c]) * db[c];
      gw.data_ptr<float>()[c] += float(k.s[o + c] * P[o + c]);
      gbias.data_ptr<float>()[c] += float(k.s[o + c] * Q[o + c]);
    }
    for (int64_t c = 0; c < d.C; ++c) {  // pnorm backward: rs (g - a^ mean(a^ g))
      gs.data_ptr<float>()[o + c] = k.rs_s[b] * (ds[c] - k.s[o + c] * float(ms / d.C));
      gb.data_ptr<float>()[o + c] = k.rs_b[b] * (db[c] - k.b[o + c] * float(mb / d.C));
    }
  }
  return {gs, gb, gw, gbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaptive_norm_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& scale_, const at::Tensor& shift_,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& mean_,
    const at::Tensor& rstd_, int64_t norm, int64_t G, double eps, bool cl) {
  const Shape d = make_shape(x_, scale_, shift_, norm, G, eps, cl);
  TORCH_CHECK(grad_y.sizes() == x_.sizes(), "adaptive_norm_bwd: grad_y must match x, got ", grad_y.sizes(), " vs ",
              x_.sizes());
  const int64_t n_stats = d.norm == kGroup ? d.G : d.R;
  TORCH_CHECK(mean_.sizes() == at::IntArrayRef({d.B, n_stats}) && rstd_.sizes() == mean_.sizes(),
              "adaptive_norm_bwd: mean and rstd must be (", d.B, ", ", n_stats, "), got ", mean_.sizes(), ", ",
              rstd_.sizes());
  at::Tensor x = f32(x_), dy = f32(grad_y), mean = f32(mean_), rstd = f32(rstd_);
  at::Tensor w = weight.has_value() ? f32(*weight) : at::Tensor(), bi = bias.has_value() ? f32(*bias) : at::Tensor();
  const Coefs k = make_coefs(d, f32(scale_), f32(shift_), at::Tensor(), at::Tensor(), ptr_or_null(w), ptr_or_null(bi));
  at::Tensor dx = empty_huge(x.sizes(), x.options());
  const BwdIo io{dy.data_ptr<float>(), x.data_ptr<float>(), dx.data_ptr<float>()};
  const float *mu = mean.data_ptr<float>(), *rs = rstd.data_ptr<float>();
  const bool rms = d.norm == kRms;
  // Tasks own disjoint (task, C) partials of P and Q; summed per batch element afterwards.
  const int64_t per_b = d.norm == kGroup ? 1 : d.cl ? (d.R + kRowChunk - 1) / kRowChunk : (d.R + kPosBlock - 1) / kPosBlock;
  std::vector<float> Pp(d.B * per_b * d.C, 0.f), Qp(d.B * per_b * d.C, 0.f);
  if (d.norm == kGroup) {  // tasks (b, g) write disjoint channel ranges of batch b's partial
    at::parallel_for(0, d.B * d.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / d.G;
        bwd_group(d, io, k.A.data() + b * d.C, mu[t], rs[t], b, t % d.G, &Pp[b * d.C], &Qp[b * d.C]);
      }
    });
  } else {
    at::parallel_for(0, d.B * per_b, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> g(d.cl ? d.C : 0);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / per_b, blk = t % per_b;
        const float* A = k.A.data() + b * d.C;
        float *P = &Pp[t * d.C], *Q = &Qp[t * d.C];
        if (d.cl) {
          for (int64_t r = blk * kRowChunk; r < std::min(d.R, (blk + 1) * kRowChunk); ++r) {
            const int64_t row = b * d.R + r, o = row * d.C;
            bwd_row_cl(io.dy + o, io.x + o, io.dx + o, d.C, rms, mu[row], rs[row], A, P, Q, g.data());
          }
        } else {
          const int64_t r0 = blk * kPosBlock, o = b * d.C * d.R;
          const BwdIo sub{io.dy + o, io.x + o, io.dx + o};
          bwd_block_cf(sub, d.R, d.C, r0, std::min(kPosBlock, d.R - r0), rms, mu + b * d.R + r0, rs + b * d.R + r0, A,
                       P, Q);
        }
      }
    });
  }
  std::vector<double> P(d.B * d.C, 0.0), Q(d.B * d.C, 0.0);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t t = 0; t < per_b; ++t)
      for (int64_t c = 0; c < d.C; ++c) {
        P[b * d.C + c] += Pp[(b * per_b + t) * d.C + c];
        Q[b * d.C + c] += Qp[(b * per_b + t) * d.C + c];
      }
  auto g = bwd_params(d, k, P, Q, ptr_or_null(w), ptr_or_null(bi));
  at::Tensor gw = weight.has_value() ? g[2].to(weight->scalar_type()) : x_.new_empty({0});
  at::Tensor gbias = bias.has_value() ? g[3].to(bias->scalar_type()) : x_.new_empty({0});
  return {dx.to(x_.scalar_type()), g[0].to(scale_.scalar_type()), g[1].to(shift_.scalar_type()), gw, gbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scm_fast, m) {
  const std::string tail = std::string(", ") + kTail;
  for (const char* suffix : {"", "_cpu"}) {  // each signature written once, for the op and its CPU kernel
    const std::string s = suffix;
    m.def(("adaptive_norm_fwd" + s + "(Tensor x, Tensor scale, Tensor shift" + tail +
          ") -> (Tensor y, Tensor mean, Tensor rstd)").c_str());
    m.def(("adaptive_norm_fwd_jvp" + s + "(Tensor x, Tensor scale, Tensor shift, Tensor tx, Tensor tscale, Tensor tshift" +
          tail + ") -> (Tensor y, Tensor mean, Tensor rstd, Tensor ty)").c_str());
    m.def(("adaptive_norm_bwd" + s + "(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, Tensor? weight, Tensor? bias,"
          " Tensor mean, Tensor rstd, int norm, int num_groups, float eps, bool channels_last) -> (Tensor grad_x,"
          " Tensor grad_scale, Tensor grad_shift, Tensor grad_weight, Tensor grad_bias)").c_str());
  }
}

TORCH_LIBRARY_IMPL(scm_fast, CPU, m) {
  m.impl("adaptive_norm_fwd_cpu", &adaptive_norm_fwd_cpu);
  m.impl("adaptive_norm_fwd_jvp_cpu", &adaptive_norm_fwd_jvp_cpu);
  m.impl("adaptive_norm_bwd_cpu", &adaptive_norm_bwd_cpu);
}

}  // namespace scm_fast
