"""`swap_adaptive_norm`: diffusers' adaLN / AdaGN modulation swapped for adaptive double normalization.

`swap_adaptive_norm(model)` replaces diffusers' adaLN / AdaGN modulation modules (AdaLayerNormZero,
AdaLayerNormContinuous, AdaGroupNorm and the variants of the same layout, `_SWAPS`) with modules of
the same submodules, parameter names and call signature that compute sCM's adaptive double
normalization (scm-reference.md §5) on scm_fast's fused op: norm(x) * pnorm(scale) + pnorm(shift)
instead of norm(x) * (1 + scale) + shift. It is an architecture change for training, not an equal
rewrite; every modulation it leaves is listed, with the reason, in the report (`_reason`). The
DoubleNorm* classes are the replacements.
"""
import re
from typing import NamedTuple

import torch

from scm_fast.ops.adaptive_norm import adaptive_double_norm
from scm_fast.ops.adaptive_norm_ref import adaptive_double_norm_ref, pnorm
from scm_fast.precision import accumulation_dtype

__all__ = ["DoubleNormContinuous", "DoubleNormGroup", "DoubleNormZero", "SwapReport", "swap_adaptive_norm"]


# ---- adaptive double normalization for diffusers' adaLN / AdaGN -------------------------------
_adn_eager = torch.compiler.disable(adaptive_double_norm)  # custom jvp: kept out of compiled graphs


def _inner_norm(norm):
    """(kind, eps, num_groups) of a LayerNorm / RMSNorm over the last dim or a GroupNorm, or a reason
    string it cannot be used."""
    if isinstance(norm, torch.nn.LayerNorm):  # also diffusers' FP32LayerNorm (fp32 compute: the op's too)
        if len(norm.normalized_shape) != 1:
            return "LayerNorm over more than the last dim"
        return "layer", norm.eps, None
    if isinstance(norm, torch.nn.GroupNorm):
        return "group", norm.eps, norm.num_groups
    if type(norm).__name__ == "RMSNorm" and isinstance(getattr(norm, "eps", None), float):
        if getattr(norm, "bias", None) is not None:
            return "RMSNorm with a bias (the fused rms norm has a weight only)"
        return "rms", norm.eps, None
    return f"inner norm {type(norm).__name__}"


class _DoubleNorm(torch.nn.Module):
    """Base of the swapped modules: keeps the original's submodules under their names (its
    state_dict keys are unchanged) and applies norm(x) * pnorm(scale) + pnorm(shift) on the fused op;
    the inner norm's weight and bias are read from the kept norm child (if any) at each call."""

    impl = "fused"
    norms = ("norm",)  # the original's inner norm children (one kind and eps for all)

    def __init__(self, original, kind, eps, num_groups=None):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.kind, self.eps, self.num_groups = kind, eps, num_groups
        self.replaces = type(original).__name__

    @classmethod
    def inner(cls, original):
        """(kind, eps, num_groups) of `original`'s inner norms, or why it cannot be swapped."""
        found = {_inner_norm(getattr(original, name)) for name in cls.norms}
        reasons = sorted(f for f in found if isinstance(f, str))
        if reasons:
            return reasons[0]
        return found.pop() if len(found) == 1 else "inner norms of different kinds or eps"

    def modulate(self, x, scale, shift, norm="norm", channels_last=None):
        """The double norm of x with the inner norm child `norm`'s affine (§5, eq. (1))."""
        inner = self._modules.get(norm)
        weight, bias = getattr(inner, "weight", None), getattr(inner, "bias", None)
        kw = dict(norm=self.kind, num_groups=self.num_groups, eps=self.eps)
        if self.impl == "torch":
            cl = x.dim() <= 3 if channels_last is None else channels_last
            return adaptive_double_norm_ref(x, scale, shift, weight, bias, channels_last=cl, **kw)
        return _adn_eager(x, scale, shift, weight=weight, bias=bias, channels_last=channels_last, **kw)

    def for_parent(self, shift, scale):
        """(shift', scale') such that the parent block's norm(x) * (1 + scale') + shift' is the double norm
        (the MLP-branch parameters adaLN-Zero modules return, in diffusers' order)."""
        acc = accumulation_dtype(scale)  # as the fused op computes
        s = (pnorm(scale.to(acc), self.eps) - 1).to(scale.dtype)
        return pnorm(shift.to(acc), self.eps).to(shift.dtype), s

    def extra_repr(self):
        groups = f", num_groups={self.num_groups}" if self.kind == "group" else ""
        return f"replaces={self.replaces}, norm={self.kind!r}{groups}, eps={self.eps}"


