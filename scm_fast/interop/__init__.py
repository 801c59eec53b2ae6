"""Drop-in routes from other codebases (diffusers, timm, plain PyTorch models) to scm_fast's fused ops.

- `scm_fast.interop.sdpa`: `patch_sdpa()` routes `torch.nn.functional.scaled_dot_product_attention`
  to the fused attention, so torch.func.jvp / forward AD run through models that call SDPA
  (`unpatch_sdpa`, `sdpa_patched`, the `SDPAPatch` handle); the same patch installs
  `scm_fast.interop.group_norm`, a group norm whose forward AD works on GroupNorm UNets.
- `scm_fast.interop.diffusers_norm`: `swap_adaptive_norm(model)` replaces diffusers' adaLN / AdaGN
  modulation with adaptive double normalization on the fused op (`SwapReport`, the `DoubleNorm*`
  replacement modules).

- `scm_fast.interop.schedulers`: `read(folder)` gives a diffusers model's parametrisation from its
  scheduler config (flow matching, epsilon, v prediction, EDM) and `to_trigflow(model, info)` the
  TrigFlow F of the model (tested exactly on an analytic Gaussian model, tests/test_conversions.py).

The first two are independent; this package re-exports them (as scm_fast.patch did before the move).
"""
from scm_fast.interop.diffusers_norm import (DoubleNormContinuous, DoubleNormGroup, DoubleNormZero, SwapReport,
                                             swap_adaptive_norm)
from scm_fast.interop.sdpa import SDPAPatch, patch_sdpa, sdpa_patched, unpatch_sdpa

__all__ = ["DoubleNormContinuous", "DoubleNormGroup", "DoubleNormZero", "SDPAPatch", "SwapReport", "patch_sdpa",
           "sdpa_patched", "swap_adaptive_norm", "unpatch_sdpa"]
