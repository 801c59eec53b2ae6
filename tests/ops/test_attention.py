"""scm_fast.ops.attention against the fp64 reference: torch.func.jvp, forward_ad and backward, on
the PyTorch reference backend and on the Triton kernels (interpreter on CPU, real kernels on CUDA)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from scm_fast.ops import _registry, attention, attention_jvp, attention_ref
from tolerance import assert_rule

BLOCK = 64  # the interpreter's tile (kernels/attention.py INTERPRET_BLOCK_M/N)


def make(shape_q, shape_k, dv, dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=g)
    k = torch.randn(*shape_k, generator=g)
    v = torch.randn(*shape_k[:-1], dv, generator=g)
    tangents = [scale * torch.randn(x.shape, generator=g) for x in (q, k, v)]
    return [x.to(device, dtype) for x in (q, k, v, *tangents)]


def make_mask(kind, B, H, Lq, Lk, device):
    g = torch.Generator().manual_seed(1)
    if kind is None:
        return None
    if kind == "keypad":  # (B, 1, 1, Lk) bool; batch 0 keeps a prefix, batch B-1 keeps one key
        keep = torch.zeros(B, 1, 1, Lk, dtype=torch.bool)
        keep[0, ..., : max(1, Lk // 2)] = True
        keep[-1, ..., Lk - 1] = True
        return keep.to(device)
    if kind == "bool":  # (1, H, Lq, Lk) random, with one fully masked row
        keep = torch.rand(1, H, Lq, Lk, generator=g) > 0.3
        keep[0, 0, Lq // 2] = False
        return keep.to(device)
    if kind == "additive":  # (Lq, Lk) float bias with -inf entries
        bias = torch.randn(Lq, Lk, generator=g)
        bias[torch.rand(Lq, Lk, generator=g) > 0.8] = float("-inf")
        return bias.to(device)
    raise ValueError(kind)


# (B, Hq, Hk, Lq, Lk, D, Dv, causal, mask): awkward sizes - 1, primes, block +- 1, head dims
# 72/80/96/256, Lq != Lk, GQA/MQA, causal with Lq != Lk, every mask kind.
CASES = [
    (1, 1, 1, 1, 1, 16, 16, False, None),
    (2, 2, 2, BLOCK, BLOCK, 64, 64, False, None),
    (1, 2, 2, BLOCK + 1, BLOCK + 1, 72, 72, True, None),
    (1, 4, 2, 37, 2 * BLOCK + 1, 80, 80, False, "keypad"),
    (2, 4, 1, 50, 97, 96, 96, True, "bool"),
    (1, 2, 1, 97, 31, 40, 24, True, "additive"),
    (1, 1, 1, 17, 23, 256, 256, False, "additive"),
    (2, 3, 3, 5, 129, 8, 8, False, "keypad"),
    # bottom-right alignment (flash-attn, KV caches): Lq < Lk, and Lq > Lk (the first Lq - Lk rows see no key)
    (1, 2, 2, BLOCK + 1, 2 * BLOCK + 3, 72, 72, "bottom_right", None),
    (2, 4, 1, 50, 97, 96, 96, "bottom_right", "bool"),
    (1, 2, 1, 97, 31, 40, 24, "bottom_right", "additive"),
]
CAUSAL_IDS = {False: "", True: "-causal", "bottom_right": "-causal_br"}
IDS = [f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}v{c[6]}{CAUSAL_IDS[c[7]]}-{c[8]}" for c in CASES]


def run_case(case, dtype, device, scale=1.0):
    B, H, Hk, Lq, Lk, D, Dv, causal, mask_kind = case
    q, k, v, tq, tk, tv = make((B, H, Lq, D), (B, Hk, Lk, D), Dv, dtype, device, scale=scale)
    mask = make_mask(mask_kind, B, H, Lq, Lk, device)
    return (q, k, v), (tq, tk, tv), mask, causal


def ref_jvp_and_grad(primals, tangents, mask, causal, grad_out, dtype):
    """(o, to, dq, dk, dv) of attention_ref in `dtype` (fp64 gives the exact values)."""
    primals = tuple(x.detach().to(dtype).requires_grad_() for x in primals)
    tangents = tuple(t.to(dtype) for t in tangents)
    mask = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    o, to = torch.func.jvp(lambda q, k, v: attention_ref(q, k, v, mask, causal), primals, tangents)
    o.backward(grad_out.to(dtype))
    return (o, to, *(x.grad for x in primals))


def check_all(primals, tangents, mask, causal, dtype):
    """The op's output, tangent (torch.func.jvp) and gradients against the rule."""
    primals = tuple(x.detach().requires_grad_() for x in primals)
    o, to = torch.func.jvp(lambda q, k, v: attention(q, k, v, attn_mask=mask, causal=causal),
                           primals, tangents)
    grad_out = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(o)
    o.backward(grad_out)
    got = (o, to, *(x.grad for x in primals))
    exact = ref_jvp_and_grad(primals, tangents, mask, causal, grad_out, torch.float64)
    low = ref_jvp_and_grad(primals, tangents, mask, causal, grad_out, dtype)
    for name, a, lo, ex in zip(("o", "to", "dq", "dk", "dv"), got, low, exact):
        assert a.dtype == dtype and a.shape == ex.shape, name
        assert_rule(name, a, lo, ex, dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jvp_and_backward_fp32(case, device_backend):
    device, _ = device_backend
    primals, tangents, mask, causal = run_case(case, torch.float32, device)
    check_all(primals, tangents, mask, causal, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=[IDS[3], IDS[5]])
def test_jvp_and_backward_half(case, dtype, device_backend):
    device, _ = device_backend
    primals, tangents, mask, causal = run_case(case, dtype, device)
    check_all(primals, tangents, mask, causal, dtype)


@pytest.mark.parametrize("D, scale", [(64, 1000.0), (128, 300.0)], ids=["D64-one-pass", "D128-two-pass"])
def test_fp16_large_tangents(D, scale, device_backend):
    """Tangents of magnitude ~1e3 (ds = tau(tq K^T + q tK^T) ~ 1e4): finite and within the rule, on the
    Triton kernels' one-pass (head dim 64) and two-pass (128) forward + JVP (at 128 a smaller scale:
    at 1e3 the fp16 reference the rule compares with overflows)."""
    device, _ = device_backend
    primals, tangents, mask, causal = run_case((1, 2, 2, 70, 70, D, D, False, None), torch.float16,
                                               device, scale=scale)
    check_all(primals, tangents, mask, causal, torch.float16)


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=[IDS[2], IDS[4]])
def test_forward_ad(case, device_backend):
    device, _ = device_backend
    primals, tangents, mask, causal = run_case(case, torch.float32, device)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip(primals, tangents)]
        out = fwAD.unpack_dual(attention(*duals, attn_mask=mask, causal=causal))
    exact = ref_jvp_and_grad(primals, tangents, mask, causal, torch.zeros(out.primal.shape), torch.float64)
    low = ref_jvp_and_grad(primals, tangents, mask, causal, torch.zeros(out.primal.shape), torch.float32)
    assert_rule("o", out.primal, low[0], exact[0], torch.float32)
    assert_rule("to", out.tangent, low[1], exact[1], torch.float32)


