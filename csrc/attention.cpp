// Fused attention with tangents: op schemas and the C++ CPU kernels (scm-reference.md §7).
//
// q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv) with Hq a multiple of Hk; mask is None or
// expanded to (B, Hq, Lq, Lk), bool (true = attend) or additive; lse is (B, Hq, Lq) in fp32; blocks is
// None or a bool block mask expanded to (B, Hq, ceil(Lq / block_q), ceil(Lk / block_k))
// (scm_fast/ops/attention_blocks.py): tiles that meet no live block are skipped, keys in dead blocks of
// a live tile are -inf.
//
// The public ops (attention_fwd, attention_fwd_jvp, attention_bwd) get their CPU and CUDA kernels
// from Python (scm_fast/ops/_registry.py chooses a backend; CUDA runs kernels/attention.py). The
// C++ CPU kernels below are registered as attention_*_cpu ops with the same signatures.
//
// Forward (+ JVP): one task per (batch, head, block of kBlockM queries), keys in tiles of kBlockN,
// online softmax in fp32:  S = tau Q K^T + b,  P~ = exp(S - m),  acc = sum P~ V,
//   dS = tau (tQ K^T + Q tK^T),  t_acc = sum P~ tV + (P~ * (dS - c)) V,  r = sum rowsum(P~ * (dS - c)),
//   o = acc / l,  to = (t_acc - r o) / l,  lse = m + log l.  Six GEMMs per tile on BLAS.
// The shift c (per row: dS at the key of the running max) leaves `to` unchanged (its terms cancel in
// t_acc - r o) but keeps t_acc and r small when P is peaked: without it a large tau (|dS| ~ 1e4 and up)
// loses `to` to the cancellation of t_acc and r o. When the max moves, t_acc -= (c' - c) acc and
// r -= (c' - c) l re-base the sums.
// tau is applied inside the GEMMs (alpha), so S and dS are stored rounded: the row max, the exponent and
// the backward's exp(S - lse) all read the same values (a multiply fused into the subtraction would not,
// and at tau ~ 1e9 the difference is many units: exp overflows or underflows).
// Backward (FlashAttention-2): one task per (batch, query head), P = exp(S - lse),
//   dV += P^T dO,  dS = tau P (dO V^T - delta),  dQ += dS K,  dK += dS^T Q.
// Memory: O(L x tile) per thread besides inputs and outputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu_math.h"

namespace scm_fast {
namespace {

constexpr int64_t kBlockM = 128;
constexpr int64_t kBlockN = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#define SCM_MASKS "Tensor? mask, Tensor? blocks, int block_q, int block_k, bool causal, int causal_shift, float scale"
const char* kFwdArgs = "(Tensor q, Tensor k, Tensor v, " SCM_MASKS ") -> (Tensor out, Tensor lse)";
const char* kFwdJvpArgs = "(Tensor q, Tensor k, Tensor v, Tensor tq, Tensor tk, Tensor tv, " SCM_MASKS
                          ") -> (Tensor out, Tensor lse, Tensor tout)";
const char* kBwdArgs = "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, " SCM_MASKS
                       ") -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)";
#undef SCM_MASKS

struct Dims {
  int64_t B, H, Hk, Lq, Lk, D, Dv;
};

// Causal window: key j visible to query i iff j <= i + shift (SDPA's top-left: shift 0; bottom-right:
// Lk - Lq). Not causal: every key.
struct Causal {
  bool on;
  int64_t shift;
  // keys [0, end) can be visible to the query rows [i0, i0 + bm)
  int64_t end(int64_t i0, int64_t bm, int64_t Lk) const {
    return on ? std::clamp<int64_t>(i0 + bm + shift, 0, Lk) : Lk;
  }
  // visible keys of row i in the tile starting at key j0 of width bn (may be <= 0)
  int64_t visible(int64_t i, int64_t j0, int64_t bn) const { return on ? i + shift - j0 + 1 : bn; }
};

// Additive bias b for one (batch, head, query row), read through the expanded mask's strides.
struct MaskView {
  const float* add = nullptr;
  const bool* keep = nullptr;
  int64_t sb = 0, sh = 0, sm = 0, sn = 0;

