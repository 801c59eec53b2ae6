"""The DiT: parameter counts, and its tangent through the fused ops against the reference ops (fp64)
and central finite differences."""
import pytest
import torch

from scm_fast.models import PRESETS, AdaptiveWeight, DiT, dit_config
from scm_fast.ops import use_backend


def expected_params(cfg):
    """Closed-form count: per block 2 norms' Linear(D, 2D), qkv, proj, MLP, QK-norm weights."""
    D, p, c = cfg.hidden, cfg.patch, cfg.in_channels
    hd, M = D // cfg.heads, int(D * cfg.mlp_ratio)
    block = 2 * (2 * D * D + 2 * D) + (3 * D * D + 3 * D) + (D * D + D) + (D * M + M + M * D + D) + 2 * hd
    embed = 256 * D + D + D * D + D                               # time MLP
    embed += (cfg.num_classes + 1) * D if cfg.num_classes else 0
    embed += (256 * D + D + D * D + D) * (cfg.guidance_embed + cfg.second_time)
    io = (c * p * p * D + D) + (2 * D * D + 2 * D) + (D * c * p * p + c * p * p)
    return cfg.depth * block + embed + io


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_counts(preset):
    cfg = dit_config(preset, img_size=32, in_channels=4, num_classes=1000, guidance_embed=True)
    with torch.device("meta"):
        model = DiT(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(cfg)
    if preset == "XXL":
        assert 1.4e9 < n < 1.6e9, n  # the ~1.5B class
    if preset == "XL":
        assert 0.6e9 < n < 0.7e9, n


def randomised(cfg, seed=0):
    """A DiT with its zero-initialised output layers re-drawn, so that F and dF are not trivially 0."""
    torch.manual_seed(seed)
    model = DiT(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2 and (name.endswith("proj.weight") or name.endswith("mlp.2.weight") or name == "out.weight"):
            torch.nn.init.normal_(p, std=0.05)
    return model


CFG = dit_config("tiny", img_size=8, in_channels=2, patch=2, num_classes=3, guidance_embed=True)


def inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([0.3, 1.2], dtype=dtype)
    return x, t, torch.randn(x.shape, generator=g, dtype=dtype), torch.tensor([0.7, 0.4], dtype=dtype)


def model_jvp(model, x, t, tx, tt):
    labels, s = torch.tensor([0, 2]), torch.tensor([1.5, 1.0], dtype=x.dtype)
    return torch.func.jvp(lambda x, t: model(x, t, labels=labels, guidance=s), (x, t), (tx, tt))


def test_fused_tangent_matches_reference_ops_and_finite_differences():
    model = randomised(CFG)
    x, t, tx, tt = (a.double() for a in inputs(torch.float64))
    with use_backend("reference"):  # fp64 composition of the reference ops
        F64, T64 = model_jvp(model.double(), x, t, tx, tt)
        h = 1e-5
        Fp = model_jvp(model, x + h * tx, t + h * tt, tx, tt)[0]
        Fm = model_jvp(model, x - h * tx, t - h * tt, tx, tt)[0]
    torch.testing.assert_close(T64, (Fp - Fm) / (2 * h), rtol=1e-6, atol=1e-7)
    assert T64.abs().max() > 1e-2  # a non-trivial tangent
    with use_backend("cpp"):  # the fused C++ kernels in fp32
        F32, T32 = model_jvp(model.float(), *(a.float() for a in (x, t, tx, tt)))
    scale = T64.abs().max().item()
    assert (F32.double() - F64).abs().max().item() < 1e-5 * max(1.0, F64.abs().max().item())
    assert (T32.double() - T64).abs().max().item() < 1e-4 * max(1.0, scale)


def test_one_pass_keeps_the_graph_and_matches_a_plain_forward():
    model = randomised(CFG)
    x, t, tx, tt = inputs(torch.float32)
    F, T = model_jvp(model, x, t, tx, tt)
    assert F.requires_grad
    F.square().sum().backward()
    g_one = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x, t, labels=torch.tensor([0, 2]), guidance=torch.tensor([1.5, 1.0])).square().sum().backward()
    for a, b in zip(g_one, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inputs_are_checked():
    model = DiT(CFG)
    with pytest.raises(ValueError, match=r"x_in must be \(B, 2, 8, 8\)"):
        model(torch.randn(1, 3, 8, 8), torch.ones(1), labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="pass labels"):
        model(torch.randn(1, 2, 8, 8), torch.ones(1))
    with pytest.raises(ValueError, match="DiT preset must be one of"):
        dit_config("huge")


def test_adaptive_weight_starts_at_zero_and_learns_per_time():
    w = AdaptiveWeight()
    t = torch.tensor([0.1, 1.0])
    assert torch.equal(w(t), torch.zeros(2))
    torch.nn.init.normal_(w.linear.weight)
    assert w(t)[0] != w(t)[1]


def test_pytorch_ops_give_the_same_model():
    """use_pytorch_ops swaps in SDPA and the norm's composition: same outputs and tangents."""
    from scm_fast.models import use_pytorch_ops
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = randomised(CFG).double()
    x, t, tx, tt = inputs(torch.float64)
    F1, T1 = model_jvp(model, x, t, tx, tt)
    with sdpa_kernel(SDPBackend.MATH):
        F2, T2 = model_jvp(use_pytorch_ops(model), x, t, tx, tt)
    torch.testing.assert_close(F1, F2)
    torch.testing.assert_close(T1, T2)
