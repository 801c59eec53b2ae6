"""scm_fast: fused kernels and a trainer for continuous-time consistency models (sCM)."""
__version__ = "0.1.0"

from scm_fast import ops  # noqa: E402  (registers the fused ops)
from scm_fast.interop import patch_sdpa, sdpa_patched, swap_adaptive_norm, unpatch_sdpa  # noqa: E402

__all__ = ["ops", "patch_sdpa", "sdpa_patched", "swap_adaptive_norm", "unpatch_sdpa", "__version__"]
