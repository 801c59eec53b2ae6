"""The run's --precision as autocast: fp32 (off), bf16 or fp16 (the network's matmuls; scm_fast's
time embeddings and fused ops keep their own fp32 accumulation)."""
import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision):
    """torch.bfloat16 / torch.float16 for 'bf16' / 'fp16'; None for 'fp32'."""
    return AUTOCAST_DTYPES.get(precision)


def autocast(device_type, precision):
    """torch.autocast for a --precision value (a disabled one for fp32)."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def accumulation_dtype(dtype):
    """The dtype sums and softmax statistics are kept in for inputs of `dtype` (a dtype or a tensor):
    fp64 for fp64 (the references and tests), fp32 for everything else (fp32 / bf16 / fp16)."""
    dtype = dtype.dtype if isinstance(dtype, torch.Tensor) else dtype
    return torch.float64 if dtype == torch.float64 else torch.float32
