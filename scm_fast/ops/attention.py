"""Scaled dot-product attention that propagates tangents in one fused pass.

`attention(q, k, v)` has SDPA's layout (B, H, L, D) and semantics and is differentiable in reverse
mode and in forward mode (torch.func.jvp, torch.autograd.forward_ad). When its inputs carry
tangents, ONE kernel computes the output, its log-sum-exp and the output tangent
(scm-reference.md §7); the primal output keeps its autograd graph for a later backward, which uses
the saved lse. `attention_jvp` is the same pass for code that carries tangents explicitly.

Supported: fp32, fp16, bf16 (fp32 accumulation and statistics; fp64 on the reference backend), head
dims up to 256 (any, no padding by the caller), Lq != Lk, GQA/MQA (Hq a multiple of Hk), causal
(SDPA's top-left alignment), attn_mask bool (True = attend) or additive, broadcastable to
(B, Hq, Lq, Lk) and never materialised. The mask is a constant: it takes no gradient and no tangent.
block_mask (scm_fast.ops.attention_blocks): a BlockSparse, a flex_attention BlockMask or a mask_mod;
the kernels skip the tiles that meet no live block, in the forward, forward + JVP and backward.
causal is False, True or 'top_left' (SDPA's is_causal), or 'bottom_right' (key j visible to query i iff
j <= i + Lk - Lq, as flash-attn); scale a finite float or None (1 / sqrt(D)).

Rows that see no key (all masked, or Lk = 0) give 0 output, 0 tangent and 0 gradient for their q
(SDPA gives NaN). A masked key is -inf in the scores whatever q k^T is, so the output and tangent of
such a row are 0 even where its q, or a key the mask excludes, is NaN (gradients still carry such
NaNs through products with 0, as PyTorch's do: a NaN q makes dk NaN). Empty batches or queries
(B = 0, Lq = 0) give empty results; zero heads (Hq or Hk = 0) are refused (ValueError), as a GQA
group size is undefined there.

Precision: o, to and dv are as exact as attention_ref in the same dtype, also at extreme scales
(tau ~ 1e9: the row max and the exponent use the same rounded logits; the tangent sums are shifted by
ds at the row max, so they do not cancel). dq and dk come from FlashAttention-2's backward,
ds = p (dO V^T - rowsum(dO * O)): their absolute error grows like tau eps |dO| |v| |k|, which shows
where p is nearly one-hot and the exact gradient is ~0.

Derivatives (scm_fast.ops._transforms): first order fused; the gradient of the output tangent w.r.t.
q, k, v and their tangents (torch.func.grad of a loss on the tangent) by autograd through the
reference, and double backward through it; double backward of the primal, jvp of grad (Hessian-vector
products) and jvp of jvp raise a RuntimeError; attention_ref (plain PyTorch ops) differentiates to any
order.

`not_supported_reasons(q, k, v, ...)` lists why a call falls outside that (as xformers' ops do);
the op's own argument checks raise its first entry, and scm_fast.interop.sdpa reads the same list
to decide which SDPA calls the fused op runs.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as fwAD

from scm_fast.ops import _registry, _transforms
from scm_fast.ops.attention_blocks import BlockSparse, from_flex, from_mask_mod, is_flex_block_mask, positive_int
from scm_fast.ops.attention_ref import (attention_bwd_reference, attention_fwd_reference,
                                        attention_fwd_jvp_reference, attention_ref, causal_shift)
from scm_fast.precision import accumulation_dtype

__all__ = ["BlockSparse", "attention", "attention_jvp", "attention_ref", "not_supported_reasons"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


# ---- validation at the public API ------------------------------------------------------------
class Unsupported(NamedTuple):
    """One reason the fused op does not run a call: `key` (stable, for code), `message` (for people),
    `error` (the exception type `attention` raises with that message; None where the call is refused
    by the chosen backend's kernels rather than by the argument checks)."""
    key: str
    message: str
    error: Optional[type]


def _tensor_reasons(name, x, ndim=4):
    if not isinstance(x, torch.Tensor):
        return [Unsupported("type", f"{name} must be a torch.Tensor, got {type(x).__name__}", TypeError)]
    out = []
    if x.dim() != ndim:
        out.append(Unsupported("ndim", f"{name} must be {ndim}-D (B, H, L, D), got shape {tuple(x.shape)}", ValueError))
    if x.dtype not in _DTYPES:
        out.append(Unsupported("dtype", f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}",
                               TypeError))
    return out


