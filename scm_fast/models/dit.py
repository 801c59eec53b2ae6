"""A DiT-style transformer for sCM (scm-reference.md §5): F_theta(x_in, t, labels, guidance, r).

Patchify -> blocks [adaptive double norm -> attention (QK RMS-norm, scm_fast's fused op) ->
adaptive double norm -> MLP] -> adaptive double norm -> linear -> unpatchify. Every layer computes
its forward-AD tangent without an autograd graph (scm_fast.nn), so the one-pass step keeps only
the primal's activations for backward. The conditioning
embedding is emb = time(t) + class(labels) + guidance(s) + time(r): each a positional (sinusoidal)
embedding with c_noise(t) = t and an MLP, computed in fp32 whatever the autocast state [rCM]. Output
projections start at zero, so every block starts as the identity and F starts at 0.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scm_fast.nn import GELU, AdaptiveDoubleNorm, Conv2d, Linear, RMSNorm, SiLU
from scm_fast.ops import attention


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


def positional(x, dim, max_period=10000.0):
    """Sinusoidal embedding of a (B,) scalar: [cos(x f_i), sin(x f_i)], f_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=dtype) / half)
    args = x.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedding(torch.nn.Module):
    """positional(x) -> Linear -> SiLU -> Linear with autocast off: in the dtype of its weights, which
    trainers keep in fp32 [rCM]."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = torch.nn.Sequential(Linear(freq_dim, dim), SiLU(), Linear(dim, dim))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.mlp(positional(x, self.freq_dim).to(self.mlp[0].weight.dtype))


def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding, (grid * grid, dim)."""
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    parts = [f(c.reshape(-1, 1) * omega) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class Attention(torch.nn.Module):
    """Multi-head self-attention with QK RMS-norm on the fused op (tangents in one pass).
    `impl = "sdpa"` calls F.scaled_dot_product_attention instead (whatever backend is enabled)."""

    impl = "fused"

    def __init__(self, dim, heads, qk_norm=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden ({dim}) must be a multiple of heads ({heads})")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else torch.nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else torch.nn.Identity()
        self.proj = Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        sdpa = F.scaled_dot_product_attention if self.impl == "sdpa" else attention
        o = sdpa(self.q_norm(q), self.k_norm(k), v)  # (B, H, L, D)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class Block(torch.nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qk_norm):
        super().__init__()
        self.norm1 = AdaptiveDoubleNorm(dim, dim, norm="layer")
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = AdaptiveDoubleNorm(dim, dim, norm="layer")
        hidden = int(dim * mlp_ratio)
        self.mlp = torch.nn.Sequential(Linear(dim, hidden), GELU(), Linear(hidden, dim))

    def forward(self, x, emb):
        x = x + self.attn(self.norm1(x, emb))
        return x + self.mlp(self.norm2(x, emb))


class DiT(torch.nn.Module):
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
        self.time = ScalarEmbedding(D)
        self.label = torch.nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes else None
        self.guidance = ScalarEmbedding(D) if cfg.guidance_embed else None
        self.time_r = ScalarEmbedding(D) if cfg.second_time else None
        self.blocks = torch.nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.norm_out = AdaptiveDoubleNorm(D, D, norm="layer")
        self.out = Linear(D, cfg.in_channels * p * p)
        for block in self.blocks:  # each block starts as the identity
            for layer in (block.attn.proj, block.mlp[2]):
                torch.nn.init.zeros_(layer.weight)
                torch.nn.init.zeros_(layer.bias)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def embed(self, t, labels, guidance, r):
        """Conditioning embedding (B, hidden), fp32."""
        emb = self.time(t)
        if self.label is not None:
            if labels is None:
                raise ValueError("this DiT is class-conditional: pass labels (B,) (-1 for the null class)")
            null = self.cfg.num_classes
            emb = emb + self.label(torch.where(labels < 0, torch.full_like(labels, null), labels))
        if self.guidance is not None:
            emb = emb + self.guidance(guidance if guidance is not None else torch.ones_like(t))
        if self.time_r is not None:
            emb = emb + self.time_r(r if r is not None else t)
        return emb

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


def use_pytorch_ops(model, enable=True):
    """Swap every scm_fast op and layer of `model` for PyTorch's own (SDPA, the norm's composition,
    nn.functional's linear / gelu / silu / rms_norm), or back."""
    from scm_fast.models.unet import UNetAttention  # lazy: unet imports dit
    for m in model.modules():
        if isinstance(m, (Attention, UNetAttention)):
            m.impl = "sdpa" if enable else "fused"
        elif isinstance(m, (AdaptiveDoubleNorm, Linear, Conv2d, GELU, SiLU, RMSNorm)):
            m.impl = "torch" if enable else "fused"
    return model


class AdaptiveWeight(torch.nn.Module):
    """The adaptive weighting head logvar(t) [P §4.2, EDM2]: positional(t) -> Linear -> (B,).
    The paper gives no architecture; this is EDM2's (a Fourier/positional embedding and one linear
    layer). It starts constant at init_logvar: the equilibrium logvar = log E[err^2] of the loss
    (objectives.initial_logvar) makes the first steps' weight exp(-logvar) the one it settles at."""

    def __init__(self, freq_dim=128, init_logvar=0.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear = torch.nn.Linear(freq_dim, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.constant_(self.linear.bias, float(init_logvar))

    def forward(self, t):
        with torch.autocast(t.device.type, enabled=False):
            return self.linear(positional(t, self.freq_dim).to(self.linear.weight.dtype)).squeeze(-1)
