// Schemas of the fused attention ops (scm-reference.md §7). Defined once here; the CPU and CUDA
// implementations are registered against them (CPU: scm_fast/ops/_registry.py until the C++ CPU
// kernels land; CUDA: the Triton kernels in kernels/attention_jvp.py).
//
// q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv) with Hq a multiple of Hk; mask is None or
// expanded to (B, Hq, Lq, Lk), bool (true = attend) or additive; lse is (B, Hq, Lq) in fp32.
#include <torch/library.h>

TORCH_LIBRARY(scm_fast, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale)"
      " -> (Tensor out, Tensor lse)");
  m.def(
      "attention_fwd_jvp(Tensor q, Tensor k, Tensor v, Tensor tq, Tensor tk, Tensor tv,"
      " Tensor? mask, bool causal, float scale) -> (Tensor out, Tensor lse, Tensor tout)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
      " Tensor? mask, bool causal, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