  bool empty() const { return add == nullptr && keep == nullptr; }
  // row[j] += b(b_, h, i, j0 + j) for j < n; exactly -inf where the mask excludes the key, whatever
  // row[j] is (a NaN q must not turn a row without keys into NaN).
  void add_row(float* row, int64_t n, int64_t b_, int64_t h, int64_t i, int64_t j0) const {
    const int64_t base = b_ * sb + h * sh + i * sm + j0 * sn;
    if (keep != nullptr) {
      for (int64_t j = 0; j < n; ++j) row[j] = keep[base + j * sn] ? row[j] : kNegInf;
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const float a = add[base + j * sn];
        row[j] = a == kNegInf ? kNegInf : row[j] + a;
      }
    }
  }
};

// Block mask: key j visible to query i only if blocks[b, h, i / bq, j / bk] (strides kept: no expansion).
struct BlockView {
  const bool* keep = nullptr;
  int64_t sb = 0, sh = 0, sm = 0, sn = 0, bq = 1, bk = 1;

  bool empty() const { return keep == nullptr; }
  bool at(int64_t b, int64_t h, int64_t r, int64_t c) const { return keep[b * sb + h * sh + r * sm + c * sn]; }
  // The tile of queries [i0, i0 + bm) x keys [j0, j0 + bn): 0 if it meets no live block (skipped), 2 if
  // every block it meets is live (no key check), 1 otherwise.
  int state(int64_t b, int64_t h, int64_t i0, int64_t bm, int64_t j0, int64_t bn) const {
    if (empty()) return 2;
    int64_t live = 0, total = 0;
    for (int64_t r = i0 / bq; r <= (i0 + bm - 1) / bq; ++r) {
      for (int64_t c = j0 / bk; c <= (j0 + bn - 1) / bk; ++c, ++total) live += at(b, h, r, c);
    }
    return live == 0 ? 0 : live == total ? 2 : 1;
  }
  // row[j] = -inf for the keys j0 + j (j < n) in query i's dead blocks.
  void mask_row(float* row, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0) const {
    for (int64_t j = 0; j < n;) {
      const int64_t c = (j0 + j) / bk, stop = std::min(n, (c + 1) * bk - j0);
      if (at(b, h, i / bq, c)) {
        j = stop;
      } else {
        for (; j < stop; ++j) row[j] = kNegInf;
      }
    }
  }
};

// Tile sizes: with a block mask of blocks from 32 to the default tile, tiles are its blocks (a dead block
// is a skipped tile); otherwise kBlockM x kBlockN.
struct Tiles {
  int64_t m = kBlockM, n = kBlockN;
};

Tiles tiles_for(const BlockView& bv) {
  Tiles t;
  if (bv.empty()) return t;
  if (bv.bq >= 32 && bv.bq <= kBlockM) t.m = bv.bq;
  if (bv.bk >= 32 && bv.bk <= kBlockN) t.n = bv.bk;
  return t;
}

BlockView block_view(const c10::optional<at::Tensor>& blocks, int64_t bq, int64_t bk, const Dims& d) {
  BlockView bv;
  if (!blocks.has_value()) return bv;
  TORCH_CHECK(bq > 0 && bk > 0, "attention: block_q and block_k must be positive, got ", bq, ", ", bk);
  TORCH_CHECK(blocks->scalar_type() == at::kBool, "attention: blocks must be bool, got ", blocks->scalar_type());
  TORCH_CHECK(blocks->sizes() == at::IntArrayRef({d.B, d.H, (d.Lq + bq - 1) / bq, (d.Lk + bk - 1) / bk}),
              "attention: blocks must be expanded to (B, Hq, ceil(Lq / block_q), ceil(Lk / block_k)) = (", d.B, ", ",
              d.H, ", ", (d.Lq + bq - 1) / bq, ", ", (d.Lk + bk - 1) / bk, "), got ", blocks->sizes());
  bv.keep = blocks->data_ptr<bool>();
  bv.sb = blocks->stride(0), bv.sh = blocks->stride(1), bv.sm = blocks->stride(2), bv.sn = blocks->stride(3);
  bv.bq = bq, bv.bk = bk;
  return bv;
}

at::Tensor f32(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be 4-D (B, H, L, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "attention_*_cpu: q, k, v must be CPU tensors");
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == d.B && v.size(0) == d.B, "attention: batch sizes differ: q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(3) == d.D, "attention: q and k head dims differ: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(v.size(1) == d.Hk && v.size(2) == d.Lk, "attention: k and v must have the same heads and length, got k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(d.Hk > 0 && d.H % d.Hk == 0, "attention: q heads (", d.H, ") must be a multiple of k/v heads (", d.Hk, ")");
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({d.B, d.H, d.Lq, d.Lk}),
                "attention: mask must be expanded to (B, Hq, Lq, Lk) = (", d.B, ", ", d.H, ", ", d.Lq, ", ", d.Lk,
                "), got ", mask->sizes());
  }
  return d;
}

