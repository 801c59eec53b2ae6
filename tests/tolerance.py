"""The tolerance rule (architecture.md, after flash-attention): for every output, tangent and
gradient, error(kernel in dtype) <= 2 x error(reference computed in dtype) + FLOOR[dtype] x scale,
both errors measured against an fp64 reference; scale = max(1, max |fp64 value|).
Floors live here and nowhere else. Never loosen them to make a test pass."""
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def max_err(x, exact):
    return (x.double() - exact.double()).abs().max().item() if x.numel() else 0.0


def assert_rule(name, actual, low_ref, exact, dtype):
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = max(1.0, exact.double().abs().max().item()) if exact.numel() else 1.0
    err, ref_err = max_err(actual, exact), max_err(low_ref, exact)
    bound = 2 * ref_err + FLOOR[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3e} > 2 x reference error {ref_err:.3e} + floor ({bound:.3e})"
