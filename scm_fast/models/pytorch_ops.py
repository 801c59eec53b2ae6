"""use_pytorch_ops: swap every scm_fast op and layer of a model for PyTorch's own, or back.

Each of scm_fast's layers picks its implementation from an `impl` attribute: "fused" (scm_fast's
op, the default) or PyTorch's: "sdpa" (F.scaled_dot_product_attention) for the attention modules,
"torch" (F.linear / F.conv2d / F.gelu / F.silu / F.rms_norm, the adaptive norm's composition) for
the others. The modules are found by duck typing, so that this file imports no network module:
every module whose class (or a base of it) defined in the scm_fast package has a string `impl`.
That covers scm_fast.nn's Linear, Conv2d, GELU, SiLU, RMSNorm, AdaptiveDoubleNorm and Attention,
the U-Net's UNetAttention and the modules scm_fast swaps into diffusers models (the double norms).
A class names its PyTorch implementation with a `pytorch_impl` class attribute if it is not
"torch" (nn.Attention, which has none, is known here).
"""
import torch

from scm_fast.nn import Attention

__all__ = ["FUSED", "pytorch_impl", "switchable", "use_pytorch_ops"]

FUSED = "fused"
_PYTORCH_IMPL = {Attention: "sdpa"}  # scm_fast classes without a `pytorch_impl` whose value is not "torch"


def _impl_owner(cls):
    """The class of cls's MRO that defines `impl` (None if none does)."""
    return next((c for c in cls.__mro__ if "impl" in vars(c)), None)


def switchable(module):
    """Whether `module` is one of scm_fast's layers with a fused and a PyTorch implementation."""
    owner = _impl_owner(type(module))
    if owner is None or not isinstance(vars(owner)["impl"], str):
        return False
    return owner.__module__ == "scm_fast" or owner.__module__.startswith("scm_fast.")


def pytorch_impl(module):
    """The `impl` value that makes a switchable module run PyTorch's own op."""
    value = getattr(type(module), "pytorch_impl", None)
    if value is not None:
        return value
    return next((v for cls, v in _PYTORCH_IMPL.items() if isinstance(module, cls)), "torch")


def use_pytorch_ops(model, enable=True):
    """Swap every scm_fast op and layer of `model` for PyTorch's own (SDPA, the norm's composition,
    nn.functional's linear / conv2d / gelu / silu / rms_norm), or back (enable=False: the fused ops).
    Returns `model`."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if switchable(m):
            m.impl = pytorch_impl(m) if enable else FUSED
    return model