class DoubleNormZero(_DoubleNorm):
    """diffusers' AdaLayerNormZero with the double norm; the base of the adaLN-Zero variants."""

    def params(self, emb):
        """shift, scale, gate, shift_mlp, scale_mlp, gate_mlp."""
        return self.linear(self.silu(emb)).chunk(6, dim=1)

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        embedder = self._modules.get("emb")  # AdaLayerNormZero(num_embeddings=...): DiT's t + label embedding
        if embedder is not None:
            emb = embedder(timestep, class_labels, hidden_dtype=hidden_dtype)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.params(emb)
        return self.modulate(x, scale, shift), gate, *self.for_parent(shift_mlp, scale_mlp), gate_mlp


class ChromaDoubleNormZero(DoubleNormZero):
    """Chroma's ChromaAdaLayerNormZeroPruned: the six chunks come precomputed (no linear)."""

    def params(self, emb):
        return emb.flatten(1, 2).chunk(6, dim=1)


class DoubleNormZeroSingle(DoubleNormZero):
    """diffusers' AdaLayerNormZeroSingle (shift, scale, gate) with the double norm."""

    def params(self, emb):
        return self.linear(self.silu(emb)).chunk(3, dim=1)

    def forward(self, x, emb=None):
        shift, scale, gate = self.params(emb)
        return self.modulate(x, scale, shift), gate


class ChromaDoubleNormZeroSingle(DoubleNormZeroSingle):
    """Chroma's ChromaAdaLayerNormZeroSinglePruned: the three chunks come precomputed."""

    def params(self, emb):
        return emb.flatten(1, 2).chunk(3, dim=1)


class DoubleNormZeroX(DoubleNormZero):
    """SD3.5's SD35AdaLayerNormZeroX: AdaLayerNormZero plus (shift, scale, gate) of a second
    attention, both modulating the one norm(x)."""

    def forward(self, hidden_states, emb=None):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate2 = (
            self.linear(self.silu(emb)).chunk(9, dim=1))
        x = hidden_states
        return (self.modulate(x, scale, shift), gate, *self.for_parent(shift_mlp, scale_mlp), gate_mlp,
                self.modulate(x, scale2, shift2), gate2)


class DoubleNormZeroTextImage(DoubleNormZero):
    """CogView4's CogView4AdaLayerNormZero (also GlmImageAdaLayerNormZero): image and text streams,
    each with its norm, from one linear (no activation) with the chunks interleaved."""

    norms = ("norm", "norm_context")

    def params(self, emb):
        """The image and the text stream's (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp)."""
        parts = self.linear(emb).chunk(12, dim=1)
        return parts[0::2], parts[1::2]

    def both(self, x, context, emb):
        (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp), (c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp,
                                                               c_gate_mlp) = self.params(emb)
        return (self.modulate(x, scale, shift, self.norms[0]), gate, *self.for_parent(shift_mlp, scale_mlp), gate_mlp,
                self.modulate(context, c_scale, c_shift, self.norms[1]), c_gate,
                *self.for_parent(c_shift_mlp, c_scale_mlp), c_gate_mlp)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return self.both(hidden_states, encoder_hidden_states, temb)


