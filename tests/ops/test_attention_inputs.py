"""scm_fast.ops.attention on edge inputs: extreme softmax scales, empty and degenerate shapes, flags
of the wrong type, NaN on fully masked rows; on every backend (C++, reference, Triton interpreter)."""
import pytest
import torch

from scm_fast.ops import attention, attention_jvp, attention_ref
from tolerance import assert_rule


def qkv_tangents(B, H, Hk, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, D)]
    primals = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    tangents = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    return primals, tangents


def op_jvp_and_grad(fn, primals, tangents, grad_seed=2):
    """(o, to, dq, dk, dv) of fn under torch.func.jvp, then the backward of o."""
    primals = tuple(x.detach().clone().requires_grad_() for x in primals)
    o, to = torch.func.jvp(fn, primals, tuple(tangents))
    grad_out = torch.randn(o.shape, generator=torch.Generator().manual_seed(grad_seed)).to(o)
    o.backward(grad_out)
    return (o, to, *(x.grad for x in primals)), grad_out


def ref_jvp_and_grad(primals, tangents, grad_out, dtype, **kw):
    primals = tuple(x.detach().to(dtype).requires_grad_() for x in primals)
    o, to = torch.func.jvp(lambda q, k, v: attention_ref(q, k, v, **kw), primals, tuple(t.to(dtype) for t in tangents))
    o.backward(grad_out.to(dtype))
    return (o, to, *(x.grad for x in primals))