// Keeps the mask alive in a layout the kernels read (bool or fp32, strides kept: no expansion).
MaskView mask_view(const c10::optional<at::Tensor>& mask, at::Tensor& holder) {
  MaskView mv;
  if (!mask.has_value()) return mv;
  holder = mask->scalar_type() == at::kBool ? *mask : mask->to(at::kFloat);
  mv.sb = holder.stride(0), mv.sh = holder.stride(1), mv.sm = holder.stride(2), mv.sn = holder.stride(3);
  if (holder.scalar_type() == at::kBool) {
    mv.keep = holder.data_ptr<bool>();
  } else {
    mv.add = holder.data_ptr<float>();
  }
  return mv;
}

// One tile row of scaled scores tau s (from the GEMM) becomes tau s + bias, -inf outside the causal window
// (its first `visible` entries are inside) and, in a partly live tile (block state 1), in dead blocks.
void mask_scores(float* row, int64_t n, int64_t visible, const MaskView& mv, const BlockView& bv, int state,
                 int64_t b, int64_t h, int64_t i, int64_t j0) {
  if (!mv.empty()) mv.add_row(row, std::min(n, visible), b, h, i, j0);
  if (state == 1) bv.mask_row(row, std::min(n, visible), b, h, i, j0);
  for (int64_t j = std::max<int64_t>(visible, 0); j < n; ++j) row[j] = kNegInf;
}

// The first j with row[j] == value (n - 1 if none: a NaN max).
int64_t index_of(const float* row, int64_t n, float value) {
  int64_t j = 0;
  while (j + 1 < n && row[j] != value) ++j;
  return j;
}

struct FwdBuffers {
  std::vector<float> s, ts, acc, tacc, m, l, r, c;
  FwdBuffers(int64_t Dv, bool tangent)
      : s(kBlockM * kBlockN), ts(tangent ? kBlockM * kBlockN : 0), acc(kBlockM * Dv), tacc(tangent ? kBlockM * Dv : 0),
        m(kBlockM), l(kBlockM), r(kBlockM), c(kBlockM) {}
};

// Row i's tangent sums after its P~ row: rescaled by alpha, re-based on the new shift, plus the tile.
void tangent_row(FwdBuffers& buf, int64_t i, int64_t Dv, const float* p, float* dsrow, int64_t n, int64_t arg,
                 float alpha, float l_old) {
  const float c_new = arg >= 0 ? dsrow[arg] : buf.c[i], dc = c_new - buf.c[i];
  buf.c[i] = c_new;
  const float rs = masked_product_sum(p, dsrow, dsrow, n, c_new);  // P~ * (dS - c), in place
  buf.r[i] = buf.r[i] * alpha - dc * l_old + rs;
  float *tacc = buf.tacc.data() + i * Dv;
  const float* acc = buf.acc.data() + i * Dv;  // already rescaled by alpha
  for (int64_t c = 0; c < Dv; ++c) tacc[c] = tacc[c] * alpha - dc * acc[c];
}

struct FwdTensors {
  const float *q, *k, *v, *tq, *tk, *tv;  // tq == nullptr: no tangent
  float *o, *lse, *to;
};

