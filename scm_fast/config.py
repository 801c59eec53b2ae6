"""The trainer's one typed config: defaults, presets, CLI overrides and the memory estimate.

Every field of `TrainConfig` is a command-line flag (`--total-kimg 200`, `--one-pass/--no-one-pass`,
tuples comma-separated: `--ema-sigma-rels 0.05,0.1`). `--preset NAME` picks a preset first; flags
given explicitly override it. Units follow EDM2: training length and intervals in images (kimg),
except the tangent warmup H, which the paper gives in iterations [P App. G].

Each field carries its help sentence and its domain in `dataclasses.field` metadata (`_option`):
`validate` checks the domains from there, `build_parser` writes the help from there, and
docs/train-help.txt is `help_text()` (tests/test_config.py keeps it current).

The presets named after the paper's runs (cifar10-*, imagenet64-*, imagenet512-*) carry its
optimisation settings (scm-reference.md §2, §6) for users who bring that data (`--data PATH`).
"""
import argparse
import json
import math
import textwrap
from dataclasses import dataclass, field, fields

OBJECTIVES = ("diffusion", "sct", "scd", "meanflow")
ARCHS = ("dit", "unet", "diffusers")
PREDICTIONS = ("auto", "flow", "epsilon", "v_prediction", "edm")
OPTIMIZERS = ("radam", "adam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "isqrt")
EMAS = ("power", "halflife", "none")
PARALLELS = ("ddp", "fsdp")
TANGENT_NORMS = ("l2", "rms", "none")
DEVICES = ("auto", "cpu", "cuda")
HELP_WIDTH = 100  # docs/train-help.txt is the help at this width, whatever the terminal


# A resume may change these freely (how long, how often, how it reports) ...
RESUME_FREE = ("run_dir", "allow_change", "total_kimg", "sample_every_kimg", "ckpt_every_kimg", "log_every",
               "progress", "tensorboard", "eval_n", "threads", "workers", "vae", "keep_ckpts", "device")
# ... never these (the checkpoint's tensors would not fit, or the run would silently become another one) ...
RESUME_NEVER = ("objective", "arch", "model", "patch", "prediction", "time_scale", "img_size", "class_cond", "adaptive_weight", "ema",
                "ema_sigma_rels", "ema_halflife_kimg", "ema_rampup", "optimizer", "parallel")
# ... and any other field only when --allow-change names it.


def _option(default, help, *, choices=None, gt=None, ge=None, lt=None, metavar=None):
    """A TrainConfig field: its default, its help sentence (what it does, its unit) and its domain:
    choices, or a lower bound (> gt or >= ge) with an optional upper bound (< lt)."""
    assert lt is None or gt is not None or ge is not None, "an upper bound needs a lower one"
    return field(default=default, metadata=dict(help=help, choices=choices, gt=gt, ge=ge, lt=lt, metavar=metavar))


@dataclass
class TrainConfig:
    # run
    preset: str = _option("digits-sct", "the preset to start from (data, network, objective and optimisation "
                          "settings); the flags given explicitly override it")
    run_dir: str = _option("", "the run directory (config.json, log.txt, stats.jsonl, samples/, checkpoints/); "
                           "re-running with the same one resumes from its newest checkpoint; '' = runs/PRESET",
                           metavar="DIR")
    allow_change: str = _option("", "resuming: comma-separated fields that may differ from the run's saved config "
                                "(e.g. lr,grad_clip,data); any other difference stops the resume with the list. "
                                "Never allowed: " + ", ".join(RESUME_NEVER), metavar="FIELDS")
    seed: int = _option(0, "seed of the initial weights, the data order and the training noise (one stream per "
                        "rank); the sample grids use it, the final evaluation seed + 1")
    threads: int = _option(0, "torch CPU threads per process (torch.set_num_threads); 0 = torch's default", ge=0)
    device: str = _option("auto", "auto: CUDA when available, else the CPU; cuda: the local rank's GPU (an error "
                          "if there is none); cpu", choices=DEVICES)
    # data
    data: str = _option("digits", "the training data: digits (the embedded 8x8 digits, 10 classes), an image "
                        "folder, a .npy/.npz array file, or latents:PATH (pre-encoded latents, normalised per "
                        "channel to std sigma_d)", metavar="PATH")
    img_size: int = _option(0, "image side in pixels: digits and image folders are resized to it, arrays and "
                            "latents must have it; 0 = the data's own size", ge=0)
    vae: str = _option("", "a local diffusers AutoencoderKL / AutoencoderDC folder (save_pretrained): sample grids "
                       "of latent data are decoded to images with it; empty: grids show the latent channels",
                       metavar="PATH")
    workers: int = _option(0, "data loader worker processes per rank, reading batches ahead of the step (with "
                           "pinned memory on CUDA); 0 = read in the training process. The batches do not "
                           "depend on it", ge=0)
    class_cond: bool = _option(True, "condition the network on the data's class labels when it has them; off: "
                               "unconditional")
    # model
    arch: str = _option("dit", "the network: dit (a DiT transformer on patches), unet (EDM2-layout U-Net), or "
                        "diffusers (a pretrained diffusers transformer / UNet from the folder --model)",
                        choices=ARCHS)
    model: str = _option("digits", "the network's size preset: for dit tiny, digits, S, B, L, XL, XXL; for unet "
                         "tiny, S, M, L, XL, XXL; for diffusers a local model or pipeline folder written by "
                         "save_pretrained (its transformer/ or unet/; weights when it has them, else a random init) "
                         "or, with --dry-run, a config.json", metavar="NAME_OR_PATH")
    prediction: str = _option("auto", "--arch diffusers: what the model predicts: flow (rectified flow velocity), "
                              "epsilon, v_prediction (DDPM schedule from the pipeline's scheduler/), edm; auto = "
                              "read from the scheduler config beside the model (flow for flow-era transformers)",
                              choices=PREDICTIONS)
    time_scale: float = _option(0.0, "--arch diffusers, flow models: timestep = time_scale * s (s in [0, 1]); 0 = "
                                "the model's own convention (1000, or 1 for Flux / Qwen-Image); smaller values are "
                                "SANA-Sprint's denser time conditioning (fine-tune the teacher on it first with "
                                "--objective diffusion)", ge=0)
    patch: int = _option(0, "DiT patch size in pixels; 0 = 2 (1 for images below 8 px or of odd size)", ge=0)
    dropout: float = _option(0.0, "U-Net dropout probability in its residual blocks (the DiT has no dropout)",
                             ge=0, lt=1)
    dropout_res: int = _option(0, "U-Net: dropout only in blocks at resolutions <= this many pixels (the paper's "
                               "CMs: 16) [P App. G]; 0 = in every block", ge=0)
    # objective (scm-reference.md §2-§3, §8)
    objective: str = _option("sct", "what to train: diffusion (a TrigFlow teacher), sct (consistency training), "
                             "scd (consistency distillation from --teacher), meanflow (MeanFlow)",
                             choices=OBJECTIVES)
    teacher: str = _option("", "sCD: the TrigFlow diffusion teacher, its run directory or a checkpoint "
                           "directory, or (--arch diffusers) a diffusers model / pipeline folder; it also "
                           "initialises the student unless --init is given [P §5.1]",
                           metavar="RUN_OR_CKPT")
    init: str = _option("", "a run directory or checkpoint to initialise the network's weights from (layers it "
                        "lacks keep their init); '' = random (sCD: the teacher's weights)", metavar="RUN_OR_CKPT")
    sigma_d: float = _option(0.5, "sigma_d, the standard deviation of the training data (pixels in [-1, 1]; "
                             "latents are scaled to it) that TrigFlow assumes [P §3]; the trainer warns when the "
                             "data's std is off by > 25%", gt=0)
    P_mean: float = _option(-1.0, "mean of tau ~ N(P_mean, P_std^2), the training times' log noise level: t = "
                            "arctan(exp(tau) / sigma_d) [P Alg. 1] (MeanFlow: t = sigmoid(tau))")
    P_std: float = _option(1.4, "standard deviation of tau in the training times (see --P-mean)", gt=0)
    tangent_warmup: int = _option(10_000, "sCT/sCD: the tangent warmup H in iterations (optimizer steps, not "
                                  "kimg): r = min(1, step / H) [P Alg. 1, App. G]; 0 = off", ge=0)
    tangent_norm: str = _option("l2", "sCT/sCD: tangent normalisation g / (||g|| + c) with ||g|| the L2 norm "
                                "per sample (l2), its root mean square (rms), or none [P Alg. 1]",
                                choices=TANGENT_NORMS)
    tangent_norm_c: float = _option(0.1, "sCT/sCD: the constant c in g / (||g|| + c)", ge=0)
    rearranged_jvp: bool = _option(True, "sCT/sCD: take the JVP along (cos t sin t dx_t/dt, cos t sin t sigma_d), "
                                   "the FP16-stable rearrangement; off: the naive tangent (dx_t/dt / sigma_d, 1), "
                                   "which overflows in fp16")
    prior_weighting: bool = _option(False, "sCT/sCD: an extra 1 / (sigma_d tan t) weight on the loss (some "
                                    "codebases; not the paper)")
    one_pass: bool = _option(True, "sCT/sCD/MeanFlow: one forward under torch.func.jvp gives F with its graph and "
                             "the tangent; off: a no-grad JVP pass, then a forward with grad (--act-ckpt implies "
                             "it)")
    adaptive_weight: bool = _option(True, "diffusion/sCT/sCD: learn the adaptive loss weight logvar(t), a small "
                                    "head trained with the network (EDM2); off: the plain mean loss")
    label_dropout: float = _option(0.1, "diffusion teachers: the fraction of labels replaced by the null class, so "
                                   "that the teacher also learns the unconditional F for classifier-free guidance",
                                   ge=0, lt=1)
    guidance_min: float = _option(1.0, "sCD: the guidance scale s ~ U[guidance_min, guidance_max] drawn per "
                                  "sample, the teacher's CFG scale and a student input [P §5.1]; >= 0 and <= "
                                  "--guidance-max")
    guidance_max: float = _option(2.0, "sCD: the upper end of s ~ U[guidance_min, guidance_max]")
    sample_guidance: float = _option(1.5, "s for the sample grids and the evaluation: the sCD student's guidance "
                                     "input, or a class-conditional teacher's CFG scale (1 = none)")
    t_mid: float = _option(1.1, "consistency models: the intermediate TrigFlow time of the 2-step sampler "
                           "[P §5.2]", gt=0, lt=math.pi / 2)
    # optimisation (scm-reference.md §6)
    batch: int = _option(128, "the global batch: images per optimizer step over all ranks (a multiple of the "
                         "world size)", gt=0)
    total_kimg: float = _option(120.0, "training length in thousands of images (kimg)", gt=0)
    optimizer: str = _option("radam", "the torch.optim optimizer: radam, adam or adamw (fused on CUDA, except "
                             "radam)", choices=OPTIMIZERS)
    lr: float = _option(2e-3, "the peak learning rate (the paper's alpha_ref), before --lr-rampup-kimg and "
                        "--lr-schedule", gt=0)
    betas: tuple = _option((0.9, 0.99), "the optimizer's beta1,beta2, each in [0, 1)", metavar="B1,B2")
    eps: float = _option(1e-8, "the optimizer's epsilon (the paper's ImageNet runs: 1e-11)")
    weight_decay: float = _option(0.0, "the optimizer's weight decay (decoupled for adamw, an L2 term for adam "
                                  "and radam)", ge=0)
    lr_schedule: str = _option("constant", "the learning-rate decay: constant, or isqrt: lr / sqrt(max(nimg / "
                               "t_ref, 1)) with t_ref = --lr-ref-kimg [P App. G]", choices=LR_SCHEDULES)
    lr_ref_kimg: float = _option(0.0, "isqrt: t_ref in kimg (the paper's t_ref in iterations x batch / 1000); "
                                 "needs > 0 with --lr-schedule isqrt", ge=0)
    lr_rampup_kimg: float = _option(0.0, "linear learning-rate rampup from 0 over this many kimg; 0 = off", ge=0)
    grad_clip: float = _option(0.0, "clip the network's global gradient norm to this (the weight head's norm is "
                               "logged, not clipped); 0 = off", ge=0)
    precision: str = _option("fp32", "the network's precision: fp32, bf16 (autocast) or fp16 (autocast and "
                             "dynamic loss scaling); targets and losses stay fp32", choices=PRECISIONS)
    loss_scale: float = _option(2.0 ** 14, "fp16: the initial dynamic loss scale (halved after a non-finite "
                                "step, doubled after 1000 finite ones)", gt=0)
    max_nonfinite: int = _option(20, "stop, with a checkpoint, after this many non-finite steps in a row (each "
                                 "is skipped)", gt=0)
    # EMA
    ema: str = _option("halflife", "the weight averages that sample and evaluate: power (EDM2 power-function "
                       "EMAs, one per --ema-sigma-rels), halflife (EDM, --ema-halflife-kimg), none (raw weights)",
                       choices=EMAS)
    ema_sigma_rels: tuple = _option((0.05, 0.10), "power EMA: the relative std sigma_rel of each average, each in "
                                    "(0, 1/sqrt(12) = 0.2887); the first one samples and evaluates",
                                    metavar="S[,S...]")
    ema_halflife_kimg: float = _option(10.0, "halflife EMA: its half-life in kimg", ge=0)
    ema_rampup: float = _option(0.05, "halflife EMA: the half-life is at most this ratio x the images seen so far "
                                "(EDM's rampup); 0 = off", ge=0)
    # parallelism
    parallel: str = _option("ddp", "data parallelism over the ranks (torchrun): ddp (DistributedDataParallel) or "
                            "fsdp (FSDP2 fully_shard per block: weights, gradients and optimizer state sharded)",
                            choices=PARALLELS)
    act_ckpt: bool = _option(False, "activation checkpointing of the network's blocks in the gradient pass (less "
                             "memory, one more forward); the consistency step then runs two-pass")
    # logging, sampling, checkpoints
    log_every: int = _option(20, "optimizer steps between records in stats.jsonl (and tensorboard)", gt=0)
    sample_every_kimg: float = _option(40.0, "kimg between sample grids (samples/*.png, from the first EMA); 0 = "
                                       "only at the end", ge=0)
    ckpt_every_kimg: float = _option(20.0, "kimg between checkpoints; 0 = only at the end (a run always ends, or "
                                     "stops on a signal, with one)", ge=0)
    keep_ckpts: int = _option(3, "how many of the newest checkpoints to keep on disk", gt=0)
    n_grid: int = _option(100, "images per sample grid (rows of one image per class)", ge=0)
    eval_n: int = _option(1000, "digits data: samples for the final FD in the digits classifier's features "
                          "(eval.json); 0 = skip", ge=0)
    tensorboard: bool = _option(True, "write tensorboard scalars to RUN_DIR/tensorboard (when tensorboard is "
                                "installed)")
    progress: bool = _option(True, "show progress on rank 0: a tqdm bar when stderr is a terminal, else a log line "
                             "every 5% of the run")

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
_DIGITS_SCRATCH = dict(_DIGITS, lr=1e-3, total_kimg=150.0)
_DIGITS_FINETUNE = dict(_DIGITS, P_mean=-1.0, P_std=1.4, tangent_warmup=200, total_kimg=40.0, ema="power",
                        ema_sigma_rels=(0.05,), ema_rampup=0.0, sample_every_kimg=0.0, ckpt_every_kimg=10.0)
_DIGITS_TEACHER = "runs/digits-teacher"

# ---- the paper's settings [P App. G] for users who bring the data ------------------------------------
# Each family has a teacher (TrigFlow diffusion, with its optimiser's 10 Mimg lr rampup: EDM, EDM2) and
# two consistency models (tangent warmup H = 10k iterations) started from the teacher's weights:
# NAME-sct (--init) and NAME-scd (--teacher). `shared` is what all three use, `cm` what both CMs use.
def _family(name, shared, teacher, cm, sct, scd):
    run = f"runs/{name}-teacher"
    cms = {**shared, "tangent_warmup": 10_000, "init": run, **cm}
    return {f"{name}-teacher": {**shared, "objective": "diffusion", "lr_rampup_kimg": 10_000.0, **teacher},
            f"{name}-sct": {**cms, "objective": "sct", **sct},
            f"{name}-scd": {**cms, "objective": "scd", "teacher": run, **scd}}


# CIFAR-10 [P §G.1]: unconditional; the paper's network is DDPM++ with the TrigFlow changes, ours the
# EDM2-layout U-Net S. Teacher: "the same settings as EDM" (Adam lr 1e-3, betas 0.9/0.999, dropout
# 0.13, 400k iterations at batch 512; EDM's P_mean/P_std -1.2/1.2, lr rampup 10 Mimg, EMA half-life
# 0.5 Mimg with rampup 0.05). CMs: RAdam lr 1e-4, betas 0.9/0.99, no schedule, EMA half-life 0.5 Mimg,
# dropout 0.20 (sCT) / 0 (sCD), initialised from the teacher's EMA; their length is not stated (400k
# iterations, as the teacher).
_CIFAR = _family(
    "cifar10",
    shared=dict(data="", arch="unet", model="S", img_size=32, class_cond=False, batch=512, sigma_d=0.5, eps=1e-8,
                ema="halflife", ema_halflife_kimg=500.0, total_kimg=_kimg(400_000, 512)),
    teacher=dict(P_mean=-1.2, P_std=1.2, optimizer="adam", lr=1e-3, betas=(0.9, 0.999), dropout=0.13,
                 label_dropout=0.0, ema_rampup=0.05),
    cm=dict(P_mean=-1.0, P_std=1.4, optimizer="radam", lr=1e-4, betas=(0.9, 0.99), ema_rampup=0.0),
    sct=dict(dropout=0.2),
    scd=dict(dropout=0.0, guidance_min=1.0, guidance_max=1.0))  # unconditional: s = 1, no CFG
# ImageNet 64 (size S) [P Table 4]: EDM2 config G with Adam eps 1e-11: batch 2048, betas 0.9/0.99,
# inverse-sqrt lr with t_ref 35k iterations, fp16; teacher alpha_ref 1e-2, 1048k iterations, dropout 0,
# P_mean/P_std -0.8/1.6 (EDM2's 10 Mimg lr rampup and power EMA sigma_rel 0.05/0.10). CMs: 0.01x the
# teacher's lr, P_mean/P_std -1.0/1.6, 400k iterations, sCT dropout 0.45 at resolutions <= 16, sCD 0,
# sampled with the sigma_rel 0.05 EMA. Label dropout / CFG at 64 px: not stated (EDM2 uses none).
_IN64 = dict(data="", arch="unet", model="S", img_size=64, batch=2048, sigma_d=0.5, optimizer="adam",
             betas=(0.9, 0.99), eps=1e-11, lr_schedule="isqrt", lr_ref_kimg=_kimg(35_000, 2048), precision="fp16",
             ema="power", ema_sigma_rels=(0.05, 0.10), label_dropout=0.0)
_IMAGENET64 = _family(
    "imagenet64", shared=_IN64,
    teacher=dict(P_mean=-0.8, P_std=1.6, lr=1e-2, dropout=0.0, total_kimg=_kimg(1_048_000, 2048)),
    cm=dict(P_mean=-1.0, P_std=1.6, lr=1e-4, ema_sigma_rels=(0.05,), total_kimg=_kimg(400_000, 2048),
            guidance_min=1.0, guidance_max=1.0),
    sct=dict(dropout=0.45, dropout_res=16),
    scd=dict(dropout=0.0, init=""))  # no --init: the student still starts from --teacher
# ImageNet 512 latents (size XXL) [P Table 5]: as ImageNet 64 but t_ref 70k iterations; teacher alpha_ref
# 6.5e-3, 376k iterations, dropout 0.1, P_mean/P_std -0.4/1.0, label dropout 0.1 (CFG 1.2 for FID).
# CMs: alpha_ref 6.5e-5, P_mean/P_std -0.8/1.6; sCT 100k iterations, dropout 0.35 at <= 16 px; sCD 200k
# iterations, dropout 0.1 at <= 16 px, s ~ U[1, 2], sampled at s = 1.3 (1 step; 2 steps: 1.2).
_IMAGENET512 = _family(
    "imagenet512",
    shared=dict(_IN64, model="XXL", lr_ref_kimg=_kimg(70_000, 2048), parallel="fsdp", label_dropout=0.1),
    teacher=dict(P_mean=-0.4, P_std=1.0, lr=6.5e-3, dropout=0.1, sample_guidance=1.2,
                 total_kimg=_kimg(376_000, 2048)),
    cm=dict(P_mean=-0.8, P_std=1.6, lr=6.5e-5, ema_sigma_rels=(0.05,), dropout_res=16),
    sct=dict(dropout=0.35, total_kimg=_kimg(100_000, 2048)),
    scd=dict(dropout=0.1, guidance_min=1.0, guidance_max=2.0, sample_guidance=1.3, total_kimg=_kimg(200_000, 2048)))

PRESETS = {
    "digits-sct": dict(_DIGITS_SCRATCH, objective="sct", P_mean=-1.4, P_std=1.4, tangent_warmup=200),
    "digits-teacher": dict(_DIGITS, objective="diffusion", P_mean=-0.8, P_std=1.6, label_dropout=0.1, lr=2e-3,
                           total_kimg=100.0),
    "digits-sct-ft": dict(_DIGITS_FINETUNE, objective="sct", lr=1e-4, init=_DIGITS_TEACHER),
    "digits-scd": dict(_DIGITS_FINETUNE, objective="scd", lr=2e-4, teacher=_DIGITS_TEACHER),
    "digits-meanflow": dict(_DIGITS_SCRATCH, objective="meanflow", P_mean=-0.4, P_std=1.0),
    **_CIFAR, **_IMAGENET64, **_IMAGENET512,
}


# ---- validation ---------------------------------------------------------------------------------------
def _number(x):
    return "pi/2" if x == math.pi / 2 else f"{x:g}"


def _domain(meta):
    """The bounds of a field as text: '> 0', '>= 0', 'in [0, 1)', 'in (0, pi/2)'; '' when it has none."""
    if meta.get("gt") is None and meta.get("ge") is None:
        return ""
    strict = meta.get("gt") is not None
    low = meta["gt"] if strict else meta["ge"]
    if meta.get("lt") is not None:
        return f"in {'(' if strict else '['}{_number(low)}, {_number(meta['lt'])})"
    return f"{'>' if strict else '>='} {_number(low)}"


def _outside(meta, value):
    """Whether value falls outside the field's bounds (NaN fails a strict lower bound and an upper one)."""
    if meta.get("gt") is not None and not value > meta["gt"]:
        return True
    if meta.get("ge") is not None and value < meta["ge"]:
        return True
    return meta.get("lt") is not None and not value < meta["lt"]


def validate(cfg, for_run=True):
    """Raise ValueError naming the flag for every value outside its domain. for_run=False (--dry-run)
    skips what only a real run needs (the data path, the sCD teacher)."""
    for f in fields(TrainConfig):  # the domains in the fields' metadata
        meta, value = f.metadata, getattr(cfg, f.name)
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"--{_flag(f.name)} must be one of {', '.join(meta['choices'])}; got {value!r}")
        if _outside(meta, value):
            raise ValueError(f"--{_flag(f.name)} must be {_domain(meta)}; got {value!r}")
    # the tuples and the checks across fields
    unknown = [f for f in (n.strip() for n in cfg.allow_change.split(",")) if f and f not in {x.name for x in fields(cfg)}]
    if unknown:
        raise ValueError(f"--allow-change: unknown fields {unknown}; expected config field names such as lr,grad_clip")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ValueError(f"--betas must be two numbers in [0, 1), e.g. 0.9,0.99; got {cfg.betas}")
    if cfg.guidance_min > cfg.guidance_max or cfg.guidance_min < 0:
        raise ValueError(f"--guidance-min must be >= 0 and <= --guidance-max; got {cfg.guidance_min}, "
                         f"{cfg.guidance_max}")
    if cfg.ema == "power" and not cfg.ema_sigma_rels:
        raise ValueError("--ema-sigma-rels needs at least one value with --ema power")
    if for_run and cfg.objective == "scd" and not cfg.teacher:
        raise ValueError("--objective scd needs --teacher RUN_DIR_OR_CHECKPOINT (a TrigFlow diffusion teacher)")
    if cfg.arch == "diffusers" and cfg.model in ("digits", ""):
        raise ValueError("--arch diffusers needs --model PATH (a local diffusers model or pipeline folder written by "
                         "save_pretrained)")
    if cfg.arch == "diffusers" and cfg.objective == "meanflow":
        raise ValueError("--objective meanflow needs a second time input: use --arch dit or unet")
    if cfg.lr_schedule == "isqrt" and cfg.lr_ref_kimg <= 0:
        raise ValueError("--lr-schedule isqrt needs --lr-ref-kimg > 0 (t_ref in kimg)")
    if for_run and not cfg.data:
        raise ValueError(f"preset {cfg.preset!r} needs --data PATH (an image folder, .npy/.npz or latents:PATH); "
                         "the embedded data set is 'digits'")


