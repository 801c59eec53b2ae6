// Small CPU building blocks for the fused kernels: row-major fp32 GEMM on BLAS and a vectorisable exp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

// Fortran BLAS sgemm as exported by libtorch_cpu (MKL on x86-64, OpenBLAS elsewhere). Weak, so that
// a torch build without it still loads; gemm_rm then falls back to ATen.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace scm_fast {

// at::empty whose pages fault in as 2 MiB huge pages where the kernel allows it (transparent huge
// pages in "madvise" mode, the common default). A fresh 300 MB output otherwise takes ~70k page
// faults, which cost several times what the kernel writing it does (benchmarks/NOTES.md).
inline at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr()), n = t.nbytes();
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + n) & ~(kHuge - 1);
  if (n >= 2 * kHuge && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C, with op(X) = X or X^T (ta / tb), leading
// dimensions as stored. Column-major BLAS sees C^T = op(B)^T op(A)^T, hence the swapped operands.
inline void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                    int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr) {
    const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
    const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
    sgemm_(&opb, &opa, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto A = at::from_blob(const_cast<float*>(a), {ta ? k : m, ta ? m : k}, {lda, 1}, opts);
  auto Bm = at::from_blob(const_cast<float*>(b), {tb ? n : k, tb ? k : n}, {ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  C.mul_(beta).addmm_(ta ? A.t() : A, tb ? Bm.t() : Bm, 1.0, alpha);
}

// exp(x) for x <= 88, with exp(-inf) = 0 exactly; branch-free so that loops over it vectorise.
// exp(x) = 2^n 2^f, n = round(x log2 e), |f| <= 1/2; 2^f by its Taylor series to degree 7
// (relative error < 1e-8, below fp32 rounding).
inline float exp_fast(float x) {
  const float t = x * 1.44269504088896341f;
  const float n = __builtin_floorf(t + 0.5f);
  const float f = (t - n) * 0.693147180559945309f;
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const float nc = n < -126.f ? -126.f : n;
  const int32_t bits = (int32_t(nc) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.f : p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
// exp_fast on 8 lanes (the same steps, so the vector and scalar paths agree).
inline __m256 exp_fast8(__m256 x) {
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945309f));
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) {
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  }
  const __m256i e = _mm256_cvtps_epi32(_mm256_max_ps(n, _mm256_set1_ps(-126.f)));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, scale));
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  return sum;
}
#endif

// max_j x[j] (-inf for n == 0). Explicit AVX2: gcc leaves the std::max reduction scalar.
inline float row_max(const float* x, int64_t n) {
  int64_t j = 0;
  float mx = -__builtin_inff();
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_set1_ps(mx);
  for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float lane : lanes) mx = lane > mx ? lane : mx;
#endif
  for (; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
}

// x[j] = exp(x[j] - sub) for j < n; returns the sum of the results.
inline float exp_sub_sum(float* x, int64_t n, float sub) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  const __m256 s = _mm256_set1_ps(sub);
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_fast8(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum8(acc);
#endif
  for (; j < n; ++j) {
    x[j] = exp_fast(x[j] - sub);
    sum += x[j];
  }
  return sum;
}

// out[j] = p[j] * (t[j] - shift), exactly 0 where p[j] == 0 (masked keys, whatever t holds);
// returns the sum of out.
inline float masked_product_sum(const float* p, const float* t, float* out, int64_t n, float shift) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  const __m256 s = _mm256_set1_ps(shift), zero = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 pj = _mm256_loadu_ps(p + j);
    const __m256 prod = _mm256_mul_ps(pj, _mm256_sub_ps(_mm256_loadu_ps(t + j), s));
    const __m256 o = _mm256_andnot_ps(_mm256_cmp_ps(pj, zero, _CMP_EQ_OQ), prod);
    _mm256_storeu_ps(out + j, o);
    acc = _mm256_add_ps(acc, o);
  }
  sum = hsum8(acc);
#endif
  for (; j < n; ++j) {
    out[j] = p[j] == 0.f ? 0.f : p[j] * (t[j] - shift);
    sum += out[j];
  }
  return sum;
}

}  // namespace scm_fast
