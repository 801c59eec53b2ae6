"""A diffusers model's parametrisation, read from its scheduler config, as the TrigFlow converter
that turns the model's output into sCM's F (scm_fast.trigflow.from_flow_matching / from_vp / from_edm).

    FlowMatch* schedulers (SD3, Flux, Wan, Sana, Qwen-Image, HunyuanVideo): "flow", rectified flow
        x = (1 - s) x0 + s eps predicting v = eps - x0; the model's timestep is s * num_train_timesteps
        (1000). Their `shift` only changes which s a sampler visits, not what the model computes at s.
    DDPM-style schedulers (DDPM, DDIM, Euler, DPM-Solver, PNDM, ... as UNet2DCondition pipelines ship):
        "epsilon" or "v_prediction" from `prediction_type`, with the schedule's alphas_cumprod.
    EDM* schedulers: "edm" (a denoiser of x_sigma at sigma).

The scheduler is built by diffusers itself from the folder (never a download), so the
alphas_cumprod are diffusers' own for every beta schedule.
"""
import json
from pathlib import Path

from scm_fast import trigflow

KINDS = ("flow", "epsilon", "v_prediction", "edm")


def _scheduler_dir(path):
    path = Path(path)
    for cand in (path / "scheduler", path):
        if (cand / "scheduler_config.json").is_file():
            return cand
    return None


def read(path):
    """{kind, alphas_cumprod (VP kinds), timestep_scale (flow), class_name} of the scheduler in `path`
    (a pipeline folder or its scheduler/); None when the folder has no scheduler_config.json."""
    folder = _scheduler_dir(path)
    if folder is None:
        return None
    config = json.loads((folder / "scheduler_config.json").read_text())
    name = config.get("_class_name", "")
    import diffusers  # noqa: PLC0415 - a pinned dependency
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{folder / 'scheduler_config.json'}: unknown scheduler class {name!r}")
    scheduler = cls.from_pretrained(folder, local_files_only=True)
    if name.startswith("FlowMatch"):
        return dict(kind="flow", class_name=name, timestep_scale=float(scheduler.config.num_train_timesteps))
    if name.startswith("EDM"):
        return dict(kind="edm", class_name=name)
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction") or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"{folder}: {name} with prediction_type {kind!r} is not a parametrisation scm_fast "
                         f"converts (expected one of {', '.join(KINDS)}); pass --prediction")
    return dict(kind=kind, class_name=name, alphas_cumprod=scheduler.alphas_cumprod.double())


def to_trigflow(model, info, sigma_d=trigflow.SIGMA_D):
    """F(x_in, t, **cond) of `model` under the parametrisation `info` (read()'s dict). model is called
    as the diffusers model is: model(x, timestep, **cond) -> the prediction tensor."""
    kind = info["kind"]
    if kind == "flow":
        scale = info.get("timestep_scale", 1000.0)
        return trigflow.from_flow_matching(lambda x, s, **c: model(x, s * scale, **c), sigma_d)
    if kind in ("epsilon", "v_prediction"):
        return trigflow.from_vp(model, info["alphas_cumprod"], kind, sigma_d)
    if kind == "edm":
        return trigflow.from_edm(model, sigma_d)
    raise ValueError(f"--prediction must be one of {', '.join(KINDS)}, got {kind!r}")
