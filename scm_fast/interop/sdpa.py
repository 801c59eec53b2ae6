"""`patch_sdpa`: PyTorch's scaled_dot_product_attention routed to scm_fast's fused attention.

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

While patched, `torch.nn.attention.flex_attention.flex_attention` (diffusers' "flex" backend calls
it there) runs the block-sparse fused attention too: scm_fast.interop.flex_attention.

Same arguments and results as SDPA, forward AD and backward. Calls the fused op cannot run exactly
go to PyTorch's own SDPA with a one-time warning naming the reason: dropout_p > 0, an attn_mask that
requires grad or carries a tangent, query/key/value leading dims that broadcast instead of matching
(beyond GQA), dtypes other than fp16/bf16/fp32/fp64 (fp64 on CUDA, or on CPU with the triton or cpp
backend: the reference backend only), devices other than CPU/CUDA, head dims > 256, nested tensors
or tensor subclasses, torch.func.vmap/functionalize. Calls that PyTorch rejects or
defines per backend (is_causal together with attn_mask: MATH raises, CPU flash combines them;
mismatched dtypes; a mask wider than the output) go there silently: its answer or error is yours.
Fully masked rows: a query row whose keys are all masked gives 0 output and 0 tangent (PyTorch
2.13's CPU SDPA gives 0 as well; some backends and older versions give NaN, not a result to keep).

How a call is decided: the SDPA-only questions (dropout, nested/subclass tensors, any-rank leading
dims and GQA broadcasting, SDPA's mask rules, devices, torch.func transforms) are answered here;
everything the fused op checks itself comes from its one list,
`scm_fast.ops.attention.not_supported_reasons`, asked about the call folded to its (B, H, L, D)
layout. Both are read in one fixed order (scalars, tensors, dtypes and devices, shapes, mask,
transforms); a call with several problems falls back on the first, silently if PyTorch rejects it.

Like the builtin, the patched function speaks __torch_function__: TorchFunctionModes and tensor
subclasses that handle `torch.nn.functional.scaled_dot_product_attention` (CausalBias masks,
diffusers' layer-skip mode, `with torch.device(...)`) see its calls.

torch.compile: PyTorch drops a custom autograd.Function `jvp` inside a compiled graph (silently
wrong tangents when torch.func.jvp is traced). The patched SDPA is therefore compiler-disabled: it
runs eagerly, a graph break in the compiled model (`fullgraph=True` raises there).
"""
import importlib
import math
import threading
import types
import warnings

import torch
import torch.nn.functional as F

from scm_fast.interop import flex_attention, group_norm, linear
from scm_fast.ops import _registry, _transforms
from scm_fast.ops.attention import MAX_HEAD_DIM, attention, unsupported

__all__ = ["SDPAPatch", "patch_sdpa", "sdpa_patched", "unpatch_sdpa"]

_FUSED_DEVICES = ("cpu", "cuda")
_NAME = "scaled_dot_product_attention"
_BUILTIN = torch._C._nn.scaled_dot_product_attention

_lock = threading.RLock()
_stack = []            # active SDPAPatch handles, the latest last; its options rule
_installed = {}        # {function name: what torch.nn.functional held when the patch went in}
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


def _check_scalars(dropout_p, is_causal):
    """SDPA's own scalars (the op has no dropout; `scale` is the op's to check)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise _Defer("dropout_type", "dropout_p is not a float", warn=False)
    if dropout_p != 0:
        raise _Defer("dropout", f"dropout_p={dropout_p} > 0 (the fused op has no dropout)")
    if not isinstance(is_causal, (bool, int)):
        raise _Defer("causal_type", "is_causal is not a bool", warn=False)


def _check_tensors(query, key, value):
    """What folding SDPA's any-rank inputs needs: plain tensors of at least 2 dims."""
    qkv = (query, key, value)
    if not all(isinstance(x, torch.Tensor) for x in qkv):
        raise _Defer("type", "query, key and value must be tensors", warn=False)
    if any(x.is_nested for x in qkv):
        raise _Defer("nested", "nested tensors")
    if not all(_is_plain(x) for x in qkv):
        raise _Defer("subclass", f"tensor subclass {type(next(x for x in qkv if not _is_plain(x))).__name__}")
    if min(x.dim() for x in qkv) < 2:
        raise _Defer("ndim", "query, key and value must be at least 2-D", warn=False)


def _fold(x):
    """(..., H, L, E) -> (B, H, L, E), B the product of the other leading dims (1 or H = 1 where there
    are none); a view where possible. For query, key, value that pass _check_shapes, the op's layout."""
    lead = x.shape[:-2]
    return x.reshape(math.prod(lead[:-1]), lead[-1] if lead else 1, *x.shape[-2:])


def _op_reasons(query, key, value, attn_mask, is_causal, scale):
    """The fused op's own list (scm_fast.ops.attention.not_supported_reasons), first reason per key,
    about the call folded to its (B, H, L, E) layout; the mask as given (see _check_mask)."""
    reasons = {}
    for reason in unsupported(_fold(query), _fold(key), _fold(value), attn_mask, is_causal, scale):
        reasons.setdefault(reason.key, reason)
    return reasons


