"""scm_fast.ops.adaptive_double_norm against the fp64 reference: torch.func.jvp, forward_ad and
backward, every norm and layout, on the C++, reference and Triton (interpreter) backends."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from scm_fast.nn import AdaptiveDoubleNorm
from scm_fast.ops import _registry, adaptive_double_norm, adaptive_double_norm_ref, use_backend
from tolerance import assert_rule

# (x shape, norm, num_groups, channels_last, affine): C 1 / 72 / 1000 / 1152, single tokens and
# positions, primes, groups of 1 channel and 1 group, tokens and feature maps for every norm.
CASES = [
    ((2, 5, 72), "layer", None, True, True),
    ((1, 3, 1000), "rms", None, True, True),
    ((3, 1, 1152), "layer", None, True, False),
    ((4, 1), "rms", None, True, False),
    ((2, 1), "layer", None, True, True),
    ((2, 72, 5, 7), "group", 8, False, True),
    ((1, 1000, 3, 1), "group", 10, False, False),
    ((2, 13, 72), "group", 6, True, True),
    ((2, 16, 3, 3), "group", 16, False, False),
    ((1, 16, 11), "group", 1, False, True),
    ((2, 72, 3, 5), "layer", None, False, True),
    ((1, 1152, 7), "rms", None, False, False),
]
IDS = [f"{'x'.join(map(str, c[0]))}-{c[1]}{c[2] or ''}-{'cl' if c[3] else 'cf'}{'-affine' if c[4] else ''}"
       for c in CASES]


def make(case, dtype, device, seed=0, scale_dtype=None):
    shape, norm, groups, cl, affine = case
    g = torch.Generator().manual_seed(seed)
    B, C = shape[0], shape[-1] if cl else shape[1]
    x = 3 * torch.randn(shape, generator=g) + 0.5  # an offset mean, as activations have
    scale, shift = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)
    tangents = [torch.randn(t.shape, generator=g) for t in (x, scale, shift)]
    params = [1 + 0.3 * torch.randn(C, generator=g), 0.3 * torch.randn(C, generator=g)] if affine else [None, None]
    if norm == "rms":
        params[1] = None
    sd = scale_dtype or dtype
    primals = [x.to(device, dtype), scale.to(device, sd), shift.to(device, sd)]
    tangents = [t.to(p) for t, p in zip(tangents, primals)]
    params = [None if p is None else p.to(device, dtype) for p in params]
    return primals, tangents, params, dict(norm=norm, num_groups=groups, channels_last=cl)


def ref_jvp_and_grad(primals, tangents, params, kw, grad_y, dtype):
    """(y, ty, dx, dscale, dshift, dweight, dbias) of the reference with inputs in `dtype`."""
    primals = [p.detach().to(dtype).requires_grad_() for p in primals]
    params = [None if p is None else p.detach().to(dtype).requires_grad_() for p in params]
    y, ty = torch.func.jvp(lambda x, s, h: adaptive_double_norm_ref(x, s, h, *params, **kw), tuple(primals),
                           tuple(t.to(dtype) for t in tangents))
    y.backward(grad_y.to(dtype))
    return [y, ty] + [p.grad for p in primals + params if p is not None]


def check_all(case, dtype, device, scale_dtype=None):
    primals, tangents, params, kw = make(case, dtype, device, scale_dtype=scale_dtype)
    primals = [p.requires_grad_() for p in primals]
    params = [None if p is None else p.requires_grad_() for p in params]
    y, ty = torch.func.jvp(lambda x, s, h: adaptive_double_norm(x, s, h, weight=params[0], bias=params[1], **kw),
                           tuple(primals), tuple(tangents))
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    y.backward(grad_y)
    got = [y, ty] + [p.grad for p in primals + params if p is not None]
    exact = ref_jvp_and_grad(primals, tangents, params, kw, grad_y, torch.float64)
    low = [g.to(a.dtype) for g, a in zip(ref_jvp_and_grad(primals, tangents, params, kw, grad_y, dtype), got)]
    names = ["y", "ty", "dx", "dscale", "dshift", "dweight", "dbias"][:len(got)]
    for name, a, lo, ex in zip(names, got, low, exact):
        assert a.shape == ex.shape, name
        assert_rule(name, a, lo, ex, dtype)
    assert y.dtype == ty.dtype == dtype and primals[1].grad.dtype == primals[1].dtype


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jvp_and_backward_fp32(case, device_backend):
    device, _ = device_backend
    check_all(case, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[11]], ids=[IDS[0], IDS[5], IDS[11]])
def test_jvp_and_backward_half(case, dtype, device_backend):
    device, _ = device_backend
    check_all(case, dtype, device)


def test_fp32_embedding_with_bf16_activations(device_backend):
    """scale/shift from an fp32 time embedding, x in bf16: gradients come back in each input's dtype."""
    device, _ = device_backend
    check_all(CASES[0], torch.bfloat16, device, scale_dtype=torch.float32)


