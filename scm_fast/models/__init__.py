"""Networks F_theta(x_in, t, ...) for sCM, built on scm_fast's fused ops."""
from scm_fast.models.dit import PRESETS, AdaptiveWeight, DiT, DiTConfig, dit_config, use_pytorch_ops
from scm_fast.models.unet import UNET_PRESETS, UNet, UNetConfig, unet_config

__all__ = ["PRESETS", "UNET_PRESETS", "AdaptiveWeight", "DiT", "DiTConfig", "UNet", "UNetConfig", "dit_config",
           "unet_config", "use_pytorch_ops"]
