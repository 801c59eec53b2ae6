"""Public differentiable fused ops (reverse mode and forward mode)."""
from scm_fast.ops._registry import backend, set_backend, use_backend
from scm_fast.ops._transforms import constant_tangents
from scm_fast.ops.adaptive_norm import adaptive_double_norm, adaptive_double_norm_ref
from scm_fast.ops.attention import attention, attention_jvp, attention_ref
from scm_fast.ops.attention_blocks import BlockSparse

__all__ = ["BlockSparse", "adaptive_double_norm", "adaptive_double_norm_ref", "attention", "attention_jvp",
           "attention_ref", "backend", "constant_tangents", "set_backend", "use_backend"]
