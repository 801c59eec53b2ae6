"""Drop-in routes from other codebases (diffusers, timm, plain PyTorch models) to scm_fast's fused ops.

`patch_sdpa()` makes `torch.nn.functional.scaled_dot_product_attention` (SDPA) run scm_fast's fused
attention, so `torch.func.jvp` / `torch.autograd.forward_ad` work through models that call SDPA
(PyTorch's flash / efficient / CPU-flash SDPA kernels have no forward-mode rule; MATH has one at
O(L^2) memory):

    with scm_fast.patch_sdpa():          # patched inside the block, restored on exit
        out, t_out = torch.func.jvp(model, primals, tangents)

    scm_fast.patch_sdpa()                # or a global switch: patched from now on ...
    scm_fast.unpatch_sdpa()              # ... until this (removes every patch)

What is covered: every call that looks up `torch.nn.functional.scaled_dot_product_attention` (or
`F.scaled_dot_product_attention`) when it runs - diffusers' attention processors and its "native"
attention backend, timm's fused attention, `nn.MultiheadAttention` / `nn.Transformer*` when they take
the SDPA path (`need_weights=False`), plain models. Not covered: a name bound before the patch with
`from torch.nn.functional import scaled_dot_product_attention` (pass that module in `modules=`),
`torch._C._nn.scaled_dot_product_attention` and `torch.ops.aten.*` calls, nn.MultiheadAttention's
C++ fast path (eval, no grad), attention libraries with their own kernels (flash-attn, xformers,
diffusers' non-native attention backends). While patched, an `sdpa_kernel(...)` backend choice
does not apply to the routed calls. (torch.compile guards on the attribute: a model compiled before
the patch recompiles when it is patched or restored.)

Same arguments and results as SDPA, forward AD and backward. Calls the fused op cannot run exactly
go to PyTorch's own SDPA with a one-time warning naming the reason: dropout_p > 0, an attn_mask that
requires grad or carries a tangent, query/key/value leading dims that broadcast instead of matching
(beyond GQA), dtypes other than fp16/bf16/fp32/fp64 (fp64 on CUDA: the reference backend only),
devices other than CPU/CUDA, head dims > 256, nested tensors or tensor subclasses,
torch.func.vmap/functionalize. Calls that PyTorch rejects or
defines per backend (is_causal together with attn_mask: MATH raises, CPU flash combines them;
mismatched dtypes; a mask wider than the output) go there silently: its answer or error is yours.
Fully masked rows: a query row whose keys are all masked gives 0 output and 0 tangent (PyTorch
2.13's CPU SDPA gives 0 as well; some backends and older versions give NaN, not a result to keep).

Like the builtin, the patched function speaks __torch_function__: TorchFunctionModes and tensor
subclasses that handle `torch.nn.functional.scaled_dot_product_attention` (CausalBias masks,
diffusers' layer-skip mode, `with torch.device(...)`) see its calls.

torch.compile: PyTorch drops a custom autograd.Function `jvp` inside a compiled graph (silently
wrong tangents when torch.func.jvp is traced). The patched SDPA is therefore compiler-disabled: it
runs eagerly, a graph break in the compiled model (`fullgraph=True` raises there).

`swap_adaptive_norm(model)` replaces diffusers' adaLN / AdaGN modulation modules with adaptive
double normalization on the fused op (see its docstring for what it can and cannot swap).
"""
import importlib
import math
import threading
import types
import warnings
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from scm_fast.ops import _registry
from scm_fast.ops.adaptive_norm import adaptive_double_norm
from scm_fast.ops.adaptive_norm_ref import adaptive_double_norm_ref, pnorm
from scm_fast.ops.attention import MAX_HEAD_DIM, attention

__all__ = ["SDPAPatch", "SwapReport", "patch_sdpa", "sdpa_patched", "swap_adaptive_norm", "unpatch_sdpa"]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FUSED_DEVICES = ("cpu", "cuda")
_NAME = "scaled_dot_product_attention"
_BUILTIN = torch._C._nn.scaled_dot_product_attention

_lock = threading.RLock()
_stack = []            # active SDPAPatch handles, the latest last; its options rule
_installed = {}        # {"original": the SDPA found in torch.nn.functional when the patch went in}
_warned = set()        # fallback reasons already warned about
_rebound = {}          # {(id(module), name): [module, name, original value, number of patches holding it]}


