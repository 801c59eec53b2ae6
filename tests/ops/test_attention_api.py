"""Input validation messages and torch.library.opcheck of the attention ops."""
import pytest
import torch

from scm_fast.ops import _registry, attention, attention_jvp, use_backend
from scm_fast.ops.attention import MAX_HEAD_DIM, not_supported_reasons


def qkv(B=2, H=4, Hk=2, Lq=5, Lk=7, D=8, Dv=8, dtype=torch.float32):
    return (torch.randn(B, H, Lq, D, dtype=dtype), torch.randn(B, Hk, Lk, D, dtype=dtype),
            torch.randn(B, Hk, Lk, Dv, dtype=dtype))


BAD = [
    # (description, kwargs-builder, exception, message fragment)
    ("rank", lambda q, k, v: dict(q=q[0], k=k, v=v), ValueError, "q must be 4-D (B, H, L, D), got shape (4, 5, 8)"),
    ("batch", lambda q, k, v: dict(q=q, k=k[:1], v=v[:1]), ValueError, "batch sizes differ"),
    ("k/v length", lambda q, k, v: dict(q=q, k=k, v=v[:, :, :3]), ValueError, "k and v must have the same heads and length"),
    ("head dim", lambda q, k, v: dict(q=q, k=k[..., :4], v=v), ValueError, "q and k head dims differ"),
    ("gqa", lambda q, k, v: dict(q=q[:, :3], k=k, v=v), ValueError, "q heads (3) must be a multiple of k/v heads (2)"),
    ("dtype", lambda q, k, v: dict(q=q, k=k.double(), v=v), TypeError, "q, k, v must share a dtype"),
    ("int", lambda q, k, v: dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "q must be float16, bfloat16, float32 or float64"),
    ("not a tensor", lambda q, k, v: dict(q=q.tolist(), k=k, v=v), TypeError, "q must be a torch.Tensor, got list"),
    ("mask shape", lambda q, k, v: dict(q=q, k=k, v=v, attn_mask=torch.ones(2, 1, 1, 6, dtype=torch.bool)),
     ValueError, "attn_mask of shape (2, 1, 1, 6) does not broadcast to (B, Hq, Lq, Lk) = (2, 4, 5, 7)"),
    ("mask rank", lambda q, k, v: dict(q=q, k=k, v=v, attn_mask=torch.ones(1, 2, 4, 5, 7, dtype=torch.bool)),
     ValueError, "does not broadcast"),
    ("mask dtype", lambda q, k, v: dict(q=q, k=k, v=v, attn_mask=torch.ones(5, 7, dtype=torch.int32)),
     TypeError, "attn_mask must be bool or floating point, got torch.int32"),
    ("mask grad", lambda q, k, v: dict(q=q, k=k, v=v, attn_mask=torch.zeros(5, 7, requires_grad=True)),
     ValueError, "attn_mask is treated as a constant"),
    ("scale", lambda q, k, v: dict(q=q, k=k, v=v, scale="0.1"), TypeError, "scale must be a float or None"),
    ("head dim 257", lambda q, k, v: dict(q=torch.randn(1, 1, 2, 257), k=torch.randn(1, 1, 2, 257), v=torch.randn(1, 1, 2, 8)),
     ValueError, "head dims must be in [1, 256]"),
]


@pytest.mark.parametrize("desc,build,exc,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(desc, build, exc, fragment):
    kwargs = build(*qkv())
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(exc) as info:
        attention(q, k, v, **kwargs)
    assert fragment in str(info.value)


def test_bad_tangents():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"tk must match k: expected \(2, 2, 7, 8\)"):
        attention_jvp(q, k, v, q, k[:, :1], v)
    with pytest.raises(TypeError, match="tv must be float16"):
        attention_jvp(q, k, v, q, k, v.int())


# ---- not_supported_reasons: the list the checks above raise from ---------------------------------
def test_not_supported_reasons_is_empty_for_calls_the_op_runs():
    q, k, v = qkv()
    assert not_supported_reasons(q, k, v) == []
    mask = torch.rand(2, 1, 5, 7) > 0.5
    assert not_supported_reasons(q, k, v, attn_mask=mask, causal=True, scale=0.5) == []
    assert not_supported_reasons(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.float64)) == []
    assert not_supported_reasons(q, k, v, tangents=(q, k, v)) == []
    big = torch.randn(1, 1, 2, MAX_HEAD_DIM)
    assert not_supported_reasons(big, big, big) == []


