"""Deprecated alias, kept for one release: scm_fast.patch moved to scm_fast.interop.

The SDPA route (patch_sdpa, unpatch_sdpa, sdpa_patched, SDPAPatch) now lives in
scm_fast.interop.sdpa, the diffusers norm swap (swap_adaptive_norm, SwapReport, DoubleNorm*) in
scm_fast.interop.diffusers_norm; `scm_fast` and `scm_fast.interop` export them. Importing this
module warns (DeprecationWarning) and gives the same objects.
"""
import warnings

from scm_fast.interop import (DoubleNormContinuous, DoubleNormGroup, DoubleNormZero, SDPAPatch,  # noqa: F401
                              SwapReport, patch_sdpa, sdpa_patched, swap_adaptive_norm, unpatch_sdpa)

warnings.warn("scm_fast.patch moved to scm_fast.interop: import from scm_fast.interop (or scm_fast); "
              "this alias will be removed in the next release", DeprecationWarning, stacklevel=2)

__all__ = ["SDPAPatch", "SwapReport", "patch_sdpa", "sdpa_patched", "swap_adaptive_norm", "unpatch_sdpa"]
