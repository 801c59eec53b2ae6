"""A local diffusers VAE (a folder written by `save_pretrained`; never a download) for latent data:
`scm_fast.prepare` encodes images with it, and the trainer and sampler decode latent samples to
images with it (`--vae`). AutoencoderKL (SD, SDXL, SD3, Flux: its posterior's mode) and AutoencoderDC
(Sana, DC-AE) are supported."""
import json
from pathlib import Path

import torch

CLASSES = ("AutoencoderKL", "AutoencoderDC")


def _class_name(path):
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ValueError(f"--vae {path}: not a diffusers model folder (no config.json; write one with "
                         f"save_pretrained, or pass the pipeline's vae/ subfolder)")
    try:
        name = json.loads(cfg.read_text()).get("_class_name")
    except ValueError as err:
        raise ValueError(f"--vae {path}: config.json is not readable JSON ({err})") from None
    if name not in CLASSES:
        raise ValueError(f"--vae {path}: a {name!r}; expected one of {', '.join(CLASSES)}")
    return name


class VAE:
    """encode(images in [-1, 1] (b, 3, H, W)) -> latents (b, C, h, w); decode(latents) -> images in [-1, 1]."""

    def __init__(self, path, device="cpu", dtype=torch.float32):
        path = Path(path)
        if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file():
            path = path / "vae"  # a pipeline folder
        self.path, self.class_name = path, _class_name(path)
        import diffusers  # noqa: PLC0415 - a pinned dependency, imported only for latent data
        cls = getattr(diffusers, self.class_name)
        self.model = cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.in_channels = self.model.config.in_channels
        self.latent_channels = self.model.config.latent_channels

    @torch.no_grad()
    def encode(self, x):
        x = x.to(self.device, self.dtype)
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)  # gray images through an RGB autoencoder
        if x.shape[1] != self.in_channels:
            raise ValueError(f"--vae {self.path}: takes {self.in_channels}-channel images, got {x.shape[1]}")
        out = self.model.encode(x)
        return (out.latent_dist.mode() if self.class_name == "AutoencoderKL" else out.latent).float()

    @torch.no_grad()
    def decode(self, z):
        if z.shape[1] != self.latent_channels:
            raise ValueError(f"--vae {self.path}: decodes {self.latent_channels}-channel latents, got {z.shape[1]}")
        return self.model.decode(z.to(self.device, self.dtype)).sample.float().clamp(-1, 1)