# ---- 1. extreme scales: the row max and the exponent see the same rounded scaled logits ------------
def fa2_grads(primals, mask, scale, grad_out, dtype):
    """(dq, dk) by FlashAttention-2's backward in plain torch ops: ds = p (dO V^T - delta) with
    delta = rowsum(dO * O), as every backend computes it. Its rounding in `dtype` (delta and dO V^T
    differ by ~eps |dO| |v|, which dq and dk multiply by the scale) is the baseline the tolerance rule
    compares the kernels' dq and dk with; attention_ref's softmax backward has no such term."""
    q, k, v, do = (x.detach().to(dtype) for x in (*primals, grad_out))
    s = (scale * q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    delta = (do * (p @ v)).sum(-1, keepdim=True)
    ds = p * (do @ v.transpose(-1, -2) - delta)
    return scale * ds @ k, scale * ds.transpose(-1, -2) @ q


@pytest.mark.parametrize("D", [16, 96], ids=["D16", "D96-two-pass"])
@pytest.mark.parametrize("scale", [1e9, 1e4, 1e-9])
def test_extreme_scales_match_fp64(scale, D, device_backend):
    """scale=1e9 gave wrong rows and NaN on the C++ kernel (max and exponent rounded differently), and
    at 1e4 a tangent off by 1e-2 on every backend (t_acc - r o cancelling); o, to and dv are now as
    exact as attention_ref in fp32, dq and dk as FlashAttention-2's backward in fp32. Head dim 96 runs
    the Triton kernels' two-pass forward + JVP (its shift c comes from the gathered K[j], tK[j])."""
    device, _ = device_backend
    primals, tangents = qkv_tangents(1, 2, 2, 40, 70, D)
    primals, tangents = [x.to(device) for x in primals], [t.to(device) for t in tangents]
    keep = torch.ones(1, 1, 40, 70, dtype=torch.bool, device=device)
    keep[..., 5, :] = False  # a fully masked row
    mask = keep.expand(1, 2, 40, 70)
    got, grad_out = op_jvp_and_grad(lambda q, k, v: attention(q, k, v, attn_mask=keep, scale=scale), primals, tangents)
    exact = ref_jvp_and_grad(primals, tangents, grad_out, torch.float64, attn_mask=mask, scale=scale)
    low = list(ref_jvp_and_grad(primals, tangents, grad_out, torch.float32, attn_mask=mask, scale=scale))
    low[2:4] = fa2_grads(primals, mask, scale, grad_out, torch.float32)
    for name, a, lo, ex in zip(("o", "to", "dq", "dk", "dv"), got, low, exact):
        assert_rule(name, a, lo, ex, torch.float32)
    o, to, dq = got[:3]
    assert o[:, :, 5].abs().max() == 0 and to[:, :, 5].abs().max() == 0 and dq[:, :, 5].abs().max() == 0


@pytest.mark.parametrize("scale", [1e9, 1e4])
def test_extreme_scale_equals_prescaled_logits(scale):
    """attention(q, k, v, scale=s) == attention(s q, k, v, scale=1) on the C++ kernel: same logits, same rows."""
    from scm_fast.ops import use_backend
    (q, k, v), _ = qkv_tangents(1, 2, 2, 40, 16, 16)
    with use_backend("cpp"):
        o = attention(q, k, v, scale=scale)
        o_pre = attention(q * scale, k, v, scale=1.0)
    exact = attention_ref(q.double(), k.double(), v.double(), scale=scale)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(o_pre.double(), exact, rtol=0, atol=1e-6)


# ---- 3. flags: causal is a bool, "top_left" or "bottom_right" ----------------------------------------
@pytest.mark.parametrize("causal", ["no", "bottom-right", 1, 0, None, torch.tensor(True)],
                         ids=["str", "misspelt", "int1", "int0", "None", "tensor"])
def test_causal_must_be_a_bool_or_an_alignment(causal):
    (q, k, v), (tq, tk, tv) = qkv_tangents(1, 2, 2, 5, 5, 8)
    expected = "causal must be a bool, 'top_left' or 'bottom_right'"
    with pytest.raises(TypeError, match=rf"{expected}, got {type(causal).__name__}"):
        attention(q, k, v, causal=causal)
    with pytest.raises(TypeError, match=expected):
        attention_jvp(q, k, v, tq, tk, tv, causal=causal)
    from scm_fast.ops.attention import not_supported_reasons
    assert any(expected in r for r in not_supported_reasons(q, k, v, causal=causal))


def test_top_left_is_sdpa_is_causal():
    """causal=True and "top_left" are SDPA's is_causal; "bottom_right" on Lq = Lk is the same too."""
    (q, k, v), _ = qkv_tangents(1, 2, 2, 6, 9, 8)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for causal in (True, "top_left"):
        torch.testing.assert_close(attention(q, k, v, causal=causal), want, rtol=1e-5, atol=1e-6)
    q2 = q[:, :, :6]
    k2, v2 = k[:, :, :6], v[:, :, :6]
    torch.testing.assert_close(attention(q2, k2, v2, causal="bottom_right"), attention(q2, k2, v2, causal=True))


@pytest.mark.parametrize("scale", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_scale_must_be_finite(scale):
    (q, k, v), _ = qkv_tangents(1, 2, 2, 5, 5, 8)
    with pytest.raises(TypeError, match=r"scale must be a float or None, got .*: it must be finite"):
        attention(q, k, v, scale=scale)


# ---- 4. zero heads: a clear ValueError; zero keys: every row fully masked --------------------------
@pytest.mark.parametrize("hq,hk", [(0, 2), (2, 0), (0, 0)])
def test_zero_heads_raise_value_error(hq, hk):
    q, k, v = torch.randn(1, hq, 3, 8), torch.randn(1, hk, 4, 8), torch.randn(1, hk, 4, 8)
    with pytest.raises(ValueError, match=r"q and k/v must have at least one head, got q \(1, %d, 3, 8\)" % hq):
        attention(q, k, v)


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"attn_mask": torch.ones(3, 0, dtype=torch.bool)}],
                         ids=["plain", "causal", "mask"])
