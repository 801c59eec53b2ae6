"""`swap_adaptive_norm`: diffusers' adaLN / AdaGN modulation swapped for adaptive double normalization.

`swap_adaptive_norm(model)` replaces diffusers' adaLN / AdaGN modulation modules (AdaLayerNormZero,
AdaLayerNormZeroSingle, AdaLayerNormContinuous, AdaGroupNorm) with modules of the same submodules,
parameter names and call signature that compute sCM's adaptive double normalization
(scm-reference.md §5) on scm_fast's fused op: norm(x) * pnorm(scale) + pnorm(shift) instead of
norm(x) * (1 + scale) + shift. It is an architecture change for training, not an equal rewrite;
its docstring says what it can and cannot swap. The DoubleNorm* classes are the replacements.
"""
from typing import NamedTuple

import torch

from scm_fast.ops.adaptive_norm import adaptive_double_norm
from scm_fast.ops.adaptive_norm_ref import adaptive_double_norm_ref, pnorm
from scm_fast.precision import accumulation_dtype

__all__ = ["DoubleNormContinuous", "DoubleNormGroup", "DoubleNormZero", "SwapReport", "swap_adaptive_norm"]


# ---- adaptive double normalization for diffusers' adaLN / AdaGN -------------------------------
_adn_eager = torch.compiler.disable(adaptive_double_norm)  # custom jvp: kept out of compiled graphs


def _inner_norm(norm):
    """(kind, eps) of a LayerNorm / RMSNorm over the last dim, or a reason string it cannot be used."""
    if isinstance(norm, torch.nn.LayerNorm):  # also diffusers' FP32LayerNorm (fp32 compute: the op's too)
        if len(norm.normalized_shape) != 1:
            return "LayerNorm over more than the last dim"
        return "layer", norm.eps
    if type(norm).__name__ == "RMSNorm" and isinstance(getattr(norm, "eps", None), float):
        if getattr(norm, "bias", None) is not None:
            return "RMSNorm with a bias (the fused rms norm has a weight only)"
        return "rms", norm.eps
    return f"inner norm {type(norm).__name__}"


class _DoubleNorm(torch.nn.Module):
    """Base of the swapped modules: keeps the original's submodules under their names (its
    state_dict keys are unchanged) and applies norm(x) * pnorm(scale) + pnorm(shift) on the fused op;
    the inner norm's weight and bias are read from the kept `norm` child (if any) at each call."""

    impl = "fused"

    def __init__(self, original, kind, eps, num_groups=None):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.kind, self.eps, self.num_groups = kind, eps, num_groups
        self.replaces = type(original).__name__

    def modulate(self, x, scale, shift, channels_last=None):
        inner = self._modules.get("norm")
        weight, bias = getattr(inner, "weight", None), getattr(inner, "bias", None)
        kw = dict(norm=self.kind, num_groups=self.num_groups, eps=self.eps)
        if self.impl == "torch":
            cl = x.dim() <= 3 if channels_last is None else channels_last
            return adaptive_double_norm_ref(x, scale, shift, weight, bias, channels_last=cl, **kw)
        return _adn_eager(x, scale, shift, weight=weight, bias=bias, channels_last=channels_last, **kw)

    def outer(self, scale, shift):
        """(scale', shift') such that the parent's norm(x) * (1 + scale') + shift' is the double norm."""
        acc = accumulation_dtype(scale)  # as the fused op computes
        s = (pnorm(scale.to(acc), self.eps) - 1).to(scale.dtype)
        return s, pnorm(shift.to(acc), self.eps).to(shift.dtype)

    def extra_repr(self):
        groups = f", num_groups={self.num_groups}" if self.kind == "group" else ""
        return f"replaces={self.replaces}, norm={self.kind!r}{groups}, eps={self.eps}"


class DoubleNormZero(_DoubleNorm):
    """diffusers' AdaLayerNormZero (6 chunks) / AdaLayerNormZeroSingle (3) with the double norm."""

    def __init__(self, original, chunks):
        kind, eps = _inner_norm(original.norm)
        super().__init__(original, kind, eps)
        self.chunks = chunks

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        embedder = self._modules.get("emb")  # AdaLayerNormZero(num_embeddings=...): DiT's t + label embedding
        if embedder is not None:
            emb = embedder(timestep, class_labels, hidden_dtype=hidden_dtype)
        parts = self.linear(self.silu(emb)).chunk(self.chunks, dim=1)  # shift, scale, gate (x2 for the MLP)
        x = self.modulate(x, parts[1], parts[0])
        if self.chunks == 3:
            return x, parts[2]
        scale_mlp, shift_mlp = self.outer(parts[4], parts[3])
        return x, parts[2], shift_mlp, scale_mlp, parts[5]


class DoubleNormContinuous(_DoubleNorm):
    """diffusers' AdaLayerNormContinuous with the double norm."""

    def __init__(self, original):
        super().__init__(original, *_inner_norm(original.norm))

    def forward(self, x, conditioning_embedding):
        scale, shift = self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
        return self.modulate(x, scale, shift)