class CogView3PlusDoubleNormZero(DoubleNormZeroTextImage):
    """CogView3Plus's CogView3PlusAdaLayerNormZeroTextImage: as CogView4's, with an activation and the
    image stream's six chunks before the text stream's."""

    norms = ("norm_x", "norm_c")

    def params(self, emb):
        parts = self.linear(self.silu(emb)).chunk(12, dim=1)
        return parts[:6], parts[6:]

    def forward(self, x, context, emb=None):
        return self.both(x, context, emb)


class DoubleNormZeroJoint(DoubleNormZero):
    """CogVideoX's CogVideoXLayerNormZero: video and text tokens through one norm, each stream with
    its (shift, scale, gate), the gates returned as (B, 1, C)."""

    def gates(self, gate, enc_gate):
        return gate[:, None, :], enc_gate[:, None, :]

    def forward(self, hidden_states, encoder_hidden_states, temb):
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb)).chunk(6, dim=1)
        return (self.modulate(hidden_states, scale, shift), self.modulate(encoder_hidden_states, enc_scale, enc_shift),
                *self.gates(gate, enc_gate))


class EasyAnimateDoubleNormZero(DoubleNormZeroJoint):
    """EasyAnimate's EasyAnimateLayerNormZero: CogVideoX's layout with the gates returned (B, C)."""

    def gates(self, gate, enc_gate):
        return gate, enc_gate


class DoubleNormContinuous(_DoubleNorm):
    """diffusers' AdaLayerNormContinuous with the double norm; the base of the continuous variants."""

    def params(self, x, conditioning_embedding):
        """scale, shift."""
        return self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)

    def forward(self, x, conditioning_embedding):
        return self.modulate(x, *self.params(x, conditioning_embedding))


class DoubleNormContinuousNoAct(DoubleNormContinuous):
    """CogView4's CogView4AdaLayerNormContinuous (also GlmImage's): no activation before the linear."""

    def params(self, x, conditioning_embedding):
        return self.linear(conditioning_embedding.to(x.dtype)).chunk(2, dim=1)


class ChromaDoubleNormContinuous(DoubleNormContinuous):
    """Chroma's ChromaAdaLayerNormContinuousPruned: (shift, scale) come precomputed."""

    def forward(self, x, emb):
        shift, scale = emb.flatten(1, 2).to(x.dtype).chunk(2, dim=1)
        return self.modulate(x, scale, shift)


class DoubleNormAdaLayerNorm(DoubleNormContinuous):
    """diffusers' AdaLayerNorm with chunk_dim=1 (CogVideoX's, EasyAnimate's, OmniGen's final norm):
    (shift, scale) per sample, from an optional timestep embedding."""

    @classmethod
    def inner(cls, original):
        if original.chunk_dim != 1:
            return "chunk_dim=0: one (scale, shift) shared over the batch"
        return super().inner(original)

    def forward(self, x, timestep=None, temb=None):
        embedder = self._modules.get("emb")
        if embedder is not None:
            temb = embedder(timestep)
        shift, scale = self.linear(self.silu(temb)).chunk(2, dim=1)
        return self.modulate(x, scale, shift)


class DoubleNormGroup(_DoubleNorm):
    """diffusers' AdaGroupNorm with the double norm (group norm over x (B, C, *spatial))."""

    @classmethod
    def inner(cls, original):  # F.group_norm inside, no norm child
        return "group", original.eps, original.num_groups

    def forward(self, x, emb):
        act = self._modules.get("act")  # AdaGroupNorm(act_fn=None): no activation
        scale, shift = self.linear(emb if act is None else act(emb)).chunk(2, dim=1)
        return self.modulate(x, scale, shift, channels_last=False)


class Kandinsky3DoubleNormGroup(DoubleNormGroup):
    """Kandinsky 3's Kandinsky3ConditionalGroupNorm: AdaGroupNorm's layout, the projection in context_mlp."""

    @classmethod
    def inner(cls, original):  # a GroupNorm child
        return _inner_norm(original.norm)

    def forward(self, x, context):
        scale, shift = self.context_mlp(context).chunk(2, dim=1)
        return self.modulate(x, scale, shift, channels_last=False)


