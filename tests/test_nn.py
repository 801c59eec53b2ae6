"""scm_fast.nn layers: PyTorch's values and gradients, exact tangents that carry no autograd graph."""
import re

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


# ---- nn.Attention: arguments and input shapes ------------------------------------------------
@pytest.mark.parametrize("args,kw,fragment", [
    ((8, 0), {}, "heads must be a positive int, got 0"),
    ((8, 2), dict(kv_heads=0), "kv_heads must be a positive int, got 0"),
    ((0, 2), {}, "dim must be a positive int, got 0"),
    ((8, 3), {}, "dim (8) must be a multiple of heads (3)"),
    ((8, 4), dict(kv_heads=3), "heads a multiple of kv_heads (3)"),
    ((8, 2), dict(context_dim=0), "context_dim must be a positive int or None, got 0"),
])
def test_attention_module_arguments(args, kw, fragment):
    with pytest.raises(ValueError) as info:
        nn.Attention(*args, **kw)
    assert fragment in str(info.value)


@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 6), (1, 2, 3, 8)])
def test_attention_module_names_the_expected_x_shape(shape):
    m = nn.Attention(8, 2)
    with pytest.raises(ValueError, match=r"x must be \(B, L, dim\) = \(B, L, 8\), got shape " + re.escape(str(shape))):
        m(torch.randn(shape))


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (1, 3, 4)])
def test_attention_module_names_the_expected_context_shape(shape):
    m = nn.Attention(8, 2, context_dim=4)
    with pytest.raises(ValueError, match=r"context must be \(B, S, context_dim\) = \(2, S, 4\), got shape "
                                         + re.escape(str(shape))):
        m(torch.randn(2, 5, 8), context=torch.randn(shape))


def test_attention_module_empty_context_gives_zeros_before_the_output_projection():
    """S = 0 keys: every query row is fully masked, the attention output is 0, the module returns proj(0)."""
    m = nn.Attention(8, 2, context_dim=4)
    y = m(torch.randn(2, 5, 8), context=torch.randn(2, 0, 4))
    torch.testing.assert_close(y, m.proj.bias.expand(2, 5, 8))


def test_attention_module_block_mask_is_the_dense_mask_it_stands_for():
    """block_mask reaches the fused op: the same output as its dense element mask; impl 'sdpa' refuses it."""
    from scm_fast.ops import BlockSparse
    from scm_fast.ops.attention_blocks import element_blocks
    torch.manual_seed(0)
    m = nn.Attention(16, 4, kv_heads=2)
    x = torch.randn(2, 40, 16)
    blocks = torch.rand(1, 4, 3, 3) > 0.5
    blocks[..., 0, 0] = True
    dense = element_blocks(blocks, 16, 16, 40, 40)
    torch.testing.assert_close(m(x, block_mask=BlockSparse(blocks, 16, 16)), m(x, attn_mask=dense),
                               atol=2e-6, rtol=2e-6)
    m.impl = "sdpa"
    with pytest.raises(ValueError, match="block_mask needs impl = 'fused'"):
        m(x, block_mask=BlockSparse(blocks, 16, 16))
