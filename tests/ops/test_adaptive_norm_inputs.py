"""scm_fast.ops.adaptive_double_norm on edge inputs: empty batches, huge or tiny embedding vectors,
non-finite eps; on every backend (C++, reference, Triton interpreter)."""
import math

import pytest
import torch

from scm_fast.ops import adaptive_double_norm, adaptive_double_norm_ref
from tolerance import assert_rule


def inputs(x_shape, C, scale_mag=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = x_shape[0]
    x = torch.randn(x_shape, generator=g)
    scale, shift = scale_mag * torch.randn(B, C, generator=g), scale_mag * torch.randn(B, C, generator=g)
    tangents = [torch.randn(t.shape, generator=g) for t in (x, scale, shift)]
    return [x, scale, shift], tangents


def jvp_and_grad(fn, primals, tangents, grad_y=None):
    primals = tuple(p.detach().clone().requires_grad_() for p in primals)
    y, ty = torch.func.jvp(fn, primals, tuple(tangents))
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y) if grad_y is None else grad_y
    y.backward(grad_y)
    return [y, ty, *(p.grad for p in primals)], grad_y


KINDS = {"layer-tokens": ((0, 5, 8), 8, dict()), "rms-tokens": ((0, 8), 8, dict(norm="rms")),
         "group-maps": ((0, 8, 3, 3), 8, dict(norm="group", num_groups=2))}


@pytest.mark.parametrize("kind", list(KINDS))
def test_empty_batch_gives_empty_results(kind, device_backend):
    device, _ = device_backend
    shape, C, kw = KINDS[kind]
    primals, tangents = inputs(shape, C)
    primals, tangents = [p.to(device) for p in primals], [t.to(device) for t in tangents]
    (y, ty, dx, dscale, dshift), _ = jvp_and_grad(lambda x, s, h: adaptive_double_norm(x, s, h, **kw), primals, tangents)
    assert y.shape == ty.shape == dx.shape == shape and dscale.shape == dshift.shape == (0, C)
    cl = len(shape) <= 3
    assert adaptive_double_norm_ref(*primals, channels_last=cl, **kw).shape == shape


@pytest.mark.parametrize("mag", [1e20, 1e30, 1e-30], ids=["1e20", "1e30", "1e-30"])
@pytest.mark.parametrize("norm", ["layer", "group"])
def test_huge_and_tiny_scale_and_shift(mag, norm, device_backend):
    """pnorm(a) = a / rms(a) is O(1) for any |a|: mean(a^2) overflowed fp32 past |a| ~ 1e19 on the
    reference and Triton backends (y silently off by O(1)); they now rescale a by a power of two."""
    device, _ = device_backend
    kw = dict(norm=norm, num_groups=2 if norm == "group" else None)
    primals, tangents = inputs((2, 5, 8), 8, scale_mag=mag)
    primals, tangents = [p.to(device) for p in primals], [t.to(device) for t in tangents]
    got, grad_y = jvp_and_grad(lambda x, s, h: adaptive_double_norm(x, s, h, **kw), primals, tangents)
    exact = jvp_and_grad(lambda x, s, h: adaptive_double_norm_ref(x, s, h, **kw), [p.double() for p in primals],
                         [t.double() for t in tangents], grad_y.double())[0]
    for name, a, ex in zip(("y", "ty", "dx", "dscale", "dshift"), got, exact):
        assert_rule(name, a, ex, ex, torch.float32)  # the floor alone (an fp32 reference overflowed too)


@pytest.mark.parametrize("eps", [math.inf, -math.inf, math.nan, 0.0, -1e-6, True, "1e-6"],
                         ids=["inf", "-inf", "nan", "zero", "negative", "bool", "str"])
def test_eps_must_be_a_positive_finite_float(eps):
    x, scale, shift = inputs((2, 5, 8), 8)[0]
    with pytest.raises(ValueError, match=r"eps must be a positive float, got "):
        adaptive_double_norm(x, scale, shift, eps=eps)