_SWAPS = {  # diffusers class name -> its replacement; each layout read from the installed source
    "AdaLayerNormZero": DoubleNormZero,
    "AdaLayerNormZeroSingle": DoubleNormZeroSingle,
    "SD35AdaLayerNormZeroX": DoubleNormZeroX,
    "ChromaAdaLayerNormZeroPruned": ChromaDoubleNormZero,
    "ChromaAdaLayerNormZeroSinglePruned": ChromaDoubleNormZeroSingle,
    "CogView4AdaLayerNormZero": DoubleNormZeroTextImage,
    "GlmImageAdaLayerNormZero": DoubleNormZeroTextImage,
    "CogView3PlusAdaLayerNormZeroTextImage": CogView3PlusDoubleNormZero,
    "CogVideoXLayerNormZero": DoubleNormZeroJoint,
    "EasyAnimateLayerNormZero": EasyAnimateDoubleNormZero,
    "AdaLayerNormContinuous": DoubleNormContinuous,
    "CogView4AdaLayerNormContinuous": DoubleNormContinuousNoAct,
    "GlmImageAdaLayerNormContinuous": DoubleNormContinuousNoAct,
    "ChromaAdaLayerNormContinuousPruned": ChromaDoubleNormContinuous,
    "AdaLayerNorm": DoubleNormAdaLayerNorm,
    "AdaGroupNorm": DoubleNormGroup,
    "Kandinsky3ConditionalGroupNorm": Kandinsky3DoubleNormGroup,
}


def _adapter(module):
    """The double-norm replacement of a diffusers modulation module, a reason string, or None."""
    cls = type(module)
    swap = _SWAPS.get(cls.__name__) if cls.__module__.startswith("diffusers.") else None
    if swap is None:
        return None
    inner = swap.inner(module)
    if isinstance(inner, str):
        return f"{cls.__name__}: {inner}"
    return swap(module, *inner)


# ---- what is not swapped, and why -------------------------------------------------------------
_MODULATION = re.compile(r"Ada(Layer|Group|RMS)?Norm|AdaLN|AdaptiveNorm|Norm(Zero|Continuous|Single)|Modulat"
                         r"|Conditional\w*Norm")  # class names of modulation modules (diffusers' naming)
_TABLE = re.compile(r"scale_shift|modulat")  # parameter names of inline modulation tables (adaLN-single)