// One (batch, head, query block): online softmax over key tiles, forward and (optionally) JVP.
void fwd_block(const FwdTensors& t, const Dims& d, const MaskView& mv, const BlockView& bv, Tiles tiles,
               Causal causal, float tau, int64_t b, int64_t h, int64_t i0, FwdBuffers& buf) {
  const bool tangent = t.tq != nullptr;
  const int64_t bm = std::min(tiles.m, d.Lq - i0), hk = h / (d.H / d.Hk);
  const int64_t q_off = ((b * d.H + h) * d.Lq + i0) * d.D, o_off = ((b * d.H + h) * d.Lq + i0) * d.Dv;
  const int64_t k_off = (b * d.Hk + hk) * d.Lk * d.D, v_off = (b * d.Hk + hk) * d.Lk * d.Dv;
  float *S = buf.s.data(), *TS = buf.ts.data(), *acc = buf.acc.data(), *tacc = buf.tacc.data();
  std::fill(buf.m.begin(), buf.m.end(), kNegInf);
  std::fill(buf.l.begin(), buf.l.end(), 0.f);
  std::fill(buf.r.begin(), buf.r.end(), 0.f);
  std::fill(buf.c.begin(), buf.c.end(), 0.f);
  std::fill(buf.acc.begin(), buf.acc.end(), 0.f);
  std::fill(buf.tacc.begin(), buf.tacc.end(), 0.f);
  const int64_t hi = causal.end(i0, bm, d.Lk);
  for (int64_t j0 = 0; j0 < hi; j0 += tiles.n) {
    const int64_t bn = std::min(tiles.n, hi - j0);
    const int state = bv.state(b, h, i0, bm, j0, bn);
    if (state == 0) continue;  // no live block: nothing visible in this tile
    const float *K = t.k + k_off + j0 * d.D, *V = t.v + v_off + j0 * d.Dv;
    gemm_rm(false, true, bm, bn, d.D, tau, t.q + q_off, d.D, K, d.D, 0.f, S, kBlockN);  // tau Q K^T
    if (tangent) {  // dS = tau tQ K^T + tau Q tK^T
      gemm_rm(false, true, bm, bn, d.D, tau, t.tq + q_off, d.D, K, d.D, 0.f, TS, kBlockN);
      gemm_rm(false, true, bm, bn, d.D, tau, t.q + q_off, d.D, t.tk + k_off + j0 * d.D, d.D, 1.f, TS, kBlockN);
    }
    for (int64_t i = 0; i < bm; ++i) {
      float* row = S + i * kBlockN;
      mask_scores(row, bn, causal.visible(i0 + i, j0, bn), mv, bv, state, b, h, i0 + i, j0);
      const float tile_max = row_max(row, bn), m_old = buf.m[i], m_new = std::max(m_old, tile_max);
      const float m_safe = m_new == kNegInf ? 0.f : m_new;  // nothing visible yet: keep P~ = 0
      const float alpha = exp_fast(m_old - m_safe), l_old = buf.l[i] * alpha;
      const int64_t arg = tangent && tile_max > m_old ? index_of(row, bn, tile_max) : -1;  // the max moved here
      buf.l[i] = l_old + exp_sub_sum(row, bn, m_safe);
      buf.m[i] = m_new;
      for (int64_t c = 0; c < d.Dv; ++c) acc[i * d.Dv + c] *= alpha;
      if (tangent) tangent_row(buf, i, d.Dv, row, TS + i * kBlockN, bn, arg, alpha, l_old);
    }
    gemm_rm(false, false, bm, d.Dv, bn, 1.f, S, kBlockN, V, d.Dv, 1.f, acc, d.Dv);
    if (tangent) {
      gemm_rm(false, false, bm, d.Dv, bn, 1.f, S, kBlockN, t.tv + v_off + j0 * d.Dv, d.Dv, 1.f, tacc, d.Dv);
      gemm_rm(false, false, bm, d.Dv, bn, 1.f, TS, kBlockN, V, d.Dv, 1.f, tacc, d.Dv);
    }
  }
  for (int64_t i = 0; i < bm; ++i) {  // epilogue; rows without a valid key: o = to = 0, lse = -inf
    const float l = buf.l[i], inv = l > 0.f ? 1.f / l : 0.f;
    float* o = t.o + o_off + i * d.Dv;
    for (int64_t c = 0; c < d.Dv; ++c) o[c] = acc[i * d.Dv + c] * inv;
    t.lse[(b * d.H + h) * d.Lq + i0 + i] = l > 0.f ? buf.m[i] + std::log(l) : kNegInf;
    if (!tangent) continue;
    float* to = t.to + o_off + i * d.Dv;
    for (int64_t c = 0; c < d.Dv; ++c) to[c] = (tacc[i * d.Dv + c] - buf.r[i] * o[c]) * inv;
  }
}