def test_zero_keys_give_zeros(kw, device_backend):
    """Lk = 0: no row sees a key, so (as for fully masked rows) output, tangent and dq are 0; dk, dv empty."""
    device, _ = device_backend
    primals, tangents = qkv_tangents(2, 4, 2, 3, 0, 8)
    primals, tangents = [x.to(device) for x in primals], [t.to(device) for t in tangents]
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    (o, to, dq, dk, dv), _ = op_jvp_and_grad(lambda q, k, v: attention(q, k, v, **kw), primals, tangents)
    assert o.shape == to.shape == dq.shape == (2, 4, 3, 8) and dk.shape == dv.shape == (2, 2, 0, 8)
    for t in (o, to, dq):
        assert torch.equal(t, torch.zeros_like(t))


# ---- 6. empty batch or queries: empty results on every backend and dtype ---------------------------
@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (2, 2, 0, 4)], ids=["B0", "Lq0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_empty_inputs_give_empty_results(shape, dtype, device_backend):
    device, name = device_backend
    if dtype == torch.float64 and name in ("cpp", "triton"):
        pytest.skip("float64 runs on the reference backend only")
    B, H, Lq, Lk = shape
    primals, tangents = qkv_tangents(B, H, H, Lq, Lk, 8, dtype)
    primals, tangents = [x.to(device) for x in primals], [t.to(device) for t in tangents]
    (o, to, dq, dk, dv), _ = op_jvp_and_grad(lambda q, k, v: attention(q, k, v, causal=True), primals, tangents)
    assert o.shape == to.shape == dq.shape == (B, H, Lq, 8) and dk.shape == dv.shape == (B, H, Lk, 8)
    assert o.dtype == dtype and dk.dtype == dtype
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))
    o2, to2 = attention_jvp(*primals, *tangents)
    assert o2.shape == to2.shape == (B, H, Lq, 8)


def test_empty_inputs_on_the_reference_backend_in_every_dtype():
    """SCM_FAST_BACKEND=reference runs every dtype on the reference: B = 0 works there too."""
    from scm_fast.ops import use_backend
    with use_backend("reference"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            (q, k, v), _ = qkv_tangents(0, 2, 2, 3, 4, 8, dtype)
            assert attention(q, k, v).shape == (0, 2, 3, 8)


# ---- 7. NaN in q or in a masked key: a fully masked row is still 0 ---------------------------------
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_nan_on_fully_masked_rows_gives_zeros(mask_kind, device_backend):
    """Row 3 sees no key and has a NaN q; key 6 is NaN and masked for every row: rows other than 3 are
    as without the NaNs, row 3 is 0 (its output depends on no key)."""
    device, _ = device_backend
    (q, k, v), tangents = qkv_tangents(1, 2, 2, 8, 9, 8)
    keep = torch.rand(1, 1, 8, 9, generator=torch.Generator().manual_seed(4)) > 0.3
    keep[..., 3, :] = False
    keep[..., :, 6] = False
    keep[..., :, 0] = True
    keep[..., 3, 0] = False
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    q_nan, k_nan = q.clone(), k.clone()
    q_nan[:, :, 3] = float("nan")
    k_nan[:, :, 6] = float("nan")
    args = lambda *xs: [x.to(device) for x in xs]
    fn = lambda q, k, v: attention(q, k, v, attn_mask=mask.to(device))
    o, to = torch.func.jvp(fn, tuple(args(q_nan, k_nan, v)), tuple(args(*tangents)))
    want, t_want = torch.func.jvp(fn, tuple(args(q, k, v)), tuple(args(*tangents)))
    assert torch.equal(o[:, :, 3], torch.zeros_like(o[:, :, 3])) and torch.equal(to[:, :, 3], torch.zeros_like(o[:, :, 3]))
    rows = [i for i in range(8) if i != 3]
    torch.testing.assert_close(o[:, :, rows], want[:, :, rows])
    torch.testing.assert_close(to[:, :, rows], t_want[:, :, rows])
    ref = attention_ref(*args(q_nan, k_nan, v), attn_mask=mask.to(device))
    assert torch.equal(ref[:, :, 3], torch.zeros_like(ref[:, :, 3]))