@pytest.mark.parametrize("desc,build,exc,fragment", BAD, ids=[b[0] for b in BAD])
def test_not_supported_reasons_lead_with_what_the_op_raises(desc, build, exc, fragment):
    kwargs = build(*qkv())
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    reasons = not_supported_reasons(q, k, v, **kwargs)
    assert reasons and fragment in reasons[0], reasons
    with pytest.raises(exc) as info:
        attention(q, k, v, **kwargs)
    assert str(info.value) == reasons[0]


def test_not_supported_reasons_names_every_problem():
    q, k, v = qkv()
    big = torch.randn(1, 1, 2, MAX_HEAD_DIM + 1)
    assert not_supported_reasons(big, big, big) == [
        f"head dims must be in [1, {MAX_HEAD_DIM}], got q/k {MAX_HEAD_DIM + 1}, v {MAX_HEAD_DIM + 1}"]
    assert not_supported_reasons(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool)) == [
        "attn_mask of shape (5, 6) does not broadcast to (B, Hq, Lq, Lk) = (2, 4, 5, 7)"]
    assert not_supported_reasons(q, k.double(), v) == [
        "q, k, v must share a dtype, got torch.float32, torch.float64, torch.float32"]
    several = not_supported_reasons(q.half(), k, torch.randn(2, 2, 7, 300), attn_mask=[1], scale=True)
    assert [r.split(" ")[0] for r in several] == ["q,", "head", "attn_mask", "scale"], several
    assert not_supported_reasons(q, k, v, tangents=(q, k[:, :1], v)) == [
        "tk must match k: expected (2, 2, 7, 8) torch.float32 on cpu, got (2, 1, 7, 8) torch.float32 on cpu"]


def test_not_supported_reasons_include_the_backends_float64_refusal():
    q, k, v = qkv(dtype=torch.float64)
    with use_backend("reference"):
        assert not_supported_reasons(q, k, v) == []
    for name in ("triton", "cpp"):
        with use_backend(name):
            (reason,) = not_supported_reasons(q, k, v)
            assert reason.startswith("float64 runs on the reference backend only") and name in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        attention(q.cuda(), k, v)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="SCM_FAST_BACKEND must be one of"):
        _registry.set_backend("cuda")


def test_fp64_on_triton_backend_is_refused():
    with use_backend("triton"), pytest.raises(TypeError, match="float64 attention runs on the reference backend only"):
        attention(*qkv(dtype=torch.float64))


def opcheck_samples(dtype):
    q, k, v = qkv(B=1, H=2, Hk=1, Lq=9, Lk=13, D=16, Dv=8, dtype=dtype)
    tq, tk, tv = (torch.randn_like(x) for x in (q, k, v))
    mask = (torch.rand(1, 1, 1, 13) > 0.3).expand(1, 2, 9, 13)
    blocks = (torch.rand(1, 2, 3, 4) > 0.4).expand(1, 2, 3, 4)  # (B, Hq, ceil(9 / 4), ceil(13 / 4))
    o, lse = torch.ops.scm_fast.attention_fwd(q, k, v, mask, None, 0, 0, True, 4, 0.25)  # bottom-right: Lk - Lq
    return [
        ("attention_fwd", (q, k, v, mask, None, 0, 0, True, 0, 0.25)),
        ("attention_fwd", (q, k, v, None, None, 0, 0, False, 0, 0.25)),
        ("attention_fwd", (q, k, v, None, blocks, 4, 4, False, 0, 0.25)),
        ("attention_fwd_jvp", (q, k, v, tq, tk, tv, mask, None, 0, 0, True, 4, 0.25)),
        ("attention_fwd_jvp", (q, k, v, tq, tk, tv, mask, blocks, 4, 4, True, 4, 0.25)),
        ("attention_bwd", (torch.randn_like(o), q, k, v, o, lse, mask, None, 0, 0, True, 4, 0.25)),
        ("attention_bwd", (torch.randn_like(o), q, k, v, o, lse, None, blocks, 4, 4, False, 0, 0.25)),
    ]


@pytest.mark.skipif(_registry._C is None, reason="scm_fast._C not built")
@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_opcheck(backend):
    dtype = torch.float32
    with use_backend(backend):
        for name, args in opcheck_samples(dtype):
            torch.library.opcheck(getattr(torch.ops.scm_fast, name), args)


@pytest.mark.skipif(_registry._C is None, reason="scm_fast._C not built")
def test_opcheck_cpu_kernels():
    """The C++ kernels' own ops (attention_*_cpu) pass opcheck too."""
    for name, args in opcheck_samples(torch.float32):
        torch.library.opcheck(getattr(torch.ops.scm_fast, name + "_cpu"), args)
