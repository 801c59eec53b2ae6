"""scm_fast.patch_sdpa and swap_adaptive_norm on real third-party models: tiny random diffusers
DiTTransformer2DModel and SD3Transformer2DModel built from configs (nothing downloaded).
Without the patch, torch.func.jvp through them raises on PyTorch's default SDPA kernel; with it,
values, tangents and gradients match the MATH backend (the only SDPA with a forward-AD rule)."""
import copy
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import scm_fast
from scm_fast.ops import adaptive_double_norm_ref
from scm_fast.ops.adaptive_norm_ref import pnorm
from scm_fast.interop import DoubleNormContinuous, DoubleNormGroup, DoubleNormZero
from tolerance import assert_rule

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]


def tiny_dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10, norm_num_groups=1)


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm")


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.rand(2, generator=g) * 1.5
    extra = dict(labels=torch.tensor([1, 7]), enc=torch.randn(2, 5, 16, generator=g),
                 pooled=torch.randn(2, 8, generator=g))
    tx, tt = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    cast = lambda a: a.to(dtype) if a.is_floating_point() else a  # noqa: E731
    return (cast(x), cast(t)), (cast(tx), cast(tt)), {k: cast(v) for k, v in extra.items()}


def as_function(model, extra):
    """F(x, t) -> the model's sample."""
    if isinstance(model, diffusers.DiTTransformer2DModel):
        return lambda x, t: model(x, timestep=t, class_labels=extra["labels"]).sample
    return lambda x, t: model(x, encoder_hidden_states=extra["enc"], pooled_projections=extra["pooled"],
                              timestep=t).sample


MODELS = {"dit": tiny_dit, "sd3": tiny_sd3}


@pytest.mark.parametrize("name", MODELS)
def test_jvp_raises_on_the_default_sdpa_kernel_without_the_patch(name):
    primals, tangents, extra = inputs()
    fn = as_function(MODELS[name](), extra)
    with pytest.raises((NotImplementedError, RuntimeError), match="forward AD"):
        torch.func.jvp(fn, primals, tangents)


def jvp_then_backward(model, dtype, extra, primals, tangents):
    """(F, dF along the tangents, parameter gradients of mean(F^2) after the jvp)."""
    model.zero_grad(set_to_none=True)
    out, t_out = torch.func.jvp(as_function(model, extra), primals, tangents)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.detach(), t_out, grads


@pytest.mark.parametrize("name", MODELS)
def test_patched_jvp_and_gradients_match_math_backend(name):
    model = MODELS[name]()
    primals, tangents, extra = inputs()
    primals64, tangents64, extra64 = inputs(torch.float64)
    exact_model = copy.deepcopy(model).double()
    with sdpa_kernel(SDPBackend.MATH):
        ref = jvp_then_backward(model, torch.float32, extra, primals, tangents)
        exact = jvp_then_backward(exact_model, torch.float64, extra64, primals64, tangents64)
    with scm_fast.patch_sdpa():
        got = jvp_then_backward(model, torch.float32, extra, primals, tangents)
    assert_rule("F", got[0], ref[0], exact[0], torch.float32)
    assert_rule("dF", got[1], ref[1], exact[1], torch.float32)
    assert got[2].keys() == ref[2].keys()
    with_grad = [n for n, g in ref[2].items() if g is not None and g.abs().sum() > 0]
    assert len(with_grad) > 10
    for n in with_grad:
        assert got[2][n] is not None, f"no gradient for {n}"
        assert_rule(f"grad {n}", got[2][n], ref[2][n], exact[2][n], torch.float32)