std::vector<at::Tensor> fwd_impl(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor* tq_,
                                 const at::Tensor* tk_, const at::Tensor* tv_, const c10::optional<at::Tensor>& mask,
                                 const c10::optional<at::Tensor>& blocks, int64_t bq, int64_t bk, Causal causal,
                                 double scale) {
  const Dims d = check_inputs(q_, k_, v_, mask);
  const BlockView bv = block_view(blocks, bq, bk, d);
  const Tiles tiles = tiles_for(bv);
  const bool tangent = tq_ != nullptr;
  at::Tensor q = f32(q_), k = f32(k_), v = f32(v_), tq, tk, tv, mask_holder;
  if (tangent) tq = f32(*tq_), tk = f32(*tk_), tv = f32(*tv_);
  const MaskView mv = mask_view(mask, mask_holder);
  auto opts = q.options();
  at::Tensor o = empty_huge({d.B, d.H, d.Lq, d.Dv}, opts), lse = at::empty({d.B, d.H, d.Lq}, opts);
  at::Tensor to = tangent ? empty_huge(o.sizes(), opts) : at::Tensor();
  const FwdTensors t{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                     tangent ? tq.data_ptr<float>() : nullptr, tangent ? tk.data_ptr<float>() : nullptr,
                     tangent ? tv.data_ptr<float>() : nullptr, o.data_ptr<float>(), lse.data_ptr<float>(),
                     tangent ? to.data_ptr<float>() : nullptr};
  const int64_t n_mblocks = (d.Lq + tiles.m - 1) / tiles.m;
  at::parallel_for(0, d.B * d.H * n_mblocks, 1, [&](int64_t begin, int64_t end) {
    FwdBuffers buf(d.Dv, tangent);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_mblocks;
      fwd_block(t, d, mv, bv, tiles, causal, float(scale), bh / d.H, bh % d.H, (task % n_mblocks) * tiles.m, buf);
    }
  });
  const auto dtype = q_.scalar_type();
  if (!tangent) return {o.to(dtype), lse};
  return {o.to(dtype), lse, to.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const c10::optional<at::Tensor>& mask,
                                                     const c10::optional<at::Tensor>& blocks, int64_t bq, int64_t bk,
                                                     bool causal, int64_t shift, double scale) {
  auto r = fwd_impl(q, k, v, nullptr, nullptr, nullptr, mask, blocks, bq, bk, Causal{causal, shift}, scale);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_jvp_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tq, const at::Tensor& tk,
    const at::Tensor& tv, const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& blocks, int64_t bq,
    int64_t bk, bool causal, int64_t shift, double scale) {
  TORCH_CHECK(tq.sizes() == q.sizes() && tk.sizes() == k.sizes() && tv.sizes() == v.sizes(),
              "attention_fwd_jvp: tangents must match q, k, v in shape, got ", tq.sizes(), ", ", tk.sizes(), ", ",
              tv.sizes());
  auto r = fwd_impl(q, k, v, &tq, &tk, &tv, mask, blocks, bq, bk, Causal{causal, shift}, scale);
  return {r[0], r[1], r[2]};
}

