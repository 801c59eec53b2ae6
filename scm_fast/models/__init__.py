"""Networks F_theta(x_in, t, ...) for sCM, built on scm_fast's fused ops (scm-reference.md §5).

dit: the DiT; unet: the EDM2-style U-Net; embedding: their conditioning embedding; adaptive_weight:
the loss's weighting head logvar(t) [P §4.2]; pytorch_ops: use_pytorch_ops. build_network (here)
makes the network a TrainConfig describes.
"""
from scm_fast.models.adaptive_weight import AdaptiveWeight
from scm_fast.models.dit import PRESETS, DiT, DiTConfig, dit_config
from scm_fast.models.embedding import ConditionEmbedding, ScalarEmbedding, positional
from scm_fast.models.pytorch_ops import use_pytorch_ops
from scm_fast.models.unet import UNET_PRESETS, UNet, UNetConfig, unet_config

__all__ = ["PRESETS", "UNET_PRESETS", "AdaptiveWeight", "ConditionEmbedding", "DiT", "DiTConfig", "ScalarEmbedding",
           "UNet", "UNetConfig", "build_network", "dit_config", "positional", "unet_config", "use_pytorch_ops"]


def build_network(cfg, shape, num_classes, spec=None):
    """The network F_theta(x_in, t, labels, guidance, r) a TrainConfig describes, for data of
    shape (C, H, W) with num_classes classes (0: unconditional). --arch diffusers: the model of
    `spec` (a DiffusersSpec or its dict, as checkpoints keep it; None: read from cfg.model) with a
    random init."""
    if cfg.arch == "diffusers":
        from scm_fast.models import diffusers_net  # noqa: PLC0415 - imports diffusers
        if spec is None:
            spec = diffusers_net.read_spec(cfg.model, cfg.prediction, cfg.time_scale)
        elif isinstance(spec, dict):
            spec = diffusers_net.spec_from_dict(spec)
        diffusers_net.check_shape(spec, shape, f"--model {cfg.model}")
        return diffusers_net.build(spec, guidance_embed=cfg.objective == "scd", sigma_d=cfg.sigma_d)
    C, H, W = shape
    if H != W:
        raise ValueError(f"images must be square, got {H}x{W} (pass --img-size to resize)")
    kw = dict(img_size=H, in_channels=C, num_classes=num_classes if cfg.class_cond else 0,
              guidance_embed=cfg.objective == "scd", second_time=cfg.objective == "meanflow")
    if cfg.arch == "dit":
        return DiT(dit_config(cfg.model, patch=cfg.patch or (2 if H % 2 == 0 and H >= 8 else 1), **kw))
    return UNet(unet_config(cfg.model, dropout=cfg.dropout, dropout_res=cfg.dropout_res, **kw))
