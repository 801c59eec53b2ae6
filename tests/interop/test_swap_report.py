"""swap_adaptive_norm leaves nothing silently: on tiny random diffusers models built from configs
(nothing downloaded) every modulation module it does not swap, and every module with an inline
modulation table (scale_shift_table), is in report.skipped with its reason; each class it swaps
computes norm(x) * pnorm(scale) + pnorm(shift) (scm-reference.md §5) from the original's own
projection outputs, with the state_dict keys unchanged."""
import copy
import importlib
import re
from pathlib import Path

import pytest
import torch

from scm_fast.interop import diffusers_norm, swap_adaptive_norm
from scm_fast.ops.adaptive_norm_ref import adaptive_double_norm_ref, pnorm

diffusers = pytest.importorskip("diffusers")

# the brief's words for a modulation class, kept apart from the implementation's own pattern
MODULATION = re.compile(r"AdaLayerNorm|AdaGroupNorm|AdaNorm|AdaLN|NormZero|Modulat|NormContinuous|NormSingle"
                        r"|ConditionalGroupNorm")

ZERO, SINGLE, CONT = "AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous"
FAMILIES = {  # name: (diffusers class, tiny config, classes swapped, modules that must be listed)
    "flux": ("FluxTransformer2DModel", dict(
        num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        pooled_projection_dim=16, in_channels=4, axes_dims_rope=[2, 2, 4]), {ZERO, SINGLE, CONT}, set()),
    "flux2": ("Flux2Transformer2DModel", dict(
        num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        in_channels=4, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2)), {CONT},
        {"double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"}),
    "wan": ("WanTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
        ffn_dim=32, num_layers=1, rope_max_seq_len=32), set(), {"", "blocks.0"}),
    "pixart": ("PixArtTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, sample_size=8, caption_channels=16), set(),
        {"", "adaln_single", "transformer_blocks.0"}),
    "sana": ("SanaTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8), set(), {"", "time_embed", "norm_out", "transformer_blocks.0"}),
    "ltx": ("LTXVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, caption_channels=16), set(), {"", "time_embed", "transformer_blocks.0"}),
    "chroma": ("ChromaTransformer2DModel", dict(
        in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1),
        {"ChromaAdaLayerNormZeroPruned", "ChromaAdaLayerNormZeroSinglePruned", "ChromaAdaLayerNormContinuousPruned"},
        set()),
    "cogview4": ("CogView4Transformer2DModel", dict(
        in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, text_embed_dim=16,
        time_embed_dim=16, condition_dim=8, sample_size=8, pos_embed_max_size=8, rope_axes_dim=(4, 4)),
        {"CogView4AdaLayerNormZero", "CogView4AdaLayerNormContinuous"}, set()),
    "mochi": ("MochiTransformer3DModel", dict(  # 2 layers: the last one has the context_pre_only norms
        num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16, in_channels=4,
        text_embed_dim=16, time_embed_dim=16, max_sequence_length=8), {CONT},
        {"transformer_blocks.0.norm1", "transformer_blocks.1.norm1_context"}),
    "cosmos": ("CosmosTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, text_embed_dim=16,
        adaln_lora_dim=8, max_size=(4, 8, 8)), set(), {"norm_out", "transformer_blocks.0.norm1"}),
    "sd35": ("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"), {ZERO, CONT, "SD35AdaLayerNormZeroX"},
        set()),
    "hunyuanvideo": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)),
        {ZERO, SINGLE, CONT}, {"context_embedder.token_refiner.refiner_blocks.0.norm_out"}),
    "lumina2": ("Lumina2Transformer2DModel", dict(
        sample_size=8, in_channels=4, hidden_size=16, num_layers=1, num_refiner_layers=1, num_attention_heads=2,
        num_kv_heads=1, multiple_of=8, axes_dim_rope=(2, 2, 4), axes_lens=(8, 8, 8), cap_feat_dim=16), set(),
        {"norm_out", "layers.0.norm1"}),
    "cogvideox": ("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=5, max_text_seq_length=8),
        {"CogVideoXLayerNormZero", "AdaLayerNorm"}, set()),
    "qwenimage": ("QwenImageTransformer2DModel", dict(  # img_mod / txt_mod projections, modulated inline
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4)), {CONT}, {"transformer_blocks.0"}),
    "unet_scale_shift": ("UNet2DModel", dict(  # ADM's AdaGN, inline in ResnetBlock2D
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        resnet_time_scale_shift="scale_shift"), set(), {"down_blocks.0.resnets.0", "up_blocks.1.resnets.1"}),
}


