"""One training step (scm-reference.md §3-§4): a single forward under torch.func.jvp gives F_theta
with its graph and the detached tangent (one-pass, scm_fast.objectives); backward of the scaled
loss; the global grad norm (the step is skipped when it or the loss is non-finite); clipping; the
optimizer; the EMA. Noise and times come from a BatchGenerator and the batch from a ShardedSampler,
both drawing for the global batch, so a run on N ranks follows the 1-rank run."""
import contextlib
import math
from dataclasses import dataclass

import torch

from scm_fast import objectives, sample, trigflow
from scm_fast.precision import autocast
from scm_fast.train.distributed import full, local_params

try:
    import nvtx
    _range = nvtx.annotate
except ImportError:  # pragma: no cover - nvtx is a pinned dependency
    def _range(_name):
        return contextlib.nullcontext()

LOSS_BUCKETS = {"trigflow": (0.0, 0.4, 0.8, 1.2, 10.0), "meanflow": (0.0, 0.25, 0.5, 0.75, 1.01)}


@dataclass
class Counters:
    """Where the run is: optimizer steps and images done, skipped (non-finite) steps."""
    step: int = 0
    cur_nimg: int = 0
    skipped: int = 0
    nonfinite_in_a_row: int = 0


def lr_at(cfg, nimg):
    """Learning rate after nimg images: linear rampup, then constant or inverse-sqrt
    lr / sqrt(max(nimg / t_ref, 1)) [P App. G]."""
    lr = cfg.lr
    if cfg.lr_rampup_kimg > 0:
        lr *= min(1.0, nimg / (cfg.lr_rampup_kimg * 1000))
    if cfg.lr_schedule == "isqrt":
        lr /= math.sqrt(max(nimg / (cfg.lr_ref_kimg * 1000), 1.0))
    return lr


def _teacher_fn(parts, cfg, conditional):
    """sCD: the teacher's F, with classifier-free guidance at the per-sample s for a conditional
    teacher (F_cfg = F_u + s (F_c - F_u) [P §5.1]); an unconditional one ignores s (only the student sees it)."""
    F_teacher = sample.network_fn(parts.teacher, parts.teacher_cfg, None, 1.0, cfg.precision)
    if getattr(parts.teacher, "guidance_input", False):  # guidance-distilled (Flux.1-dev): s is its input
        return F_teacher
    if conditional:
        return trigflow.cfg(F_teacher)

    def teacher(x_in, t, guidance=None, **c):
        return F_teacher(x_in, t, **c)
    return teacher


def loss(parts, cfg, step, x0, labels, extra=None):
    """(the objective's mean loss, its stats {t, err}) for the batch x0 at optimizer step `step`; the
    labels and the dataset's conditioning tensors `extra` reach the network as keyword arguments."""
    cond = dict(extra or {}, **({} if labels is None else {"labels": labels}))

    def F(x_in, t, **c):
        with autocast(x_in.device.type, cfg.precision):
            return parts.net(x_in, t, **c)

    if cfg.objective == "diffusion":
        return objectives.diffusion_loss(F, x0, cond, parts.logvar, sigma_d=cfg.sigma_d, P_mean=cfg.P_mean,
                                         P_std=cfg.P_std, label_dropout=cfg.label_dropout, generator=parts.gen)
    if cfg.objective == "meanflow":
        return objectives.meanflow_loss(lambda z, r, t, **c: F(z, t, r=r, **c), x0, cond, P_mean=cfg.P_mean,
                                        P_std=cfg.P_std, generator=parts.gen, one_pass=parts.scm_cfg.one_pass)
    teacher = None if parts.teacher is None else _teacher_fn(parts, cfg, labels is not None)
    return objectives.scm_loss(F, x0, step, parts.scm_cfg, cond, parts.logvar, teacher, parts.gen)


def next_batch(parts, device):
    x0, labels, extra = parts.loader.next()
    if labels is None and parts.num_classes:  # --arch diffusers: data without labels, with a null conditioning
        labels = torch.zeros(len(x0), dtype=torch.long)
    labels = None if labels is None or not parts.num_classes else labels.to(device, non_blocking=True)
    return x0.to(device, non_blocking=True), labels, {k: v.to(device, non_blocking=True) for k, v in extra.items()}


