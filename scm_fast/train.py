"""The scm_fast trainer: `python -m scm_fast.train` or `torchrun --nproc_per_node=N -m scm_fast.train`.

Trains TrigFlow diffusion teachers, sCT, sCD and MeanFlow models (scm-reference.md) with DDP (default)
or FSDP2 (`--parallel fsdp`), gloo on CPU and nccl on CUDA. With no arguments: sCT on the embedded
digits data, on the CPU, in a few minutes. `--dry-run` prints the resolved config, the parameter
count and the memory per device. Re-running the same command resumes from the newest good
checkpoint of the run directory.

One step (scm_fast.objectives): a single forward under torch.func.jvp gives F_theta with its graph
and the detached tangent (one-pass); backward; global grad norm (skip the step if it or the loss is
non-finite); clip; optimizer; EMA. Noise and times come from a BatchGenerator and the batch from a
ShardedSampler, both drawing for the global batch, so a run on N ranks follows the 1-rank run.

Run directory: config.json, log.txt, stats.jsonl, samples/*.png, checkpoints/ckpt-*/ (weights and
EMAs as safetensors; optimizer, loss scale, EMA state, data position, RNG of every rank), eval.json.
SIGTERM / SIGINT: the step in progress finishes, every rank agrees, a checkpoint is written, exit 0.

Fault injection for tests (SCM_FAST_FAULT, comma-separated): `nan@S` makes the loss of step S
non-finite on every rank; `kill@S:R` kills rank R with SIGKILL at step S on the first attempt
(TORCHELASTIC_RESTART_COUNT 0), to test `torchrun --max-restarts`.
"""
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scm_fast import checkpoint, config, data, ema, images, objectives, sample, trigflow
from scm_fast.models import AdaptiveWeight

try:
    import nvtx
    _range = nvtx.annotate
except ImportError:  # pragma: no cover - nvtx is a pinned dependency
    def _range(_name):
        return contextlib.nullcontext()