def modulations(model):
    """Names of the modules the brief says must be swapped or listed: diffusers classes named as a
    modulation, and modules owning a scale_shift_table."""
    return {name for name, m in model.named_modules()
            if (type(m).__module__.startswith("diffusers.") and MODULATION.search(type(m).__name__))
            or "scale_shift_table" in dict(m.named_parameters(recurse=False))}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_modulation_is_swapped_or_listed_with_its_reason(family):
    cls_name, config, swapped, must_list = FAMILIES[family]
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        pytest.skip(f"{cls_name} is not in diffusers {diffusers.__version__}")
    torch.manual_seed(0)
    model = cls(**config)
    report = swap_adaptive_norm(model)
    assert set(report.swapped.values()) == swapped
    left = modulations(model) | must_list
    assert left <= set(report.skipped), f"silently left: {sorted(left - set(report.skipped))}"
    assert not any("unknown layout" in why for why in report.skipped.values())  # each has a specific reason
    for name in report.swapped:
        assert isinstance(model.get_submodule(name), diffusers_norm._DoubleNorm)
        assert name not in report.skipped


def test_the_rule_lists_modulations_it_does_not_know():
    def fake(name, module):
        return type(name, (torch.nn.Module,), {"__module__": module})()

    class TableBlock(torch.nn.Module):  # adaLN-single, as Wan / PixArt / Sana / LTX blocks
        def __init__(self):
            super().__init__()
            self.scale_shift_table = torch.nn.Parameter(torch.zeros(6, 4))

    class ReferenceDiTBlock(torch.nn.Module):  # facebookresearch/DiT: modulate(norm(x), shift, scale) inline
        def __init__(self):
            super().__init__()
            self.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(4, 24))

    holder = torch.nn.ModuleDict(dict(
        made_up=fake("FooAdaLayerNormZero", "diffusers.models.made_up"), table=TableBlock(), dit=ReferenceDiTBlock(),
        own=fake("FooAdaLayerNormZero", "my_project.layers"), plain=torch.nn.LayerNorm(4)))
    report = swap_adaptive_norm(holder)
    assert report.swapped == {}
    assert set(report.skipped) == {"made_up", "table", "dit"}
    assert report.skipped["made_up"] == "modulation class FooAdaLayerNormZero: not swapped (unknown layout)"
    assert "scale_shift_table" in report.skipped["table"] and "inline" in report.skipped["table"]
    assert "adaLN_modulation" in report.skipped["dit"]


def test_unswappable_instances_and_the_root_are_listed():
    from diffusers.models.normalization import AdaLayerNorm, AdaLayerNormZero
    holder = torch.nn.ModuleDict(dict(shared=AdaLayerNorm(8, num_embeddings=10)))  # chunk_dim=0
    report = swap_adaptive_norm(holder)
    assert report.swapped == {} and "chunk_dim=0" in report.skipped["shared"]
    report = swap_adaptive_norm(AdaLayerNormZero(8))
    assert report.swapped == {} and "pass its parent" in report.skipped[""]


def test_the_tables_name_every_modulation_class_of_the_installed_diffusers_and_no_other():
    source = "\n".join(p.read_text() for p in Path(diffusers.__file__).parent.rglob("*.py"))
    defined = set(re.findall(r"^class (\w+)\(", source, re.M))
    known = set(diffusers_norm._SWAPS) | set(diffusers_norm._REASONS)
    unread = {c for c in defined if diffusers_norm._MODULATION.search(c)} - known
    assert not unread, f"read their forward, then add them to _SWAPS or _REASONS: {sorted(unread)}"
    assert (known | set(diffusers_norm._INLINE)) <= defined, "a table names a class diffusers does not have"


# ---- each swapped class is the double norm of the original's projection outputs --------------
D, E = 16, 8  # channels, conditioning width
X, CTX = (2, 5, D), (2, 3, D)  # image tokens, text tokens


def dn(x, scale, shift, norm, kind="layer", groups=None):
    """The reference double norm with `norm`'s affine and eps."""
    return adaptive_double_norm_ref(x, scale, shift, getattr(norm, "weight", None), getattr(norm, "bias", None),
                                    norm=kind, num_groups=groups, eps=norm.eps, channels_last=kind != "group")


def for_parent(shift, scale, eps):
    """(shift', scale') with which the parent's norm(x) * (1 + scale') + shift' is the double norm."""
    return pnorm(shift, eps), pnorm(scale, eps) - 1