# ---- the command line -----------------------------------------------------------------------------------
def _flag(name):
    return name.replace("_", "-")


def _tuple_of_floats(text):
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


class _HelpFormatter(argparse.HelpFormatter):
    """A fixed width (the help does not depend on the terminal), no line breaks inside --flag-names."""

    def __init__(self, prog):
        super().__init__(prog, width=HELP_WIDTH, max_help_position=30)

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _metavar(f, default):
    if f.metadata["metavar"] or f.metadata["choices"]:
        return f.metadata["metavar"]
    return "KIMG" if f.name.endswith("_kimg") else "N" if isinstance(default, int) else "X"


def _help(f, default):
    """The field's help sentence, its bounds and its default, as `--help` shows them."""
    domain = _domain(f.metadata)
    shown = ",".join(map(repr, default)) if isinstance(default, tuple) else repr(default)
    text = f"{f.metadata['help']}{'; ' + domain if domain else ''} (default: {shown}; presets may change it)"
    return text.replace("%", "%%")  # argparse formats help with %


def build_parser():
    p = argparse.ArgumentParser(prog="python -m scm_fast.train",
                                description="Train TrigFlow teachers, sCT, sCD and MeanFlow models (scm_fast).",
                                formatter_class=_HelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parameter count and memory per device, then exit")
    p.add_argument("--world-size", type=int, default=0, metavar="N",
                   help="--dry-run only: the world size to estimate memory for (default: this launch's)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        default, flag = getattr(defaults, f.name), f"--{_flag(f.name)}"
        if f.name == "preset":
            p.add_argument(flag, choices=sorted(PRESETS), default=None, metavar="NAME",
                           help=f"{f.metadata['help']}; one of {', '.join(PRESETS)} (default: {default})")
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_help(f, default))
        else:
            kind = _tuple_of_floats if isinstance(default, tuple) else type(default)
            p.add_argument(flag, type=kind, default=None, choices=f.metadata["choices"],
                           metavar=_metavar(f, default), help=_help(f, default))
    return p


def help_text():
    """`python -m scm_fast.train --help`, at a fixed width: docs/train-help.txt."""
    return build_parser().format_help()


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


def diff(a, b, ignore=RESUME_FREE):
    """Fields that differ between two configs (those that may change on a resume are ignored)."""
    da, db = a.to_dict(), b.to_dict()
    return {k: (da[k], db[k]) for k in da if k not in ignore and da[k] != db.get(k)}


def check_resume(saved, cfg):
    """ValueError listing the fields in which `cfg` differs from the run's saved config, unless each is
    free to change on a resume or named in cfg.allow_change (and none is in RESUME_NEVER)."""
    changed = diff(saved, cfg)
    allowed = {f.strip() for f in cfg.allow_change.split(",") if f.strip()}
    never = {k: v for k, v in changed.items() if k in RESUME_NEVER}
    refused = {k: v for k, v in changed.items() if k not in RESUME_NEVER and k not in allowed}
    if not never and not refused:
        return changed
    lines = [f"  {_flag(k)}: {old!r} in the run, {new!r} now" for k, (old, new) in {**never, **refused}.items()]
    advice = []
    if never:
        advice.append(f"{', '.join('--' + _flag(k) for k in never)} cannot change on a resume: start a new --run-dir "
                      "(--init RUN starts it from this run's weights)")
    if refused:
        advice.append(f"to resume with the new values, pass --allow-change {','.join(refused)}")
    raise ValueError("this command differs from the run's saved config.json:\n" + "\n".join(lines) + "\n"
                     + "; ".join(advice))


def dumps(cfg):
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


# ---- the consistency objective's knobs -----------------------------------------------------------------
# objectives.SCMConfig fields that are not TrainConfig fields of the same value, and how they follow from it.
_SCM_DERIVED = {
    "one_pass": lambda cfg: cfg.one_pass and not cfg.act_ckpt,  # a checkpointed gradient pass runs two-pass
    "guidance_input": lambda cfg: cfg.objective == "scd",  # sCD draws s and feeds it to teacher and student
}


def scm_config(cfg):
    """The objectives.SCMConfig of a TrainConfig: its fields by name, plus those in _SCM_DERIVED."""
    from scm_fast import objectives  # torch: imported when a trainer needs it, not with the config
    names = {f.name for f in fields(TrainConfig)}
    kw = {}
    for f in fields(objectives.SCMConfig):
        if f.name in _SCM_DERIVED:
            kw[f.name] = _SCM_DERIVED[f.name](cfg)
        elif f.name in names:
            kw[f.name] = getattr(cfg, f.name)
        else:
            raise TypeError(f"objectives.SCMConfig.{f.name} is neither a TrainConfig field nor derived from one: "
                            "add a TrainConfig field of that name or an entry in config._SCM_DERIVED")
    return objectives.SCMConfig(**kw)


def steps_for(kimg, batch):
    # round first: 32.112 kimg / 16 is 2007.0000000000002 in floats, which must stay 2007 steps
    return max(1, math.ceil(round(kimg * 1000 / batch, 9)))


_MOVED = {"estimate_memory": "scm_fast.train.dry_run", "format_bytes": "scm_fast.train.dry_run"}


def __getattr__(name):
    """Deprecated aliases (one release): the --dry-run memory estimate moved to scm_fast.train.dry_run."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings
    warnings.warn(f"scm_fast.config.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)


__all__ = ["PRESETS", "RESUME_FREE", "RESUME_NEVER", "TrainConfig", "build_parser", "check_resume", "diff", "dumps", "from_dict", "help_text", "parse", "resolve",
           "scm_config", "steps_for", "validate"]
