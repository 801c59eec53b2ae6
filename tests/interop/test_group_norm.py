"""The tangent-safe group norm patch_sdpa installs (scm_fast/interop/group_norm.py): PyTorch's
forward-AD rule fails on non-contiguous inputs (UNet2DModel) and gives an fp32 tangent for a bf16
output under CPU autocast (GroupNorm -> Conv UNets); through the patch both run, with tangents
against fp64 (PyTorch's own rule on a contiguous copy, and central finite differences of whole
diffusers UNets)."""
import pytest
import torch
import torch.nn.functional as F

import tiny_diffusers as td
from scm_fast import patch_sdpa
from scm_fast.interop import group_norm

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _channels_last_view(x):
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def _gn_jvp(x, tx, gn):
    return torch.func.jvp(gn, (x,), (tx,))


def test_patch_installs_and_restores_group_norm():
    assert F.group_norm is group_norm.BUILTIN
    with patch_sdpa():
        assert F.group_norm is group_norm.group_norm
    assert F.group_norm is group_norm.BUILTIN


def test_non_contiguous_input_under_jvp():
    """A channels-last view (what AttnProcessor2_0 hands UNet2DModel's next GroupNorm): PyTorch's rule
    raises; through the patch output and tangent equal PyTorch's rule on the contiguous fp64 input."""
    g = torch.Generator().manual_seed(0)
    gn = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(gn.weight, generator=g)
    torch.nn.init.normal_(gn.bias, generator=g)
    x, tx = (_channels_last_view(torch.randn(2, 8, 5, 3, generator=g)) for _ in range(2))
    assert not x.is_contiguous()
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        _gn_jvp(x, tx, gn)
    with patch_sdpa():
        y, ty = _gn_jvp(x, tx, gn)
    want_y, want_t = _gn_jvp(x.double().contiguous(), tx.double().contiguous(), gn.double())
    torch.testing.assert_close(y.double(), want_y, rtol=0, atol=1e-5)
    torch.testing.assert_close(ty.double(), want_t, rtol=0, atol=1e-5)


def test_bf16_autocast_tangent_has_the_output_dtype():
    """Conv -> GroupNorm -> Conv under CPU bf16 autocast: PyTorch's tangent of the norm is fp32 and the
    second conv fails; through the patch the tangent is bf16 and within bf16 rounding of fp32."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 4, 3, padding=1))
    g = torch.Generator().manual_seed(1)
    x, tx = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    want = torch.func.jvp(net, (x,), (tx,))[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            torch.func.jvp(net, (x,), (tx,))
        with patch_sdpa():
            y, ty = torch.func.jvp(net, (x,), (tx,))
    assert y.dtype == ty.dtype == torch.bfloat16
    assert (ty.float() - want).norm() / want.norm() < 0.02


def _unet2d():
    import diffusers
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def _central_difference(f, x, tx, h=1e-4):
    with torch.no_grad():
        return (f(x + h * tx) - f(x - h * tx)) / (2 * h)


def test_unet2d_model_tangent_matches_finite_differences():
    """UNet2DModel (attention blocks: a channels-last view into the next GroupNorm) under torch.func.jvp in
    fp32 with the patch, against the fp64 central difference of the unpatched model (h = 1e-4)."""
    model = _unet2d()
    g = torch.Generator().manual_seed(2)
    x, tx = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([10.0, 500.0])

    def f(x):
        return model(x, t).sample
    with patch_sdpa():
        _, tangent = torch.func.jvp(f, (x,), (tx,))
    model.double()
    want = _central_difference(lambda x: model(x, t.double()).sample, x.double(), tx.double())
    assert (tangent.double() - want).norm() / want.norm() < 1e-4


def test_unet2d_condition_in_bf16_under_jvp():
    """A bare UNet2DConditionModel (no DiffusersNet) under bf16 autocast + torch.func.jvp with the patch:
    finite, and the tangent within 4% of fp32 (measured in test_distill_diffusers: 1.5%)."""
    model = td.unet(4).eval()
    g = torch.Generator().manual_seed(3)
    x, tx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cond = td.cond("unet", 2)
    t = torch.tensor([10.0, 700.0])

    def f(x):
        return model(x, t, **cond).sample.float()
    with patch_sdpa():
        want = torch.func.jvp(f, (x,), (tx,))[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, tangent = torch.func.jvp(f, (x,), (tx,))
    assert torch.isfinite(tangent).all()
    assert (tangent - want).norm() / want.norm() < 0.04