def _rejected(op, *keys):
    """Defer silently on the op's reasons that PyTorch's SDPA rejects or defines itself."""
    for key in keys:
        if key in op:
            raise _Defer(key, op.pop(key).message, warn=False)
    for key in keys:
        op.pop(key, None)


def _unsupported(op, key, message):
    """Defer with a warning on one of the op's reasons: a call SDPA runs and the fused op cannot."""
    if op.pop(key, None) is not None:
        raise _Defer(key, message)


def _check_dtypes(op, query):
    _rejected(op, "dtypes_differ", "devices_differ")
    if "dtype" in op and not query.dtype.is_floating_point:
        _rejected(op, "dtype")
    _unsupported(op, "dtype", f"dtype {query.dtype} (the fused op runs fp16, bf16, fp32, fp64)")
    if query.device.type not in _FUSED_DEVICES:
        raise _Defer("device", f"device {query.device} (the fused op runs on CPU and CUDA)")
    if query.device.type == "cuda":
        _unsupported(op, "backend", "float64 on CUDA (the Triton kernels run fp16, bf16, fp32; "
                                    "scm_fast.ops.use_backend('reference') runs fp64)")
    _unsupported(op, "backend", f"float64 on {query.device.type} with the {_registry.backend()} backend (its "
                                "kernels run fp16, bf16, fp32; scm_fast.ops.use_backend('reference') runs fp64)")


def _check_shapes(op, query, key, value, enable_gqa):
    """(B, Hq, Hk): how SDPA's leading dims fold into the fused op's (B, H) layout."""
    _rejected(op, "qk_head_dim", "kv_length")
    E, Ev = query.shape[-1], value.shape[-1]
    _unsupported(op, "head_dim", f"head dims {E} (query/key), {Ev} (value) outside [1, {MAX_HEAD_DIM}]")
    lq, lk, lv = query.shape[:-2], key.shape[:-2], value.shape[:-2]
    same = lq == lk == lv
    gqa = (enable_gqa and len(lq) >= 1 and lk == lv and lq[:-1] == lk[:-1] and lk[-1] >= 1
           and lq[-1] % lk[-1] == 0)
    if not (same or gqa):
        raise _Defer("broadcast", f"leading dims of query {tuple(lq)}, key {tuple(lk)}, value {tuple(lv)} "
                                  f"broadcast (only equal dims, or GQA with enable_gqa=True, are fused)")
    for layout in ("batch", "kv_heads", "gqa"):  # the op's view of what the rule above decides for SDPA
        op.pop(layout, None)
    if query.numel() == 0 or key.numel() == 0:
        raise _Defer("empty", "empty tensors", warn=False)
    return math.prod(lq[:-1]), (lq[-1] if lq else 1), (lk[-1] if lk else 1)


def _check_mask(op, attn_mask, query, key, is_causal, folds):
    """SDPA's mask rules and the op's; the mask folded like query (4-D query: as it is, the op
    broadcasts it)."""
    if attn_mask is None:
        return None
    if is_causal:
        raise _Defer("causal_mask", "is_causal with attn_mask", warn=False)
    _rejected(op, "mask_type")
    if not _is_plain(attn_mask):  # e.g. torch.nn.attention.bias.CausalBias, which PyTorch dispatches itself
        raise _Defer("mask_subclass", f"attn_mask of type {type(attn_mask).__name__}")
    if attn_mask.is_floating_point() and attn_mask.dtype not in (torch.float32, query.dtype):
        raise _Defer("mask_dtype", "attn_mask dtype (SDPA takes bool, float32 or query's dtype)", warn=False)
    _rejected(op, "mask_dtype", "mask_device")
    _unsupported(op, "mask_grad", "attn_mask requires grad (the fused op's mask is a constant)")
    _unsupported(op, "mask_tangent", "attn_mask carries a forward-AD tangent (the fused op's mask is a constant)")
    if query.dim() == 4:
        _rejected(op, "mask_shape")
        return attn_mask
    op.pop("mask_shape", None)  # the op compared the unfolded mask with the folded query: SDPA's rule here
    full = (*query.shape[:-1], key.shape[-2])
    try:
        fits = torch.broadcast_shapes(attn_mask.shape, full) == full
    except RuntimeError:
        fits = False
    if not fits:
        raise _Defer("mask_shape", f"attn_mask {tuple(attn_mask.shape)} does not broadcast to {full}", warn=False)
    B, Hq, _ = folds
    return attn_mask.expand(full).reshape(B, Hq, *full[-2:])


def _check_transforms():
    """torch.func.vmap / functionalize have no rule in the fused op's autograd.Function."""
    try:
        stack = torch._C._functorch.get_interpreter_stack() or []
    except AttributeError:  # an older or newer torch without this introspection
        return
    allowed = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    if any(level.key() not in allowed for level in stack):
        raise _Defer("transform", "a torch.func transform other than grad/jvp (e.g. vmap, jacfwd)")