@pytest.mark.parametrize("name", MODELS)
def test_patched_jvp_under_cpu_bf16_autocast(name):
    model = MODELS[name]()
    primals, tangents, extra = inputs()
    fn = as_function(model, extra)
    with sdpa_kernel(SDPBackend.MATH):
        exact = torch.func.jvp(fn, primals, tangents)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = torch.func.jvp(fn, primals, tangents)
    with scm_fast.patch_sdpa(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.func.jvp(fn, primals, tangents)
    for label, g, r, e in zip(("F", "dF"), got, ref, exact):
        assert g.dtype == torch.bfloat16
        assert_rule(label, g, r, e, torch.bfloat16)


def test_patch_is_used_and_restored():
    primals, tangents, extra = inputs()
    fn = as_function(tiny_dit(), extra)
    with scm_fast.patch_sdpa():
        torch.func.jvp(fn, primals, tangents)
    assert not scm_fast.sdpa_patched()
    with pytest.raises((NotImplementedError, RuntimeError), match="forward AD"):
        torch.func.jvp(fn, primals, tangents)


def test_diffusers_layer_skip_mode_still_applies_under_the_patch():
    from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode
    v = torch.randn(1, 2, 5, 8)
    with scm_fast.patch_sdpa(), AttentionScoreSkipFunctionMode():
        assert torch.nn.functional.scaled_dot_product_attention(torch.randn(1, 2, 5, 8), v, v) is v


# ---- swap_adaptive_norm ----------------------------------------------------------------------
def test_swap_reports_what_it_swapped_and_what_it_left():
    report = scm_fast.swap_adaptive_norm(tiny_dit())
    assert report.swapped == {f"transformer_blocks.{i}.norm1": "AdaLayerNormZero" for i in range(2)}
    assert "final layer" in report.skipped[""]
    report = scm_fast.swap_adaptive_norm(tiny_sd3())
    assert report.swapped == {"norm_out": "AdaLayerNormContinuous",
                              "transformer_blocks.0.norm1": "AdaLayerNormZero",
                              "transformer_blocks.0.norm1_context": "AdaLayerNormZero",
                              "transformer_blocks.1.norm1": "AdaLayerNormZero",
                              "transformer_blocks.1.norm1_context": "AdaLayerNormContinuous"}
    assert report.skipped == {}


def test_swap_keeps_state_dict_and_is_idempotent():
    model = tiny_sd3()
    before = model.state_dict()
    scm_fast.swap_adaptive_norm(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(before[k] is after[k] or before[k].equal(after[k]) for k in before)
    assert scm_fast.swap_adaptive_norm(model).swapped == {}


def test_swapped_ada_layer_norm_zero_is_the_double_norm():
    block = tiny_dit().double().transformer_blocks[0]
    original = copy.deepcopy(block.norm1)
    scm_fast.swap_adaptive_norm(block)
    x, t, y = torch.randn(2, 16, 16, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([2, 5])
    out, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, t, y, hidden_dtype=torch.float64)
    emb = original.linear(original.silu(original.emb(t, y, hidden_dtype=torch.float64)))
    e_shift, e_scale, e_gate, e_shift_mlp, e_scale_mlp, e_gate_mlp = emb.chunk(6, dim=1)
    torch.testing.assert_close(out, adaptive_double_norm_ref(x, e_scale, e_shift, eps=original.norm.eps))
    torch.testing.assert_close(gate_msa, e_gate)
    torch.testing.assert_close(gate_mlp, e_gate_mlp)
    h = block.norm3(x)  # the parent block's MLP-branch modulation becomes the double norm too
    eps = original.norm.eps
    torch.testing.assert_close(h * (1 + scale_mlp[:, None]) + shift_mlp[:, None],
                               h * pnorm(e_scale_mlp, eps)[:, None] + pnorm(e_shift_mlp, eps)[:, None])


def test_swapped_continuous_and_group_norms_are_the_double_norm():
    from diffusers.models.normalization import AdaGroupNorm, AdaLayerNormContinuous
    torch.manual_seed(0)
    holder = torch.nn.ModuleDict(dict(
        cont=AdaLayerNormContinuous(16, 8, elementwise_affine=True, eps=1e-5),
        group=AdaGroupNorm(8, 12, num_groups=3, act_fn="silu", eps=1e-5))).double()
    for p in holder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    cont, group = holder["cont"], holder["group"]
    x, h, c = (torch.randn(*s, dtype=torch.float64) for s in ((2, 6, 16), (2, 12, 4, 4), (2, 8)))
    s_c, b_c = cont.linear(cont.silu(c)).chunk(2, dim=1)
    s_g, b_g = group.linear(torch.nn.functional.silu(c)).chunk(2, dim=1)
    assert set(scm_fast.swap_adaptive_norm(holder).swapped) == {"cont", "group"}
    torch.testing.assert_close(holder["cont"](x, c), adaptive_double_norm_ref(
        x, s_c, b_c, cont.norm.weight, cont.norm.bias, norm="layer", eps=1e-5))
    torch.testing.assert_close(holder["group"](h, c), adaptive_double_norm_ref(
        h, s_g, b_g, norm="group", num_groups=3, eps=1e-5, channels_last=False))


@pytest.mark.parametrize("name", MODELS)
def test_swapped_model_jvp_and_gradients_match_the_reference_composition(name):
    model = MODELS[name]()
    scm_fast.swap_adaptive_norm(model)
    primals, tangents, extra = inputs()
    with scm_fast.patch_sdpa():
        got = jvp_then_backward(model, torch.float32, extra, primals, tangents)
    for m in model.modules():  # the same model with the PyTorch composition of the double norm
        if isinstance(m, (DoubleNormZero, DoubleNormContinuous, DoubleNormGroup)):
            m.impl = "torch"
    with sdpa_kernel(SDPBackend.MATH):
        ref = jvp_then_backward(model, torch.float32, extra, primals, tangents)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)
    linear_grads = [n for n in got[2] if "norm1.linear.weight" in n]
    assert linear_grads and all(got[2][n].abs().sum() > 0 for n in linear_grads)
    for n, g in ref[2].items():
        if g is not None:
            torch.testing.assert_close(got[2][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_example_script_runs():
    argv = sys.argv
    sys.argv = ["diffusers_sct.py", "--steps", "2", "--batch", "4"]
    try:
        result = runpy.run_path(str(ROOT / "examples" / "diffusers_sct.py"), run_name="__main__")
    finally:
        sys.argv = argv
        scm_fast.unpatch_sdpa()
    assert "main" in result
