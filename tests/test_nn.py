"""scm_fast.nn layers: PyTorch's values and gradients, exact tangents that carry no autograd graph."""
import pytest
import torch

from scm_fast import nn

torch.manual_seed(0)
PAIRS = {
    "linear": (lambda: nn.Linear(6, 5), lambda m: torch.nn.functional.linear),
    "gelu": (lambda: nn.GELU(), None),
    "silu": (lambda: nn.SiLU(), None),
    "rmsnorm": (lambda: nn.RMSNorm(6), None),
}


def native(name, m):
    if name == "linear":
        return lambda x: torch.nn.functional.linear(x, m.weight, m.bias)
    if name == "gelu":
        return lambda x: torch.nn.functional.gelu(x)
    if name == "silu":
        return torch.nn.functional.silu
    return lambda x: torch.nn.functional.rms_norm(x, (6,), m.weight, m.eps)


@pytest.mark.parametrize("name", list(PAIRS))
def test_values_gradients_and_tangents_match_pytorch(name):
    m = PAIRS[name][0]().double()
    if name == "rmsnorm":
        torch.nn.init.normal_(m.weight)
    ref = native(name, m)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    tx = torch.randn_like(x)
    y, ty = torch.func.jvp(m, (x,), (tx,))
    ry, rty = torch.func.jvp(ref, (x,), (tx,))
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(ty, rty)
    assert ty.grad_fn is None and not ty.requires_grad  # the tangent keeps nothing for backward
    assert torch.autograd.gradcheck(m, (x,))
    params = list(m.parameters())
    if params:
        g = torch.randn_like(y)
        got = torch.autograd.grad(m(x), [x, *params], g)
        want = torch.autograd.grad(ref(x), [x, *params], g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_linear_tangent_along_its_parameters():
    """torch.func.jvp over the weight too (e.g. a jvp through functional_call): exact."""
    m = nn.Linear(4, 3).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    tw, tb = torch.randn_like(m.weight), torch.randn_like(m.bias)
    f = lambda w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))
    _, t = torch.func.jvp(f, (m.weight.detach(), m.bias.detach()), (tw, tb))
    torch.testing.assert_close(t, x @ tw.t() + tb)
