"""Setting a run up: the data, the network (and the sCD teacher, the initial weights, the weight
head), the parallel wrappers, the optimizer, the loss scaler, the EMA, the data order and the noise.
Everything the step reads or changes is one `Parts`; CheckpointIO saves and restores it."""
import inspect
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from scm_fast import checkpoint, config, data, ema, loader, objectives, runs, trigflow
from scm_fast.models import AdaptiveWeight, build_network
from scm_fast.train import distributed
from scm_fast.train.distributed import RunError


@dataclass
class Parts:
    data: Any
    num_classes: int
    raw_net: torch.nn.Module          # the network itself (what is saved, sampled and averaged)
    net: torch.nn.Module              # the same network as the step calls it (DDP / FSDP2 wrapped)
    raw_logvar: Any                   # the adaptive weight head [P §4.2], or None
    logvar: Any
    teacher: Any                      # sCD: the TrigFlow teacher (frozen), or None
    teacher_cfg: Any
    opt: torch.optim.Optimizer
    scaler: "LossScaler"
    ema: Any                          # PowerEMA / HalfLifeEMA, or None
    sampler: loader.ShardedSampler      # the data position (checkpointed); the loader advances it
    loader: loader.BatchLoader
    gen: trigflow.BatchGenerator
    scm_cfg: objectives.SCMConfig
    params: list                      # what the optimizer steps: the network's parameters, then the head's
    spec: Any = None                  # --arch diffusers: the DiffusersSpec (kept in each checkpoint's meta)


class LossScaler:
    """Dynamic loss scaling for fp16 (halve on overflow, double after `interval` clean steps);
    disabled (scale 1) otherwise."""

    def __init__(self, enabled, scale=2.0 ** 14, interval=1000):
        self.enabled, self.scale, self.interval, self.clean = enabled, scale if enabled else 1.0, interval, 0

    def update(self, finite):
        if not self.enabled:
            return
        if not finite:
            self.scale, self.clean = max(self.scale / 2, 1.0), 0
            return
        self.clean += 1
        if self.clean % self.interval == 0:
            self.scale *= 2

    def state_dict(self):
        return {"scale": self.scale, "clean": self.clean}

    def load_state_dict(self, d):
        self.scale, self.clean = float(d["scale"]), int(d["clean"])


def make_optimizer(cfg, params, cuda):
    kind = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cuda and cfg.optimizer != "radam":
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return kind(params, **kw)


def dataset(cfg):
    """The training data; RunError naming --data when it cannot be read (or --vae on pixel data)."""
    try:
        ds = data.build_dataset(cfg.data, cfg.img_size or None, cfg.sigma_d)
    except (OSError, ValueError) as err:  # a message, not a traceback, and no run dir for a bad --data
        msg = str(err)
        raise RunError(msg if msg.startswith("--data") else f"--data {cfg.data}: {msg}") from None
    if cfg.vae and not ds.is_latent:
        raise RunError(f"--vae {cfg.vae}: decodes latent data, but --data {cfg.data} holds pixels "
                       f"(drop --vae, or write latents with python -m scm_fast.prepare --vae)")
    return ds


def check_sigma_d(ds, sigma_d, log, n=512):
    """sigma_d is the data's std [P §3]: log the std of n evenly spaced samples, warn when it is off
    by more than 25% (TrigFlow's noise levels, t_max and the teacher's F scale all assume it)."""
    idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).long()
    std = ds.get_batch(idx)[0].float().std().item()
    msg = f"data std {std:.3f} ({len(idx)} samples), --sigma-d {sigma_d:g}"
    if not 0.8 <= std / sigma_d <= 1.25:
        msg = f"warning: {msg}: set --sigma-d to the data's std (or rescale the data)"
    log(msg)


def _load(flag, path, device):
    try:
        return runs.load_run(path, device=device)
    except (OSError, ValueError, checkpoint.CheckpointError) as err:
        raise RunError(f"--{flag} {path}: {err}") from None


def _is_diffusers_folder(path):
    from scm_fast.models import diffusers_net  # noqa: PLC0415
    try:
        diffusers_net.model_folder(path, "--teacher")
    except ValueError:
        return False
    return not (Path(path) / runs.CHECKPOINTS).is_dir()


