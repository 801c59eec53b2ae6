"""A tangent-safe torch.nn.functional.group_norm, installed by `patch_sdpa` beside the attention.

PyTorch's forward-AD rule for group_norm fails two ways that stop sCM on GroupNorm models:
  - on a non-contiguous input ("view size is not compatible with input tensor's size and stride"):
    diffusers' UNet2DModel feeds its GroupNorms the channels-last view AttnProcessor2_0 returns;
  - under CPU autocast a bf16 input gives a bf16 output with an fp32 tangent, which the next Conv2d
    rejects (every GroupNorm -> Conv UNet in bf16, UNet2DCondition's ResNet blocks).
`group_norm` below runs, when an input carries a tangent, PyTorch's own group_norm on a contiguous
fp32 copy (fp64 stays fp64) with autocast off (the statistics in fp32, as autocast computes norms), and returns output
and tangent in the dtype PyTorch gives the output: the input's, or fp32 where autocast casts group
norm to fp32 (CUDA). Calls without a tangent go to PyTorch unchanged.
"""
import torch

from scm_fast.ops._transforms import has_tangent

BUILTIN = torch.nn.functional.group_norm
_AUTOCAST_FP32 = ("cuda",)  # device types whose autocast runs group_norm in fp32 (CPU's keeps the input dtype)


def _output_dtype(x):
    device = x.device.type
    if device in _AUTOCAST_FP32 and torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.float32
    return x.dtype


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """torch.nn.functional.group_norm; with a forward-AD tangent on input, weight or bias: on a
    contiguous fp32 copy (module docstring), output and tangent in the output's dtype."""
    if not has_tangent(input, weight, bias):
        return BUILTIN(input, num_groups, weight, bias, eps)
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    with torch.autocast(input.device.type, enabled=False):
        w, b = (None if p is None else p.to(compute) for p in (weight, bias))
        y = BUILTIN(input.to(compute).contiguous(), num_groups, w, b, eps)
    return y.to(_output_dtype(input))
