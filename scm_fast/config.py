"""The trainer's one typed config: defaults, presets, CLI overrides and the memory estimate.

Every field of `TrainConfig` is a command-line flag (`--total-kimg 200`, `--one-pass/--no-one-pass`,
tuples comma-separated: `--ema-sigma-rels 0.05,0.1`). `--preset NAME` picks a preset first; flags
given explicitly override it. Units follow EDM2: training length and intervals in images (kimg),
except the tangent warmup H, which the paper gives in iterations [P App. G].

The presets named after the paper's runs (cifar10-*, imagenet64-*, imagenet512-*) carry its
optimisation settings (scm-reference.md §2, §6) for users who bring that data (`--data PATH`).
"""
import argparse
import json
import math
from dataclasses import dataclass, fields

OBJECTIVES = ("diffusion", "sct", "scd", "meanflow")
ARCHS = ("dit", "unet")
OPTIMIZERS = ("radam", "adam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "isqrt")
EMAS = ("power", "halflife", "none")
PARALLELS = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    # run
    preset: str = "digits-sct"
    run_dir: str = ""                 # default: runs/<preset>; re-running with the same run_dir resumes
    seed: int = 0
    threads: int = 0                  # torch threads per process; 0 = torch's default
    device: str = "auto"              # auto (cuda if available) | cpu | cuda
    # data
    data: str = "digits"              # digits | image folder | .npy/.npz | latents:PATH
    img_size: int = 0                 # 0 = the data's own size
    class_cond: bool = True           # use the data's labels when it has them
    # model
    arch: str = "dit"
    model: str = "digits"             # a DiT preset (digits, tiny, S, B, L, XL, XXL) or a U-Net preset
    patch: int = 0                    # DiT patch size; 0 = 2 (1 for images below 8 px or of odd size)
    dropout: float = 0.0              # U-Net only
    dropout_res: int = 0              # U-Net: dropout only at resolutions <= this (the paper's CMs: 16); 0 = all
    # objective (scm-reference.md §2-§3, §8)
    objective: str = "sct"
    teacher: str = ""                 # sCD: the teacher's run dir or checkpoint dir
    init: str = ""                    # run dir / checkpoint to initialise the network from (sCD: the teacher)
    sigma_d: float = 0.5
    P_mean: float = -1.0
    P_std: float = 1.4
    tangent_warmup: int = 10_000      # H in iterations; 0 = off
    tangent_norm: str = "l2"          # l2 | rms | none
    tangent_norm_c: float = 0.1
    rearranged_jvp: bool = True
    prior_weighting: bool = False
    one_pass: bool = True             # one forward under torch.func.jvp (False: no-grad JVP pass + grad pass)
    adaptive_weight: bool = True      # the learned logvar(t) head
    label_dropout: float = 0.1        # teacher (diffusion): fraction of labels -> null class, for CFG
    guidance_min: float = 1.0         # sCD: s ~ U[min, max], the teacher's CFG scale and a student input
    guidance_max: float = 2.0
    sample_guidance: float = 1.5      # sCD student's s, and the teacher's CFG scale, when sampling
    t_mid: float = 1.1                # the 2-step sampler's intermediate time [P §5.2]
    # optimisation (scm-reference.md §6)
    batch: int = 128                  # global batch (images per step over all ranks)
    total_kimg: float = 120.0
    optimizer: str = "radam"
    lr: float = 2e-3
    betas: tuple = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: str = "constant"     # constant | isqrt: lr / sqrt(max(nimg / lr_ref_kimg, 1))
    lr_ref_kimg: float = 0.0
    lr_rampup_kimg: float = 0.0
    grad_clip: float = 0.0            # max global grad norm; 0 = off
    precision: str = "fp32"           # fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling)
    loss_scale: float = 2.0 ** 14     # fp16: initial loss scale
    max_nonfinite: int = 20           # stop after this many non-finite steps in a row
    # EMA
    ema: str = "halflife"
    ema_sigma_rels: tuple = (0.05, 0.10)
    ema_halflife_kimg: float = 10.0
    ema_rampup: float = 0.05          # halflife EMA: half-life <= ema_rampup x images seen (EDM); 0 = off
    # parallelism
    parallel: str = "ddp"             # ddp | fsdp (FSDP2 fully_shard)
    act_ckpt: bool = False            # activation checkpointing of the blocks in the gradient pass
    # logging, sampling, checkpoints
    log_every: int = 20               # steps between stats.jsonl records
    sample_every_kimg: float = 40.0   # sample grids; 0 = only at the end
    ckpt_every_kimg: float = 20.0
    keep_ckpts: int = 3
    n_grid: int = 100                 # images per sample grid (rows of one image per class)
    eval_n: int = 1000                # samples for the final FD (digits classifier features); 0 = skip
    tensorboard: bool = True          # when tensorboard is installed
    progress: bool = True             # tqdm bar on rank 0 (when stderr is a terminal)

    @property
    def resolved_run_dir(self):
        return self.run_dir or f"runs/{self.preset}"

    def to_dict(self):
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def _kimg(iterations, batch):
    """Training length in kimg from the paper's iteration counts."""
    return iterations * batch / 1000


# ---- the embedded default: digits (8x8, 10 classes) on a CPU in a few minutes ----------------------
# Tuned on this 2-core CPU, one training seed per setting (benchmarks/NOTES.md §17; FD of 1000 samples
# in the digits classifier's features, two halves of the data set score ~10):
# - sigma_d = 0.75, the digits' measured std (pixels in [-1, 1]; the paper's 0.5 is CIFAR's).
# - sCT from scratch at P_mean -1.4: FD 1 / 2 steps 105 / 128 at -0.6, 58 / 61 at -1.0 (the paper's),
#   28 / 25 at -1.4, 31 / 26 at -1.8 (100 kimg).
# - Runs from the teacher fine-tune at a fraction of its lr [P App. G: CIFAR-10 0.1x, ImageNet 0.01x]
#   with a power-function EMA (sigma_rel 0.05, no rampup: the start is already good): sCD at 2e-4
#   (0.1x; 2-step FD 19.7 vs 20.5 at 1e-4, teacher 18.8, 40 kimg), sCT from the teacher at 1e-4 (0.05x;
#   2 steps 14.9; at 2e-4 its raw weights jumped from 18 to 41 after the warmup, its EMA held 14).
_DIGITS = dict(data="digits", arch="dit", model="digits", batch=128, sigma_d=0.75, optimizer="radam",
               ema="halflife", ema_halflife_kimg=10.0, sample_every_kimg=50.0, ckpt_every_kimg=25.0)
_DIGITS_FINETUNE = dict(_DIGITS, P_mean=-1.0, P_std=1.4, tangent_warmup=200, total_kimg=40.0, ema="power",
                        ema_sigma_rels=(0.05,), ema_rampup=0.0, sample_every_kimg=0.0, ckpt_every_kimg=10.0)

# ---- the paper's settings [P App. G] for users who bring the data ------------------------------------
# CIFAR-10 [P §G.1]: unconditional; the paper's network is DDPM++ with the TrigFlow changes, ours the
# EDM2-layout U-Net S. Teacher: "the same settings as EDM" (Adam lr 1e-3, betas 0.9/0.999, dropout
# 0.13, 400k iterations at batch 512; EDM's P_mean/P_std -1.2/1.2, lr rampup 10 Mimg, EMA half-life
# 0.5 Mimg with rampup 0.05). CMs: RAdam lr 1e-4, betas 0.9/0.99, no schedule, EMA half-life 0.5 Mimg,
# dropout 0.20 (sCT) / 0 (sCD), initialised from the teacher's EMA; their length is not stated (400k
# iterations, as the teacher).
_CIFAR = dict(data="", arch="unet", model="S", img_size=32, class_cond=False, batch=512, sigma_d=0.5,
              ema="halflife", ema_halflife_kimg=500.0, total_kimg=_kimg(400_000, 512))
_CIFAR_CM = dict(_CIFAR, P_mean=-1.0, P_std=1.4, optimizer="radam", lr=1e-4, betas=(0.9, 0.99), eps=1e-8,
                 ema_rampup=0.0, tangent_warmup=10_000, init="runs/cifar10-teacher")
# ImageNet 64 (size S) [P Table 4]: EDM2 config G with Adam eps 1e-11: batch 2048, betas 0.9/0.99,
# inverse-sqrt lr with t_ref 35k iterations, fp16; teacher alpha_ref 1e-2, 1048k iterations, dropout 0,
# P_mean/P_std -0.8/1.6 (EDM2's 10 Mimg lr rampup and power EMA sigma_rel 0.05/0.10). CMs: 0.01x the
# teacher's lr, P_mean/P_std -1.0/1.6, 400k iterations, sCT dropout 0.45 at resolutions <= 16, sCD 0,
# sampled with the sigma_rel 0.05 EMA. Label dropout / CFG at 64 px: not stated (EDM2 uses none).
_IN64 = dict(data="", arch="unet", model="S", img_size=64, batch=2048, sigma_d=0.5, optimizer="adam",
             betas=(0.9, 0.99), eps=1e-11, lr_schedule="isqrt", lr_ref_kimg=_kimg(35_000, 2048), precision="fp16",
             ema="power", label_dropout=0.0)
_IN64_CM = dict(_IN64, P_mean=-1.0, P_std=1.6, lr=1e-4, ema_sigma_rels=(0.05,), tangent_warmup=10_000,
                total_kimg=_kimg(400_000, 2048), guidance_min=1.0, guidance_max=1.0)
# ImageNet 512 latents (size XXL) [P Table 5]: as ImageNet 64 but t_ref 70k iterations; teacher alpha_ref
# 6.5e-3, 376k iterations, dropout 0.1, P_mean/P_std -0.4/1.0, label dropout 0.1 (CFG 1.2 for FID).
# CMs: alpha_ref 6.5e-5, P_mean/P_std -0.8/1.6; sCT 100k iterations, dropout 0.35 at <= 16 px; sCD 200k
# iterations, dropout 0.1 at <= 16 px, s ~ U[1, 2], sampled at s = 1.3 (1 step; 2 steps: 1.2).
_IN512 = dict(_IN64, model="XXL", lr_ref_kimg=_kimg(70_000, 2048), parallel="fsdp", label_dropout=0.1)
_IN512_CM = dict(_IN512, P_mean=-0.8, P_std=1.6, lr=6.5e-5, ema_sigma_rels=(0.05,), tangent_warmup=10_000,
                 dropout_res=16, init="runs/imagenet512-teacher")

PRESETS = {
    "digits-sct": dict(_DIGITS, objective="sct", P_mean=-1.4, P_std=1.4, lr=1e-3, total_kimg=150.0,
                       tangent_warmup=200),
    "digits-teacher": dict(_DIGITS, objective="diffusion", P_mean=-0.8, P_std=1.6, label_dropout=0.1, lr=2e-3,
                           total_kimg=100.0),
    "digits-sct-ft": dict(_DIGITS_FINETUNE, objective="sct", lr=1e-4, init="runs/digits-teacher"),
    "digits-scd": dict(_DIGITS_FINETUNE, objective="scd", lr=2e-4, teacher="runs/digits-teacher"),
    "digits-meanflow": dict(_DIGITS, objective="meanflow", P_mean=-0.4, P_std=1.0, lr=1e-3, total_kimg=150.0),
    "cifar10-teacher": dict(_CIFAR, objective="diffusion", label_dropout=0.0, P_mean=-1.2, P_std=1.2,
                            optimizer="adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, dropout=0.13,
                            lr_rampup_kimg=10_000.0, ema_rampup=0.05),
    "cifar10-sct": dict(_CIFAR_CM, objective="sct", dropout=0.2),
    "cifar10-scd": dict(_CIFAR_CM, objective="scd", dropout=0.0, teacher="runs/cifar10-teacher",
                        guidance_min=1.0, guidance_max=1.0),
    "imagenet64-teacher": dict(_IN64, objective="diffusion", P_mean=-0.8, P_std=1.6, lr=1e-2, dropout=0.0,
                               lr_rampup_kimg=10_000.0, ema_sigma_rels=(0.05, 0.10),
                               total_kimg=_kimg(1_048_000, 2048)),
    "imagenet64-sct": dict(_IN64_CM, objective="sct", dropout=0.45, dropout_res=16, init="runs/imagenet64-teacher"),
    "imagenet64-scd": dict(_IN64_CM, objective="scd", dropout=0.0, teacher="runs/imagenet64-teacher"),
    "imagenet512-teacher": dict(_IN512, objective="diffusion", P_mean=-0.4, P_std=1.0, lr=6.5e-3, dropout=0.1,
                                lr_rampup_kimg=10_000.0, ema_sigma_rels=(0.05, 0.10), sample_guidance=1.2,
                                total_kimg=_kimg(376_000, 2048)),
    "imagenet512-sct": dict(_IN512_CM, objective="sct", dropout=0.35, total_kimg=_kimg(100_000, 2048)),
    "imagenet512-scd": dict(_IN512_CM, objective="scd", dropout=0.1, teacher="runs/imagenet512-teacher",
                            guidance_min=1.0, guidance_max=2.0, sample_guidance=1.3,
                            total_kimg=_kimg(200_000, 2048)),
}

_CHOICES = dict(objective=OBJECTIVES, arch=ARCHS, optimizer=OPTIMIZERS, precision=PRECISIONS,
                lr_schedule=LR_SCHEDULES, ema=EMAS, parallel=PARALLELS, tangent_norm=("l2", "rms", "none"),
                device=("auto", "cpu", "cuda"))


def validate(cfg, for_run=True):
    """Raise ValueError naming the flag for every value outside its domain. for_run=False (--dry-run)
    skips what only a real run needs (the data path, the sCD teacher)."""
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ValueError(f"--{_flag(name)} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")
    positive = ("batch", "total_kimg", "lr", "sigma_d", "P_std", "keep_ckpts", "log_every", "max_nonfinite",
                "loss_scale")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{_flag(name)} must be > 0; got {getattr(cfg, name)!r}")
    non_negative = ("weight_decay", "grad_clip", "tangent_warmup", "tangent_norm_c", "img_size", "patch",
                    "dropout", "lr_ref_kimg", "lr_rampup_kimg", "sample_every_kimg", "ckpt_every_kimg",
                    "eval_n", "n_grid", "threads", "ema_halflife_kimg", "ema_rampup", "dropout_res")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{_flag(name)} must be >= 0; got {getattr(cfg, name)!r}")
    if not 0 <= cfg.label_dropout < 1 or not 0 <= cfg.dropout < 1:
        raise ValueError(f"--label-dropout and --dropout must be in [0, 1); got {cfg.label_dropout}, {cfg.dropout}")
    if not 0 < cfg.t_mid < math.pi / 2:
        raise ValueError(f"--t-mid must be in (0, pi/2); got {cfg.t_mid!r}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ValueError(f"--betas must be two numbers in [0, 1), e.g. 0.9,0.99; got {cfg.betas}")
    if cfg.guidance_min > cfg.guidance_max or cfg.guidance_min < 0:
        raise ValueError(f"--guidance-min must be >= 0 and <= --guidance-max; got {cfg.guidance_min}, "
                         f"{cfg.guidance_max}")
    if cfg.ema == "power" and not cfg.ema_sigma_rels:
        raise ValueError("--ema-sigma-rels needs at least one value with --ema power")
    if for_run and cfg.objective == "scd" and not cfg.teacher:
        raise ValueError("--objective scd needs --teacher RUN_DIR_OR_CHECKPOINT (a TrigFlow diffusion teacher)")
    if cfg.lr_schedule == "isqrt" and cfg.lr_ref_kimg <= 0:
        raise ValueError("--lr-schedule isqrt needs --lr-ref-kimg > 0 (t_ref in kimg)")
    if for_run and not cfg.data:
        raise ValueError(f"preset {cfg.preset!r} needs --data PATH (an image folder, .npy/.npz or latents:PATH); "
                         "the embedded data set is 'digits'")


def _flag(name):
    return name.replace("_", "-")


def _tuple_of_floats(text):
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser():
    p = argparse.ArgumentParser(prog="python -m scm_fast.train",
                                description="Train TrigFlow teachers, sCT, sCD and MeanFlow models (scm_fast).")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parameter count and memory per device, then exit")
    p.add_argument("--world-size", type=int, default=0,
                   help="--dry-run only: the world size to estimate memory for (default: this launch's)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        help_text = f"(default: {default!r}; presets may change it)"
        if f.name == "preset":
            p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                           help=f"one of the presets (default: {default})")
        elif isinstance(default, bool):
            p.add_argument(f"--{_flag(f.name)}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, tuple):
            p.add_argument(f"--{_flag(f.name)}", type=_tuple_of_floats, default=None, help=help_text)
        else:
            p.add_argument(f"--{_flag(f.name)}", type=type(default), default=None, help=help_text)
    return p


def resolve(preset=None, for_run=True, **overrides):
    """TrainConfig from a preset plus overrides (validated)."""
    preset = preset or TrainConfig.preset
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(sorted(PRESETS))}; got {preset!r}")
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown config fields: {sorted(unknown)}")
    cfg = TrainConfig(**{**PRESETS[preset], **overrides, "preset": preset})
    cfg.betas, cfg.ema_sigma_rels = tuple(cfg.betas), tuple(cfg.ema_sigma_rels)
    validate(cfg, for_run)
    return cfg


def parse(argv=None):
    """(TrainConfig, dry_run, world_size_for_dry_run) from the command line; bad values exit with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("dry_run", "world_size", "preset")}
    try:
        cfg = resolve(args.preset, for_run=not args.dry_run, **overrides)
    except ValueError as e:
        parser.error(str(e))
    return cfg, args.dry_run, args.world_size


def from_dict(d):
    """The TrainConfig saved in a run directory (config.json)."""
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})
    return cfg


def diff(a, b, ignore=("total_kimg", "sample_every_kimg", "ckpt_every_kimg", "log_every", "progress",
                       "tensorboard", "eval_n", "threads", "keep_ckpts")):
    """Fields that differ between two configs (those that may change on a resume are ignored)."""
    da, db = a.to_dict(), b.to_dict()
    return {k: (da[k], db[k]) for k in da if k not in ignore and da[k] != db.get(k)}


def dumps(cfg):
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


# ---- memory estimate for --dry-run -------------------------------------------------------------
def estimate_memory(cfg, n_params, act_per_image, block_inputs_per_image, n_blocks, world_size):
    """Bytes per device, by part. Weights, gradients and optimizer state in fp32 (Adam/RAdam: 2
    moments), EMA copies in fp32; FSDP2 divides all of those by the world size, DDP keeps them
    whole. Activations: what autograd saves per image (measured on fake tensors under the run's
    autocast, train.saved_activation_bytes) times the batch per device. The one-pass JVP's tangents
    live one layer at a time (no graph): about one block's share. Activation checkpointing keeps
    the blocks' inputs plus one block's activations during its recompute."""
    shard = world_size if cfg.parallel == "fsdp" else 1
    n_ema = len(cfg.ema_sigma_rels) if cfg.ema == "power" else (0 if cfg.ema == "none" else 1)
    local_batch = max(cfg.batch // world_size, 1)
    per_block = act_per_image * local_batch / max(n_blocks, 1)
    saved = act_per_image * local_batch
    if cfg.act_ckpt:
        saved = block_inputs_per_image * local_batch + per_block
    parts = {
        "weights": 4 * n_params / shard,
        "gradients": 4 * n_params / shard,
        "optimizer": 8 * n_params / shard,
        "ema": 4 * n_ema * n_params / shard,
        "activations": saved,
        "tangents (transient)": per_block,
    }
    if cfg.objective == "scd":
        parts["teacher (no grad)"] = 4 * n_params / shard
    parts["total"] = sum(parts.values())
    return parts


def format_bytes(n):
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def steps_for(kimg, batch):
    # round first: 32.112 kimg / 16 is 2007.0000000000002 in floats, which must stay 2007 steps
    return max(1, math.ceil(round(kimg * 1000 / batch, 9)))


__all__ = ["PRESETS", "TrainConfig", "build_parser", "diff", "dumps", "estimate_memory", "format_bytes",
           "from_dict", "parse", "resolve", "steps_for", "validate"]