def zero(o, x, emb):
    sh, sc, g, sh_m, sc_m, g_m = o.linear(o.silu(emb)).chunk(6, dim=1)
    return dn(x, sc, sh, o.norm), g, *for_parent(sh_m, sc_m, o.norm.eps), g_m


def single(o, x, emb):
    sh, sc, g = o.linear(o.silu(emb)).chunk(3, dim=1)
    return dn(x, sc, sh, o.norm), g


def zero_x(o, x, emb):
    sh, sc, g, sh_m, sc_m, g_m, sh2, sc2, g2 = o.linear(o.silu(emb)).chunk(9, dim=1)
    return dn(x, sc, sh, o.norm), g, *for_parent(sh_m, sc_m, o.norm.eps), g_m, dn(x, sc2, sh2, o.norm), g2


def chroma_zero(o, x, emb):
    sh, sc, g, sh_m, sc_m, g_m = emb.flatten(1, 2).chunk(6, dim=1)
    return dn(x, sc, sh, o.norm), g, *for_parent(sh_m, sc_m, o.norm.eps), g_m


def chroma_single(o, x, emb):
    sh, sc, g = emb.flatten(1, 2).chunk(3, dim=1)
    return dn(x, sc, sh, o.norm), g


def chroma_continuous(o, x, emb):
    sh, sc = emb.flatten(1, 2).chunk(2, dim=1)
    return dn(x, sc, sh, o.norm)


def two_streams(x, c, norms, image, text):
    (sh, sc, g, sh_m, sc_m, g_m), (c_sh, c_sc, c_g, c_sh_m, c_sc_m, c_g_m) = image, text
    eps = norms[0].eps
    return (dn(x, sc, sh, norms[0]), g, *for_parent(sh_m, sc_m, eps), g_m,
            dn(c, c_sc, c_sh, norms[1]), c_g, *for_parent(c_sh_m, c_sc_m, eps), c_g_m)


def cogview4_zero(o, x, c, temb):
    p = o.linear(temb).chunk(12, dim=1)  # interleaved: shift, c_shift, scale, c_scale, ...
    return two_streams(x, c, (o.norm, o.norm_context), p[0::2], p[1::2])


def cogview3plus_zero(o, x, c, emb):
    p = o.linear(o.silu(emb)).chunk(12, dim=1)
    return two_streams(x, c, (o.norm_x, o.norm_c), p[:6], p[6:])


def cogvideox_zero(o, x, c, temb):
    sh, sc, g, c_sh, c_sc, c_g = o.linear(o.silu(temb)).chunk(6, dim=1)
    return dn(x, sc, sh, o.norm), dn(c, c_sc, c_sh, o.norm), g[:, None, :], c_g[:, None, :]


def easyanimate_zero(o, x, c, temb):
    sh, sc, g, c_sh, c_sc, c_g = o.linear(o.silu(temb)).chunk(6, dim=1)
    return dn(x, sc, sh, o.norm), dn(c, c_sc, c_sh, o.norm), g, c_g


def continuous(o, x, c):
    sc, sh = o.linear(o.silu(c)).chunk(2, dim=1)
    return dn(x, sc, sh, o.norm, "rms")


def continuous_no_act(o, x, c):
    sc, sh = o.linear(c).chunk(2, dim=1)
    return dn(x, sc, sh, o.norm)


def ada_layer_norm(o, x, temb):
    sh, sc = o.linear(o.silu(temb)).chunk(2, dim=1)  # chunk_dim=1: shift first
    return dn(x, sc, sh, o.norm)


def ada_group(o, x, emb):
    sc, sh = o.linear(torch.nn.functional.silu(emb)).chunk(2, dim=1)
    return dn(x, sc, sh, o, "group", o.num_groups)  # F.group_norm with the module's eps, no affine


def kandinsky3_group(o, x, context):
    sc, sh = o.context_mlp(context).chunk(2, dim=1)
    return dn(x, sc, sh, o.norm, "group", o.norm.num_groups)