// One (batch, query head): dQ for its rows and its share of dK, dV (summed over the group later).
void bwd_head(const float* q, const float* k, const float* v, const float* dO, const float* lse, const float* delta,
              float* dq, float* dk, float* dv, const Dims& d, const MaskView& mv, const BlockView& bv, Tiles tiles,
              Causal causal, float tau, int64_t b, int64_t h, std::vector<float>& P, std::vector<float>& dS) {
  for (int64_t i0 = 0; i0 < d.Lq; i0 += tiles.m) {
    const int64_t bm = std::min(tiles.m, d.Lq - i0);
    const float *Q = q + i0 * d.D, *DO = dO + i0 * d.Dv;
    const int64_t hi = causal.end(i0, bm, d.Lk);
    for (int64_t j0 = 0; j0 < hi; j0 += tiles.n) {
      const int64_t bn = std::min(tiles.n, hi - j0);
      const int state = bv.state(b, h, i0, bm, j0, bn);
      if (state == 0) continue;  // no live block: p = 0 here
      gemm_rm(false, true, bm, bn, d.D, tau, Q, d.D, k + j0 * d.D, d.D, 0.f, P.data(), kBlockN);  // as forward
      gemm_rm(false, true, bm, bn, d.Dv, 1.f, DO, d.Dv, v + j0 * d.Dv, d.Dv, 0.f, dS.data(), kBlockN);
      for (int64_t i = 0; i < bm; ++i) {
        float *row = P.data() + i * kBlockN, *drow = dS.data() + i * kBlockN;
        mask_scores(row, bn, causal.visible(i0 + i, j0, bn), mv, bv, state, b, h, i0 + i, j0);
        const float l = lse[i0 + i] == kNegInf ? -kNegInf : lse[i0 + i], dl = delta[i0 + i];
        exp_sub_sum(row, bn, l);  // P = exp(S - lse)
#pragma omp simd
        for (int64_t j = 0; j < bn; ++j) drow[j] = tau * row[j] * (drow[j] - dl);
      }
      gemm_rm(true, false, bn, d.Dv, bm, 1.f, P.data(), kBlockN, DO, d.Dv, 1.f, dv + j0 * d.Dv, d.Dv);
      gemm_rm(false, false, bm, d.D, bn, 1.f, dS.data(), kBlockN, k + j0 * d.D, d.D, 1.f, dq + i0 * d.D, d.D);
      gemm_rm(true, false, bn, d.D, bm, 1.f, dS.data(), kBlockN, Q, d.D, 1.f, dk + j0 * d.D, d.D);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out, const at::Tensor& lse_, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& blocks, int64_t bq, int64_t bk, bool causal, int64_t shift, double scale) {
  const Dims d = check_inputs(q_, k_, v_, mask);
  const BlockView bv = block_view(blocks, bq, bk, d);
  const Tiles tiles = tiles_for(bv);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({d.B, d.H, d.Lq, d.Dv}),
              "attention_bwd: grad_out and out must be (B, Hq, Lq, Dv), got ", grad_out.sizes(), ", ", out.sizes());
  TORCH_CHECK(lse_.sizes() == at::IntArrayRef({d.B, d.H, d.Lq}), "attention_bwd: lse must be (B, Hq, Lq), got ",
              lse_.sizes());
  at::Tensor q = f32(q_), k = f32(k_), v = f32(v_), dO = f32(grad_out), lse = f32(lse_), mask_holder;
  const at::Tensor delta = (dO * out.to(at::kFloat)).sum(-1).contiguous();  // rowsum(dO * O)
  const MaskView mv = mask_view(mask, mask_holder);
  const int64_t G = d.H / d.Hk;
  auto opts = q.options();
  at::Tensor dq = at::zeros({d.B, d.H, d.Lq, d.D}, opts);
  at::Tensor dk = at::zeros({d.B, d.H, d.Lk, d.D}, opts), dv = at::zeros({d.B, d.H, d.Lk, d.Dv}, opts);
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(kBlockM * kBlockN), dS(kBlockM * kBlockN);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H, bhk = b * d.Hk + h / G;
      bwd_head(q.data_ptr<float>() + bh * d.Lq * d.D, k.data_ptr<float>() + bhk * d.Lk * d.D,
               v.data_ptr<float>() + bhk * d.Lk * d.Dv, dO.data_ptr<float>() + bh * d.Lq * d.Dv,
               lse.data_ptr<float>() + bh * d.Lq, delta.data_ptr<float>() + bh * d.Lq,
               dq.data_ptr<float>() + bh * d.Lq * d.D, dk.data_ptr<float>() + bh * d.Lk * d.D,
               dv.data_ptr<float>() + bh * d.Lk * d.Dv, d, mv, bv, tiles, Causal{causal, shift}, float(scale), b, h,
               P, dS);
    }
  });
  if (G > 1) {  // GQA: a key head's gradient sums over the query heads that share it
    dk = dk.view({d.B, d.Hk, G, d.Lk, d.D}).sum(2);
    dv = dv.view({d.B, d.Hk, G, d.Lk, d.Dv}).sum(2);
  }
  return {dq.to(q_.scalar_type()), dk.to(k_.scalar_type()), dv.to(v_.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(scm_fast, m) {
  for (const char* suffix : {"", "_cpu"}) {  // each signature written once, for the op and its CPU kernel
    m.def((std::string("attention_fwd") + suffix + kFwdArgs).c_str());
    m.def((std::string("attention_fwd_jvp") + suffix + kFwdJvpArgs).c_str());
    m.def((std::string("attention_bwd") + suffix + kBwdArgs).c_str());
  }
}

TORCH_LIBRARY_IMPL(scm_fast, CPU, m) {
  m.impl("attention_fwd_cpu", &attention_fwd_cpu);
  m.impl("attention_fwd_jvp_cpu", &attention_fwd_jvp_cpu);
  m.impl("attention_bwd_cpu", &attention_bwd_cpu);
}

}  // namespace scm_fast