class DoubleNormGroup(_DoubleNorm):
    """diffusers' AdaGroupNorm with the double norm (group norm over x (B, C, *spatial))."""

    def __init__(self, original):
        super().__init__(original, "group", original.eps, original.num_groups)
        self.act = original.act

    def forward(self, x, emb):
        if self.act is not None:
            emb = self.act(emb)
        scale, shift = self.linear(emb).chunk(2, dim=1)
        return self.modulate(x, scale, shift, channels_last=False)


def _adapter(module):
    """The double-norm replacement of a diffusers modulation module, or a reason string."""
    cls = type(module)
    if not cls.__module__.startswith("diffusers."):
        return None
    name = cls.__name__
    if name in ("AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous"):
        inner = _inner_norm(module.norm)
        if isinstance(inner, str):
            return f"{name}: {inner}"
        if name == "AdaLayerNormContinuous":
            return DoubleNormContinuous(module)
        return DoubleNormZero(module, 6 if name == "AdaLayerNormZero" else 3)
    if name == "AdaGroupNorm":
        return DoubleNormGroup(module)
    if name in _UNSUPPORTED:
        return f"{name}: {_UNSUPPORTED[name]}"
    return None


_UNSUPPORTED = {
    "AdaLayerNorm": "scale/shift may be shared over the batch (chunk_dim=0); not swapped",
    "AdaLayerNormSingle": "no modulation inside (PixArt's blocks modulate inline); not swapped",
    "SD35AdaLayerNormZeroX": "second (dual) attention modulation; not swapped",
    "LuminaRMSNormZero": "scale only, no shift; not swapped",
    "LuminaLayerNormContinuous": "not swapped",
    "CogVideoXLayerNormZero": "not swapped",
    "CogView3PlusAdaLayerNormZeroTextImage": "not swapped",
}
_INLINE = {  # modulations written inline in a model's forward: no module swap reaches them
    "DiTTransformer2DModel": "final layer: norm_out(x) * (1 + scale) + shift inline in forward, left as adaLN",
    "PixArtTransformer2DModel": "adaLN-single modulation inline in blocks and final layer, left as adaLN",
}


class SwapReport(NamedTuple):
    swapped: dict   # {module name: class it replaced}
    skipped: dict   # {module name: why it was left as it is}


def swap_adaptive_norm(model, *, impl="fused"):
    """Replace diffusers' adaLN / AdaGN modulation in `model` with adaptive double normalization
    (scm-reference.md §5): norm(x) * (1 + scale) + shift  ->  norm(x) * pnorm(scale) + pnorm(shift).

    THIS CHANGES THE FUNCTION: it is sCM's architecture change, for training (from scratch, or
    fine-tuning a teacher's weights into the new parameterisation), not a numerically equal
    rewrite; a pretrained model gives other outputs after the swap. Kept exactly: the projection
    (`linear`), the embedding submodules and their parameter names (state_dict keys unchanged), the
    inner norm's kind, affine and eps (the one eps is used in both square roots), gates (gate_msa,
    gate_mlp), and the module's call signature and outputs.
    Swapped (exact diffusers classes, matched by name): AdaLayerNormZero, AdaLayerNormZeroSingle,
    AdaLayerNormContinuous (LayerNorm or weight-only RMSNorm inside), AdaGroupNorm. AdaLayerNormZero
    also returns the MLP branch's (shift_mlp, scale_mlp), which the parent block applies itself as
    norm2(x) * (1 + scale_mlp) + shift_mlp: the swapped module returns scale_mlp' = pnorm(scale_mlp) - 1
    and shift_mlp' = pnorm(shift_mlp), so that branch becomes the double norm too, computed by the
    parent's own PyTorch ops and norm2 (not fused; its tangent has an autograd graph; 1 + (p - 1)
    rounds like the original 1 + scale in the activation dtype).
    Not swapped, listed in the report: other diffusers modulations (AdaLayerNorm, AdaLayerNormSingle,
    SD35AdaLayerNormZeroX, Lumina*, CogVideoX*), and modulation written inline in a forward (DiT's
    final layer; timm / DiT-reference blocks that call `modulate(norm(x), shift, scale)`) - replace
    those lines by `scm_fast.ops.adaptive_double_norm(x, scale, shift, eps=...)` or use
    `scm_fast.nn.AdaptiveDoubleNorm` in your own modules.
    impl: "fused" (scm_fast's op, compiler-disabled) or "torch" (the PyTorch reference composition).
    Returns SwapReport(swapped, skipped), both {module name: text}.
    """
    if impl not in ("fused", "torch"):
        raise ValueError(f"impl must be 'fused' or 'torch', got {impl!r}")
    report = SwapReport({}, {})
    if type(model).__name__ in _INLINE and type(model).__module__.startswith("diffusers."):
        report.skipped[""] = _INLINE[type(model).__name__]
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            new = _adapter(child)
            if isinstance(new, str):
                report.skipped[full] = new
            elif new is not None:
                new.impl = impl
                setattr(parent, name, new)
                report.swapped[full] = type(child).__name__
    return report