def _decide(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    """The folded (q, k, v, mask) the fused op runs, or _Defer: in the order the route always asked
    (dtypes, devices, shapes, mask, transforms), each of the op's own questions answered by its list."""
    op = _op_reasons(query, key, value, attn_mask, is_causal, scale)
    _rejected(op, "scale")
    _check_dtypes(op, query)
    B, Hq, Hk = _check_shapes(op, query, key, value, enable_gqa)
    mask = _check_mask(op, attn_mask, query, key, is_causal, (B, Hq, Hk))
    _check_transforms()
    if op:  # a reason of the op's that this route does not know: it cannot run the call
        reason = next(iter(op.values()))
        raise _Defer(reason.key, reason.message)
    return _fold(query), _fold(key), _fold(value), mask


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
def _fused(query, folded, is_causal, scale):
    """SDPA on the fused op: the folded (B, H, L, E) call, unfolded to query's leading dims."""
    q, k, v, mask = folded
    out = attention(q, k, v, attn_mask=mask, causal=bool(is_causal), scale=scale)
    return out.reshape(*query.shape[:-1], v.shape[-1])


def _warn_once(defer):
    if defer.warn and defer.key not in _warned:
        _warned.add(defer.key)
        warnings.warn(f"scm_fast.patch_sdpa: {defer}: this call (and later ones like it) runs PyTorch's "
                      "scaled_dot_product_attention (warned once)", UserWarning, stacklevel=4)


def _original():
    return _installed.get(_NAME, _BUILTIN)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention on scm_fast's fused attention (scm_fast.interop.sdpa)."""
    handle = _stack[-1] if _stack else None
    args, kwargs = (query, key, value, attn_mask, dropout_p, is_causal), dict(scale=scale, enable_gqa=enable_gqa)
    if handle is None:
        return _original()(*args, **kwargs)
    relevant = tuple(x for x in args[:4] if isinstance(x, torch.Tensor))
    if torch.overrides.has_torch_function(relevant):  # as the builtin: modes and subclasses see this function
        return torch.overrides.handle_torch_function(_PATCHED, relevant, *args, **kwargs)
    try:
        _check_scalars(dropout_p, is_causal)
        _check_tensors(query, key, value)
        if handle.jvp_only and not _transforms.has_tangent(query, key, value):
            return _original()(*args, **kwargs)
        dtype = _autocast_dtype(query)
        q, k, v, mask = (_cast(x, dtype) for x in (query, key, value, attn_mask))
        folded = _decide(q, k, v, mask, is_causal, scale, bool(enable_gqa))
    except _Defer as defer:
        _warn_once(defer)
        return _original()(*args, **kwargs)
    if dtype is None:
        return _fused(q, folded, is_causal, scale)
    with torch.autocast(query.device.type, enabled=False):
        return _fused(q, folded, is_causal, scale)


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


def _functions():
    """{name: (module, scm_fast's replacement, PyTorch's)}: in torch.nn.functional the attention, the
    tangent-safe group norm (scm_fast.interop.group_norm) that GroupNorm UNets need under jvp and the
    linear without a tangent graph in sCM's one pass (scm_fast.interop.linear); flex_attention on the
    block-sparse fused attention (scm_fast.interop.flex_attention)."""
    flex = importlib.import_module(flex_attention.MODULE)
    return {_NAME: (F, _PATCHED, _BUILTIN), "group_norm": (F, group_norm.group_norm, group_norm.BUILTIN),
            "linear": (F, linear.linear, linear.BUILTIN),
            flex_attention.NAME: (flex, flex_attention.PATCHED, flex_attention.builtin())}


def _install():
    for name, (module, patched, _) in _functions().items():
        current = getattr(module, name)
        if current is not patched:
            _installed[name] = current
            setattr(module, name, patched)


def _uninstall():
    for name, (module, patched, builtin) in _functions().items():
        original = _installed.pop(name, builtin)
        if getattr(module, name) is patched:
            setattr(module, name, original)
        else:
            warnings.warn(f"scm_fast.unpatch_sdpa: {module.__name__}.{name} was replaced by other code after "
                          "scm_fast patched it; leaving that replacement in place", UserWarning, stacklevel=3)


def _rebind(module):
    """Point module's attributes that are PyTorch's SDPA at the patched one; [(key)] of what it holds."""
    keys, originals = [], (_BUILTIN, _installed.get(_NAME, _BUILTIN))
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
    """Route torch.nn.functional.scaled_dot_product_attention to scm_fast's fused attention, now, and
    torch.nn.functional.group_norm (so nn.GroupNorm) to a tangent-safe one under forward AD
    (scm_fast.interop.group_norm: non-contiguous inputs, bf16 under autocast; calls without a tangent
    run PyTorch's), torch.nn.functional.linear to one without a tangent graph inside
    scm_fast.ops.constant_tangents (scm_fast.interop.linear; sCM's one pass), and
    torch.nn.attention.flex_attention.flex_attention to the block-sparse fused attention
    (scm_fast.interop.flex_attention: BlockMask models under torch.func.jvp).

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