def _qkv_reasons(q, k, v):
    out = [r for name, x in (("q", q), ("k", k), ("v", v)) for r in _tensor_reasons(name, x)]
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        return out
    if not (q.dtype == k.dtype == v.dtype):
        out.append(Unsupported("dtypes_differ", f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}",
                               TypeError))
    if not (q.device == k.device == v.device):
        out.append(Unsupported("devices_differ",
                               f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}", ValueError))
    if not (q.dim() == k.dim() == v.dim() == 4):
        return out
    (B, H, _, D), (Bk, Hk, Lk, Dk), (Bv, Hv, Lv, Dv) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        out.append(Unsupported("batch", f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                                        f"v {tuple(v.shape)}", ValueError))
    if (Hk, Lk) != (Hv, Lv):
        out.append(Unsupported("kv_length" if Lk != Lv else "kv_heads", f"k and v must have the same heads and "
                               f"length, got k {tuple(k.shape)}, v {tuple(v.shape)}", ValueError))
    if D != Dk:
        out.append(Unsupported("qk_head_dim", f"q and k head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}",
                               ValueError))
    if H == 0 or Hk == 0:
        out.append(Unsupported("heads", f"q and k/v must have at least one head, got q {tuple(q.shape)}, "
                                        f"k {tuple(k.shape)}", ValueError))
    elif H % Hk != 0:
        out.append(Unsupported("gqa", f"q heads ({H}) must be a multiple of k/v heads ({Hk}) for GQA/MQA, "
                                      f"got q {tuple(q.shape)}, k {tuple(k.shape)}", ValueError))
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        out.append(Unsupported("head_dim", f"head dims must be in [1, {MAX_HEAD_DIM}], got q/k {D}, v {Dv}",
                               ValueError))
    return out


def _tangent_reasons(primals, tangents):
    out = []
    for name, x, t in zip(("q", "k", "v"), primals, tangents):
        bad = _tensor_reasons("t" + name, t)
        out += [r._replace(key="tangent_" + r.key) for r in bad]
        if isinstance(t, torch.Tensor) and isinstance(x, torch.Tensor) and (
                t.shape != x.shape or t.dtype != x.dtype or t.device != x.device):
            out.append(Unsupported("tangent", f"t{name} must match {name}: expected {tuple(x.shape)} {x.dtype} on "
                                              f"{x.device}, got {tuple(t.shape)} {t.dtype} on {t.device}", ValueError))
    return out


def _mask_reasons(attn_mask, q, k):
    if attn_mask is None:
        return []
    if not isinstance(attn_mask, torch.Tensor):
        return [Unsupported("mask_type", f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}",
                            TypeError)]
    out = []
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        out.append(Unsupported("mask_dtype", f"attn_mask must be bool or floating point, got {attn_mask.dtype}",
                               TypeError))
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k)):
        return out  # the q/k reasons already say why; the mask is not compared with them
    if attn_mask.device != q.device:
        out.append(Unsupported("mask_device", f"attn_mask is on {attn_mask.device} but q is on {q.device}",
                               ValueError))
    if attn_mask.requires_grad or fwAD.unpack_dual(attn_mask).tangent is not None:
        out.append(Unsupported("mask_grad" if attn_mask.requires_grad else "mask_tangent",
                               "attn_mask is treated as a constant: it must not require grad or carry a tangent",
                               ValueError))
    full = _mask_shape(q, k)
    try:
        fits = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, full) == full
    except RuntimeError:
        fits = False
    if not fits:
        out.append(Unsupported("mask_shape", f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                                             f"(B, Hq, Lq, Lk) = {full}", ValueError))
    return out


def _scale_reasons(scale):
    if scale is None:
        return []
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return [Unsupported("scale", f"scale must be a float or None, got {scale!r}", TypeError)]
    if not math.isfinite(scale):
        return [Unsupported("scale", f"scale must be a float or None, got {scale!r}: it must be finite", TypeError)]
    return []


