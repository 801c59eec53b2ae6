"""scm_fast: fused kernels and a trainer for continuous-time consistency models (sCM)."""
__version__ = "0.1.0"

from scm_fast import ops  # noqa: E402  (registers the fused ops)

__all__ = ["ops", "__version__"]
