"""Second order through the tangent: the gradient of a loss on the fused ops' output tangent with respect
to their inputs and the inputs' tangents (Terminal Velocity Matching, MeanFlow variants), and a double
backward through it, against fp64 torch.func of the math references (scm_fast/ops/_transforms.py:
differentiable_tangent). The tangent's forward stays the fused pass; its backward differentiates the
reference."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from scm_fast.ops import adaptive_double_norm, adaptive_double_norm_ref, attention, attention_ref, use_backend
from tolerance import assert_rule

F64 = dict(dtype=torch.float64)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **F64)


ATTENTION = {  # name: (q, k, v shapes, keyword arguments)
    "plain": ((2, 2, 7, 8), (2, 2, 7, 8), (2, 2, 7, 8), {}),
    "gqa-lq!=lk-dv": ((1, 4, 5, 16), (1, 2, 11, 16), (1, 2, 11, 8), {}),
    "causal": ((1, 2, 9, 8), (1, 2, 9, 8), (1, 2, 9, 8), {"causal": True}),
    "bool-mask-empty-row": ((1, 2, 6, 8), (1, 2, 5, 8), (1, 2, 5, 8), {"mask": "bool"}),
    "additive-mask": ((2, 1, 4, 72), (2, 1, 13, 72), (2, 1, 13, 72), {"mask": "float", "scale": 0.3}),
}


def _attention_case(name):
    sq, sk, sv, kw = ATTENTION[name]
    kw = dict(kw)
    if kw.pop("mask", None) == "bool":
        mask = _randn(sq[2], sk[2], seed=9) > 0
        mask[1] = False  # a query that sees no key: 0 output, 0 tangent, 0 gradient
        kw["attn_mask"] = mask
    elif "scale" in kw:
        kw["attn_mask"] = _randn(sq[2], sk[2], seed=9)
    primals = [_randn(*s, seed=i) for i, s in enumerate((sq, sk, sv))]
    tangents = [_randn(*s, seed=10 + i) for i, s in enumerate((sq, sk, sv))]
    return (lambda fn: lambda q, k, v: fn(q, k, v, **kw)), primals, tangents


def _norm_case(norm):
    x = _randn(2, 6, 8, seed=0) if norm != "group" else _randn(2, 8, 3, 3, seed=0)
    c = 8
    primals = [x, _randn(2, c, seed=1), _randn(2, c, seed=2), _randn(c, seed=3), _randn(c, seed=4)]
    tangents = [_randn(*p.shape, seed=10 + i) for i, p in enumerate(primals)]
    kw = {"norm": norm, "num_groups": 4 if norm == "group" else None, "channels_last": norm != "group"}
    if norm == "rms":  # weight only
        primals, tangents = primals[:4], tangents[:4]

    def wrap(fn):
        def f(x, scale, shift, weight, bias=None):
            return fn(x, scale, shift, weight=weight, bias=bias, **kw)
        return f
    return wrap, primals, tangents


CASES = {**{f"attention-{n}": (lambda n=n: _attention_case(n), attention, attention_ref) for n in ATTENTION},
         **{f"norm-{n}": (lambda n=n: _norm_case(n), adaptive_double_norm, adaptive_double_norm_ref)
            for n in ("layer", "rms", "group")}}


def _tangent_loss(f, n):
    """L(primals, tangents) = sum(w * tangent) + sum(tangent^2) / 2 of f's output tangent."""
    def loss(*args):
        _, t = torch.func.jvp(f, tuple(args[:n]), tuple(args[n:]))
        return (t * torch.linspace(-1, 2, t.numel(), dtype=t.dtype).view_as(t)).sum() + t.square().sum() / 2
    return loss


def _check(name, got, low_ref, exact, dtype):
    """Each gradient by the tolerance rule (tests/tolerance.py), and the exact one not all zero."""
    for i, (g, lo, ex) in enumerate(zip(got, low_ref, exact)):
        assert ex.abs().max() > 0, f"{name} argument {i}: the reference gradient is zero"
        assert_rule(f"{name} argument {i}", g, lo, ex, dtype)


def _func_grads(f, args, dtype):
    n = len(args) // 2
    return torch.func.grad(_tangent_loss(f, n), argnums=tuple(range(2 * n)))(*(a.to(dtype) for a in args))


