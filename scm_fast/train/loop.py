"""The training loop, top to bottom (EDM2's training_loop layout): set up, resume, step, log,
checkpoint, sample, stop; then the final grids and FD."""
import errno
import os
import sys
import time
from pathlib import Path

import torch

from scm_fast import config
from scm_fast.train import build
from scm_fast.train.distributed import Dist, NonFiniteStop, RunError
from scm_fast.train.evaluate import Evaluator
from scm_fast.train.faults import Faults, StopRequested
from scm_fast.train.rundir import RunDir
from scm_fast.train.runlog import Progress, RunLog
from scm_fast.train.state import CheckpointIO
from scm_fast.train.step import Counters, train_step


_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def _every(kimg, batch):
    return config.steps_for(kimg, batch) if kimg else 0


def _on_rank0(proc, fn):
    """fn() on rank 0; a RunError there is raised on every rank (nobody waits at a barrier for it)."""
    message = None
    if proc.rank == 0:
        try:
            fn()
        except RunError as err:
            message = str(err)
    message = proc.broadcast(message)
    if message is not None:
        raise RunError(message)


def _open_run_dir(rundir, cfg, log):
    """Lock the run directory, check a resume's config, write config.json, open the log (rank 0)."""
    rundir.lock()
    changed = rundir.check_config(cfg)
    rundir.write_config(cfg)
    log.open()
    if rundir.stale:
        log(f"took over the lock of a trainer that is gone ({rundir.stale})")
    if changed:
        log("resuming with changed " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))


def training_loop(cfg, proc):
    """Train the run `cfg` describes on this process (one of proc.world ranks); 0 on success."""
    run_dir = Path(cfg.resolved_run_dir)
    log = RunLog(run_dir, proc.rank, cfg)
    faults = Faults(proc.rank, log)
    faults.install_signal_handlers()
    rundir = RunDir(run_dir)
    try:
        return _train(cfg, proc, run_dir, log, faults, rundir)
    finally:
        rundir.release()


def _train(cfg, proc, run_dir, log, faults, rundir):
    # ---- set up: data, run directory (lock, config), every part of the run, resume
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch % proc.world:
        raise RunError(f"--batch {cfg.batch} (the global batch) must be divisible by the world size {proc.world}")
    ds = build.dataset(cfg)
    _on_rank0(proc, lambda: _open_run_dir(rundir, cfg, log))
    proc.barrier()
    log(f"data: {ds.describe()}")
    build.check_sigma_d(ds, cfg.sigma_d, log)
    faults.point("setup")
    parts = build.build_parts(cfg, proc, log, ds)
    total_steps = config.steps_for(cfg.total_kimg, cfg.batch)
    ckpt_io, evaluator = CheckpointIO(run_dir, cfg, proc, log, faults), Evaluator(cfg, proc, run_dir, log)
    counters = ckpt_io.resume(parts)
    resumed_step = None if counters is None else counters.step
    counters = counters or Counters()
    log.truncate_stats(counters.step)
    log.open_tensorboard()
    if faults.signal_received is not None:
        log("stopped after setup (a signal arrived during it); nothing was trained")
        return 0

    # ---- the loop
    faults.phase = "train"
    if counters.step >= total_steps:
        log(f"run already complete at step {counters.step} ({counters.cur_nimg / 1000:g} kimg)")
    progress = Progress(log, cfg, counters.step, total_steps)
    sample_every, ckpt_every = _every(cfg.sample_every_kimg, cfg.batch), _every(cfg.ckpt_every_kimg, cfg.batch)
    t_last, n_last = time.time(), counters.cur_nimg
    while counters.step < total_steps:
        faults.maybe_kill(counters.step + 1)
        s = train_step(parts, cfg, proc, counters, faults, log)
        progress.update(counters.step, counters.cur_nimg, s)
        # -- log, stop on a run of non-finite steps, checkpoint, sample, stop on a signal
        if counters.step % cfg.log_every == 0 or counters.step == total_steps:
            now = time.time()
            log.stats(counters, s, (counters.cur_nimg - n_last) / max(now - t_last, 1e-9), parts.scaler.scale,
                      proc.device)
            t_last, n_last = now, counters.cur_nimg
        if counters.nonfinite_in_a_row >= cfg.max_nonfinite:
            ckpt_io.save(parts, counters)
            raise NonFiniteStop(f"stopping: {counters.nonfinite_in_a_row} non-finite steps in a row (last at step "
                                f"{counters.step}, --max-nonfinite {cfg.max_nonfinite}); try a lower --lr, "
                                "--grad-clip or --precision bf16")
        not_last = counters.step < total_steps
        saved = ckpt_every and counters.step % ckpt_every == 0 and not_last
        if saved:
            ckpt_io.save(parts, counters)
        if sample_every and counters.step % sample_every == 0 and not_last:
            evaluator.sample_grids(parts, f"{counters.cur_nimg // 1000:06d}k")
        if faults.stop_agreed:
            if not saved:
                ckpt_io.save(parts, counters)
            log(f"stop requested: checkpoint at step {counters.step} written; exiting")
            return 0
    progress.close()
    parts.loader.close()

    # ---- finish: the last checkpoint, final grids and FD
    if resumed_step != counters.step:  # a finished run re-run only samples and evaluates again
        ckpt_io.save(parts, counters)
    if faults.signal_received is not None:
        log("stop requested: the final checkpoint is written; skipping the final samples (rerun to make them)")
        return 0
    faults.phase = "finish"
    try:
        faults.point("eval")
        evaluator.finish(parts)
    except StopRequested as stop:
        log(f"received signal {stop.args[0]} during the final sampling / evaluation: stopped it; the final "
            "checkpoint is written (rerun to sample and evaluate)")
    return 0


def main(argv=None):
    """`python -m scm_fast.train`: parse the flags, then --dry-run or train. A RunError prints its
    message and exits 1; NonFiniteStop (too many non-finite steps in a row) exits 3; bad flags exit 2."""
    cfg, is_dry_run, world = config.parse(argv)
    try:
        if is_dry_run:
            from scm_fast.train.dry_run import dry_run
            return dry_run(cfg, world or int(os.environ.get("WORLD_SIZE", "1")))
        proc = Dist(cfg.device)
        try:
            return training_loop(cfg, proc)
        finally:
            proc.close()
    except RunError as err:
        print(err, file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None
    except OSError as err:
        if err.errno not in _DISK_ERRORS:
            raise
        print(f"{err.filename or 'the run directory'}: {err.strerror}; the checkpoints written so far are intact "
              "(free space, or pass a --run-dir on a writable filesystem, then rerun to resume)", file=sys.stderr,
              flush=True)
        raise SystemExit(1) from None