SWAPPED = {  # class: (module under diffusers.models, constructor kwargs, args, kwargs (shapes), by hand)
    "AdaLayerNormZero": ("normalization", dict(embedding_dim=D), (X,), dict(emb=(2, D)), zero),
    "AdaLayerNormZeroSingle": ("normalization", dict(embedding_dim=D), (X,), dict(emb=(2, D)), single),
    "SD35AdaLayerNormZeroX": ("normalization", dict(embedding_dim=D), (X,), dict(emb=(2, D)), zero_x),
    "ChromaAdaLayerNormZeroPruned": ("transformers.transformer_chroma", dict(embedding_dim=D), (X,),
                                     dict(emb=(2, 6, D)), chroma_zero),
    "ChromaAdaLayerNormZeroSinglePruned": ("transformers.transformer_chroma", dict(embedding_dim=D), (X,),
                                           dict(emb=(2, 3, D)), chroma_single),
    "ChromaAdaLayerNormContinuousPruned": ("transformers.transformer_chroma", dict(
        embedding_dim=D, conditioning_embedding_dim=E), (X, (2, 2, D)), {}, chroma_continuous),
    "CogView4AdaLayerNormZero": ("transformers.transformer_cogview4", dict(embedding_dim=E, dim=D), (X, CTX, (2, E)),
                                 {}, cogview4_zero),
    "GlmImageAdaLayerNormZero": ("transformers.transformer_glm_image", dict(embedding_dim=E, dim=D),
                                 (X, CTX, (2, E)), {}, cogview4_zero),
    "CogView3PlusAdaLayerNormZeroTextImage": ("normalization", dict(embedding_dim=E, dim=D), (X, CTX),
                                              dict(emb=(2, E)), cogview3plus_zero),
    "CogVideoXLayerNormZero": ("normalization", dict(conditioning_dim=E, embedding_dim=D), (X, CTX, (2, E)), {},
                               cogvideox_zero),
    "EasyAnimateLayerNormZero": ("transformers.transformer_easyanimate", dict(conditioning_dim=E, embedding_dim=D),
                                 (X, CTX, (2, E)), {}, easyanimate_zero),
    "AdaLayerNormContinuous": ("normalization", dict(embedding_dim=D, conditioning_embedding_dim=E,
                                                     norm_type="rms_norm"), (X, (2, E)), {}, continuous),
    "CogView4AdaLayerNormContinuous": ("transformers.transformer_cogview4", dict(
        embedding_dim=D, conditioning_embedding_dim=E), (X, (2, E)), {}, continuous_no_act),
    "GlmImageAdaLayerNormContinuous": ("transformers.transformer_glm_image", dict(
        embedding_dim=D, conditioning_embedding_dim=E), (X, (2, E)), {}, continuous_no_act),
    "AdaLayerNorm": ("normalization", dict(embedding_dim=E, output_dim=2 * D, norm_elementwise_affine=True,
                                           chunk_dim=1), (X,), dict(temb=(2, E)), ada_layer_norm),
    "AdaGroupNorm": ("normalization", dict(embedding_dim=E, out_dim=D, num_groups=4, act_fn="silu"),
                     ((2, D, 3, 3), (2, E)), {}, ada_group),
    "Kandinsky3ConditionalGroupNorm": ("unets.unet_kandinsky3", dict(groups=4, normalized_shape=D, context_dim=E),
                                       ((2, D, 3, 3), (2, E)), {}, kandinsky3_group),
}


def test_every_swapped_class_has_a_case():
    assert set(SWAPPED) == set(diffusers_norm._SWAPS)


@pytest.mark.parametrize("name", SWAPPED)
def test_swapped_module_is_the_double_norm_of_the_original_projection(name):
    path, config, arg_shapes, kwarg_shapes, by_hand = SWAPPED[name]
    cls = getattr(importlib.import_module(f"diffusers.models.{path}"), name, None)
    if cls is None:
        pytest.skip(f"{name} is not in diffusers {diffusers.__version__}")
    torch.manual_seed(0)
    holder = torch.nn.ModuleDict(dict(m=cls(**config))).double()
    for p in holder.parameters():  # affine inner norms and nonzero projections (Kandinsky 3 starts at zero)
        torch.nn.init.normal_(p, std=0.5)
    original, before = copy.deepcopy(holder["m"]), holder.state_dict()
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(s, generator=g, dtype=torch.float64) for s in arg_shapes]
    kwargs = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in kwarg_shapes.items()}
    assert swap_adaptive_norm(holder) == ({"m": name}, {})
    after = holder.state_dict()
    assert list(after) == list(before) and all(after[k].equal(before[k]) for k in before)
    got, want = holder["m"](*args, **kwargs), by_hand(original, *args, **kwargs)
    got, want = (t if isinstance(t, tuple) else (t,) for t in (got, want))
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, msg=lambda m: f"output {i}: {m}")
