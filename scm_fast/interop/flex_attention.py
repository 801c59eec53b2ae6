"""flex_attention with a BlockMask on scm_fast's block-sparse fused attention, installed by `patch_sdpa`.

PyTorch's flex_attention has no forward-mode rule, so a model that builds a BlockMask (diffusers'
"flex" attention backend, video models' sparse attention) cannot run under torch.func.jvp. While
patch_sdpa is active, `torch.nn.attention.flex_attention.flex_attention` (the module attribute that
diffusers' dispatcher calls) runs `scm_fast.ops.attention(q, k, v, block_mask=block_mask, scale=scale)`:
the BlockMask's full and partial blocks become the op's block mask (dead tiles skipped) and, inside
partial blocks, its mask_mod an element mask (scm_fast.ops.attention_blocks; Lq x Lk bytes per
(batch, head) the BlockMask names, none when its mask_mod is noop_mask). That is what flex_attention's
compiled kernel attends (full blocks: every key; partial blocks: where the mask_mod allows); its eager
path evaluates the mask_mod alone. The two agree for BlockMasks made by create_block_mask.

Calls the fused op cannot express go to PyTorch's flex_attention with a one-time warning: a score_mod
(diffusers passes additive masks as one), return_lse / return_aux, dropout-free but non-4-D or
subclass inputs, GQA without enable_gqa (flex raises), and what the op's own list refuses
(scm_fast.ops.attention.not_supported_reasons). kernel_options tune flex's Triton kernels and are
ignored. With patch_sdpa(jvp_only=True) only calls whose inputs carry a tangent are fused.
"""
import functools

import torch

from scm_fast.ops import _transforms
from scm_fast.ops.attention import attention, unsupported

MODULE = "torch.nn.attention.flex_attention"
NAME = "flex_attention"


@functools.cache
def builtin():
    """PyTorch's flex_attention, as found on first use (before any patch: its module is imported then)."""
    from torch.nn.attention import flex_attention as module
    return module.flex_attention


def _decide(sdpa, query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, return_aux):
    """Raise sdpa._Defer for a call the fused op does not run."""
    if score_mod is not None:
        raise sdpa._Defer("flex_score_mod", "flex_attention with a score_mod (the fused op takes masks only)")
    if return_lse or return_aux is not None:
        raise sdpa._Defer("flex_lse", "flex_attention with return_lse / return_aux")
    qkv = (query, key, value)
    if not all(type(x) in (torch.Tensor, torch.nn.Parameter) and x.dim() == 4 for x in qkv):
        raise sdpa._Defer("flex_inputs", "flex_attention inputs that are not plain 4-D tensors")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise sdpa._Defer("flex_gqa", "query and key heads differ without enable_gqa", warn=False)
    for reason in unsupported(query, key, value, scale=scale, block_mask=block_mask):
        raise sdpa._Defer(reason.key, reason.message)
    sdpa._check_transforms()


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None, *, return_aux=None):
    """torch.nn.attention.flex_attention.flex_attention on scm_fast's fused attention (module docstring)."""
    from scm_fast.interop import sdpa  # the patch's state (sdpa imports this module)
    handle = sdpa._stack[-1] if sdpa._stack else None
    original = sdpa._installed.get(NAME, builtin())
    args = (query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options)
    kwargs = {} if return_aux is None else dict(return_aux=return_aux)
    if handle is None or handle.jvp_only and not _transforms.has_tangent(query, key, value):
        return original(*args, **kwargs)
    try:
        _decide(sdpa, query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, return_aux)
    except sdpa._Defer as defer:
        sdpa._warn_once(defer)
        return original(*args, **kwargs)
    return attention(query, key, value, scale=scale, block_mask=block_mask)


PATCHED = torch.compiler.disable(flex_attention)  # as the patched SDPA: eager, so the custom jvp is kept
PATCHED.__name__ = PATCHED.__qualname__ = NAME