def _causal_reasons(causal):
    if isinstance(causal, bool) or (isinstance(causal, str) and causal in ("top_left", "bottom_right")):
        return []
    got = f"{type(causal).__name__} {causal!r}"
    return [Unsupported("causal", f"causal must be a bool, 'top_left' or 'bottom_right', got {got}", TypeError)]


def _block_mask_reasons(block_mask, q, k):
    """A BlockSparse, a flex_attention BlockMask or a mask_mod (attention_blocks), of q's and k's shape."""
    if block_mask is None:
        return []
    if is_flex_block_mask(block_mask):
        return _flex_reasons(block_mask, q, k)
    if callable(block_mask) and not isinstance(block_mask, (BlockSparse, torch.Tensor)):
        return []  # a mask_mod: create_block_mask raises on its own errors
    if not isinstance(block_mask, BlockSparse):
        return [Unsupported("block_mask_type", "block_mask must be a scm_fast.ops.BlockSparse, a flex_attention "
                            f"BlockMask or a mask_mod, got {type(block_mask).__name__}", TypeError)]
    blocks, bq, bk = block_mask
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool:
        return [Unsupported("block_mask_dtype", "block_mask.blocks must be a bool tensor, got "
                            f"{getattr(blocks, 'dtype', type(blocks).__name__)}", TypeError)]
    for name, size in (("block_q", bq), ("block_k", bk)):
        if not positive_int(size):
            return [Unsupported("block_size", f"block_mask.{name} must be a positive int, got {size!r}", ValueError)]
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k)):
        return []
    out = []
    if blocks.device != q.device:
        out.append(Unsupported("block_mask_device", f"block_mask.blocks is on {blocks.device} but q is on {q.device}",
                               ValueError))
    full = _blocks_shape(q, k, bq, bk)
    if blocks.dim() != 4 or any(n not in (1, f) for n, f in zip(blocks.shape[:2], full[:2])) or \
            tuple(blocks.shape[2:]) != full[2:]:
        out.append(Unsupported("block_mask_shape", f"block_mask.blocks of shape {tuple(blocks.shape)} must be "
                               f"(B or 1, Hq or 1, ceil(Lq / block_q), ceil(Lk / block_k)) = {full}", ValueError))
    return out


def _flex_reasons(block_mask, q, k):
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k)):
        return []
    lengths = (q.shape[2], k.shape[2])
    if tuple(block_mask.seq_lengths) != lengths:
        return [Unsupported("block_mask_shape", f"block_mask: the BlockMask is for (Lq, Lk) = "
                            f"{tuple(block_mask.seq_lengths)}, the call's is {lengths}", ValueError)]
    B, H = block_mask.kv_num_blocks.shape[:2]
    if B not in (1, q.shape[0]) or H not in (1, q.shape[1]):
        return [Unsupported("block_mask_shape", f"block_mask: the BlockMask's (B, H) = {(B, H)} does not broadcast "
                            f"to q's {tuple(q.shape[:2])}", ValueError)]
    if block_mask.kv_num_blocks.device != q.device:
        return [Unsupported("block_mask_device", f"block_mask: the BlockMask is on {block_mask.kv_num_blocks.device} "
                            f"but q is on {q.device}", ValueError)]
    return []


