"""Modules built on scm_fast's fused ops."""
import torch

from scm_fast.ops.adaptive_norm import adaptive_double_norm, adaptive_double_norm_ref

__all__ = ["AdaptiveDoubleNorm"]


class AdaptiveDoubleNorm(torch.nn.Module):
    """norm(x) * pnorm(scale) + pnorm(shift) with (scale, shift) = Linear(emb) (scm-reference.md §5).

    Replaces AdaGN / adaLN modulation: `channels` is C of x, `emb_dim` the width of the conditioning
    embedding (time, class, guidance). norm: "layer", "rms" or "group" (with num_groups); affine
    adds the inner norm's elementwise weight (and bias, except for rms). x is (B, L, C), (B, C) or
    (B, C, *spatial) as in `scm_fast.ops.adaptive_double_norm`; emb is (B, emb_dim).
    `impl = "torch"` swaps the fused op for the PyTorch composition (the reference), e.g. to
    benchmark against what a codebase without the fused op runs.
    """

    impl = "fused"

    def __init__(self, channels, emb_dim, norm="layer", num_groups=None, eps=1e-6, affine=False,
                 channels_last=None):
        super().__init__()
        if norm == "group" and num_groups is None:
            num_groups = min(32, channels)
            while channels % num_groups:
                num_groups -= 1
        self.channels, self.norm, self.num_groups, self.eps = channels, norm, num_groups, eps
        self.channels_last = channels_last
        self.emb = torch.nn.Linear(emb_dim, 2 * channels)  # -> (scale, shift)
        self.weight = torch.nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(channels)) if affine and norm != "rms" else None

    def forward(self, x, emb):
        scale, shift = self.emb(emb).chunk(2, dim=-1)
        kw = dict(norm=self.norm, num_groups=self.num_groups, eps=self.eps, channels_last=self.channels_last)
        if self.impl == "torch":
            cl = x.dim() <= 3 if self.channels_last is None else self.channels_last
            return adaptive_double_norm_ref(x, scale, shift, self.weight, self.bias, **{**kw, "channels_last": cl})
        return adaptive_double_norm(x, scale, shift, weight=self.weight, bias=self.bias, **kw)

    def extra_repr(self):
        groups = f", num_groups={self.num_groups}" if self.norm == "group" else ""
        return f"{self.channels}, norm={self.norm!r}{groups}, eps={self.eps}, affine={self.weight is not None}"
