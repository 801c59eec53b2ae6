"""The EDM2-style U-Net and scm_fast.nn.Conv2d: parameter counts (closed form, and EDM2's layout
against the paper's sizes), Conv2d against F.conv2d, the U-Net's tangent through the fused ops
against the PyTorch ops (fp64), the reference ops and central finite differences, the one-pass
graph, and input checks."""
import pytest
import torch
import torch.nn.functional as F

from scm_fast.models import UNET_PRESETS, UNet, UNetConfig, unet_config, use_pytorch_ops
from scm_fast.models.unet import UNetAttention
from scm_fast.nn import Conv2d
from scm_fast.ops import use_backend
from test_dit import inputs  # the same (x, t, tx, tt) as the DiT's tangent tests

PAPER_PARAMS = {"S": 280e6, "M": 498e6, "L": 778e6, "XL": 1119e6, "XXL": 1523e6}  # [P §5]


# ---- parameter counts ------------------------------------------------------------------------
def walk(cfg, block, conv_in, embed, out):
    """Sum over EDM2's U-Net layout: block(ci, co, encoder, attention) per residual block."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    res = [cfg.img_size >> level for level in range(len(widths))]
    n, cout, skips = embed + conv_in(widths[0]) + out(widths[0]), widths[0], [widths[0]]
    for level, c in enumerate(widths):
        if level:
            n += block(cout, cout, True, False)
            skips.append(cout)
        for _ in range(cfg.num_blocks):
            n += block(cout, c, True, res[level] in cfg.attn_resolutions)
            cout = c
            skips.append(c)
    for level in reversed(range(len(widths))):
        c = widths[level]
        if level == len(widths) - 1:
            n += block(cout, cout, False, True) + block(cout, cout, False, False)
        else:
            n += block(cout, cout, False, False)
        for _ in range(cfg.num_blocks + 1):
            n += block(cout + skips.pop(), c, False, res[level] in cfg.attn_resolutions)
            cout = c
    return n


def expected_params(cfg):
    """This U-Net: convs and linears with biases, adaptive double norms Linear(E, 2C), QK-norm weights."""
    E, hd, c = cfg.emb_channels, cfg.head_dim, cfg.in_channels
    conv = lambda ci, co, k: ci * co * k * k + co
    adn = lambda ch: E * 2 * ch + 2 * ch
    scalar = (256 * E + E) + (E * E + E)

    def block(ci, co, _encoder, attention):
        n = adn(ci) + conv(ci, co, 3) + adn(co) + conv(co, co, 3) + (conv(ci, co, 1) if ci != co else 0)
        return n + (adn(co) + conv(co, 3 * co, 1) + 2 * hd + conv(co, co, 1) if attention else 0)

    embed = scalar * (1 + cfg.guidance_embed + cfg.second_time) + ((cfg.num_classes + 1) * E if cfg.num_classes else 0)
    return walk(cfg, block, lambda c0: conv(c, c0, 3), embed, lambda c0: adn(c0) + conv(c0, c, 3))


def edm2_params(cfg):
    """EDM2's own layers on the same layout (networks_edm2.py): bias-free MPConvs, one Linear(E, C) and
    a scalar gain per block, attention inside the block, a constant input channel, an output gain."""
    E, c = cfg.emb_channels, cfg.in_channels

    def block(ci, co, encoder, attention):
        n = (co if encoder else ci) * co * 9 + E * co + co * co * 9 + (ci * co if ci != co else 0) + 1
        return n + (4 * co * co if attention else 0)

    embed = cfg.model_channels * E + cfg.num_classes * E
    return walk(cfg, block, lambda c0: (c + 1) * c0 * 9, embed, lambda c0: c0 * c * 9 + 1)


@pytest.mark.parametrize("preset", list(UNET_PRESETS))
def test_parameter_counts(preset):
    cfg = unet_config(preset, num_classes=1000, guidance_embed=preset == "S", second_time=preset == "tiny")
    with torch.device("meta"):
        model = UNet(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(cfg)
    if preset == "tiny":
        assert n < 1e6, n
    else:
        # EDM2's layers on this layout give the paper's sizes to 0.1% (280.2 / 497.8 / 777.5 / 1119.3 / 1523.2 M) ...
        plain = unet_config(preset, num_classes=1000)
        assert abs(edm2_params(plain) / PAPER_PARAMS[preset] - 1) < 1e-3, edm2_params(plain)
        # ... and this U-Net's adaptive double norms add ~23%: S measures 346.8 M with guidance_embed (346.0 M
        # without, x1.24 the paper's 280 M), XXL 1880.3 M without (x1.23).
        assert 1.2 < n / PAPER_PARAMS[preset] < 1.25, n


def test_unconditional_tiny_is_under_a_million_parameters():
    n = sum(p.numel() for p in UNet(unet_config("tiny")).parameters())
    assert n == expected_params(unet_config("tiny")) and n < 1e6


# ---- Conv2d ----------------------------------------------------------------------------------
CONVS = {
    "3x3": dict(kernel_size=3, padding=1),
    "stride2-groups2": dict(kernel_size=3, stride=2, padding=1, groups=2),
    "same-dilation2": dict(kernel_size=3, padding="same", dilation=2),
    "reflect-nobias": dict(kernel_size=(3, 1), padding=(1, 0), padding_mode="reflect", bias=False),
    "1x1": dict(kernel_size=1),
}


def torch_twin(m):
    ref = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                          m.bias is not None, m.padding_mode).double()
    ref.load_state_dict(m.state_dict())
    return ref


@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_values_gradients_and_tangents_match_pytorch(name):
    torch.manual_seed(0)
    m = Conv2d(4, 6, **CONVS[name]).double()
    ref = torch_twin(m)
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64, requires_grad=True)
    tx = torch.randn_like(x)
    y, ty = torch.func.jvp(m, (x,), (tx,))
    ry, rty = torch.func.jvp(ref, (x,), (tx,))
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(ty, rty)
    assert ty.grad_fn is None and not ty.requires_grad  # the tangent keeps nothing for backward
    assert rty.requires_grad  # (PyTorch's does: tx conv W is recorded for dW)
    assert torch.autograd.gradcheck(m, (x,))
    g = torch.randn_like(y)
    got = torch.autograd.grad(m(x), [x, *m.parameters()], g)
    want = torch.autograd.grad(ref(x), [x, *ref.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(m(x[0]), ref(x[0]))  # unbatched (C, H, W)


def test_conv2d_tangent_along_its_parameters():
    m = Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    tw, tb = torch.randn_like(m.weight), torch.randn_like(m.bias)
    f = lambda w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))
    _, t = torch.func.jvp(f, (m.weight.detach(), m.bias.detach()), (tw, tb))
    torch.testing.assert_close(t, F.conv2d(x, tw, tb, padding=1))
    _, t = torch.func.jvp(lambda b: torch.func.functional_call(m, {"bias": b}, (x,)), (m.bias.detach(),), (tb,))
    torch.testing.assert_close(t, tb[:, None, None].expand(2, 5, 6, 6))


def test_conv2d_under_autocast():
    torch.manual_seed(0)
    m = Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        ref = F.conv2d(x, m.weight, m.bias, padding=1)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
    y.float().square().sum().backward()
    assert m.weight.grad.dtype == x.grad.dtype == torch.float32


def test_pytorch_impl_is_torch_conv2d():
    m = Conv2d(2, 3, 3, padding=1)
    m.impl = "torch"
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    _, t = torch.func.jvp(m, (x,), (torch.ones_like(x),))
    assert t.requires_grad  # PyTorch's forward AD, recorded


# ---- the U-Net -------------------------------------------------------------------------------
CFG = unet_config("tiny", img_size=8, in_channels=2, attn_resolutions=(8, 4), num_classes=3, guidance_embed=True,
                  second_time=True)
LABELS = torch.tensor([0, -1])


def randomised(cfg, seed=0):
    """A U-Net with its zero-initialised layers (and the QK-norm weights) re-drawn, so that F and dF
    are not trivially 0."""
    torch.manual_seed(seed)
    model = UNet(cfg)
    for m in model.modules():
        if isinstance(m, Conv2d) and not m.weight.any():
            m.reset_parameters()
        elif isinstance(m, UNetAttention):
            torch.nn.init.normal_(m.q_norm.weight, 1.0, 0.2)
            torch.nn.init.normal_(m.k_norm.weight, 1.0, 0.2)
    return model


def model_jvp(model, x, t, tx, tt):
    s, r = torch.tensor([1.5, 1.0], dtype=x.dtype), torch.tensor([0.1, 0.9], dtype=x.dtype)
    return torch.func.jvp(lambda x, t: model(x, t, labels=LABELS, guidance=s, r=r), (x, t), (tx, tt))


def test_starts_at_zero():
    x, t, _, _ = inputs(torch.float32)
    assert torch.equal(UNet(CFG)(x, t, labels=LABELS), torch.zeros_like(x))


def test_fused_tangent_matches_reference_ops_and_finite_differences():
    model = randomised(CFG).double()
    x, t, tx, tt = inputs(torch.float64)
    with use_backend("reference"):  # fp64 composition of the reference ops
        F64, T64 = model_jvp(model, x, t, tx, tt)
        h = 1e-5
        Fp = model(x + h * tx, t + h * tt, labels=LABELS, guidance=torch.tensor([1.5, 1.0], dtype=x.dtype),
                   r=torch.tensor([0.1, 0.9], dtype=x.dtype))
        Fm = model(x - h * tx, t - h * tt, labels=LABELS, guidance=torch.tensor([1.5, 1.0], dtype=x.dtype),
                   r=torch.tensor([0.1, 0.9], dtype=x.dtype))
    assert T64.shape == x.shape
    torch.testing.assert_close(T64, (Fp - Fm) / (2 * h), rtol=1e-6, atol=1e-7)
    assert T64.abs().max() > 1e-2  # a non-trivial tangent
    assert not T64.requires_grad  # no autograd graph anywhere in the tangent
    with use_backend("cpp"):  # the fused C++ kernels in fp32
        F32, T32 = model_jvp(model.float(), *(a.float() for a in (x, t, tx, tt)))
    assert (F32.double() - F64).abs().max().item() < 1e-5 * max(1.0, F64.abs().max().item())
    assert (T32.double() - T64).abs().max().item() < 1e-4 * max(1.0, T64.abs().max().item())


@pytest.mark.slow
def test_triton_kernels_on_the_unet():
    """The Triton kernels (interpreter on CPU, ~2 min): F, tangent and a backward in fp32 vs fp64."""
    model = randomised(CFG).double()
    x, t, tx, tt = inputs(torch.float64)
    with use_backend("reference"):
        F64, T64 = model_jvp(model, x, t, tx, tt)
    with use_backend("triton"):
        F32, T32 = model_jvp(model.float(), *(a.float() for a in (x, t, tx, tt)))
        F32.square().sum().backward()
    assert (F32.double() - F64).abs().max().item() < 1e-5 * max(1.0, F64.abs().max().item())
    assert (T32.double() - T64).abs().max().item() < 1e-4 * max(1.0, T64.abs().max().item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_pytorch_ops_give_the_same_model():
    """SDPA, torch's conv / linear / silu / rms_norm and the norm's composition: same F and tangent (fp64);
    PyTorch's tangent carries a graph, ours none."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = randomised(CFG).double()
    x, t, tx, tt = inputs(torch.float64)
    with use_backend("reference"):
        F1, T1 = model_jvp(model, x, t, tx, tt)
    with sdpa_kernel(SDPBackend.MATH):
        F2, T2 = model_jvp(use_pytorch_ops(model), x, t, tx, tt)
    assert all(m.impl in ("torch", "sdpa") for m in model.modules() if hasattr(m, "impl"))
    torch.testing.assert_close(F1, F2)
    torch.testing.assert_close(T1, T2)
    assert not T1.requires_grad and T2.requires_grad