# ---- processes and devices -------------------------------------------------------------------
class Dist:
    """rank, world size and device of this process; a no-op wrapper when world_size == 1."""

    def __init__(self, device_choice="auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
        if cuda and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if cuda else "gloo"
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            if attempt is None:
                dist.init_process_group(backend)
            else:
                # torchrun keeps its TCPStore across --max-restarts attempts, so a restarted group would
                # read the previous attempt's keys (gloo then connects to dead ports): one prefix per attempt.
                store, _, _ = next(dist.rendezvous("env://", self.rank, self.world))
                dist.init_process_group(backend, store=dist.PrefixStore(f"scm_fast/attempt-{attempt}", store),
                                        rank=self.rank, world_size=self.world)

    def all_sum(self, t):
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


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


def lr_at(cfg, nimg):
    """Learning rate after nimg images: linear rampup, then constant or inverse-sqrt
    lr / sqrt(max(nimg / t_ref, 1)) [P App. G]."""
    lr = cfg.lr
    if cfg.lr_rampup_kimg > 0:
        lr *= min(1.0, nimg / (cfg.lr_rampup_kimg * 1000))
    if cfg.lr_schedule == "isqrt":
        lr /= math.sqrt(max(nimg / (cfg.lr_ref_kimg * 1000), 1.0))
    return lr


def make_optimizer(cfg, params, cuda):
    kind = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cuda and cfg.optimizer != "radam":
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return kind(params, **kw)


def parse_faults(text):
    """SCM_FAST_FAULT -> {"nan": {steps}, "kill": {(step, rank)}}."""
    faults = {"nan": set(), "kill": set()}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        kind, _, where = item.partition("@")
        if kind == "nan":
            faults["nan"].add(int(where))
        elif kind == "kill":
            step, _, rank = where.partition(":")
            faults["kill"].add((int(step), int(rank or 0)))
        else:
            raise ValueError(f"SCM_FAST_FAULT: unknown fault {item!r} (expected nan@STEP or kill@STEP:RANK)")
    return faults


def block_modules(net):
    """The repeated blocks of a network (FSDP2 units, activation-checkpointing units)."""
    if hasattr(net, "blocks"):  # DiT
        return list(net.blocks)
    if hasattr(net, "enc"):  # U-Net: its residual blocks (each with its attention)
        return list(net.enc.values()) + list(net.dec.values())
    return []


def checkpoint_blocks(net):
    """Activation checkpointing (non-reentrant) of every block in passes that record a graph."""
    from torch.utils.checkpoint import checkpoint as ckpt
    for block in block_modules(net):
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return ckpt(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)
        block.forward = forward


# ---- the trainer ------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg, proc):
        self.cfg, self.proc = cfg, proc
        self.run_dir = Path(cfg.resolved_run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.step, self.cur_nimg, self.skipped, self.nonfinite_in_a_row = 0, 0, 0, 0
        self.stop_requested = False
        self.faults = parse_faults(os.environ.get("SCM_FAST_FAULT"))
        self.log_file = None
        self.tb = None
        self.resumed_step = None

    # -- setup
    def setup(self):
        cfg, proc = self.cfg, self.proc
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch % proc.world:
            raise SystemExit(f"--batch {cfg.batch} (the global batch) must be divisible by the world size "
                             f"{proc.world}")
        try:
            self.data = data.build_dataset(cfg.data, cfg.img_size or None, cfg.sigma_d)
        except (OSError, ValueError) as err:  # a message, not a traceback, and no run dir for a bad --data
            msg = str(err)
            raise SystemExit(msg if msg.startswith("--data") else f"--data {cfg.data}: {msg}") from None
        self._prepare_run_dir()
        self.num_classes = self.data.num_classes if cfg.class_cond else 0
        self.log(f"data: {self.data.describe()}")
        self._check_sigma_d()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.raw_net = sample.build_network(cfg, self.data.shape, self.num_classes).to(proc.device)
        self.teacher = self._load_teacher()
        self._init_weights()
        self.raw_logvar = self._build_logvar()
        n_params = sum(p.numel() for p in self.raw_net.parameters())
        self.log(f"network: {cfg.arch} {cfg.model}, {n_params / 1e6:.2f} M parameters; objective {cfg.objective}; "
                 f"world size {proc.world} ({cfg.parallel}); device {proc.device}; precision {cfg.precision}")
        if cfg.act_ckpt:
            checkpoint_blocks(self.raw_net)
        self.net, self.logvar = self._wrap(self.raw_net), self._wrap(self.raw_logvar)
        params = list(self.net.parameters()) + (list(self.logvar.parameters()) if self.logvar else [])
        self.params = params
        self.opt = make_optimizer(cfg, params, proc.device.type == "cuda")
        self.scaler = LossScaler(cfg.precision == "fp16", cfg.loss_scale)
        self.ema = ema.make_ema(cfg.ema, self._ema_tensors(), sigma_rels=cfg.ema_sigma_rels,
                                half_life_kimg=cfg.ema_halflife_kimg, rampup_ratio=cfg.ema_rampup or None)
        self.sampler = data.ShardedSampler(len(self.data), cfg.batch, proc.rank, proc.world, cfg.seed)
        self.gen = trigflow.BatchGenerator(cfg.seed + 1, proc.rank, proc.world, proc.device)
        self.scm_cfg = objectives.SCMConfig(
            sigma_d=cfg.sigma_d, P_mean=cfg.P_mean, P_std=cfg.P_std, tangent_warmup=cfg.tangent_warmup,
            tangent_norm=cfg.tangent_norm, tangent_norm_c=cfg.tangent_norm_c, rearranged_jvp=cfg.rearranged_jvp,
            prior_weighting=cfg.prior_weighting, one_pass=cfg.one_pass and not cfg.act_ckpt,
            guidance_input=cfg.objective == "scd", guidance_min=cfg.guidance_min, guidance_max=cfg.guidance_max)
        if cfg.act_ckpt and cfg.one_pass:
            self.log("act_ckpt: the gradient pass is checkpointed, so the step runs two-pass "
                     "(no-grad JVP pass, then a checkpointed forward with grad)")
        self.total_steps = config.steps_for(cfg.total_kimg, cfg.batch)
        self._resume()
        if proc.rank == 0 and cfg.tensorboard:
            self.tb = _tensorboard(self.run_dir / "tensorboard")

    def _prepare_run_dir(self):
        if self.proc.rank == 0:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            saved = self.run_dir / "config.json"
            if saved.exists():
                changed = config.diff(config.from_dict(json.loads(saved.read_text())), self.cfg)
                if changed:
                    print(f"warning: {saved} differs from this command in {changed}; the run resumes with "
                          "this command's values", file=sys.stderr)
            tmp = saved.with_suffix(".tmp")
            tmp.write_text(config.dumps(self.cfg))
            os.replace(tmp, saved)
            self.log_file = open(self.run_dir / "log.txt", "a")
        self.proc.barrier()

    def _check_sigma_d(self, n=512):
        """sigma_d is the data's std [P §3]: log the std of n evenly spaced samples, warn when it is off
        by more than 25% (TrigFlow's noise levels, t_max and the teacher's F scale all assume it)."""
        idx = torch.linspace(0, len(self.data) - 1, min(n, len(self.data))).long()
        std = self.data.get_batch(idx)[0].float().std().item()
        msg = f"data std {std:.3f} ({len(idx)} samples), --sigma-d {self.cfg.sigma_d:g}"
        if not 0.8 <= std / self.cfg.sigma_d <= 1.25:
            msg = f"warning: {msg}: set --sigma-d to the data's std (or rescale the data)"
        self.log(msg)

    def _wrap(self, module):
        if module is None:
            return None
        if self.proc.world == 1:
            return module
        if self.cfg.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard
            for block in block_modules(module):
                fully_shard(block)
            return fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.proc.local_rank] if self.proc.device.type == "cuda" else None
        # broadcast_buffers=False: buffers are constants, and their broadcast is an in-place copy
        # that torch.func.jvp refuses inside the transform.
        return DDP(module, device_ids=ids, broadcast_buffers=False)

    def _load_teacher(self):
        cfg = self.cfg
        if cfg.objective != "scd":
            return None
        try:
            net, tcfg, meta = sample.load_run(cfg.teacher, device=self.proc.device)
        except (OSError, ValueError, checkpoint.CheckpointError) as err:
            raise SystemExit(f"--teacher {cfg.teacher}: {err}") from None
        if tcfg.objective != "diffusion":
            raise SystemExit(f"--teacher {cfg.teacher}: a TrigFlow diffusion teacher is needed, "
                             f"that run trained {tcfg.objective!r}")
        if tuple(meta["shape"]) != tuple(self.data.shape):
            raise SystemExit(f"--teacher {cfg.teacher} was trained on {tuple(meta['shape'])} images, "
                             f"the data is {tuple(self.data.shape)}")
        self.log(f"teacher: {meta['checkpoint']} ({meta['weights']})")
        self.teacher_cfg = tcfg
        return net

    def _init_weights(self):
        """sCD students start from the teacher's EMA weights [P §5.1]; --init loads any run's weights.
        Layers the source lacks (the student's guidance embedding) keep their init, with the
        embedding's output layer zeroed so that the student starts as the teacher."""
        cfg = self.cfg
        source = cfg.init or (cfg.teacher if cfg.objective == "scd" else "")
        if not source:
            return
        if self.teacher is not None and source == cfg.teacher:
            state = self.teacher.state_dict()
        else:
            try:
                state = sample.load_run(source, device=self.proc.device)[0].state_dict()
            except (OSError, ValueError, checkpoint.CheckpointError) as err:
                raise SystemExit(f"--init {source}: {err}") from None
        missing, unexpected = self.raw_net.load_state_dict(state, strict=False)
        if unexpected:
            raise SystemExit(f"--init {source}: weights do not fit this network (unexpected {unexpected[:5]})")
        guidance = getattr(self.raw_net, "guidance", None)
        if guidance is not None and any(k.startswith("guidance.") for k in missing):
            torch.nn.init.zeros_(guidance.mlp[2].weight)
            torch.nn.init.zeros_(guidance.mlp[2].bias)
        self.log(f"initialised from {source} ({len(state) - len(unexpected)} tensors; new: {len(missing)})")

    def _build_logvar(self):
        """The adaptive weight head, started at its equilibrium for this objective and tangent norm."""
        cfg = self.cfg
        if not cfg.adaptive_weight:
            return None
        init = objectives.initial_logvar(cfg.objective, cfg.tangent_norm, math.prod(self.data.shape), cfg.sigma_d,
                                         cfg.P_mean, cfg.P_std, cfg.tangent_norm_c)
        self.log(f"adaptive weight: logvar(t) starts at {init:.3f} (its equilibrium for {cfg.objective}, tangent "
                 f"norm {cfg.tangent_norm})")
        return AdaptiveWeight(init_logvar=init).to(self.proc.device)

    def _ema_tensors(self):
        """name -> tensor of the network's weights (local shards under FSDP2)."""
        out = {}
        for name, p in self.raw_net.named_parameters():
            out[name] = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
        return out

    # -- one step
    def loss(self, x0, labels):
        cfg = self.cfg
        cond = {} if labels is None else {"labels": labels}
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

        def F(x_in, t, **c):
            with torch.autocast(x_in.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return self.net(x_in, t, **c)

        logvar = self.logvar
        if cfg.objective == "diffusion":
            return objectives.diffusion_loss(F, x0, cond, logvar, sigma_d=cfg.sigma_d, P_mean=cfg.P_mean,
                                             P_std=cfg.P_std, label_dropout=cfg.label_dropout, generator=self.gen)
        if cfg.objective == "meanflow":
            return objectives.meanflow_loss(lambda z, r, t, **c: F(z, t, r=r, **c), x0, cond, P_mean=cfg.P_mean,
                                            P_std=cfg.P_std, generator=self.gen, one_pass=self.scm_cfg.one_pass)
        teacher = None
        if self.teacher is not None:
            F_teacher = sample.network_fn(self.teacher, self.teacher_cfg, None, 1.0, cfg.precision)
            if labels is not None:  # F_cfg = F_u + s (F_c - F_u), s per sample [P §5.1]
                teacher = trigflow.cfg(F_teacher)
            else:  # an unconditional teacher has no CFG: s is only the student's input
                def teacher(x_in, t, guidance=None, **c):
                    return F_teacher(x_in, t, **c)
        return objectives.scm_loss(F, x0, self.step, self.scm_cfg, cond, logvar, teacher, self.gen)

    def train_step(self):
        cfg, proc = self.cfg, self.proc
        with _range("data"):
            x0, labels = self.data.get_batch(self.sampler.next())
            x0 = x0.to(proc.device)
            labels = None if labels is None or not self.num_classes else labels.to(proc.device)
        lr = lr_at(cfg, self.cur_nimg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if hasattr(self.net, "reducer"):
            # DDP rebuilds its gradient buckets once, in the forward after the first backward; inside
            # torch.func.jvp its new buckets are storage-less wrappers, so rebuild here, outside the transform.
            self.net.reducer._rebuild_buckets()
        with _range("forward+jvp"):
            loss, stats = self.loss(x0, labels)
        if self.step + 1 in self.faults["nan"]:
            loss = loss * float("nan")
        with _range("backward"):
            (loss * self.scaler.scale).backward()
        summary = self._reduce_stats(loss, stats)
        with _range("optimizer"):
            grad_norm, grad_norm_logvar = self._unscale_and_clip()
            finite = all(map(math.isfinite, (summary["loss"], grad_norm, grad_norm_logvar)))
            if finite:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.scaler.update(finite)
        self.step += 1
        self.cur_nimg += cfg.batch
        if finite:
            self.nonfinite_in_a_row = 0
            with _range("ema"):
                self._update_ema()
        else:
            self.skipped += 1
            self.nonfinite_in_a_row += 1
            self.log(f"step {self.step}: non-finite loss ({summary['loss']}) or grad norm ({grad_norm}); "
                     f"step skipped ({self.skipped} so far, {self.nonfinite_in_a_row} in a row)")
        summary.update(grad_norm=grad_norm, grad_norm_logvar=grad_norm_logvar, lr=lr)
        return summary

    def _reduce_stats(self, loss, stats):
        """Global mean loss, per-time-bucket losses and the stop flag, in one all-reduce."""
        edges = (0.0, 0.4, 0.8, 1.2, 10.0) if self.cfg.objective != "meanflow" else (0.0, 0.25, 0.5, 0.75, 1.01)
        t, err = stats["t"].double(), stats["err"].double()
        buckets = [((t >= lo) & (t < hi)) for lo, hi in zip(edges[:-1], edges[1:])]
        vals = [loss.detach().double().reshape(()), torch.tensor(float(self.stop_requested), dtype=torch.float64)]
        vals += [err[m].sum() for m in buckets] + [m.sum().double() for m in buckets]
        packed = self.proc.all_sum(torch.stack([v.cpu() for v in vals]).to(self.proc.device)).cpu()
        n = len(buckets)
        self.stop_requested = bool(packed[1] > 0)
        per_bucket = {f"{lo:g}-{hi:g}": (packed[2 + i] / packed[2 + n + i]).item() if packed[2 + n + i] > 0
                      else None for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))}
        return {"loss": (packed[0] / self.proc.world).item(), "loss_per_t": per_bucket}

    def _unscale_and_clip(self):
        """(the network's global grad norm, the weight head's). --grad-clip clips the network's
        gradient; the head's (129 numbers, large while logvar moves) is reported apart so that it
        neither hides the network's norm in the log nor shrinks the network's step."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.scaler.enabled:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(list(self.net.parameters()), max_norm, foreach=True)
        head = (torch.nn.utils.clip_grad_norm_(list(self.logvar.parameters()), float("inf"), foreach=True)
                if self.logvar is not None else torch.zeros(()))
        return tuple(float(n.full_tensor() if hasattr(n, "full_tensor") else n) for n in (norm, head))

    def _update_ema(self):
        if self.ema is None:
            return
        if isinstance(self.ema, ema.PowerEMA):
            self.ema.update(self._ema_tensors(), self.step)
        else:
            self.ema.update(self._ema_tensors(), self.cur_nimg, self.cfg.batch)

    # -- the loop
    def run(self):
        self.setup()
        cfg = self.cfg
        if self.step >= self.total_steps:
            self.log(f"run already complete at step {self.step} ({self.cur_nimg / 1000:g} kimg)")
        self._install_signal_handlers()
        bar = self._progress_bar()
        sample_every = config.steps_for(cfg.sample_every_kimg, cfg.batch) if cfg.sample_every_kimg else 0
        ckpt_every = config.steps_for(cfg.ckpt_every_kimg, cfg.batch) if cfg.ckpt_every_kimg else 0
        t_last, n_last = time.time(), self.cur_nimg
        t_start, step_start = t_last, self.step
        while self.step < self.total_steps:
            self._maybe_kill()
            s = self.train_step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{s['loss']:.4f}", refresh=False)
            elif cfg.progress and self.step % max(1, self.total_steps // 20) == 0:
                self._log_progress(s, t_start, step_start)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                now = time.time()
                self._log_stats(s, (self.cur_nimg - n_last) / max(now - t_last, 1e-9))
                t_last, n_last = now, self.cur_nimg
            if self.nonfinite_in_a_row >= cfg.max_nonfinite:
                self.save_checkpoint()
                raise SystemExit(f"stopping: {self.nonfinite_in_a_row} non-finite steps in a row (last at step "
                                 f"{self.step}, --max-nonfinite {cfg.max_nonfinite}); try a lower --lr, "
                                 "--grad-clip or --precision bf16")
            if ckpt_every and self.step % ckpt_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            if sample_every and self.step % sample_every == 0 and self.step < self.total_steps:
                self.sample_grids(f"{self.cur_nimg // 1000:06d}k")
            if self.stop_requested:
                self.save_checkpoint()
                self.log(f"stop requested: checkpoint at step {self.step} written; exiting")
                return 0
        if bar is not None:
            bar.close()
        if self.resumed_step != self.step:  # a finished run re-run only samples and evaluates again
            self.save_checkpoint()
        self.finish()
        return 0

    def finish(self):
        paths = self.sample_grids("final")
        results = self.evaluate()
        if self.proc.rank == 0:
            self.log("samples: " + ", ".join(str(p) for p in paths))
            if results:
                (self.run_dir / "eval.json").write_text(json.dumps(results, indent=2))
                self.log("eval: " + "; ".join(f"{k}: FD {v['fd']:.3f} precision {v['precision']:.3f} "
                                              f"recall {v['recall']:.3f}" for k, v in results.items()))

    # -- sampling and evaluation (rank 0, EMA weights)
    def sampling_net(self):
        """An unwrapped copy of the network holding the first EMA (or the raw weights)."""
        weights = self._ema_full(self.ema.names[0]) if self.ema is not None else self._model_state()
        if self.proc.rank != 0:
            return None
        net = sample.build_network(self.cfg, self.data.shape, self.num_classes).to(self.proc.device)
        missing, unexpected = net.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= {n for n, _ in net.named_buffers()}, (missing, unexpected)
        return net.eval().requires_grad_(False)

    def _sample_settings(self):
        if self.cfg.objective == "diffusion":
            return [("heun-nfe35", 18)]
        return [("1step", 1), ("2step", 2)]

    def sample_grids(self, tag):
        net = self.sampling_net()
        paths = []
        if net is not None:
            labels = sample.class_labels(self.cfg.n_grid, self.num_classes, self.proc.device)
            for name, steps in self._sample_settings():
                x = sample.generate(net, self.cfg, self.data.shape, self.cfg.n_grid, steps, labels=labels,
                                    seed=self.cfg.seed, device=self.proc.device)
                path = self.run_dir / "samples" / f"{tag}-{name}.png"
                images.save_grid(path, x.clamp(-1, 1).cpu(), nrow=max(self.num_classes, 8) if self.num_classes else None)
                paths.append(path)
        self.proc.barrier()
        return paths

    def evaluate(self):
        cfg = self.cfg
        if not cfg.eval_n or cfg.data != "digits":
            if cfg.eval_n and self.proc.rank == 0:
                self.log("eval: the built-in FD uses digits-classifier features; for other data run "
                         "python -m scm_fast.sample, then python -m scm_fast.eval with your feature weights")
            return {}
        net = self.sampling_net()
        results = {}
        if net is not None:
            from scm_fast import eval as sfeval
            labels = sample.class_labels(cfg.eval_n, self.num_classes, self.proc.device)
            for name, steps in self._sample_settings():
                x = sample.generate(net, cfg, self.data.shape, cfg.eval_n, steps, labels=labels,
                                    seed=cfg.seed + 1, device=self.proc.device)
                r = sfeval.evaluate(x.clamp(-1, 1).cpu(), reference="digits")
                results[name] = {k: r[k] for k in ("fd", "precision", "recall", "n")}
        self.proc.barrier()
        return results

    # -- checkpoints
    def _model_state(self):
        """Full network weights (gathered under FSDP2; collective)."""
        out = {}
        for name, p in self.raw_net.state_dict().items():
            out[name] = p.full_tensor() if hasattr(p, "full_tensor") else p
        return {k: v.detach().cpu() for k, v in out.items()}

    def _ema_full(self, name):
        """Full EMA weights (gathered under FSDP2; collective)."""
        avg = self.ema.averaged(name)
        out = {}
        for pname, p in self.raw_net.named_parameters():
            t = avg[pname]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor
                t = DTensor.from_local(t.to(p.device), p.device_mesh, p.placements,
                                       shape=p.shape, stride=p.stride()).full_tensor()
            out[pname] = t.detach().cpu()
        return out

    def save_checkpoint(self):
        proc, cfg = self.proc, self.cfg
        staged = checkpoint.stage(self.ckpt_root, self.step, rank=proc.rank)
        proc.barrier()
        model = self._model_state()
        logvar = {} if self.raw_logvar is None else {
            f"logvar.{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
            for k, v in self.raw_logvar.state_dict().items()}
        emas = {n: self._ema_full(n) for n in (self.ema.names if self.ema is not None else [])}
        fsdp = cfg.parallel == "fsdp" and proc.world > 1
        if fsdp:
            self._save_sharded(staged)
        if proc.rank == 0:
            checkpoint.write_tensors(staged, "model", {**model, **logvar})
            for n, w in emas.items():
                checkpoint.write_tensors(staged, f"ema-{n}", w)
            checkpoint.write_object(staged, "meta", self._meta())
            checkpoint.write_object(staged, "state", self._train_state(include_optimizer=not fsdp))
        if self.ema is not None and fsdp:
            checkpoint.write_object(staged, f"ema-state-rank{proc.rank}", self.ema.state_dict())
        checkpoint.write_object(staged, f"rng-rank{proc.rank}", self._rng_state())
        proc.barrier()
        if proc.rank == 0:
            checkpoint.commit(staged, keep=cfg.keep_ckpts, log=self.log)
        proc.barrier()

    def _save_sharded(self, staged):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(self._modules_for_dcp(), self.opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(staged / "dcp"))

    def _modules_for_dcp(self):
        # one module: torch.distributed.checkpoint's get_state_dict/set_state_dict take a single nn.Module
        mods = {"net": self.raw_net}
        if self.raw_logvar is not None:
            mods["logvar"] = self.raw_logvar
        return torch.nn.ModuleDict(mods)

    def _meta(self):
        return {"config": self.cfg.to_dict(), "shape": list(self.data.shape), "num_classes": self.num_classes,
                "ema_names": list(self.ema.names) if self.ema is not None else [], "step": self.step,
                "cur_nimg": self.cur_nimg, "world_size": self.proc.world}

    def _train_state(self, include_optimizer):
        state = {"step": self.step, "cur_nimg": self.cur_nimg, "skipped": self.skipped,
                 "nonfinite_in_a_row": self.nonfinite_in_a_row, "scaler": self.scaler.state_dict(),
                 "sampler": self.sampler.state_dict(), "generator": self.gen.get_state()}
        if include_optimizer:
            state["optimizer"] = self.opt.state_dict()
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
        return state

    def _rng_state(self):
        state = {"torch": torch.get_rng_state()}
        if self.proc.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.proc.device)
        return state

    def _resume(self):
        proc = self.proc
        found = checkpoint.latest(self.ckpt_root, log=self.log) if proc.rank == 0 else None
        found = proc.broadcast(None if found is None else str(found))
        if found is None:
            return
        path = Path(found)
        meta = checkpoint.read_object(path, "meta")
        state = checkpoint.read_object(path, "state")
        fsdp = self.cfg.parallel == "fsdp" and proc.world > 1
        if fsdp != ("optimizer" not in state):
            raise SystemExit(f"{path}: written by a {'FSDP2' if 'optimizer' not in state else 'DDP'} run; resume "
                             f"it with the same --parallel (and world size for FSDP2)")
        if fsdp:
            self._load_sharded(path, meta)
        else:
            self._load_replicated(path, state)
        self.step, self.cur_nimg = state["step"], state["cur_nimg"]
        self.skipped, self.nonfinite_in_a_row = state["skipped"], state["nonfinite_in_a_row"]
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.gen.set_state(state["generator"])
        rng_file = path / f"rng-rank{proc.rank}.pt"
        if rng_file.exists():
            rng = checkpoint.read_object(path, f"rng-rank{proc.rank}")
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and proc.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], proc.device)
        self.resumed_step = self.step
        self._truncate_stats()
        self.log(f"resumed from {path} at step {self.step} ({self.cur_nimg / 1000:g} kimg)")

    def _load_replicated(self, path, state):
        weights = checkpoint.read_tensors(path, "model")
        net_w = {k: v for k, v in weights.items() if not k.startswith("logvar.")}
        self.raw_net.load_state_dict(net_w, strict=False)
        if self.raw_logvar is not None:
            self.raw_logvar.load_state_dict({k[len("logvar."):]: v for k, v in weights.items()
                                             if k.startswith("logvar.")})
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def _load_sharded(self, path, meta):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        if meta["world_size"] != self.proc.world:
            raise SystemExit(f"{path}: an FSDP2 checkpoint of world size {meta['world_size']}; this launch has "
                             f"{self.proc.world} (its EMA shards are per rank)")
        msd, osd = get_state_dict(self._modules_for_dcp(), self.opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(path / "dcp"))
        set_state_dict(self._modules_for_dcp(), self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint.read_object(path, f"ema-state-rank{self.proc.rank}"))

    # -- logging
    def log(self, msg):
        if self.proc.rank != 0:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        try:
            from tqdm import tqdm
            tqdm.write(line)
        except ImportError:  # pragma: no cover
            print(line, flush=True)
        if self.log_file is not None:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def _log_stats(self, s, images_per_s):
        if self.proc.rank != 0:
            return
        rec = {"step": self.step, "kimg": self.cur_nimg / 1000, "loss": s["loss"], "loss_per_t": s["loss_per_t"],
               "grad_norm": s["grad_norm"], "grad_norm_logvar": s["grad_norm_logvar"], "lr": s["lr"],
               "images_per_s": images_per_s,
               "skipped": self.skipped, "loss_scale": self.scaler.scale, "memory_mib": _memory_mib(self.proc.device),
               "time": time.time()}
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k in ("loss", "grad_norm", "grad_norm_logvar", "lr", "images_per_s", "loss_scale", "memory_mib"):
                self.tb.add_scalar(k, rec[k], self.cur_nimg)

    def _log_progress(self, s, t_start, step_start):
        """A progress line (when there is no terminal for the tqdm bar): step, kimg, loss, ETA."""
        rate = (self.step - step_start) / max(time.time() - t_start, 1e-9)
        eta = (self.total_steps - self.step) / max(rate, 1e-9)
        self.log(f"step {self.step}/{self.total_steps} ({self.cur_nimg / 1000:g} kimg) loss {s['loss']:.4f} "
                 f"grad norm {s['grad_norm']:.3g}, {rate:.2f} steps/s, ETA {eta / 60:.1f} min")

    def _truncate_stats(self):
        """Drop stats records newer than the resumed step (they belong to the interrupted attempt)."""
        path = self.run_dir / "stats.jsonl"
        if self.proc.rank != 0 or not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    def _progress_bar(self):
        if self.proc.rank != 0 or not self.cfg.progress or self.step >= self.total_steps:
            return None
        if not sys.stderr.isatty():  # a log file gets stats.jsonl-style lines, not carriage returns
            return None
        from tqdm import tqdm
        return tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                    desc=f"{self.cfg.preset}", file=sys.stderr)

    # -- faults
    def _install_signal_handlers(self):
        def handler(signum, _frame):
            self.stop_requested = True
            self.log(f"received signal {signum}: finishing the step, then checkpointing")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def _maybe_kill(self):
        if (self.step + 1, self.proc.rank) in self.faults["kill"] and os.environ.get("TORCHELASTIC_RESTART_COUNT",
                                                                                      "0") == "0":
            print(f"fault injection: killing rank {self.proc.rank} at step {self.step + 1}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux reports KiB)


def _tensorboard(logdir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(logdir))


# ---- --dry-run -----------------------------------------------------------------------------
_PAPER_DATA = {"cifar10": ((3, 32, 32), 10), "imagenet64": ((3, 64, 64), 1000), "imagenet512": ((4, 64, 64), 1000)}


def dry_run(cfg, world_size):
    """Print the resolved config, parameter count and estimated memory per device."""
    shape, K = _dry_run_data(cfg)
    K = K if cfg.class_cond else 0
    build = lambda: sample.build_network(cfg, shape, K)  # noqa: E731
    with torch.device("meta"):
        net = build()
    n_params = sum(p.numel() for p in net.parameters())
    act, block_inputs = saved_activation_bytes(build, shape, K, cfg)
    parts = config.estimate_memory(cfg, n_params, act, block_inputs, len(block_modules(net)), world_size)
    print(config.dumps(cfg))
    print(f"data shape {shape}, {K} classes; network {cfg.arch} {cfg.model}: {n_params:,} parameters "
          f"({n_params / 1e6:.1f} M)")
    print(f"estimated memory per device, world size {world_size}, {cfg.parallel}, {cfg.precision}, batch "
          f"{max(cfg.batch // world_size, 1)} per device{', activation checkpointing' if cfg.act_ckpt else ''}:")
    for k, v in parts.items():
        print(f"  {k:<22} {config.format_bytes(v)}")
    return 0


def _dry_run_data(cfg):
    family = cfg.preset.split("-")[0]
    if cfg.data == "digits":
        return (1, cfg.img_size or 8, cfg.img_size or 8), 10
    if family in _PAPER_DATA and (not cfg.data or not Path(cfg.data).exists()):
        (C, H, W), K = _PAPER_DATA[family]
        return (C, cfg.img_size or H, cfg.img_size or W), K
    try:
        ds = data.build_dataset(cfg.data, cfg.img_size or None, cfg.sigma_d)
    except (OSError, ValueError) as err:
        msg = str(err)
        raise SystemExit(msg if msg.startswith("--data") else f"--data {cfg.data}: {msg}") from None
    return ds.shape, ds.num_classes


def saved_activation_bytes(build, shape, num_classes, cfg):
    """(bytes autograd saves for backward per image, bytes of the blocks' inputs per image),
    measured by running the network on fake tensors (no memory) under the run's autocast, for
    batch 2 minus batch 1 (the weights that layers save cancel out)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    counts = []
    with FakeTensorMode():
        net = build()
        for b in (1, 2):
            saved, inputs = [0], [0]
            hooks = [m.register_forward_pre_hook(lambda _m, a: inputs.__setitem__(0, inputs[0] + _nbytes(a[0])))
                     for m in block_modules(net)]
            x, t = torch.empty(b, *shape), torch.full((b,), 0.5)
            kw = {"labels": torch.zeros(b, dtype=torch.long)} if num_classes else {}
            if cfg.objective == "scd":
                kw["guidance"] = torch.ones(b)
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda v: saved.__setitem__(0, saved[0] + _nbytes(v)) or v, lambda v: v), \
                    torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                net(x, t, **kw)
            for h in hooks:
                h.remove()
            counts.append((saved[0], inputs[0]))
    return counts[1][0] - counts[0][0], counts[1][1] - counts[0][1]


def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def main(argv=None):
    cfg, is_dry_run, world = config.parse(argv)
    if is_dry_run:
        return dry_run(cfg, world or int(os.environ.get("WORLD_SIZE", "1")))
    proc = Dist(cfg.device)
    try:
        return Trainer(cfg, proc).run()
    finally:
        proc.close()


if __name__ == "__main__":
    sys.exit(main())