@pytest.mark.parametrize("norm,groups", [("layer", None), ("rms", None), ("group", 4)])
def test_zero_scale_and_shift_are_finite(norm, groups, device_backend):
    """pnorm(0) = 0: y = 0 everywhere; tangents and gradients stay finite."""
    device, _ = device_backend
    x = torch.randn(2, 8, 12, device=device, requires_grad=True)
    zero = torch.zeros(2, 12, device=device, requires_grad=True)
    zero2 = torch.zeros(2, 12, device=device, requires_grad=True)
    tangents = (torch.randn_like(x), torch.randn_like(zero), torch.randn_like(zero))
    y, ty = torch.func.jvp(lambda x, s, h: adaptive_double_norm(x, s, h, norm=norm, num_groups=groups),
                           (x, zero, zero2), tangents)
    assert torch.equal(y, torch.zeros_like(y))
    y.square().sum().backward()
    for t in (ty, x.grad, zero.grad, zero2.grad):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=[IDS[0], IDS[5]])
def test_forward_ad(case, device_backend):
    device, _ = device_backend
    primals, tangents, params, kw = make(case, torch.float32, device)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = fwAD.unpack_dual(adaptive_double_norm(*duals, weight=params[0], bias=params[1], **kw))
    zeros = torch.zeros(out.primal.shape)
    exact = ref_jvp_and_grad(primals, tangents, params, kw, zeros, torch.float64)
    low = ref_jvp_and_grad(primals, tangents, params, kw, zeros, torch.float32)
    assert_rule("y", out.primal, low[0], exact[0], torch.float32)
    assert_rule("ty", out.tangent, low[1], exact[1], torch.float32)


def test_tangent_only_on_scale(device_backend):
    """Only the embedding moves (x constant): the fused pass gets zero tx and is still exact."""
    device, _ = device_backend
    primals, tangents, params, kw = make(CASES[7], torch.float32, device)
    x, scale, shift = primals
    y, ty = torch.func.jvp(lambda s: adaptive_double_norm(x, s, shift, weight=params[0], bias=params[1], **kw),
                           (scale,), (tangents[1],))
    exact = torch.func.jvp(lambda s: adaptive_double_norm_ref(x.double(), s, shift.double(), *[p.double() for p in params],
                                                              **kw), (scale.double(),), (tangents[1].double(),))[1]
    assert_rule("ty", ty, ty, exact, torch.float32)


def test_weight_and_bias_tangents():
    """Tangents on the inner norm's weight and bias (e.g. jvp over parameters) are exact too."""
    primals, tangents, params, kw = make(CASES[5], torch.float64, "cpu")
    tw, tb = torch.randn_like(params[0]), torch.randn_like(params[1])

    def run(fn):
        return torch.func.jvp(lambda x, s, h, w, b: fn(x, s, h, weight=w, bias=b, **kw),
                              (*primals, *params), (*tangents, tw, tb))

    y, ty = run(adaptive_double_norm)
    ry, rty = run(adaptive_double_norm_ref)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(ty, rty)


def test_one_fused_pass_under_jvp(monkeypatch):
    """torch.func.jvp runs ONE kernel (adaptive_norm_fwd_jvp) for y and ty; backward runs one kernel."""
    calls = []
    real_call = _registry.call
    monkeypatch.setattr(_registry, "call", lambda name, *a: calls.append(name) or real_call(name, *a))
    primals, tangents, params, kw = make(CASES[0], torch.float32, "cpu")
    primals = [p.requires_grad_() for p in primals]
    y, _ = torch.func.jvp(lambda x, s, h: adaptive_double_norm(x, s, h, **kw), tuple(primals), tuple(tangents))
    assert calls == ["adaptive_norm_fwd_jvp"]
    y.sum().backward()
    assert calls == ["adaptive_norm_fwd_jvp", "adaptive_norm_bwd"]
    calls.clear()
    adaptive_double_norm(*primals, **kw)
    assert calls == ["adaptive_norm_fwd"]


def test_statistics_match_the_reference():
    """The saved statistics are those of norm_stats (what the backward and the Triton kernels use)."""
    from scm_fast.ops.adaptive_norm_ref import norm_stats
    for case in CASES:
        (x, scale, shift), _, params, kw = make(case, torch.float32, "cpu")
        code = {"layer": 0, "rms": 1, "group": 2}[kw["norm"]]
        _, mean, rstd = _registry.call("adaptive_norm_fwd", x, scale, shift, *params, code, kw["num_groups"] or 1,
                                       1e-6, kw["channels_last"])
        rmu, rrstd = norm_stats(x.double(), kw["norm"], kw["num_groups"] or 1, 1e-6, kw["channels_last"])
        torch.testing.assert_close(mean.double(), rmu, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rstd.double(), rrstd, atol=1e-5, rtol=1e-5)


