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