# ---- deciding: fused op or PyTorch's SDPA ----------------------------------------------------
class _Defer(Exception):
    """This call goes to PyTorch's SDPA. `warn`: False when PyTorch itself rejects the arguments."""

    def __init__(self, key, message, warn=True):
        super().__init__(message)
        self.key, self.warn = key, warn


def _is_plain(x):
    return type(x) in (torch.Tensor, torch.nn.Parameter)


def _check_tensors(query, key, value):
    qkv = (query, key, value)
    if not all(isinstance(x, torch.Tensor) for x in qkv):
        raise _Defer("type", "query, key and value must be tensors", warn=False)
    if any(x.is_nested for x in qkv):
        raise _Defer("nested", "nested tensors")
    if not all(_is_plain(x) for x in qkv):
        raise _Defer("subclass", f"tensor subclass {type(next(x for x in qkv if not _is_plain(x))).__name__}")
    if min(x.dim() for x in qkv) < 2:
        raise _Defer("ndim", "query, key and value must be at least 2-D", warn=False)


def _check_dtypes(query, key, value):
    if not (query.dtype == key.dtype == value.dtype) or not (query.device == key.device == value.device):
        raise _Defer("mismatch", "query, key, value dtypes or devices differ", warn=False)
    if not query.dtype.is_floating_point:
        raise _Defer("int_dtype", f"dtype {query.dtype}", warn=False)
    if query.dtype not in _FUSED_DTYPES:
        raise _Defer("dtype", f"dtype {query.dtype} (the fused op runs fp16, bf16, fp32, fp64)")
    if query.device.type not in _FUSED_DEVICES:
        raise _Defer("device", f"device {query.device} (the fused op runs on CPU and CUDA)")
    if query.dtype == torch.float64 and query.device.type == "cuda" and _registry.backend() != "reference":
        raise _Defer("fp64_cuda", "float64 on CUDA (the Triton kernels run fp16, bf16, fp32; "
                                  "scm_fast.ops.use_backend('reference') runs fp64)")


def _check_shapes(query, key, value, enable_gqa):
    """(B, Hq, Hk): how the leading dims fold into the fused op's (B, H) layout."""
    E, (S, Ek), (Sv, Ev) = query.shape[-1], key.shape[-2:], value.shape[-2:]
    if E != Ek or S != Sv:
        raise _Defer("shape", "query/key head dims or key/value lengths differ", warn=False)
    if not (1 <= E <= MAX_HEAD_DIM and 1 <= Ev <= MAX_HEAD_DIM):
        raise _Defer("head_dim", f"head dims {E} (query/key), {Ev} (value) outside [1, {MAX_HEAD_DIM}]")
    lq, lk, lv = query.shape[:-2], key.shape[:-2], value.shape[:-2]
    same = lq == lk == lv
    gqa = (enable_gqa and len(lq) >= 1 and lk == lv and lq[:-1] == lk[:-1] and lk[-1] >= 1
           and lq[-1] % lk[-1] == 0)
    if not (same or gqa):
        raise _Defer("broadcast", f"leading dims of query {tuple(lq)}, key {tuple(lk)}, value {tuple(lv)} "
                                  f"broadcast (only equal dims, or GQA with enable_gqa=True, are fused)")
    if query.numel() == 0 or key.numel() == 0:
        raise _Defer("empty", "empty tensors", warn=False)
    B = math.prod(lq[:-1])
    return B, (lq[-1] if lq else 1), (lk[-1] if lk else 1)