def _blocks_shape(q, k, bq, bk):
    return (q.shape[0], q.shape[1], -(-q.shape[2] // bq), -(-k.shape[2] // bk))


def _backend_reasons(q):
    """What the chosen backend's kernels refuse (raised by the dispatcher when the op runs)."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float64:
        return []
    name, device = _registry.backend(), q.device.type
    if (device == "cuda" and name != "reference") or (device == "cpu" and name in ("triton", "cpp")):
        return [Unsupported("backend", f"float64 runs on the reference backend only (the {name} backend's kernels "
                                       f"run float16, bfloat16, float32 on {device})", None)]
    return []


def unsupported(q, k, v, attn_mask=None, causal=False, scale=None, *, tangents=None, block_mask=None):
    """Every reason `attention` (with `tangents`: `attention_jvp`) does not run this call, as
    Unsupported(key, message, error), in the order the op checks them; [] when it runs it.
    `not_supported_reasons` is its text."""
    out = _qkv_reasons(q, k, v)
    if tangents is not None:
        out += _tangent_reasons((q, k, v), tangents)
    out += _mask_reasons(attn_mask, q, k) + _block_mask_reasons(block_mask, q, k)
    out += _scale_reasons(scale) + _causal_reasons(causal)
    return out + _backend_reasons(q)


def not_supported_reasons(q, k, v, attn_mask=None, causal=False, scale=None, *, tangents=None, block_mask=None):
    """Why the fused op cannot run attention(q, k, v, attn_mask=..., causal=..., scale=...) (with
    `tangents=(tq, tk, tv)`: attention_jvp), one human-readable string per problem; [] when it runs it.

    The op's own argument checks read this list: called anyway, `attention` raises the first
    entry's message (as TypeError or ValueError). Entries about the backend (float64 where the
    chosen backend's kernels run fp16/bf16/fp32 only) come last; those the dispatcher raises.
    Used by scm_fast.interop.sdpa to decide which SDPA calls the fused op runs.
    """
    return [r.message for r in unsupported(q, k, v, attn_mask, causal, scale, tangents=tangents,
                                           block_mask=block_mask)]


def _validate(q, k, v, attn_mask, causal, scale, tangents=None, block_mask=None):
    """Raise the first argument problem (the dispatcher raises the backend's own refusals)."""
    for reason in unsupported(q, k, v, attn_mask, causal, scale, tangents=tangents, block_mask=block_mask):
        if reason.error is not None:
            raise reason.error(reason.message)


def _mask_shape(q, k):
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _prepare_mask(attn_mask, q, k):
    """A validated mask expanded (a view, no copy) to (B, Hq, Lq, Lk), or None."""
    if attn_mask is None:
        return None
    if attn_mask.is_floating_point():  # kernels read fp32 biases; convert before expanding (no Lq x Lk copy)
        attn_mask = attn_mask.to(accumulation_dtype(q))
    return attn_mask.expand(_mask_shape(q, k))


def _scale_value(scale, q):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _with_keep(attn_mask, keep, q):
    """attn_mask restricted to a bool element mask `keep` (True = attend); an additive mask in the kernels'
    fp32 (one Lq x Lk copy, not two)."""
    if keep is None:
        return attn_mask
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return torch.where(keep, attn_mask.to(accumulation_dtype(q)), float("-inf"))


def _consts(q, k, attn_mask, block_mask, causal, scale):
    """The op's constant arguments (schema order): mask, blocks, block_q, block_k, causal, shift, scale."""
    blocks, bq, bk = None, 0, 0
    if block_mask is not None:
        keep = None
        if is_flex_block_mask(block_mask):
            block_mask, keep = from_flex(block_mask)
        elif not isinstance(block_mask, BlockSparse):  # a mask_mod
            block_mask, keep = from_mask_mod(block_mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
        attn_mask = _with_keep(attn_mask, keep, q)
        blocks, bq, bk = block_mask
        bq, bk = int(bq), int(bk)
        blocks = blocks.expand(_blocks_shape(q, k, bq, bk))
    is_causal, shift = causal_shift(causal, q.shape[-2], k.shape[-2])
    return _prepare_mask(attn_mask, q, k), blocks, bq, bk, is_causal, shift, _scale_value(scale, q)


# ---- kernels behind the dispatcher -----------------------------------------------------------
def _kernels(q):
    """The Triton launchers (imported on first use), for fp32/fp16/bf16 inputs."""
    if q.dtype == torch.float64:
        raise TypeError("float64 attention runs on the reference backend only")
    from scm_fast.kernels import attention as kernels
    return kernels


# The ops' constant arguments after the tensors, in schema order (csrc/attention.cpp):
#   mask, blocks, block_q, block_k, causal, causal_shift, scale
def _triton_fwd(q, k, v, *consts):
    return _kernels(q).attention_fwd(q, k, v, *consts)


def _triton_fwd_jvp(q, k, v, tq, tk, tv, *consts):
    return _kernels(q).attention_fwd(q, k, v, *consts, tq, tk, tv)


def _triton_bwd(grad_out, q, k, v, out, lse, *consts):
    return _kernels(q).attention_bwd(grad_out, q, k, v, out, lse, *consts)


def _lse_like(q):
    dtype = accumulation_dtype(q)
    return q.new_empty(q.shape[:-1], dtype=dtype)


def _fake_fwd(q, k, v, *consts):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), _lse_like(q)


def _fake_fwd_jvp(q, k, v, tq, tk, tv, *consts):
    o, lse = _fake_fwd(q, k, v)
    return o, lse, torch.empty_like(o)


def _fake_bwd(grad_out, q, k, v, out, lse, *consts):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_registry.define("attention_fwd", attention_fwd_reference, _triton_fwd, _fake_fwd)
_registry.define("attention_fwd_jvp", attention_fwd_jvp_reference, _triton_fwd_jvp, _fake_fwd_jvp)
_registry.define("attention_bwd", attention_bwd_reference, _triton_bwd, _fake_bwd)


# ---- autograd --------------------------------------------------------------------------------
def _backward(ctx, grad_out):
    _transforms.check_backward(ctx.uses, grad_out)
    q, k, v, o, lse = ctx.saved_tensors
    with torch.no_grad():  # first order only (_transforms.first_order)
        grads = _registry.call("attention_bwd", grad_out.contiguous(), q, k, v, o, lse, *ctx.consts)
    return _transforms.first_order(ctx.uses, grads, (grad_out, q, k, v))


class _Attention(torch.autograd.Function):
    """(o, lse) of (q, k, v). Used when no input carries a tangent; its jvp is still exact."""

    @staticmethod
    def forward(q, k, v, consts, uses):
        return _registry.call("attention_fwd", q, k, v, *consts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, consts, uses = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        # q, k, v not detached (they carry no tangent here): a gradient of the backward must reach their
        # graph (_transforms.first_order)
        ctx.save_for_backward(q, k, v, o.detach(), lse)
        ctx.save_for_forward(q, k, v)
        ctx.consts, ctx.uses = consts, uses

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        return *_backward(ctx, grad_out), None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        _transforms.check_jvp(ctx.uses, (tq, tk, tv))
        q, k, v = ctx.saved_tensors
        tq, tk, tv = _transforms.zeros_for_none((q, k, v), (tq, tk, tv))
        with torch.no_grad():  # the kernel has no autograd; _differentiable_tangent gives to its gradient
            _, _, to = _registry.call("attention_fwd_jvp", q, k, v, tq, tk, tv, *ctx.consts)
        return _differentiable_tangent(ctx, to, q, k, v, tq, tk, tv), None


class _AttentionFused(torch.autograd.Function):
    """(o, lse, to) of (q, k, v, tq, tk, tv) in one kernel launch. `to` has no graph here (jvp and
    attention_jvp give the tangent one: _transforms.differentiable_tangent).

    With `tangents_of_inputs` the caller guarantees that (tq, tk, tv) ARE the forward-AD tangents of
    (q, k, v), so jvp returns the `to` already computed: one pass instead of two.
    """

    @staticmethod
    def forward(q, k, v, tq, tk, tv, consts, tangents_of_inputs, uses):
        return _registry.call("attention_fwd_jvp", q, k, v, tq, tk, tv, *consts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, consts, tangents_of_inputs, uses = inputs
        o, lse, to = output
        ctx.mark_non_differentiable(lse, to)
        ctx.save_for_backward(*(t.detach() for t in (q, k, v, o, lse)))  # no saved tangents
        if tangents_of_inputs:
            ctx.save_for_forward(to, q, k, v)
        else:
            ctx.save_for_forward(q, k, v)
        ctx.consts, ctx.fused, ctx.uses = consts, tangents_of_inputs, uses
        ctx.set_materialize_grads(False)  # no zero tangents for tq, tk, tv (a full-size fill each)

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_to):
        if grad_out is None:
            return (None,) * 9
        return *_backward(ctx, grad_out), *(None,) * 6

    @staticmethod
    def jvp(ctx, gq, gk, gv, *_):
        _transforms.check_jvp(ctx.uses, (gq, gk, gv))
        if gq is None and gk is None and gv is None:
            return None, None, None
        if ctx.fused:
            to, q, k, v = ctx.saved_tensors
        else:  # an outer forward AD over explicit-tangent code: the JVP along (gq, gk, gv)
            q, k, v = ctx.saved_tensors
        gq, gk, gv = _transforms.zeros_for_none((q, k, v), (gq, gk, gv))
        if not ctx.fused:
            with torch.no_grad():  # as in _Attention.jvp
                _, _, to = _registry.call("attention_fwd_jvp", q, k, v, gq, gk, gv, *ctx.consts)
        return _differentiable_tangent(ctx, to, q, k, v, gq, gk, gv), None, None


def _tangent_reference(consts):
    def reference(q, k, v, tq, tk, tv):
        return attention_fwd_jvp_reference(q, k, v, tq, tk, tv, *consts)[2]
    return reference


def _differentiable_tangent(ctx, to, *inputs):
    """`to` as the forward-AD tangent, differentiable w.r.t. q, k, v and their tangents by autograd
    through the reference (_transforms.differentiable_tangent)."""
    reference = _tangent_reference(ctx.consts)
    return _transforms.differentiable_tangent(to, reference, inputs)


# ---- public API ------------------------------------------------------------------------------
def _tangent_or_zeros(x):
    t = fwAD.unpack_dual(x).tangent
    return torch.zeros_like(x) if t is None else t


@torch.compiler.disable  # torch.compile drops a custom jvp (pytorch 192985): keep the op eager
def attention(q, k, v, *, attn_mask=None, causal=False, scale=None, block_mask=None):
    """softmax(scale q k^T + attn_mask) v, like F.scaled_dot_product_attention (B, H, L, D).
    causal: False, True / "top_left" (SDPA's is_causal) or "bottom_right" (the last query sees
    every key; attention_ref.causal_shift).
    block_mask: None, a BlockSparse, a flex_attention BlockMask or a mask_mod (attention_blocks):
    tiles that meet no live block are skipped; keys outside the live blocks are masked.

    Under torch.func.jvp or torch.autograd.forward_ad the output tangent comes from the same fused
    pass as the output (no second forward). Example:
        o, to = torch.func.jvp(lambda q, k, v: attention(q, k, v), (q, k, v), (tq, tk, tv))
    """
    _validate(q, k, v, attn_mask, causal, scale, block_mask=block_mask)
    _transforms.check_call("attention", (q, k, v))
    consts = _consts(q, k, attn_mask, block_mask, causal, scale)
    uses = _transforms.Uses("attention")
    if _transforms.has_tangent(q, k, v):
        tangents = [_tangent_or_zeros(x) for x in (q, k, v)]
        o, _, _ = _AttentionFused.apply(q, k, v, *tangents, consts, True, uses)
        return o
    o, _ = _Attention.apply(q, k, v, consts, uses)
    return o


@torch.compiler.disable  # torch.compile drops a custom jvp (pytorch 192985): keep the op eager
def attention_jvp(q, k, v, tq, tk, tv, *, attn_mask=None, causal=False, scale=None, block_mask=None):
    """(o, to): the attention output and its tangent along (tq, tk, tv), in one fused pass.

    o is differentiable w.r.t. q, k, v (the fused backward); to w.r.t. q, k, v, tq, tk, tv (second
    order: autograd through the reference, _transforms.differentiable_tangent; sCM detaches it, sg(.)).
    """
    _validate(q, k, v, attn_mask, causal, scale, tangents=(tq, tk, tv), block_mask=block_mask)
    _transforms.check_call("attention", (q, k, v, tq, tk, tv))
    consts = _consts(q, k, attn_mask, block_mask, causal, scale)
    uses = _transforms.Uses("attention")
    o, _, to = _AttentionFused.apply(q, k, v, tq, tk, tv, consts, False, uses)
    reference = _tangent_reference(consts)
    return o, _transforms.differentiable_tangent(to, reference, (q, k, v, tq, tk, tv))
