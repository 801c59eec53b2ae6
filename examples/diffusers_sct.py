"""An sCT or sCD step on a diffusers transformer with scm_fast (a tiny random DiT; CPU, seconds).

    python examples/diffusers_sct.py                  # sCT from scratch on random 8x8 "latents"
    python examples/diffusers_sct.py --mode scd       # sCD from a teacher (here a random copy)

The pieces (docs/using-scm-fast.md):
  scm_fast.patch_sdpa()          diffusers' attention -> the fused op: torch.func.jvp runs (it raises on
                                 PyTorch's default SDPA kernel) in O(L) memory, primal and tangent in one pass
  scm_fast.swap_adaptive_norm()  adaLN -> adaptive double norm (sCM's architecture change; changes the model)
  scm_fast.objectives.scm_loss   the step: ONE forward under torch.func.jvp (JVP rearrangement), then backward
For a real run: a pretrained teacher converted to TrigFlow (SD3 is flow matching:
scm_fast.trigflow.from_flow_matching), your latents instead of torch.randn, EMA, and the time input
scaled as the model was trained (see --time-scale).
"""
import argparse
import copy

import torch
from diffusers import DiTTransformer2DModel

import scm_fast
from scm_fast import trigflow
from scm_fast.models import AdaptiveWeight
from scm_fast.objectives import SCMConfig, initial_logvar, scm_loss

NUM_CLASSES = 10


def as_trigflow(model, time_scale):
    """F(x_in, t, labels) for scm_fast.objectives: the diffusers model at timestep = time_scale * t.
    labels == -1 is the CFG null class (DiT's label table keeps it at index NUM_CLASSES)."""
    def F(x_in, t, labels):
        labels = torch.where(labels < 0, torch.full_like(labels, NUM_CLASSES), labels)
        return model(x_in, timestep=time_scale * t, class_labels=labels).sample
    return F


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("sct", "scd"), default="sct")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="timestep = time_scale * t; sCM wants c_noise(t) = t (1.0); large scales make dF/dt explode")
    p.add_argument("--keep-adaln", action="store_true", help="do not swap adaLN for adaptive double norm")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)
    if not args.keep_adaln:
        report = scm_fast.swap_adaptive_norm(model)
        print(f"swapped {len(report.swapped)} adaLN modules; left: {report.skipped}")
    F = as_trigflow(model, args.time_scale)
    teacher = None
    if args.mode == "scd":  # stand-in for a pretrained diffusion teacher in TrigFlow form
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        teacher = trigflow.cfg(as_trigflow(frozen, args.time_scale), guidance=1.5)
    cfg = SCMConfig(tangent_warmup=max(1, args.steps // 2))
    logvar = AdaptiveWeight(init_logvar=initial_logvar(args.mode, cfg.tangent_norm, 4 * 8 * 8, cfg.sigma_d,
                                                       cfg.P_mean, cfg.P_std))  # the head at its equilibrium
    opt = torch.optim.Adam([*model.parameters(), *logvar.parameters()], lr=args.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1)
    with scm_fast.patch_sdpa():  # without it torch.func.jvp raises inside diffusers' attention
        for step in range(args.steps):
            x0 = torch.randn(args.batch, 4, 8, 8, generator=gen)       # your latents here
            labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen)
            loss, stats = scm_loss(F, x0, step, cfg, cond={"labels": labels}, logvar=logvar, teacher=teacher,
                                   generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            print(f"step {step:3d}  loss {loss.item():+.4f}  |g| {stats['g_norm'].mean().item():.3f}")
    return loss.item()


if __name__ == "__main__":
    main()