def _check_mask(attn_mask, query, key, is_causal):
    if attn_mask is None:
        return
    if is_causal:
        raise _Defer("causal_mask", "is_causal with attn_mask", warn=False)
    if not isinstance(attn_mask, torch.Tensor):
        raise _Defer("mask_type", "attn_mask is not a tensor", warn=False)
    if not _is_plain(attn_mask):  # e.g. torch.nn.attention.bias.CausalBias, which PyTorch dispatches itself
        raise _Defer("mask_subclass", f"attn_mask of type {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype) or attn_mask.device != query.device:
        raise _Defer("mask_dtype", "attn_mask dtype or device", warn=False)
    if attn_mask.requires_grad:
        raise _Defer("mask_grad", "attn_mask requires grad (the fused op's mask is a constant)")
    if fwAD.unpack_dual(attn_mask).tangent is not None:
        raise _Defer("mask_tangent", "attn_mask carries a forward-AD tangent (the fused op's mask is a constant)")
    full = (*query.shape[:-1], key.shape[-2])
    try:
        fits = torch.broadcast_shapes(attn_mask.shape, full) == full
    except RuntimeError:
        fits = False
    if not fits:
        raise _Defer("mask_shape", f"attn_mask {tuple(attn_mask.shape)} does not broadcast to {full}", warn=False)


def _check_transforms():
    """torch.func.vmap / functionalize have no rule in the fused op's autograd.Function."""
    try:
        stack = torch._C._functorch.get_interpreter_stack() or []
    except AttributeError:  # an older or newer torch without this introspection
        return
    allowed = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    if any(level.key() not in allowed for level in stack):
        raise _Defer("transform", "a torch.func transform other than grad/jvp (e.g. vmap, jacfwd)")


def _check_scalars(dropout_p, is_causal, scale):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise _Defer("dropout_type", "dropout_p is not a float", warn=False)
    if dropout_p != 0:
        raise _Defer("dropout", f"dropout_p={dropout_p} > 0 (the fused op has no dropout)")
    if not isinstance(is_causal, (bool, int)):
        raise _Defer("causal_type", "is_causal is not a bool", warn=False)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise _Defer("scale_type", "scale is not a float", warn=False)


def _autocast_dtype(query):
    """The dtype autocast would run SDPA in on query's device, or None."""
    device = query.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return None
    return torch.get_autocast_dtype(device)


def _cast(x, dtype):
    """Autocast's cast: floating tensors other than fp64 to dtype; bool masks and fp64 untouched."""
    if dtype is None or not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == torch.float64:
        return x
    return x.to(dtype)


# ---- the fused path --------------------------------------------------------------------------
def _fused(query, key, value, attn_mask, is_causal, scale, folds):
    """SDPA on the fused op: (..., L, E) inputs folded to (B, H, L, E) and back (views where possible)."""
    B, Hq, Hk = folds
    lead, (L, S) = query.shape[:-2], (query.shape[-2], key.shape[-2])
    q = query.reshape(B, Hq, L, query.shape[-1])
    k = key.reshape(B, Hk, S, key.shape[-1])
    v = value.reshape(B, Hk, S, value.shape[-1])
    if attn_mask is not None and query.dim() != 4:  # 4-D: the op broadcasts the mask itself
        attn_mask = attn_mask.expand(*lead, L, S).reshape(B, Hq, L, S)
    out = attention(q, k, v, attn_mask=attn_mask, causal=bool(is_causal), scale=scale)
    return out.reshape(*lead, L, value.shape[-1])


def _has_tangent(*xs):
    return any(fwAD.unpack_dual(x).tangent is not None for x in xs)


def _warn_once(defer):
    if defer.warn and defer.key not in _warned:
        _warned.add(defer.key)
        warnings.warn(f"scm_fast.patch_sdpa: {defer}: this call (and later ones like it) runs PyTorch's "
                      "scaled_dot_product_attention (warned once)", UserWarning, stacklevel=4)


def _original():
    return _installed.get("original", _BUILTIN)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention on scm_fast's fused attention (scm_fast.patch)."""
    handle = _stack[-1] if _stack else None
    args, kwargs = (query, key, value, attn_mask, dropout_p, is_causal), dict(scale=scale, enable_gqa=enable_gqa)
    if handle is None:
        return _original()(*args, **kwargs)
    relevant = tuple(x for x in args[:4] if isinstance(x, torch.Tensor))
    if torch.overrides.has_torch_function(relevant):  # as the builtin: modes and subclasses see this function
        return torch.overrides.handle_torch_function(_PATCHED, relevant, *args, **kwargs)
    try:
        _check_scalars(dropout_p, is_causal, scale)
        _check_tensors(query, key, value)
        if handle.jvp_only and not _has_tangent(query, key, value):
            return _original()(*args, **kwargs)
        dtype = _autocast_dtype(query)
        q, k, v, mask = (_cast(x, dtype) for x in (query, key, value, attn_mask))
        _check_dtypes(q, k, v)
        folds = _check_shapes(q, k, v, bool(enable_gqa))
        _check_mask(mask, q, k, is_causal)
        _check_transforms()
    except _Defer as defer:
        _warn_once(defer)
        return _original()(*args, **kwargs)
    if dtype is None:
        return _fused(q, k, v, mask, is_causal, scale, folds)
    with torch.autocast(query.device.type, enabled=False):
        return _fused(q, k, v, mask, is_causal, scale, folds)


# Kept out of torch.compile graphs: inside one, PyTorch drops the fused op's custom jvp.
_PATCHED = torch.compiler.disable(_sdpa)
_PATCHED.__name__ = _PATCHED.__qualname__ = _NAME


# ---- installing and removing -----------------------------------------------------------------
def _resolve(module):
    if isinstance(module, str):
        return importlib.import_module(module)
    if not isinstance(module, types.ModuleType):
        raise TypeError(f"modules must hold modules or module names, got {type(module).__name__}")
    return module


def _install():
    current = getattr(F, _NAME)
    if current is not _PATCHED:
        _installed["original"] = current
        setattr(F, _NAME, _PATCHED)


def _uninstall():
    original = _installed.pop("original", _BUILTIN)
    if getattr(F, _NAME) is _PATCHED:
        setattr(F, _NAME, original)
    else:
        warnings.warn("scm_fast.unpatch_sdpa: torch.nn.functional.scaled_dot_product_attention was replaced "
                      "by other code after scm_fast patched it; leaving that replacement in place", UserWarning,
                      stacklevel=3)


def _rebind(module):
    """Point module's attributes that are PyTorch's SDPA at the patched one; [(key)] of what it holds."""
    keys, originals = [], (_BUILTIN, _installed.get("original", _BUILTIN))
    for name, value in list(vars(module).items()):
        key = (id(module), name)
        if key in _rebound and value is _PATCHED:  # rebound by another active patch
            _rebound[key][3] += 1
        elif any(value is o for o in originals):
            _rebound[key] = [module, name, value, 1]
            setattr(module, name, _PATCHED)
        else:
            continue
        keys.append(key)
    return keys


def _release(key):
    entry = _rebound[key]
    entry[3] -= 1
    if entry[3] == 0:
        module, name, value, _ = _rebound.pop(key)
        if getattr(module, name, None) is _PATCHED:
            setattr(module, name, value)


class SDPAPatch:
    """An active patch (what `patch_sdpa` returns): a context manager; `remove()` undoes it."""

    def __init__(self, jvp_only=False, modules=()):
        self.jvp_only = bool(jvp_only)
        self._modules = [_resolve(m) for m in modules]
        self._keys = []  # the module attributes this patch holds rebound
        self.active = False

    def _apply(self):
        with _lock:
            _install()
            for module in self._modules:
                self._keys += _rebind(module)
            _stack.append(self)
            self.active = True
        return self

    def remove(self):
        """Undo this patch (SDPA stays patched while another patch is active). Idempotent."""
        with _lock:
            if not self.active:
                return
            self.active = False
            _stack.remove(self)
            for key in self._keys:
                _release(key)
            self._keys.clear()
            if not _stack:
                _uninstall()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        state = "active" if self.active else "removed"
        return f"SDPAPatch({state}, jvp_only={self.jvp_only}, modules={[m.__name__ for m in self._modules]})"


def patch_sdpa(*, jvp_only=False, modules=()):
    """Route torch.nn.functional.scaled_dot_product_attention to scm_fast's fused attention, now.

    Returns an SDPAPatch: `with patch_sdpa(): ...` restores the previous SDPA on exit; called on its
    own it is a global switch until `.remove()` or `unpatch_sdpa()`. Patches nest; the latest active
    one's options apply.
    jvp_only: use the fused op only for calls whose query, key or value carries a forward-AD tangent
        (torch.func.jvp, torch.autograd.forward_ad); other calls keep PyTorch's kernels (e.g. flash on
        a GPU for the teacher's no-grad forward). Default False: every supported call is fused, so a
        model computes the same primal with and without tangents.
    modules: modules (or their names) that bound SDPA to a name of their own, e.g. by
        `from torch.nn.functional import scaled_dot_product_attention`; every attribute of theirs that
        is PyTorch's SDPA is rebound while this patch is active.
    """
    return SDPAPatch(jvp_only, modules)._apply()


def unpatch_sdpa():
    """Remove every patch_sdpa patch and restore the SDPA found before the first."""
    with _lock:
        for handle in list(reversed(_stack)):
            handle.remove()


def sdpa_patched():
    """True while torch.nn.functional.scaled_dot_product_attention is scm_fast's."""
    return getattr(F, _NAME) is _PATCHED


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
        acc = torch.float64 if scale.dtype == torch.float64 else torch.float32  # as the fused op computes
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
