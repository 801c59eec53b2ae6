"""Tiny random diffusers models of the families scm_fast distils (SD3, Flux, Wan, UNet2DCondition),
built from configs and written with save_pretrained (nothing downloaded); their conditioning
inputs for 4x8x8 latents; and the public configs of real models (facts, not weights) for --dry-run."""
import json

import torch

TEXT_LEN, TEXT_DIM, POOLED_DIM = 5, 16, 8


def sd3(channels=4):
    import diffusers
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=channels, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, out_channels=channels,
        pos_embed_max_size=8, qk_norm="rms_norm")


def flux(channels=4):
    import diffusers
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * channels, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def wan(channels=4):
    import diffusers
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=channels, out_channels=channels,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def unet(channels=4):
    import diffusers
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=8)


FAMILIES = {"sd3": sd3, "flux": flux, "wan": wan, "unet": unet}
# the conditioning inputs each family's forward takes (besides x and the timestep)
COND_KEYS = {"sd3": ("encoder_hidden_states", "pooled_projections"),
             "flux": ("encoder_hidden_states", "pooled_projections"),
             "wan": ("encoder_hidden_states",), "unet": ("encoder_hidden_states",)}


def scheduler(family):
    """The scheduler its pipeline ships: flow matching, or DDPM with v prediction for the UNet."""
    import diffusers
    if family == "unet":
        return diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction",
                                       beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)


def save_pipeline_folder(family, root, seed=0, channels=4):
    """root/transformer (or unet)/ + root/scheduler/ as a pipeline folder would hold them -> root."""
    torch.manual_seed(seed)
    model = FAMILIES[family](channels)
    sub = "unet" if family == "unet" else "transformer"
    model.save_pretrained(root / sub)
    scheduler(family).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "TinyPipeline", sub: ["diffusers",
                                                       type(model).__name__]}))
    return root


def cond(family, batch, generator=None):
    g = generator or torch.Generator().manual_seed(3)
    out = {"encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)}
    if "pooled_projections" in COND_KEYS[family]:
        out["pooled_projections"] = torch.randn(batch, POOLED_DIM, generator=g)
    return out


def digits_dataset(root, pooled=True):
    """The embedded digits as a dataset folder with a random embedding per class as
    encoder_hidden_states (and pooled_projections) and zeros as the null conditioning -> root."""
    import numpy as np
    from scm_fast import prepare
    g = np.random.default_rng(0)
    emb = {"encoder_hidden_states": g.standard_normal((10, TEXT_LEN, TEXT_DIM)).astype(np.float32)}
    if pooled:
        emb["pooled_projections"] = g.standard_normal((10, POOLED_DIM)).astype(np.float32)
    np.savez(root.parent / f"{root.name}-emb.npz", **emb)
    np.savez(root.parent / f"{root.name}-null.npz", **{k: np.zeros((1, *v.shape[1:]), np.float32) for k, v in emb.items()})
    assert prepare.main(["digits", str(root), "--cond-per-class", str(root.parent / f"{root.name}-emb.npz"),
                         "--null", str(root.parent / f"{root.name}-null.npz")]) == 0
    return root


# Public configs (the config.json of each model's transformer/ folder on the Hugging Face hub).
FLUX1_DEV = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
             "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
             "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}
SD35_LARGE = {"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 2432,
              "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38,
              "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
              "qk_norm": "rms_norm", "sample_size": 128}
WAN21_14B = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
             "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "image_dim": None,
             "in_channels": 16, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
             "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}