_BY_REASON = {  # why each diffusers modulation class that is not swapped stays adaLN, read from the installed source
    "projection only: the parent block chunks it and applies norm(x) * (1 + scale) + shift inline in forward": (
        "Flux2Modulation", "Flux3Modulation", "Kandinsky5Modulation", "Kandinsky6Modulation", "Kandinsky6SRModulation",
        "Modulation", "MiniMaxH3AdaLayerNormModulation", "LTX2VideoVaeAdaLNZero", "AudioDiTAdaLNMLP"),
    "adaLN-single projection only, no norm: the blocks add it to their scale_shift_table and modulate inline "
    "(listed there)": ("AdaLayerNormSingle", "LTX2AdaLayerNormSingle", "SanaWMLTX2AdaLayerNormSingle"),
    "modulate_table + conditioning, applied inline by the parent block": ("JoyImageModulate",
                                                                          "JoyImageEditPlusModulate"),
    "a block: the model's shared (shift, scale, gate) applied inline in forward": ("ErnieImageSharedAdaLNBlock",),
    "scale only, no shift (the double norm needs one)": (
        "LuminaRMSNormZero", "LuminaLayerNormContinuous", "MochiRMSNormZero", "MochiLayerNormContinuous",
        "QwenImage21AdaLayerNormContinuous"),
    "scale (or tanh gate) given by the parent block, no projection inside": ("MochiModulatedRMSNorm",),
    "shift only, no scale (the double norm needs one)": ("AdaLayerNormShift",),
    "gates only (gate_msa, gate_mlp): no norm, nothing to swap": (
        "HunyuanVideoAdaNorm", "HunyuanVideo15AdaNorm", "HunyuanImageAdaNorm", "MotifVideoAdaNorm"),
    "token replace: the first frame's tokens get a second modulation": (
        "HunyuanVideoTokenReplaceAdaLayerNormZero", "HunyuanVideoTokenReplaceAdaLayerNormZeroSingle"),
    "adaLN-LoRA (two linears plus the model's temb), scale/shift may be per token (B, L, C)": (
        "CosmosAdaLayerNorm", "CosmosAdaLayerNormZero"),
    "scale/shift may be per token (B, L, C); the fused op takes one (B, C) vector per sample": (
        "Flux3AdaLayerNorm", "AudioDiTAdaLayerNormZeroFinal"),
    "(shift, scale) from the parent's scale_shift_table + temb, passed in (per token in Sana-Video)": (
        "SanaModulatedNorm",),
    "scale/shift selected per row of a packed sequence (index_select)": ("MiniMaxH3AdaLayerNormOut",),
    "sequence-first (S, B, C) tokens (scale.unsqueeze(0))": ("ErnieImageAdaLNContinuous",),
    "FiLM from a latent map (1x1 convs), not a per-sample vector": ("Kandinsky6SRLatentUpscalerModulatedNorm",),
    "sigmoid gamma (no 1 +) from a normed condition, masked": ("RFD4ProteinaAdaptiveNorm",),
}
_REASONS = {name: why for why, names in _BY_REASON.items() for name in names}
_INLINE = {  # diffusers modules whose forward modulates inline, with no table or projection child to see
    "DiTTransformer2DModel": "final layer: norm_out(x) * (1 + scale) + shift inline in forward, left as adaLN",
    "AuraFlowPreFinalBlock": "x * (1 + scale) + shift inline in forward (no norm inside), left as adaLN",
    "T5FiLMLayer": "FiLM x * (1 + scale) + shift inline in forward (no norm inside), left as is",
    "ConvNextBlock": "norm(x) * (1 + scale) + shift from cond_embeds_mapper inline in forward, left as adaLN",
}
_PROJECTION_CHILD = re.compile(r"(^|_)mod$|modulation|^adaln", re.I)  # img_mod, adaLN_modulation, adaln_proj ...


def _reason(module):
    """Why `module`, not swapped, is left as adaLN; None if it holds no modulation of its own."""
    cls = type(module)
    named = _named_reason(cls.__name__) if cls.__module__.startswith("diffusers.") else None
    return named or _inline_reason(module)


def _named_reason(name):
    """The reason for a diffusers class, by its name."""
    if name in _SWAPS:  # reached only for the root: it cannot be replaced in place
        return f"{name}: the model passed in is the module itself; pass its parent to swap it"
    if name in _REASONS:
        return f"{name}: {_REASONS[name]}; not swapped"
    if _MODULATION.search(name):
        return f"modulation class {name}: not swapped (unknown layout)"
    return _INLINE.get(name)


