"""scm_fast.models.use_pytorch_ops: it reaches every scm_fast layer (scm_fast.nn.Attention, the
U-Net's attention, the double norms swapped into diffusers models), runs PyTorch's SDPA, and goes
back; and build_network."""
import pytest
import torch
import torch.nn.functional as F

import scm_fast
from scm_fast import nn
from scm_fast.models import DiT, UNet, build_network, dit_config, unet_config, use_pytorch_ops
from scm_fast.models.pytorch_ops import switchable


class Tokens(torch.nn.Module):
    """A model another codebase might build from scm_fast.nn.Attention."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Attention(16, 2)
        self.mlp = torch.nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        return self.mlp(self.attn(x))


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    return calls


def impls(model):
    return {type(m).__name__: m.impl for m in model.modules() if hasattr(m, "impl")}


def test_attention_model_runs_sdpa_and_goes_back(sdpa_calls):
    torch.manual_seed(0)
    model = Tokens()
    x = torch.randn(2, 5, 16)
    fused = model(x)
    assert sdpa_calls == []
    assert use_pytorch_ops(model) is model
    assert impls(model) == {"Attention": "sdpa", "Linear": "torch", "GELU": "torch", "RMSNorm": "torch"}
    torch.testing.assert_close(model(x), fused)
    assert len(sdpa_calls) == 1
    use_pytorch_ops(model, False)
    assert set(impls(model).values()) == {"fused"}
    assert torch.equal(model(x), fused)
    assert len(sdpa_calls) == 1


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_networks_run_sdpa_in_every_attention(arch, sdpa_calls):
    if arch == "dit":
        cfg = dit_config("tiny", img_size=8, in_channels=2, depth=3)
        model, x, n_attn = DiT(cfg), torch.randn(2, 2, 8, 8), 3
    else:
        cfg = unet_config("tiny", in_channels=2)
        model, x = UNet(cfg), torch.randn(2, 2, 16, 16)
        n_attn = sum(type(m).__name__ == "UNetAttention" for m in model.modules())
    t = torch.tensor([0.3, 1.2])
    model(x, t)
    assert sdpa_calls == []
    use_pytorch_ops(model)
    assert all(m.impl in ("sdpa", "torch") for m in model.modules() if switchable(m))
    model(x, t)
    assert len(sdpa_calls) == n_attn > 0
    use_pytorch_ops(model, False)
    model(x, t)
    assert len(sdpa_calls) == n_attn


def test_only_scm_fast_classes_are_switched():
    class Foreign(torch.nn.Module):  # an `impl` attribute outside the scm_fast package: not ours
        impl = "something"

    class MyLinear(nn.Linear):  # a subclass of an scm_fast layer: switched
        pass
    model = torch.nn.Sequential(Foreign(), MyLinear(2, 2), torch.nn.Linear(2, 2))
    use_pytorch_ops(model)
    assert model[0].impl == "something" and model[1].impl == "torch"
    use_pytorch_ops(model, False)
    assert model[0].impl == "something" and model[1].impl == "fused"


def test_swapped_diffusers_norms_are_switched():
    normalization = pytest.importorskip("diffusers.models.normalization")
    holder = torch.nn.ModuleDict(dict(
        cont=normalization.AdaLayerNormContinuous(16, 8, elementwise_affine=True, eps=1e-5),
        group=normalization.AdaGroupNorm(8, 12, num_groups=3, act_fn="silu", eps=1e-5)))
    assert set(scm_fast.swap_adaptive_norm(holder).swapped) == {"cont", "group"}
    x, h, c = torch.randn(2, 6, 16), torch.randn(2, 12, 4, 4), torch.randn(2, 8)
    fused = holder["cont"](x, c), holder["group"](h, c)
    use_pytorch_ops(holder)
    assert {holder["cont"].impl, holder["group"].impl} == {"torch"}
    torch.testing.assert_close((holder["cont"](x, c), holder["group"](h, c)), fused)
    use_pytorch_ops(holder, False)
    assert {holder["cont"].impl, holder["group"].impl} == {"fused"}


@pytest.mark.parametrize("arch,objective,class_cond", [("dit", "sct", True), ("dit", "scd", False),
                                                        ("unet", "meanflow", True)])
def test_build_network(arch, objective, class_cond):
    from types import SimpleNamespace
    cfg = SimpleNamespace(arch=arch, model="tiny", patch=0, class_cond=class_cond, objective=objective,
                          dropout=0.1, dropout_res=0)
    net = build_network(cfg, (2, 16, 16), 10)
    assert isinstance(net, DiT if arch == "dit" else UNet)
    assert net.cfg.num_classes == (10 if class_cond else 0)
    assert net.cfg.guidance_embed == (objective == "scd") and net.cfg.second_time == (objective == "meanflow")
    if arch == "dit":
        assert net.cfg.patch == 2
    else:
        assert net.cfg.dropout == 0.1
    with pytest.raises(ValueError, match="square"):
        build_network(cfg, (2, 16, 8), 10)
