"""Sampling from a trained run: `python -m scm_fast.sample --ckpt RUN_OR_CKPT --steps 1|2|K ...`.

Consistency models (sCT, sCD) sample in 1, 2 or K steps [P §5.2]: x = sigma_d eps at
t_max = arctan(80 / sigma_d), then x0 = f(x, t_i) and re-noise to t_{i+1}; 2 steps go through the
run's t_mid (the paper's 1.1 unless the run set --t-mid), 4 steps SANA-Sprint's (t_max, 1.3, 1.1, 0.6),
other K need --times. TrigFlow teachers run the PF-ODE (Heun, K steps,
NFE = 2K - 1) with classifier-free guidance. MeanFlow models take K uniform average-velocity steps
from t = 1 to 0. Writes OUTDIR/grid.png, OUTDIR/images/NNNNNN.png and OUTDIR/samples.npz
(images uint8 (N, H, W, C), labels int64).
"""
import argparse
import importlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from scm_fast import images, runs, trigflow
from scm_fast.precision import autocast


_MOVED = {"build_network": "scm_fast.models", "load_run": "scm_fast.runs", "resolve_checkpoint": "scm_fast.runs"}


def __getattr__(name):
    """Deprecated aliases (one release): the run format moved to scm_fast.runs, networks to scm_fast.models."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"scm_fast.sample.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)


# ---- generating -----------------------------------------------------------------------------
def class_labels(n, num_classes, device="cpu"):
    """0, 1, ..., K-1, 0, 1, ... (None for unconditional networks)."""
    return None if not num_classes else torch.arange(n, device=device) % num_classes


def network_fn(net, cfg, labels, guidance, precision="fp32", cond=None):
    """F(x_in, t) with the run's conditioning: class labels, the dataset's conditioning tensors
    `cond`, the sCD student's guidance input, or the teacher's classifier-free guidance
    F_u + s (F_c - F_u) (objective 'diffusion')."""
    fixed = dict(cond or {})

    def F(x_in, t, labels=labels, **extra):
        kw = dict(fixed, **({} if labels is None else {"labels": labels}))
        with autocast(x_in.device.type, precision):
            return net(x_in, t, **kw, **extra).float()

    if cfg.objective == "diffusion" and getattr(net, "guidance_input", False):  # guidance-distilled teacher
        return lambda x_in, t: F(x_in, t, guidance=torch.full_like(t, guidance))
    if cfg.objective == "scd":
        return lambda x_in, t: F(x_in, t, guidance=torch.full_like(t, guidance))
    if cfg.objective == "diffusion" and labels is not None:
        guided = trigflow.cfg(F, guidance)  # F_u + s (F_c - F_u); F_c alone at s = 1
        return lambda x_in, t: guided(x_in, t, labels=labels)
    return F


def generate(net, cfg, shape, n, steps=None, guidance=None, labels=None, times=None, seed=0, batch=500,
             device="cpu", cond=None):
    """n images (n, C, H, W) in data space. steps: consistency / MeanFlow steps, or the teacher's
    ODE steps (default 18, NFE 35); guidance: the sCD student's s or the teacher's CFG scale
    (default cfg.sample_guidance); cond: {key: (n, ...)} conditioning tensors."""
    guidance = cfg.sample_guidance if guidance is None else guidance
    gen = torch.Generator(device).manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        lab = None if labels is None else labels[i:i + b].to(device)
        noise = torch.randn((b, *shape), generator=gen, device=device)
        c = {k: v[i:i + b].to(device) for k, v in (cond or {}).items()}
        F = network_fn(net, cfg, lab, guidance, cfg.precision, c)
        out.append(_sample(F, cfg, noise, steps, times, gen))
    return torch.cat(out)


def _sample(F, cfg, noise, steps, times, gen):
    if cfg.objective == "diffusion":
        return trigflow.ode_sample(F, noise, steps=steps or 18, solver="heun", sigma_d=cfg.sigma_d)
    if cfg.objective == "meanflow":
        return meanflow_sample(F, noise, steps or 1)
    ts = times or consistency_times(steps or 1, cfg.sigma_d, cfg.t_mid)
    return trigflow.consistency_sample(F, noise, ts, sigma_d=cfg.sigma_d, generator=gen)


def consistency_times(steps, sigma_d=trigflow.SIGMA_D, t_mid=trigflow.T_MID):
    """(t_max(sigma_d), ...): 1 step; 2 steps through t_mid [P §5.2]; SANA-Sprint's 4 steps."""
    later = {1: (), 2: (t_mid,), 4: (1.3, 1.1, 0.6)}
    if steps not in later:
        raise ValueError(f"--steps {steps} has no default schedule (1, 2 and 4 do): pass --times t_max,...")
    return (trigflow.t_max(sigma_d), *later[steps])