def diffusers_teacher(cfg, ds, device, log):
    """(a diffusers model folder's TrigFlow network, frozen; a TrainConfig of it as a diffusion teacher)."""
    from scm_fast.models import diffusers_net  # noqa: PLC0415
    try:
        spec = diffusers_net.read_spec(cfg.teacher, cfg.prediction, cfg.time_scale, flag="--teacher")
        spec.null_cond = dict(ds.null_cond)
        diffusers_net.check_shape(spec, ds.shape, f"--teacher {cfg.teacher}")
        net = diffusers_net.load_pretrained(diffusers_net.build(spec, sigma_d=cfg.sigma_d), cfg.teacher, "--teacher")
    except ValueError as err:
        raise RunError(str(err)) from None
    log(f"teacher: {cfg.teacher} ({spec.class_name}, {diffusers_net.time_steps_hint(spec)})")
    return net.to(device).eval().requires_grad_(False), replace(cfg, objective="diffusion")


def load_teacher(cfg, shape, device, log, ds=None):
    """sCD: (the TrigFlow teacher's network, its TrainConfig); (None, None) otherwise."""
    if cfg.objective != "scd":
        return None, None
    if cfg.arch == "diffusers" and _is_diffusers_folder(cfg.teacher):
        return diffusers_teacher(cfg, ds, device, log)
    net, tcfg, meta = _load("teacher", cfg.teacher, device)
    if tcfg.objective != "diffusion":
        raise RunError(f"--teacher {cfg.teacher}: a TrigFlow diffusion teacher is needed, "
                       f"that run trained {tcfg.objective!r}")
    if tuple(meta["shape"]) != tuple(shape):
        raise RunError(f"--teacher {cfg.teacher} was trained on {tuple(meta['shape'])} images, "
                       f"the data is {tuple(shape)}")
    log(f"teacher: {meta['checkpoint']} ({meta['weights']})")
    return net, tcfg


def _classes(net):
    """The classes a network is conditioned on (its label embedding has one more row, the null class); 0: none."""
    label = getattr(net, "label", None)
    return label.num_embeddings - 1 if label is not None else 0


def _check_teacher_classes(net, teacher, cfg):
    """sCD: the teacher must be conditioned as the student is (RunError naming --teacher otherwise)."""
    t, s = _classes(teacher), _classes(net)
    where = f"--teacher {cfg.teacher}"
    if s and not t:
        raise RunError(f"{where} is unconditional (trained with --no-class-cond or on unlabeled data) but the "
                       f"student is class-conditional ({s} classes): the student learns the teacher's classifier-free "
                       f"guidance, which needs a class-conditional teacher; pass --no-class-cond to the student, or "
                       f"use a class-conditional teacher")
    if t and not s:
        raise RunError(f"{where} is class-conditional ({t} classes) but the student is unconditional "
                       f"(--no-class-cond, or data without labels): the trainer runs a class-conditional teacher "
                       f"only with the data's labels (distilling its unconditional, null-label F is not supported); "
                       f"train the student on labeled data without --no-class-cond, or use an unconditional teacher")
    if t != s:
        raise RunError(f"{where} was trained on {t} classes but the data has {s}: use a teacher of this data")


def _misfit(own, state, new_ok):
    """The first way weights `state` do not fit a network's state dict `own`, in words; None when they fit.
    new_ok(name): whether the network may keep its init for a tensor that `state` lacks."""
    for k, v in state.items():
        if k not in own:
            return f"the first tensor the student lacks is {k} {tuple(v.shape)}"
        if tuple(own[k].shape) != tuple(v.shape):
            return f"the first mismatching tensor is {k}: {tuple(v.shape)} there, {tuple(own[k].shape)} in the student"
    lacking = [k for k in own if k not in state and not new_ok(k)]
    return f"the first student tensor it lacks is {lacking[0]}" if lacking else None


def _arch(run_cfg, path):
    """'arch model' of a run (its TrainConfig, or read from its newest checkpoint)."""
    try:
        run_cfg = run_cfg or runs.read_meta(runs.resolve_checkpoint(path))[0]
    except (OSError, ValueError, checkpoint.CheckpointError):
        return "of another architecture"
    return f"{run_cfg.arch} {run_cfg.model}"