# the C++ and Triton kernels in fp32, the reference backend in fp64 too; their tangent's backward is the reference's
BACKEND_DTYPES = [("cpp", torch.float32), ("triton", torch.float32), ("reference", torch.float32),
                  ("reference", torch.float64)]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_of_the_tangent(case, backend, dtype):
    """torch.func.grad of a loss on the tangent w.r.t. every primal and tangent, against fp64 torch.func of
    the math reference."""
    make, op, ref = CASES[case]
    wrap, primals, tangents = make()
    args = (*primals, *tangents)
    exact, low_ref = _func_grads(wrap(ref), args, torch.float64), _func_grads(wrap(ref), args, dtype)
    with use_backend(backend):
        got = _func_grads(wrap(op), args, dtype)
    _check(case, got, low_ref, exact, dtype)


EAGER_CASES = ["attention-gqa-lq!=lk-dv", "attention-bool-mask-empty-row", "norm-layer", "norm-group"]


@pytest.mark.parametrize("case", EAGER_CASES)
def test_eager_forward_ad_then_backward_of_the_tangent(case):
    """forward_ad dual tensors, then loss(tangent).backward() (C++ kernels, fp32): the gradients of every
    leaf as fp64 torch.func of the reference."""
    make, op, ref = CASES[case]
    wrap, primals, tangents = make()
    n, args = len(primals), (*primals, *tangents)
    leaves = [x.float().requires_grad_() for x in args]
    with fwAD.dual_level():
        out = wrap(op)(*(fwAD.make_dual(p, t) for p, t in zip(leaves[:n], leaves[n:])))
        t = fwAD.unpack_dual(out).tangent
    ((t * torch.linspace(-1, 2, t.numel()).view_as(t)).sum() + t.square().sum() / 2).backward()
    exact, low_ref = _func_grads(wrap(ref), args, torch.float64), _func_grads(wrap(ref), args, torch.float32)
    _check(case, [x.grad for x in leaves], low_ref, exact, torch.float32)


@pytest.mark.parametrize("case", ["attention-plain", "attention-causal", "norm-rms"])
def test_double_backward_through_the_tangent(case):
    """A gradient of the tangent's gradient (create_graph=True, then grad again; C++ kernels, fp32) against
    fp64: the reference the tangent's backward differentiates is plain PyTorch ops."""
    make, op, ref = CASES[case]
    wrap, primals, tangents = make()
    n = len(primals)

    def grad_of_grad(f, dtype):
        x = primals[0].to(dtype).requires_grad_()
        rest = [a.to(dtype) for a in (*primals[1:], *tangents)]
        (g,) = torch.autograd.grad(_tangent_loss(f, n)(x, *rest), x, create_graph=True)
        return g, torch.autograd.grad(g.square().sum(), x)[0]

    _check(case, grad_of_grad(wrap(op), torch.float32), grad_of_grad(wrap(ref), torch.float32),
           grad_of_grad(wrap(ref), torch.float64), torch.float32)


def test_scm_one_pass_has_no_gradient_through_the_detached_tangent():
    """sCM's sg(tangent) is unchanged: a loss on the detached tangent gives the primal's gradients only."""
    make, op, _ = CASES["attention-plain"]
    wrap, primals, tangents = make()
    primals, tangents = [p.float() for p in primals], tuple(t.float() for t in tangents)
    x = primals[0].clone().requires_grad_()
    out, t = torch.func.jvp(wrap(op), (x, *primals[1:]), tangents)
    (out * t.detach()).sum().backward()
    y = primals[0].clone().requires_grad_()
    (wrap(op)(y, *primals[1:]) * t.detach()).sum().backward()
    assert torch.equal(x.grad, y.grad)


def test_constant_tangents_keeps_no_graph():
    """Inside constant_tangents (scm_loss's one pass) the tangent has no graph: no saved tq, tk, tv."""
    from scm_fast.ops import constant_tangents
    make, op, _ = CASES["attention-plain"]
    wrap, primals, tangents = make()
    x = primals[0].float().requires_grad_()
    rest, tangents = [p.float() for p in primals[1:]], tuple(t.float() for t in tangents)
    assert torch.func.jvp(wrap(op), (x, *rest), tangents)[1].grad_fn is not None
    with constant_tangents():
        assert torch.func.jvp(wrap(op), (x, *rest), tangents)[1].grad_fn is None
