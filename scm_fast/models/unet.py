"""An EDM2-style U-Net for sCM (scm-reference.md §5): F_theta(x_in, t, labels, guidance, r).

Layout (EDM2's, Karras et al. 2024, `UNet` in networks_edm2.py): widths model_channels * channel_mult
per resolution level, an input conv, then per level a downsampling block (levels > 0) and num_blocks
residual blocks; the decoder starts with two blocks at the lowest resolution (the first with
attention), then per level an upsampling block (levels < last) and num_blocks + 1 residual blocks,
each taking one encoder activation concatenated on the channels (every encoder output is a skip).
Residual blocks at attn_resolutions end with a self-attention block.

    residual block   x <- resample(x);  h = conv3x3(SiLU(ADN(x, emb)));  h = conv3x3_0(dropout(SiLU(ADN(h, emb))))
                     x <- skip(x) + h              (skip: 1x1 conv when the channels change, else identity)
    attention block  q, k, v = conv1x1(ADN(x, emb));  x <- x + conv1x1_0(attention(rms(q), rms(k), v))
    output           conv3x3_0(SiLU(ADN(x, emb)))

ADN is the adaptive double norm with GroupNorm inside (sCM's replacement for AdaGN [P §4.1]):
GroupNorm(x) * pnorm(scale) + pnorm(shift), (scale, shift) = Linear(emb); groups = the largest divisor
of C up to 32. Attention uses heads of head_dim channels, RMS-normalised q and k [SANA-Sprint] and
scm_fast's fused attention (tangent in the same pass); `impl = "sdpa"` swaps in PyTorch's SDPA.
`_0` layers start at zero (weights and biases), so every block starts as its skip path and F at 0.
The conditioning embedding is emb = SiLU(time(t) + class(labels) + guidance(s) + time(r)): each a
positional embedding with c_noise(t) = t and an MLP (embedding.ConditionEmbedding, shared with the
DiT), fp32 with autocast off [rCM]. Every layer's forward-AD tangent carries no autograd graph
(scm_fast.nn), so the one-pass sCM step keeps only the primal's activations for backward;
resampling, concatenation, sums and dropout are linear and their tangents involve no parameter,
hence no graph either.

Where this deviates from EDM2 (the sCM paper says it changes EDM2's time embedding and normalization
but gives no layer-level specification; these are the choices):
- EDM2 is magnitude-preserving: weight-normalised convs without biases, no normalization layers
  (pixel norm of activations in encoder blocks), mp_silu, mp_sum/mp_cat with balances, a learned
  gain on the output and on the embedding modulation (c = 1 + gain * Linear(emb)), activation clip
  at 256. Here: standard layers with biases, pre-activation residual blocks with two adaptive double
  norms each (GroupNorm inside, no "+1" on the scale), plain sums and concatenation, zero-init
  output layers, no clipping; attention blocks have their own adaptive double norm.
- EDM2's noise embedding is MPFourier(c_noise = ln(sigma) / 4) + one linear layer; here positional
  embeddings of c_noise(t) = t (256 frequencies) + a 2-layer MLP [P §4.1]. EDM2 feeds labels as a
  one-hot through a linear layer; here an nn.Embedding with one extra row for the CFG null class
  (labels == -1 or num_classes). EDM2 appends a constant-one input channel; with biases it is
  not needed, so the input conv takes in_channels.
- Resampling is EDM2's [1, 1] filter: 2x2 average pooling down, nearest-neighbour up.
- Attention: EDM2 pixel-normalises q, k, v over each head's channels; here RMSNorm (with a weight)
  on q and k only.
Parameter counts (in_channels=3, img_size=64, num_classes=1000, guidance_embed=False; closed form in
tests/models/test_unet.py) vs the paper's EDM2 models [P §5]:
    S   model_channels 192:  346.0 M  (paper 280 M, x1.24)
    M   model_channels 256:  614.7 M  (paper 498 M, x1.23)
    L   model_channels 320:  959.9 M  (paper 778 M, x1.23)
    XL  model_channels 384: 1381.8 M  (paper 1119 M, x1.23)
    XXL model_channels 448: 1880.3 M  (paper 1523 M, x1.23)
    tiny (img_size 16, unconditional, CPU toy): 0.88 M
The layout is EDM2's: the same walk with EDM2's layers gives 280.2 / 497.8 / 777.5 / 1119.3 / 1523.2 M.
The excess is mostly the adaptive double norms: two Linear(emb, 2C) per residual block (and one per
attention block) where EDM2 has one Linear(emb, C); then the biases and the 2-layer embedding MLPs.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scm_fast.models.embedding import ConditionEmbedding
from scm_fast.nn import AdaptiveDoubleNorm, Conv2d, RMSNorm, SiLU
from scm_fast.ops import attention

__all__ = ["UNET_PRESETS", "ResBlock", "UNet", "UNetAttention", "UNetConfig", "unet_config"]


@dataclass(frozen=True)
class UNetConfig:
    img_size: int = 64
    in_channels: int = 3
    model_channels: int = 192
    channel_mult: tuple = (1, 2, 3, 4)
    num_blocks: int = 3               # residual blocks per level in the encoder (num_blocks + 1 in the decoder)
    attn_resolutions: tuple = (16, 8)
    head_dim: int = 64                # channels per attention head (EDM2: 64)
    num_classes: int = 0              # 0: unconditional; labels == -1 (or num_classes) is the CFG null class
    guidance_embed: bool = False      # sCD student: the teacher's CFG scale s is an input
    second_time: bool = False         # MeanFlow: u(z, r, t) takes r too
    dropout: float = 0.0
    dropout_res: int = 0              # dropout only in blocks at resolutions <= dropout_res (0: every block)
    emb_channels: int = None          # default model_channels * max(channel_mult) (EDM2)

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if self.emb_channels is None:
            object.__setattr__(self, "emb_channels", self.model_channels * max(self.channel_mult))
        levels = len(self.channel_mult)
        if levels < 1 or min(self.channel_mult) < 1 or self.model_channels < 1:
            raise ValueError(f"channel_mult must be non-empty positive ints and model_channels positive, got "
                             f"channel_mult={self.channel_mult}, model_channels={self.model_channels}")
        if self.img_size < 1 or self.img_size % 2 ** (levels - 1):
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of 2^(levels - 1) = {2 ** (levels - 1)} "
                             f"for channel_mult={self.channel_mult}")
        resolutions = self.resolutions
        for res in self.attn_resolutions:
            if res not in resolutions:
                raise ValueError(f"attn_resolutions {self.attn_resolutions}: {res} is not one of the level "
                                 f"resolutions {resolutions} (img_size {self.img_size})")
        for res, ch in zip(resolutions, self.widths):
            if (res in self.attn_resolutions or res == resolutions[-1]) and ch % self.head_dim:
                raise ValueError(f"attention at {res}x{res} has {ch} channels, not a multiple of head_dim "
                                 f"({self.head_dim})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def resolutions(self):
        return tuple(self.img_size >> level for level in range(len(self.channel_mult)))

    @property
    def widths(self):
        return tuple(self.model_channels * m for m in self.channel_mult)


_EDM2 = dict(channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), head_dim=64)
UNET_PRESETS = {
    "tiny": dict(img_size=16, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                 head_dim=16),
    "S": dict(model_channels=192, **_EDM2),
    "M": dict(model_channels=256, **_EDM2),
    "L": dict(model_channels=320, **_EDM2),
    "XL": dict(model_channels=384, **_EDM2),
    "XXL": dict(model_channels=448, **_EDM2),
}


def unet_config(preset, **overrides):
    if preset not in UNET_PRESETS:
        raise ValueError(f"UNet preset must be one of {tuple(UNET_PRESETS)}, got {preset!r}")
    return UNetConfig(**{**UNET_PRESETS[preset], **overrides})


def _zero(layer):
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    return layer


def resample(x, mode):
    """EDM2's [1, 1] filter: 2x2 average pooling ("down"), nearest-neighbour x2 ("up"), or x ("keep")."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class UNetAttention(torch.nn.Module):
    """x + proj(attention(rms(q), rms(k), v)) over the H*W pixels, q, k, v = qkv(ADN(x, emb)).
    `impl = "sdpa"` calls F.scaled_dot_product_attention instead (whatever backend is enabled).

    Not scm_fast.nn.Attention (the DiT's, on (B, L, C) tokens) with a norm around it: the projections
    are 1x1 Conv2d on (B, C, H, W), so qkv.weight / proj.weight are (out, in, 1, 1) where Linear's are
    (out, in) (checkpoints would not load) and the convolution rounds differently from a Linear on
    the transposed tokens (outputs would change); it also holds its adaptive norm and the residual.
    The q, k, v channel layout is nn.Attention's: [q | k | v], each (heads, head_dim).
    """

    impl = "fused"
    pytorch_impl = "sdpa"  # what scm_fast.models.use_pytorch_ops sets

    def __init__(self, channels, emb_channels, head_dim):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
        self.heads, self.head_dim = channels // head_dim, head_dim
        self.norm = AdaptiveDoubleNorm(channels, emb_channels, norm="group")
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = _zero(Conv2d(channels, channels, 1))

    def forward(self, x, emb):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x, emb)).reshape(B, 3, self.heads, self.head_dim, H * W)
        q, k, v = qkv.permute(1, 0, 2, 4, 3)  # (B, heads, H*W, head_dim) each
        sdpa = F.scaled_dot_product_attention if self.impl == "sdpa" else attention
        o = sdpa(self.q_norm(q), self.k_norm(k), v)  # (B, heads, H*W, head_dim)
        return x + self.proj(o.transpose(2, 3).reshape(B, C, H, W))