def train_step(parts, cfg, proc, counters, faults, log):
    """One optimizer step; updates `counters`; returns the step's stats (global means)."""
    with _range("data"):
        x0, labels, extra = next_batch(parts, proc.device)
    lr = lr_at(cfg, counters.cur_nimg)
    for group in parts.opt.param_groups:
        group["lr"] = lr
    if hasattr(parts.net, "reducer"):
        # DDP rebuilds its gradient buckets once, in the forward after the first backward; inside
        # torch.func.jvp its new buckets are storage-less wrappers, so rebuild here, outside the transform.
        parts.net.reducer._rebuild_buckets()
    with _range("forward+jvp"):
        value, stats = loss(parts, cfg, counters.step, x0, labels, extra)
    if faults.nan_at(counters.step + 1):
        value = value * float("nan")
    with _range("backward"):
        (value * parts.scaler.scale).backward()
    summary = reduce_stats(value, stats, cfg.objective, faults, proc)
    with _range("optimizer"):
        grad_norm, grad_norm_logvar = unscale_and_clip(parts, cfg.grad_clip)
        finite = all(map(math.isfinite, (summary["loss"], grad_norm, grad_norm_logvar)))
        if finite:
            parts.opt.step()
        parts.opt.zero_grad(set_to_none=True)
        parts.scaler.update(finite)
    counters.step += 1
    counters.cur_nimg += cfg.batch
    if finite:
        counters.nonfinite_in_a_row = 0
        if parts.ema is not None:
            with _range("ema"):
                parts.ema.update(local_params(parts.raw_net), counters.cur_nimg, cfg.batch)
    else:
        counters.skipped += 1
        counters.nonfinite_in_a_row += 1
        log(f"step {counters.step}: non-finite loss ({summary['loss']}) or grad norm ({grad_norm}); "
            f"step skipped ({counters.skipped} so far, {counters.nonfinite_in_a_row} in a row)")
    summary.update(grad_norm=grad_norm, grad_norm_logvar=grad_norm_logvar, lr=lr)
    return summary


def reduce_stats(value, stats, objective, faults, proc):
    """Global mean loss, per-time-bucket losses, the stop flag and (sCT/sCD) the mean ||g|| before
    tangent normalization, in one all-reduce. With g normalized the loss stays near ||g_n||^2 / dim
    whatever the network does; ||g|| is the consistency residual the training drives down."""
    edges = LOSS_BUCKETS["meanflow" if objective == "meanflow" else "trigflow"]
    t, err = stats["t"].double(), stats["err"].double()
    g_norm = stats.get("g_norm")
    buckets = [((t >= lo) & (t < hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    signalled = float(faults.signal_received is not None)
    vals = [value.detach().double().reshape(()), torch.tensor(signalled, dtype=torch.float64),
            torch.tensor(0.0, dtype=torch.float64) if g_norm is None else g_norm.double().sum()]
    vals += [err[m].sum() for m in buckets] + [m.sum().double() for m in buckets]
    packed = proc.all_sum(torch.stack([v.cpu() for v in vals]).to(proc.device)).cpu()
    n = len(buckets)
    faults.stop_agreed = bool(packed[1] > 0)
    per_bucket = {f"{lo:g}-{hi:g}": (packed[3 + i] / packed[3 + n + i]).item() if packed[3 + n + i] > 0
                  else None for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))}
    out = {"loss": (packed[0] / proc.world).item(), "loss_per_t": per_bucket}
    if g_norm is not None:
        out["g_norm"] = (packed[2] / packed[3 + n:].sum()).item()  # the buckets count every sample
    return out


def unscale_and_clip(parts, grad_clip):
    """(the network's global grad norm, the weight head's). --grad-clip clips the network's
    gradient; the head's (129 numbers, large while logvar moves) is reported apart so that it
    neither hides the network's norm in the log nor shrinks the network's step."""
    grads = [p.grad for p in parts.params if p.grad is not None]
    if parts.scaler.enabled:
        torch._foreach_mul_(grads, 1.0 / parts.scaler.scale)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(list(parts.net.parameters()), max_norm, foreach=True)
    head = (torch.nn.utils.clip_grad_norm_(list(parts.logvar.parameters()), float("inf"), foreach=True)
            if parts.logvar is not None else torch.zeros(()))
    return tuple(float(full(n)) for n in (norm, head))
