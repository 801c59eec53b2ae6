"""Second-order use of the fused ops raises a RuntimeError naming the op and the transform (it used to
give zeros, or partial sums on the reference backend); first-order use under every transform is
unchanged (scm_fast/ops/_transforms.py)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from scm_fast.ops import adaptive_double_norm, adaptive_double_norm_ref, attention, attention_ref, use_backend

G = torch.Generator().manual_seed(0)
X_ATTN = torch.randn(1, 2, 5, 8, generator=G)
X_NORM = torch.randn(2, 5, 8, generator=G)
S0, H0 = torch.randn(2, 8, generator=G), torch.randn(2, 8, generator=G)


def attn(fn):
    return lambda x: fn(x, 0.5 * x, x.flip(-2))


def norm(fn):
    return lambda x: fn(x, S0 + x.mean(1), H0 + x[:, 0])


OPS = {"attention": (attn(attention), attn(attention_ref), X_ATTN),
       "adaptive_double_norm": (norm(adaptive_double_norm), norm(adaptive_double_norm_ref), X_NORM)}


def squared(f):
    return lambda x: f(x).square().sum()


def linear(f):
    return lambda x: f(x).sum()


def plain_double_backward(f, x, t):
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    return torch.autograd.grad((g * t).sum(), x)[0]


def forward_ad_over_backward(f, x, t):
    x = x.clone().requires_grad_()
    with fwAD.dual_level():
        (g,) = torch.autograd.grad(f(fwAD.make_dual(x, t)), x)
        return fwAD.unpack_dual(g).tangent


def func_grad_of_grad(f, x, t):
    return torch.func.grad(lambda y: (torch.func.grad(f)(y) * t).sum())(x)


def jvp_of_grad(f, x, t):
    return torch.func.jvp(torch.func.grad(f), (x,), (t,))[1]


def hvp(f, x, t):
    return torch.autograd.functional.hvp(f, x, t)[1]


SECOND_ORDER = {  # name: (how, the transform the message names)
    "autograd.grad(create_graph)-squared": (lambda f, x, t: plain_double_backward(squared(f), x, t), "double backward"),
    "autograd.grad(create_graph)-linear": (lambda f, x, t: plain_double_backward(linear(f), x, t), "double backward"),
    "autograd.functional.hvp": (lambda f, x, t: hvp(squared(f), x, t), "double backward"),
    "func.grad(func.grad)-squared": (lambda f, x, t: func_grad_of_grad(squared(f), x, t), "double backward"),
    "func.grad(func.grad)-linear": (lambda f, x, t: func_grad_of_grad(linear(f), x, t), "double backward"),
    "func.jvp(func.grad)-squared": (lambda f, x, t: jvp_of_grad(squared(f), x, t), "forward-mode AD over backward"),
    "func.jvp(func.grad)-linear": (lambda f, x, t: jvp_of_grad(linear(f), x, t), "forward-mode AD over backward"),
    "forward_ad-over-backward": (lambda f, x, t: forward_ad_over_backward(squared(f), x, t),
                                 "forward-mode AD over backward"),
    "func.jvp(func.jvp)-tangent": (lambda f, x, t: torch.func.jvp(
        lambda y: torch.func.jvp(f, (y,), (t,))[1], (x,), (t.flip(-1),))[1], "jvp of jvp"),
    "func.jvp(func.jvp)-primal": (lambda f, x, t: torch.func.jvp(  # a first-order tangent, but wrong before
        lambda y: torch.func.jvp(f, (y,), (t,))[0], (x,), (t.flip(-1),))[1], "jvp of jvp"),
}


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("case", list(SECOND_ORDER))
@pytest.mark.parametrize("op", list(OPS))
def test_second_order_raises(op, case, backend):
    f, _, x = OPS[op]
    how, transform = SECOND_ORDER[case]
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with use_backend(backend), pytest.raises(RuntimeError) as info:
        how(f, x, t)
    message = str(info.value)
    assert message.startswith(f"scm_fast.ops.{op}: {transform}"), message
    assert f"scm_fast.ops.{op}_ref" in message


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("op", list(OPS))
def test_first_order_transforms_still_work(op, backend):
    """torch.func.grad, vjp, jacrev, grad over a jvp, sCM's one pass (jvp, then the primal's backward)
    and a backward inside a dual level that no tangent reaches: as before, against the reference."""
    f, f_ref, x = OPS[op]
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with use_backend(backend):
        grad = torch.func.grad(squared(f))(x)
        _, vjp_fn = torch.func.vjp(f, x)
        (vjp,) = vjp_fn(torch.ones_like(f(x)))
        jac = torch.func.jacrev(f)(x)
        grad_of_jvp = torch.func.grad(lambda y: torch.func.jvp(f, (y,), (t,))[0].sum())(x)
        xg = x.clone().requires_grad_()
        out, tangent = torch.func.jvp(f, (xg,), (t,))
        (out * tangent.detach()).sum().backward()
        xu = x.clone().requires_grad_()
        with fwAD.dual_level():
            fwAD.make_dual(torch.zeros(3), torch.ones(3))  # a dual level that the op never sees
            (inside,) = torch.autograd.grad(squared(f)(xu), xu)
    ref_grad = torch.func.grad(squared(f_ref))(x)
    ref_out, ref_tangent = torch.func.jvp(f_ref, (x,), (t,))
    xr = x.clone().requires_grad_()
    (f_ref(xr) * ref_tangent).sum().backward()
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, **close)
    torch.testing.assert_close(inside, ref_grad, **close)
    torch.testing.assert_close(vjp, torch.func.grad(linear(f_ref))(x), **close)
    torch.testing.assert_close(grad_of_jvp, torch.func.grad(linear(f_ref))(x), **close)
    torch.testing.assert_close(jac, torch.func.jacrev(f_ref)(x), **close)
    torch.testing.assert_close(xg.grad, xr.grad, **close)


@pytest.mark.parametrize("op", list(OPS))
def test_one_pass_step_is_bit_identical_to_a_plain_backward(op):
    """The transform checks change no number: sCM's one pass gives the plain forward's gradients."""
    f, _, x = OPS[op]
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    g = torch.randn(f(x).shape, generator=torch.Generator().manual_seed(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, _ = torch.func.jvp(f, (xa,), (t,))
    (out * g).sum().backward()
    (f(xb) * g).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