class ResBlock(torch.nn.Module):
    """Pre-activation residual block with adaptive double norms, optional resampling of its input
    ("down" / "up", EDM2's resampling blocks) and an optional attention block after it."""

    def __init__(self, in_channels, out_channels, emb_channels, resample="keep", attention=False, head_dim=64,
                 dropout=0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.resample = in_channels, out_channels, resample
        self.norm0 = AdaptiveDoubleNorm(in_channels, emb_channels, norm="group")
        self.conv0 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = AdaptiveDoubleNorm(out_channels, emb_channels, norm="group")
        self.dropout = torch.nn.Dropout(dropout)
        self.conv1 = _zero(Conv2d(out_channels, out_channels, 3, padding=1))
        self.act = SiLU()
        self.skip = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.attn = UNetAttention(out_channels, emb_channels, head_dim) if attention else None

    def forward(self, x, emb):
        x = resample(x, self.resample)
        h = self.conv0(self.act(self.norm0(x, emb)))
        h = self.conv1(self.dropout(self.act(self.norm1(h, emb))))
        x = (x if self.skip is None else self.skip(x)) + h
        return x if self.attn is None else self.attn(x, emb)

    def extra_repr(self):
        return f"{self.in_channels} -> {self.out_channels}, resample={self.resample!r}"


class UNet(ConditionEmbedding):
    """F_theta(x_in, t, labels=None, guidance=None, r=None) -> same shape as x_in (B, C, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.emb_channels

        def kw(res):  # every block computes at its level's resolution (resampling blocks after resampling)
            on = not cfg.dropout_res or res <= cfg.dropout_res
            return dict(head_dim=cfg.head_dim, dropout=cfg.dropout if on else 0.0)
        # time, label, guidance, time_r, emb_act (SiLU of the sum); checks t and labels
        self.init_embedding(E, cfg.num_classes, cfg.guidance_embed, cfg.second_time, act=True, strict=True)

        widths, resolutions = cfg.widths, cfg.resolutions
        self.conv_in = Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.enc = torch.nn.ModuleDict()
        cout, skips = widths[0], [widths[0]]
        for level, (ch, res) in enumerate(zip(widths, resolutions)):
            if level > 0:
                self.enc[f"{res}x{res}_down"] = ResBlock(cout, cout, E, resample="down", **kw(res))
                skips.append(cout)
            for i in range(cfg.num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = ResBlock(cout, ch, E, attention=res in cfg.attn_resolutions, **kw(res))
                cout = ch
                skips.append(cout)
        self.dec = torch.nn.ModuleDict()
        for level in reversed(range(len(widths))):
            ch, res = widths[level], resolutions[level]
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = ResBlock(cout, cout, E, attention=True, **kw(res))
                self.dec[f"{res}x{res}_in1"] = ResBlock(cout, cout, E, **kw(res))
            else:
                self.dec[f"{res}x{res}_up"] = ResBlock(cout, cout, E, resample="up", **kw(res))
            for i in range(cfg.num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = ResBlock(cout + skips.pop(), ch, E,
                                                             attention=res in cfg.attn_resolutions, **kw(res))
                cout = ch
        self.norm_out = AdaptiveDoubleNorm(cout, E, norm="group")
        self.act_out = SiLU()
        self.out = _zero(Conv2d(cout, cfg.in_channels, 3, padding=1))

    def repeated_blocks(self):
        """The residual blocks (each with its attention)."""
        return list(self.enc.values()) + list(self.dec.values())

    def forward(self, x_in, t, labels=None, guidance=None, r=None):
        c, s = self.cfg.in_channels, self.cfg.img_size
        if x_in.dim() != 4 or tuple(x_in.shape[1:]) != (c, s, s):
            raise ValueError(f"x_in must be (B, {c}, {s}, {s}), got {tuple(x_in.shape)}")
        if t.shape != x_in.shape[:1]:
            raise ValueError(f"t must be (B,) = ({x_in.shape[0]},), got shape {tuple(t.shape)}")
        emb = self.embed(t, labels, guidance, r)
        x = self.conv_in(x_in.to(self.conv_in.weight.dtype))
        skips = [x]
        for block in self.enc.values():
            x = block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out(self.act_out(self.norm_out(x, emb)))