def _inline_reason(module):
    """Modulation a module writes inline in its forward, seen from what it owns (any module, not
    only diffusers': timm / DiT-reference blocks have an adaLN_modulation projection too)."""
    tables = [n for n, _ in module.named_parameters(recurse=False) if _TABLE.search(n)]
    found = [f"owns {', '.join(tables)} (adaLN-single: a table + the timestep projection)"] if tables else []
    projections = [n for n, child in module.named_children()
                   if _PROJECTION_CHILD.search(n) and isinstance(child, (torch.nn.Linear, torch.nn.Sequential))]
    if projections:
        found.append(f"projects its (shift, scale, gate) with {', '.join(projections)}")
    if getattr(module, "time_embedding_norm", None) == "scale_shift":  # ResnetBlock2D: ADM's AdaGN
        found.append("has time_embedding_norm='scale_shift' (norm2(h) * (1 + scale) + shift)")
    if not found:
        return None
    return (f"{type(module).__name__} {'; '.join(found)}: modulation inline in its forward, which a module swap "
            "cannot reach; left as it is")


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
    inner norm's kind, affine and eps (the one eps is used in both square roots), gates, and the
    module's call signature and outputs.
    Swapped (exact diffusers classes, matched by name, each layout read from diffusers' source; the
    inner norm a LayerNorm, a GroupNorm or a weight-only RMSNorm): AdaLayerNormZero,
    AdaLayerNormZeroSingle, SD35AdaLayerNormZeroX, CogView4AdaLayerNormZero, GlmImageAdaLayerNormZero,
    CogView3PlusAdaLayerNormZeroTextImage, CogVideoXLayerNormZero, EasyAnimateLayerNormZero, Chroma's
    ChromaAdaLayerNormZero(Single)Pruned (chunks precomputed), AdaLayerNormContinuous and its CogView4 /
    GlmImage / Chroma variants, AdaLayerNorm with chunk_dim=1, AdaGroupNorm and
    Kandinsky3ConditionalGroupNorm (`_SWAPS`). The adaLN-Zero modules also return the MLP branch's
    (shift_mlp, scale_mlp), which the parent block applies itself as norm2(x) * (1 + scale_mlp) + shift_mlp:
    the swapped module returns scale_mlp' = pnorm(scale_mlp) - 1 and shift_mlp' = pnorm(shift_mlp), so that
    branch becomes the double norm too, computed by the parent's own PyTorch ops and norm2 (not fused;
    its tangent has an autograd graph; 1 + (p - 1) rounds like the original 1 + scale in the
    activation dtype).
    Listed in `skipped`, with the reason, and left as they are:
    - every other module of a diffusers class whose name marks a modulation (AdaLayerNorm*,
      AdaGroupNorm, *AdaNorm, AdaLN*, *NormZero, *NormContinuous, *NormSingle, *Modulation,
      *Modulate*, Conditional*Norm), with a specific reason where its layout was read (projection only:
      Flux2Modulation, PixArt's AdaLayerNormSingle; scale only: Lumina*, Mochi*; gates only:
      HunyuanVideoAdaNorm; per token: Cosmos*, Flux3AdaLayerNorm ...) and "unknown layout" otherwise;
    - a swappable class whose inner norm or layout does not fit (AdaLayerNorm with chunk_dim=0);
    - modulation inline in a forward, which no module swap reaches: modules owning a modulation
      table parameter (scale_shift_table ...: Wan, PixArt, Sana, LTX blocks and final layers),
      modules with a modulation projection child (img_mod, adaLN_modulation ...: QwenImage, HiDream,
      DiT-reference / timm-style blocks, any module), ResnetBlock2D with time_embedding_norm=
      'scale_shift', DiT's final layer. For those, replace norm(x) * (1 + scale) + shift by
      `scm_fast.ops.adaptive_double_norm(x, scale, shift, eps=...)` or use
      `scm_fast.nn.AdaptiveDoubleNorm` in your own modules.
    impl: "fused" (scm_fast's op, compiler-disabled) or "torch" (the PyTorch reference composition).
    Returns SwapReport(swapped, skipped), both {module name: text} ("" is the model itself).
    """
    if impl not in ("fused", "torch"):
        raise ValueError(f"impl must be 'fused' or 'torch', got {impl!r}")
    report = SwapReport({}, {})
    _skip(report, "", model, None)  # the root is reported, never replaced
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            new = _adapter(child)
            if isinstance(new, torch.nn.Module):
                new.impl = impl
                setattr(parent, name, new)
                report.swapped[full] = type(child).__name__
            else:
                _skip(report, full, child, new)
    return report


def _skip(report, name, module, reason):
    reason = reason or _reason(module)
    if reason:
        report.skipped[name] = reason
