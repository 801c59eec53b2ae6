"""The trained student as a diffusers model: RUN/diffusers/ (written at the end of an --arch diffusers run).

    RUN/diffusers/transformer/ (or unet/)   save_pretrained of the first EMA: config.json + safetensors,
                                            loadable by <ModelClass>.from_pretrained and a pipeline
    RUN/diffusers/scheduler/                the --model folder's scheduler config, when it had one
    RUN/diffusers/scm_fast.json             how to sample it (parametrisation, sigma_d, times, guidance)
    RUN/diffusers/guidance_embedding.safetensors   the added guidance embedding (any s through scm_fast)

An added guidance embedding g(s) is summed into the output of the model's time embedding MLP
(its linear_2), so for one scale s it is a constant vector: it is folded into linear_2's bias and
the saved model is the student at s = --sample-guidance (exactly), runnable without scm_fast.
Flux-style models keep their own `guidance` input. The student is a consistency model in TrigFlow
time: one step from pure noise is the flow sampler's single Euler step from s = 1 (x0 = x1 - v).
"""
import copy
import json
import shutil
from pathlib import Path

import torch

from scm_fast.models import diffusers_net


def _bake_guidance(net, model, s, sign=1.0):
    """Fold g(s) of the student's added guidance embedding into `model`'s time-embedding bias (sign -1:
    take it out again)."""
    target = model.get_submodule(net.guidance_target)
    with torch.no_grad():
        g = net.guidance(torch.tensor([float(s)], device=target.linear_2.bias.device))[0]
        target.linear_2.bias.add_(sign * g.to(target.linear_2.bias.dtype))


def export(net, out, cfg, teacher_times=None):
    """Write net (a DiffusersNet holding the weights to ship) to `out` (module docstring) -> out."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = copy.deepcopy(net.model).cpu()
    baked = None
    if hasattr(net, "guidance"):
        baked = cfg.sample_guidance
        _bake_guidance(net, model, baked)
        from safetensors.torch import save_file  # noqa: PLC0415
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in net.guidance.state_dict().items()},
                  tmp / "guidance_embedding.safetensors")
    sub = "unet" if "UNet" in net.spec.class_name else "transformer"
    model.save_pretrained(tmp / sub)
    folder = diffusers_net.model_folder(cfg.model)
    for sched in (folder / "scheduler", folder.parent / "scheduler"):
        if sched.is_dir():
            shutil.copytree(sched, tmp / "scheduler")
            break
    info = {"model": sub, "class_name": net.spec.class_name, "prediction": net.spec.kind,
            "time_scale": net.spec.time_scale, "sigma_d": net.sigma_d, "objective": cfg.objective,
            "guidance_baked_in": baked, "guidance_input": net.guidance_input,
            "consistency_times": teacher_times,
            "note": "a consistency model in TrigFlow time; python -m scm_fast.sample --ckpt RUN samples it in 1-2 "
                    "steps (any guidance); in a diffusers flow pipeline, 1 step is num_inference_steps=1"}
    (tmp / "scm_fast.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def load(folder, guidance_embedding=True):
    """(the DiffusersNet of an exported folder, its scm_fast.json); with the added guidance embedding
    re-attached (and unbaked) when guidance_embedding and the folder has one."""
    folder = Path(folder)
    info = json.loads((folder / "scm_fast.json").read_text())
    spec = diffusers_net.read_spec(folder / info["model"], info["prediction"], info["time_scale"],
                                   flag="--ckpt")
    add = guidance_embedding and (folder / "guidance_embedding.safetensors").is_file()
    net = diffusers_net.load_pretrained(diffusers_net.build(spec, guidance_embed=add, sigma_d=info["sigma_d"]),
                                        folder / info["model"], "--ckpt")
    if add:
        from safetensors.torch import load_file  # noqa: PLC0415
        net.guidance.load_state_dict(load_file(folder / "guidance_embedding.safetensors"))
        _bake_guidance(net, net.model, info["guidance_baked_in"], sign=-1.0)
    return net.eval(), info