def init_weights(net, cfg, teacher, device, log):
    """sCD students start from the teacher's EMA weights [P §5.1]; --init loads any run's weights.
    Layers the source lacks (the student's guidance embedding) keep their init, with the
    embedding's output layer zeroed so that the student starts as the teacher. A teacher conditioned
    otherwise than the student, and weights of another architecture or size, raise RunError naming
    the flag, both networks and the first tensor that does not fit; a teacher must hold every
    student tensor but the guidance embedding, an --init run may lack some."""
    if teacher is not None:
        _check_teacher_classes(net, teacher, cfg)
    source = cfg.init or (cfg.teacher if cfg.objective == "scd" else "")
    if not source:
        return
    flag, run_cfg = ("init" if cfg.init else "teacher"), None
    if teacher is not None and source == cfg.teacher:
        state = teacher.state_dict()
    else:
        src, run_cfg, _ = _load("init", source, device)
        state = src.state_dict()
    new_ok = (lambda k: True) if flag == "init" else (lambda k: k.startswith("guidance."))
    problem = _misfit(net.state_dict(), state, new_ok)
    if problem:
        hint = ("an sCD student starts from its teacher's weights: give it the teacher's --arch, --model and "
                "--patch, or --init it from a run of its own architecture") if flag == "teacher" else \
            "pass that run's --arch, --model and --patch, or --init a run of this architecture"
        raise RunError(f"--{flag} {source}: its weights do not fit the student ({problem}); the {flag} run is "
                       f"{_arch(run_cfg, source)}, the student {cfg.arch} {cfg.model}; {hint}")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if any(k.startswith("guidance.") for k in missing):
        net.start_as_unguided()
    log(f"initialised from {source} ({len(state) - len(unexpected)} tensors; new: {len(missing)})")


def weight_head(cfg, shape, device, log):
    """The adaptive weight head, started at its equilibrium for this objective and tangent norm."""
    if not cfg.adaptive_weight:
        return None
    init = objectives.initial_logvar(cfg.objective, cfg.tangent_norm, math.prod(shape), cfg.sigma_d,
                                     cfg.P_mean, cfg.P_std, cfg.tangent_norm_c)
    log(f"adaptive weight: logvar(t) starts at {init:.3f} (its equilibrium for {cfg.objective}, tangent "
        f"norm {cfg.tangent_norm})")
    return AdaptiveWeight(init_logvar=init).to(device)


def check_cond_keys(net, cfg, ds):
    """The dataset's conditioning keys must be keyword arguments of the network's forward: RunError
    naming the keys and what the network takes otherwise."""
    params = inspect.signature(net.forward).parameters
    takes = list(getattr(net, "cond_inputs", ()))  # a diffusers model: its forward's inputs
    if not ds.cond_keys or (not takes and any(p.kind == p.VAR_KEYWORD for p in params.values())):
        return
    takes = takes or [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)][2:]
    missing = [k for k in ds.cond_keys if k not in takes]
    if missing:
        raise RunError(f"--data {cfg.data}: the per-sample conditioning {missing} is not an input of --arch "
                       f"{cfg.arch} (its forward takes {takes} beside x and t); drop those keys from the "
                       f"dataset or train a network that takes them")


def diffusers_spec(cfg, ds, log):
    """--arch diffusers: (the DiffusersSpec of --model with the data's null conditioning, the number of
    'classes'). Labels there only mark rows for the null conditioning (-1: CFG's F_u, label dropout), so
    data with a null conditioning but no labels counts one class."""
    from scm_fast.models import diffusers_net  # noqa: PLC0415
    try:
        spec = diffusers_net.read_spec(cfg.model, cfg.prediction, cfg.time_scale)
        diffusers_net.check_shape(spec, ds.shape, f"--data {cfg.data} with --model {cfg.model}")
    except ValueError as err:
        raise RunError(str(err)) from None
    spec.null_cond = dict(ds.null_cond)
    num_classes = (ds.num_classes or 1) if cfg.class_cond and ds.null_cond else 0
    log(f"network: {spec.class_name} from {cfg.model}: {diffusers_net.time_steps_hint(spec)}; " +
        (f"null conditioning {sorted(ds.null_cond)} for classifier-free guidance" if ds.null_cond else
         "no null conditioning in the data (no label dropout, no classifier-free guidance)"))
    return spec, num_classes