def test_module_projects_embedding_and_matches_functional():
    torch.manual_seed(0)
    m = AdaptiveDoubleNorm(24, 10, norm="group", affine=True)
    assert m.num_groups == 24 and m.emb.weight.shape == (48, 10) and m.weight.shape == (24,)
    assert sum(p.numel() for p in m.parameters()) == 48 * 10 + 48 + 24 + 24
    x, emb = torch.randn(2, 24, 4, 4), torch.randn(2, 10)
    scale, shift = m.emb(emb).chunk(2, dim=-1)
    ref = adaptive_double_norm_ref(x, scale, shift, m.weight, m.bias, norm="group", num_groups=24, channels_last=False)
    torch.testing.assert_close(m(x, emb), ref)
    rms = AdaptiveDoubleNorm(24, 10, norm="rms", affine=True)
    assert rms.bias is None and "norm='rms'" in repr(rms)


# ---- bad inputs ------------------------------------------------------------------------------
def xss(B=2, L=5, C=8):
    return torch.randn(B, L, C), torch.randn(B, C), torch.randn(B, C)


BAD = [
    ("x rank", lambda x, s, h: dict(x=x[0, 0], scale=s, shift=h), ValueError, "x must be (B, L, C), (B, C) or (B, C, *spatial)"),
    ("x dtype", lambda x, s, h: dict(x=x.long(), scale=s, shift=h), TypeError, "x must be float16, bfloat16, float32 or float64"),
    ("scale rank", lambda x, s, h: dict(x=x, scale=s[0], shift=h), ValueError, "scale must be (B, C) with B = x.shape[0] = 2, got (8,)"),
    ("scale batch", lambda x, s, h: dict(x=x, scale=s[:1], shift=h[:1]), ValueError, "scale must be (B, C) with B = x.shape[0] = 2"),
    ("shift shape", lambda x, s, h: dict(x=x, scale=s, shift=h[:, :4]), ValueError, "scale and shift must have the same shape"),
    ("channels", lambda x, s, h: dict(x=x[..., :6], scale=s, shift=h), ValueError, "x (2, 5, 6) must have its C = 8 channels last"),
    ("maps channels", lambda x, s, h: dict(x=torch.randn(2, 6, 3, 3), scale=s, shift=h), ValueError, "channels at dim 1"),
    ("norm", lambda x, s, h: dict(x=x, scale=s, shift=h, norm="batch"), ValueError, "norm must be one of ('layer', 'rms', 'group'), got 'batch'"),
    ("groups missing", lambda x, s, h: dict(x=x, scale=s, shift=h, norm="group"), ValueError, "needs num_groups, a positive int dividing C = 8, got None"),
    ("groups divide", lambda x, s, h: dict(x=x, scale=s, shift=h, norm="group", num_groups=3), ValueError, "dividing C = 8, got 3"),
    ("groups layer", lambda x, s, h: dict(x=x, scale=s, shift=h, num_groups=2), ValueError, "num_groups applies to norm='group' only"),
    ("eps", lambda x, s, h: dict(x=x, scale=s, shift=h, eps=0.0), ValueError, "eps must be a positive float, got 0.0"),
    ("weight shape", lambda x, s, h: dict(x=x, scale=s, shift=h, weight=torch.ones(7)), ValueError, "weight must be (C,) = (8,), got (7,)"),
    ("rms bias", lambda x, s, h: dict(x=x, scale=s, shift=h, norm="rms", bias=torch.zeros(8)), ValueError, "norm='rms' has no bias"),
    ("layout flag", lambda x, s, h: dict(x=x, scale=s, shift=h, channels_last="yes"), TypeError, "channels_last must be a bool or None"),
    ("scale type", lambda x, s, h: dict(x=x, scale=s.tolist(), shift=h), TypeError, "scale must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("desc,build,exc,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(desc, build, exc, fragment):
    kwargs = build(*xss())
    x, scale, shift = kwargs.pop("x"), kwargs.pop("scale"), kwargs.pop("shift")
    with pytest.raises(exc, match=None) as info:
        adaptive_double_norm(x, scale, shift, **kwargs)
    assert fragment in str(info.value)


# ---- opcheck: schemas, fakes and autograd registration of every op on every backend ----------
def op_args(case, with_tangent):
    (x, s, h), (tx, ts, th), (w, b), kw = make(case, torch.float32, "cpu")
    tail = ({"layer": 0, "rms": 1, "group": 2}[kw["norm"]], kw["num_groups"] or 1, 1e-6, kw["channels_last"])
    return (x, s, h, tx, ts, th, w, b, *tail) if with_tangent else (x, s, h, w, b, *tail)


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=[IDS[0], IDS[5]])
def test_opcheck(case, backend):
    with use_backend(backend):
        fwd_args = op_args(case, False)
        torch.library.opcheck(torch.ops.scm_fast.adaptive_norm_fwd.default, fwd_args)
        torch.library.opcheck(torch.ops.scm_fast.adaptive_norm_fwd_jvp.default, op_args(case, True))
        y, mean, rstd = torch.ops.scm_fast.adaptive_norm_fwd(*fwd_args)
        x, s, h, w, b, *tail = fwd_args
        torch.library.opcheck(torch.ops.scm_fast.adaptive_norm_bwd.default,
                              (torch.randn_like(y), x, s, h, w, b, mean, rstd, *tail))
    if backend == "cpp":
        torch.library.opcheck(torch.ops.scm_fast.adaptive_norm_fwd_cpu.default, fwd_args)