def test_explicit_attention_jvp_matches_func_jvp(device_backend):
    device, _ = device_backend
    primals, tangents, mask, causal = run_case(CASES[4], torch.float32, device)
    o, to = attention_jvp(*primals, *tangents, attn_mask=mask, causal=causal)
    o2, to2 = torch.func.jvp(lambda q, k, v: attention(q, k, v, attn_mask=mask, causal=causal),
                             primals, tangents)
    torch.testing.assert_close(o, o2, rtol=0, atol=0)
    torch.testing.assert_close(to, to2, rtol=0, atol=0)
    assert not to.requires_grad


def test_fully_masked_rows_give_zeros(device_backend):
    """Rows with no valid key: 0 output, 0 tangent, finite gradients (never NaN)."""
    device, _ = device_backend
    B, H, L, D = 2, 2, 33, 32
    primals = tuple(x.requires_grad_() for x in make((B, H, L, D), (B, H, L, D), D, torch.float32, device)[:3])
    tangents = tuple(make((B, H, L, D), (B, H, L, D), D, torch.float32, device, seed=3)[3:])
    keep = torch.ones(B, 1, L, L, dtype=torch.bool, device=device)
    keep[0] = False          # a whole batch element sees nothing
    keep[1, :, 7] = False     # and one row of the other
    o, to = torch.func.jvp(lambda q, k, v: attention(q, k, v, attn_mask=keep), primals, tangents)
    o.sum().backward()
    for x in (o, to):
        assert torch.isfinite(x).all()
        assert x[0].abs().max() == 0 and x[1, :, 7].abs().max() == 0
    assert all(torch.isfinite(x.grad).all() for x in primals)
    assert primals[0].grad[0].abs().max() == 0
    exact = ref_jvp_and_grad(primals, tangents, keep, False, torch.ones(o.shape), torch.float64)
    low = ref_jvp_and_grad(primals, tangents, keep, False, torch.ones(o.shape), torch.float32)
    for name, a, lo, ex in zip(("o", "to", "dq", "dk", "dv"), (o, to, *(x.grad for x in primals)), low, exact):
        assert_rule(name, a, lo, ex, torch.float32)