def pretrained_weights(net, cfg, teacher, log):
    """--arch diffusers: the student starts from --model's weights (sCT, diffusion) when the folder has
    them; an sCD student from its teacher (init_weights), which must be the same model."""
    from scm_fast.models import diffusers_net  # noqa: PLC0415
    if teacher is not None:
        t, s = teacher.spec, net.spec
        if (t.class_name, t.config, t.kind, t.time_scale) != (s.class_name, s.config, s.kind, s.time_scale):
            diff = [k for k in t.config if t.config.get(k) != s.config.get(k) and not k.startswith("_")]
            raise RunError(f"--teacher {cfg.teacher} is {t.class_name} ({t.kind}, time scale {t.time_scale:g}) and "
                           f"--model {cfg.model} is {s.class_name} ({s.kind}, time scale {s.time_scale:g})"
                           f"{'; configs differ in ' + str(diff[:5]) if diff else ''}: an sCD student starts from "
                           f"its teacher, so give --model the teacher's config")
        return
    folder = diffusers_net.model_folder(cfg.model)
    if cfg.init or not any(folder.glob(diffusers_net.WEIGHTS + "*")):
        log(f"--model {cfg.model}: {'--init weights' if cfg.init else 'no weights in the folder, a random init'}")
        return
    try:
        diffusers_net.load_pretrained(net, cfg.model)
    except ValueError as err:
        raise RunError(str(err)) from None
    log(f"initialised from --model {cfg.model}")


def build_parts(cfg, proc, log, ds):
    """Every part of the run, in a fixed order (the random init follows cfg.seed on every rank)."""
    num_classes = ds.num_classes if cfg.class_cond else 0
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    spec = None
    if cfg.arch == "diffusers":
        spec, num_classes = diffusers_spec(cfg, ds, log)
    raw_net = build_network(cfg, ds.shape, num_classes, spec).to(proc.device)
    check_cond_keys(raw_net, cfg, ds)
    teacher, teacher_cfg = load_teacher(cfg, ds.shape, proc.device, log, ds)
    if spec is not None:
        pretrained_weights(raw_net, cfg, teacher, log)
    init_weights(raw_net, cfg, teacher, proc.device, log)
    raw_logvar = weight_head(cfg, ds.shape, proc.device, log)
    n_params = sum(p.numel() for p in raw_net.parameters())
    log(f"network: {cfg.arch} {cfg.model}, {n_params / 1e6:.2f} M parameters; objective {cfg.objective}; "
        f"world size {proc.world} ({cfg.parallel}); device {proc.device}; precision {cfg.precision}")
    if cfg.act_ckpt:
        distributed.checkpoint_blocks(raw_net)
    net, logvar = distributed.wrap(raw_net, proc, cfg.parallel), distributed.wrap(raw_logvar, proc, cfg.parallel)
    params = list(net.parameters()) + (list(logvar.parameters()) if logvar else [])
    sampler = loader.ShardedSampler(len(ds), cfg.batch, proc.rank, proc.world, cfg.seed)
    parts = Parts(
        data=ds, num_classes=num_classes, raw_net=raw_net, net=net, raw_logvar=raw_logvar, logvar=logvar,
        teacher=teacher, teacher_cfg=teacher_cfg,
        opt=make_optimizer(cfg, params, proc.device.type == "cuda"),
        scaler=LossScaler(cfg.precision == "fp16", cfg.loss_scale),
        ema=ema.make_ema(cfg.ema, distributed.local_params(raw_net), sigma_rels=cfg.ema_sigma_rels,
                         half_life_kimg=cfg.ema_halflife_kimg, rampup_ratio=cfg.ema_rampup or None),
        sampler=sampler, loader=loader.BatchLoader(ds, sampler, cfg.workers, pin_memory=proc.device.type == "cuda"),
        gen=trigflow.BatchGenerator(cfg.seed + 1, proc.rank, proc.world, proc.device),
        scm_cfg=config.scm_config(cfg), params=params, spec=spec)
    if cfg.act_ckpt and cfg.one_pass:
        log("act_ckpt: the gradient pass is checkpointed, so the step runs two-pass "
            "(no-grad JVP pass, then a checkpointed forward with grad)")
    return parts
