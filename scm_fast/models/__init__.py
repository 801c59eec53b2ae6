"""Networks F_theta(x_in, t, ...) for sCM, built on scm_fast's fused ops."""
from scm_fast.models.dit import PRESETS, AdaptiveWeight, DiT, DiTConfig, dit_config, use_pytorch_ops

__all__ = ["PRESETS", "AdaptiveWeight", "DiT", "DiTConfig", "dit_config", "use_pytorch_ops"]