def test_one_fused_pass_under_jvp(monkeypatch):
    """torch.func.jvp runs ONE kernel (attention_fwd_jvp) for output and tangent; backward runs the
    backward kernel only."""
    calls = []
    real_call = _registry.call
    monkeypatch.setattr(_registry, "call", lambda name, *a: calls.append(name) or real_call(name, *a))
    primals, tangents, mask, causal = run_case(CASES[3], torch.float32, "cpu")
    primals = tuple(x.requires_grad_() for x in primals)
    o, _ = torch.func.jvp(lambda q, k, v: attention(q, k, v, attn_mask=mask), primals, tangents)
    assert calls == ["attention_fwd_jvp"]
    o.sum().backward()
    assert calls == ["attention_fwd_jvp", "attention_bwd"]
    calls.clear()
    attention(*primals)
    assert calls == ["attention_fwd"]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float16], ids=["bool", "additive-fp16"])
def test_key_padding_mask_is_not_materialised(monkeypatch, dtype):
    """A (B, 1, 1, Lk) mask reaches the kernel as a broadcast view of B x Lk storage (fp32 for biases)."""
    seen = []
    real_call = _registry.call
    # the call's last seven arguments: mask, blocks, block_q, block_k, causal, causal_shift, scale
    monkeypatch.setattr(_registry, "call", lambda name, *a: seen.append(a[-7]) or real_call(name, *a))
    B, H, L, D = 2, 4, 300, 16
    q, k, v = make((B, H, L, D), (B, H, L, D), D, torch.bfloat16, "cpu")[:3]
    mask = (torch.rand(B, 1, 1, L) > 0.5).to(dtype)
    attention(q, k, v, attn_mask=mask)
    (seen_mask,) = seen
    assert seen_mask.shape == (B, H, L, L)
    assert seen_mask.untyped_storage().nbytes() == B * L * seen_mask.element_size()


def test_nested_forward_ad_over_explicit_jvp():
    """An outer jvp over attention_jvp's output o differentiates o along the outer tangents."""
    primals, tangents, mask, causal = run_case(CASES[5], torch.float64, "cpu")
    outer = tuple(make(primals[0].shape, primals[1].shape, primals[2].shape[-1], torch.float64, "cpu", seed=9)[3:])
    f = lambda q, k, v: attention_jvp(q, k, v, *tangents, attn_mask=mask, causal=causal)[0]
    _, t_o = torch.func.jvp(f, primals, outer)
    _, t_ref = torch.func.jvp(lambda q, k, v: attention_ref(q, k, v, mask, causal), primals, outer)
    torch.testing.assert_close(t_o, t_ref)


def test_default_scale_and_sdpa_semantics():
    """Without masks or empty rows the op equals SDPA (enable_gqa for Hq != Hk)."""
    q, k, v = make((2, 4, 19, 24), (2, 2, 29, 24), 24, torch.float64, "cpu")[:3]
    for causal in (False, True):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(attention(q, k, v, causal=causal), want)
    bias = torch.randn(19, 29, dtype=torch.float64)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(attention(q, k, v, attn_mask=bias, scale=0.3), want)


@pytest.mark.slow
@pytest.mark.parametrize("L", [255, 512])
def test_longer_sequences(L, device_backend):
    device, _ = device_backend
    primals, tangents, mask, causal = run_case((1, 2, 2, L, L, 64, 64, True, "keypad"), torch.float32, device)
    check_all(primals, tangents, mask, causal, torch.float32)



def random_case(seed):
    """A seeded random problem: sizes from 1 to beyond a tile, any head dim, every option."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    Hk, G = r(1, 3), r(1, 3)
    D = r(1, 256) if seed % 3 else r(1, 24)
    mask = [None, "keypad", "bool", "additive"][r(0, 3)]
    return (r(1, 2), Hk * G, Hk, r(1, 300), r(1, 300), D, r(1, 130), bool(r(0, 1)), mask)


@pytest.mark.parametrize("seed", range(12))
def test_cpp_kernels_random_shapes(seed):
    """The C++ CPU kernels on random shapes against fp64, under the tolerance rule."""
    from scm_fast.ops import use_backend
    case = random_case(seed)
    with use_backend("cpp"):
        primals, tangents, mask, causal = run_case(case, torch.float32, "cpu")
        check_all(primals, tangents, mask, causal, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "additive"])
def test_mask_without_unit_key_stride(dtype, device_backend):
    """A mask whose key stride is not 1 (a transposed view) gives what its contiguous copy gives (the
    Triton launcher copies it: the kernels are compiled and reported for a unit key stride)."""
    device, _ = device_backend
    primals, tangents, _, _ = run_case((1, 2, 2, 45, 45, 96, 96, False, None), torch.float32, device)
    g = torch.Generator().manual_seed(4)
    mask = torch.randn(1, 2, 45, 45, generator=g).to(device)
    mask = (mask > -0.5) if dtype == torch.bool else mask
    strided = mask.transpose(-1, -2)
    assert strided.stride(-1) != 1
    fn = lambda m: torch.func.jvp(lambda q, k, v: attention(q, k, v, attn_mask=m), primals, tangents)  # noqa: E731
    for a, b in zip(fn(strided), fn(strided.contiguous())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