@torch.no_grad()
def meanflow_sample(F, noise, steps):
    """z_1 = eps; z_r = z_t - (t - r) u(z_t, r, t) on a uniform grid from t = 1 to 0 [MeanFlow]."""
    z = noise
    grid = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t, r in zip(grid[:-1], grid[1:]):
        tt = torch.full((z.shape[0],), t, device=z.device)
        z = z - (t - r) * F(z, tt, r=torch.full_like(tt, r))
    return z


# ---- command line -----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scm_fast.sample", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a run directory (its newest good checkpoint) or a checkpoint")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 1; teachers: 18 ODE steps)")
    p.add_argument("--times", type=str, default=None, help="consistency times, comma-separated, t_max first")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--guidance", type=float, default=None, help="sCD student's s / teacher CFG scale")
    p.add_argument("--label", type=int, default=None, help="one class for all images (default: cycle)")
    p.add_argument("--ema", type=str, default=None, help="EMA name, or 'none' for the raw weights")
    p.add_argument("--cond", default=None, help="an .npz of the network's conditioning inputs (--arch diffusers: "
                   "encoder_hidden_states, pooled_projections, ...), one row per image or one row for all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", required=True)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.n < 1 or (args.steps is not None and args.steps < 1):
        p.error(f"--n and --steps must be >= 1; got {args.n}, {args.steps}")
    if args.times:
        try:
            args.times = tuple(float(v) for v in args.times.split(","))
        except ValueError:
            p.error(f"--times must be comma-separated numbers, got {args.times!r}")
        if not all(0 < t <= math.pi / 2 for t in args.times):
            p.error(f"--times must lie in (0, pi/2], got {args.times}")
    if not Path(args.ckpt).exists():
        p.error(f"--ckpt: {args.ckpt} does not exist")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    net, cfg, meta = runs.load_run(args.ckpt, args.ema, device)
    shape, K = tuple(meta["shape"]), meta["num_classes"] if cfg.class_cond else 0
    if args.label is not None and not 0 <= args.label < max(K, 1):
        raise SystemExit(f"--label must be in [0, {K}) for this run, got {args.label}")
    labels = class_labels(args.n, K) if args.label is None or not K else torch.full((args.n,), args.label)
    if cfg.arch == "diffusers" and labels is not None:
        labels = torch.zeros_like(labels)  # labels there only mark null-conditioned rows (-1)
    cond = read_cond(args.cond, meta.get("cond_keys", []), args.n)
    x = generate(net, cfg, shape, args.n, args.steps, args.guidance, labels, args.times, args.seed, device=device,
                 cond=cond)
    write_outputs(Path(args.outdir), x.clamp(-1, 1).cpu(), labels)
    info = dict(checkpoint=meta["checkpoint"], weights=meta["weights"], n=args.n, steps=args.steps,
                times=args.times, guidance=args.guidance, seed=args.seed)
    (Path(args.outdir) / "sample.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {args.n} samples to {args.outdir}/ (grid.png, images/, samples.npz)")


def read_cond(path, keys, n):
    """{key: (n, ...)} from an .npz of conditioning arrays (n rows, or 1 broadcast); SystemExit naming
    --cond when the run needs keys the file lacks, or rows do not fit."""
    if path is None:
        if keys:
            raise SystemExit(f"--cond: this run's network takes the conditioning {keys}; pass an .npz with them "
                             f"(e.g. rows of the training dataset's keys)")
        return None
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise SystemExit(f"--cond {path}: lacks {missing} (has {sorted(arrays)}); the run was trained with {keys}")
    out = {}
    for k in keys:
        a = torch.from_numpy(arrays[k])
        if len(a) not in (1, n):
            raise SystemExit(f"--cond {path}: {k!r} has {len(a)} rows; expected 1 or --n ({n})")
        out[k] = (a.expand(n, *a.shape[1:]) if len(a) == 1 else a).float() if a.is_floating_point() else \
            (a.expand(n, *a.shape[1:]) if len(a) == 1 else a)
    return out


def write_outputs(outdir, x, labels):
    """grid.png, images/NNNNNN.png (gray or RGB samples; latents and other channel counts have no
    per-image PNG: decode them first) and samples.npz (images uint8 (N, H, W, C), labels)."""
    os.makedirs(outdir, exist_ok=True)
    images.save_grid(outdir / "grid.png", x[:256])
    u8 = images.to_uint8(x)
    if x.shape[1] in (1, 3):
        os.makedirs(outdir / "images", exist_ok=True)
        for i, img in enumerate(u8):
            images.write_png(outdir / "images" / f"{i:06d}.png", img)
    extra = {} if labels is None else {"labels": labels.numpy().astype(np.int64)}
    np.savez(outdir / "samples.npz", images=u8, **extra)


if __name__ == "__main__":
    main()