def test_one_pass_keeps_the_graph_and_matches_a_plain_forward():
    model = randomised(CFG)
    x, t, tx, tt = inputs(torch.float32)
    F1, T = model_jvp(model, x, t, tx, tt)
    assert F1.requires_grad and not T.requires_grad
    F1.square().sum().backward()
    g_one = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F2 = model(x, t, labels=LABELS, guidance=torch.tensor([1.5, 1.0]), r=torch.tensor([0.1, 0.9]))
    torch.testing.assert_close(F1, F2)
    F2.square().sum().backward()
    for a, b in zip(g_one, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_shares_its_mask_between_primal_and_tangent():
    model = randomised(unet_config("tiny", img_size=8, in_channels=2, attn_resolutions=(4,), dropout=0.3)).double()
    x, t, tx, tt = inputs(torch.float64)
    f = lambda x, t: model(x, t)
    with use_backend("reference"):
        torch.manual_seed(5)
        _, T = torch.func.jvp(f, (x, t), (tx, tt))
        h = 1e-5
        torch.manual_seed(5)
        Fp = f(x + h * tx, t + h * tt)
        torch.manual_seed(5)
        Fm = f(x - h * tx, t - h * tt)
        torch.manual_seed(6)
        F_other = f(x, t)
    torch.testing.assert_close(T, (Fp - Fm) / (2 * h), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(F_other, (Fp + Fm) / 2)  # dropout is active


def test_inputs_are_checked():
    model = UNet(CFG)
    t, labels = torch.ones(1), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x_in must be \(B, 2, 8, 8\), got \(1, 2, 16, 16\)"):
        model(torch.randn(1, 2, 16, 16), t, labels=labels)
    with pytest.raises(ValueError, match=r"x_in must be \(B, 2, 8, 8\), got \(1, 3, 8, 8\)"):
        model(torch.randn(1, 3, 8, 8), t, labels=labels)
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        model(torch.randn(1, 2, 8, 8), t)
    with pytest.raises(ValueError, match=r"labels must be integer \(B,\)"):
        model(torch.randn(1, 2, 8, 8), t, labels=torch.zeros(1))
    with pytest.raises(ValueError, match=r"t must be \(B,\) = \(1,\)"):
        model(torch.randn(1, 2, 8, 8), torch.ones(2), labels=labels)
    with pytest.raises(ValueError, match="UNet preset must be one of"):
        unet_config("huge")


def test_configs_are_checked():
    with pytest.raises(ValueError, match=r"img_size \(12\) must be a multiple of 2\^\(levels - 1\) = 8"):
        unet_config("S", img_size=12)
    with pytest.raises(ValueError, match=r"32 is not one of the level resolutions \(16, 8\)"):
        unet_config("tiny", attn_resolutions=(32,))
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        unet_config("tiny", head_dim=24)
    with pytest.raises(ValueError, match="dropout"):
        unet_config("tiny", dropout=1.0)
    assert UNetConfig().emb_channels == 192 * 4 and unet_config("XL").emb_channels == 384 * 4
