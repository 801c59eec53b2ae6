"""A DiT-style transformer for sCM (scm-reference.md §5): F_theta(x_in, t, labels, guidance, r).

Patchify -> blocks [adaptive double norm -> attention (QK RMS-norm, scm_fast's fused op) ->
adaptive double norm -> MLP] -> adaptive double norm -> linear -> unpatchify. Every layer computes
its forward-AD tangent without an autograd graph (scm_fast.nn), so the one-pass step keeps only
the primal's activations for backward. The conditioning
embedding is emb = time(t) + class(labels) + guidance(s) + time(r): each a positional (sinusoidal)
embedding with c_noise(t) = t and an MLP, computed in fp32 whatever the autocast state [rCM]
(embedding.ConditionEmbedding, shared with the U-Net). Attention is scm_fast.nn.Attention. Output
projections start at zero, so every block starts as the identity and F starts at 0.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scm_fast.models.embedding import ConditionEmbedding, ScalarEmbedding, positional
from scm_fast.nn import GELU, AdaptiveDoubleNorm, Attention, Linear

__all__ = ["PRESETS", "Block", "DiT", "DiTConfig", "ScalarEmbedding", "dit_config", "positional", "sincos_2d"]


@dataclass(frozen=True)
class DiTConfig:
    img_size: int = 32
    in_channels: int = 3
    patch: int = 2
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0          # 0: unconditional; labels == -1 (or num_classes) is the CFG null class
    guidance_embed: bool = False  # sCD student: the teacher's CFG scale s is an input
    second_time: bool = False     # MeanFlow: u(z, r, t) takes r too
    qk_norm: bool = True


# Presets from a CPU toy to ~1.5B parameters (DiT's S/B/L/XL widths; XXL for the ~1.5B class).
PRESETS = {
    "tiny": dict(hidden=64, depth=2, heads=2),
    "digits": dict(hidden=128, depth=4, heads=4),   # the embedded digits run (8x8, patch 1: 64 tokens)
    "S": dict(hidden=384, depth=12, heads=6),
    "B": dict(hidden=768, depth=12, heads=12),
    "L": dict(hidden=1024, depth=24, heads=16),
    "XL": dict(hidden=1152, depth=28, heads=16),
    "XXL": dict(hidden=1536, depth=40, heads=24),
}


def dit_config(preset, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"DiT preset must be one of {tuple(PRESETS)}, got {preset!r}")
    return DiTConfig(**{**PRESETS[preset], **overrides})


def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding, (grid * grid, dim)."""
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    parts = [f(c.reshape(-1, 1) * omega) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class Block(torch.nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qk_norm):
        super().__init__()
        self.norm1 = AdaptiveDoubleNorm(dim, dim, norm="layer")
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.norm2 = AdaptiveDoubleNorm(dim, dim, norm="layer")
        hidden = int(dim * mlp_ratio)
        self.mlp = torch.nn.Sequential(Linear(dim, hidden), GELU(), Linear(hidden, dim))

    def forward(self, x, emb):
        x = x + self.attn(self.norm1(x, emb))
        return x + self.mlp(self.norm2(x, emb))


class DiT(ConditionEmbedding):
    """F_theta(x_in, t, labels=None, guidance=None, r=None) -> same shape as x_in (B, C, H, W)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.img_size % cfg.patch:
            raise ValueError(f"img_size ({cfg.img_size}) must be a multiple of patch ({cfg.patch})")
        self.cfg = cfg
        D, p = cfg.hidden, cfg.patch
        self.grid = cfg.img_size // p
        self.patchify = Linear(cfg.in_channels * p * p, D)
        self.register_buffer("pos", sincos_2d(self.grid, D), persistent=False)
        self.init_embedding(D, cfg.num_classes, cfg.guidance_embed, cfg.second_time)  # time, label, guidance, time_r
        self.blocks = torch.nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.norm_out = AdaptiveDoubleNorm(D, D, norm="layer")
        self.out = Linear(D, cfg.in_channels * p * p)
        for block in self.blocks:  # each block starts as the identity
            for layer in (block.attn.proj, block.mlp[2]):
                torch.nn.init.zeros_(layer.weight)
                torch.nn.init.zeros_(layer.bias)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def repeated_blocks(self):
        return list(self.blocks)

    def forward(self, x_in, t, labels=None, guidance=None, r=None):
        B, C, H, W = x_in.shape
        p, g = self.cfg.patch, self.grid
        if (C, H, W) != (self.cfg.in_channels, self.cfg.img_size, self.cfg.img_size):
            raise ValueError(f"x_in must be (B, {self.cfg.in_channels}, {self.cfg.img_size}, {self.cfg.img_size}), "
                             f"got {tuple(x_in.shape)}")
        emb = self.embed(t, labels, guidance, r)
        dtype = self.patchify.weight.dtype
        tokens = x_in.to(dtype).reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
        x = self.patchify(tokens) + self.pos.to(dtype)
        for block in self.blocks:
            x = block(x, emb)
        x = self.out(self.norm_out(x, emb))
        return x.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
