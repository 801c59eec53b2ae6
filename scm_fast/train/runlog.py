"""The run's log (rank 0): log.txt lines, stats.jsonl records, TensorBoard scalars, the progress bar."""
import json
import os
import resource
import sys
import time

import torch

STATS_KEYS = ("loss", "grad_norm", "grad_norm_logvar", "lr", "images_per_s", "loss_scale", "memory_mib")


class RunLog:
    """Writes only on rank 0; every method is safe to call on every rank."""

    def __init__(self, run_dir, rank, cfg):
        self.run_dir, self.rank, self.cfg = run_dir, rank, cfg
        self.file, self.tb = None, None

    def open(self):
        """Open log.txt for appending (rank 0; the run directory exists)."""
        if self.rank == 0:
            self.file = open(self.run_dir / "log.txt", "a")

    def open_tensorboard(self):
        if self.rank == 0 and self.cfg.tensorboard:
            self.tb = _tensorboard(self.run_dir / "tensorboard")

    def __call__(self, msg):
        if self.rank != 0:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        try:
            from tqdm import tqdm
            tqdm.write(line)
        except ImportError:  # pragma: no cover
            print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def stats(self, counters, s, images_per_s, loss_scale, device):
        """One stats.jsonl record (and TensorBoard scalars at cur_nimg)."""
        if self.rank != 0:
            return
        rec = {"step": counters.step, "kimg": counters.cur_nimg / 1000, "loss": s["loss"],
               "loss_per_t": s["loss_per_t"], "grad_norm": s["grad_norm"], "grad_norm_logvar": s["grad_norm_logvar"],
               "lr": s["lr"], "images_per_s": images_per_s, "skipped": counters.skipped, "loss_scale": loss_scale,
               "memory_mib": memory_mib(device), "time": time.time()}
        if "g_norm" in s:  # sCT / sCD
            rec["g_norm"] = s["g_norm"]
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k in (*STATS_KEYS, "g_norm"):
                if k in rec:
                    self.tb.add_scalar(k, rec[k], counters.cur_nimg)

    def truncate_stats(self, step):
        """Keep the stats records up to `step`, the step the run continues from (0 for a fresh start):
        later ones belong to an interrupted attempt; a torn last line (a kill or a full disk during an
        append) is dropped with a note."""
        path = self.run_dir / "stats.jsonl"
        if self.rank != 0 or not path.exists():
            return
        keep, torn = [], 0
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line) if line.strip() else None
            except ValueError:
                torn += 1
                continue
            if rec is not None and rec.get("step", 0) <= step:
                keep.append(line)
        if torn:
            self(f"stats.jsonl: dropped {torn} unreadable line(s) (an interrupted write)")
        _write_atomic(path, "".join(line + "\n" for line in keep))


class Progress:
    """A tqdm bar on a terminal; otherwise ~20 progress lines (step, kimg, loss, ETA) in the log."""

    def __init__(self, log, cfg, step, total_steps):
        self.log, self.total, self.every = log, total_steps, max(1, total_steps // 20)
        self.enabled = log.rank == 0 and cfg.progress
        self.t_start, self.step_start = time.time(), step
        self.bar = None
        if self.enabled and step < total_steps and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc=cfg.preset,
                            file=sys.stderr)

    def update(self, step, cur_nimg, s):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{s['loss']:.4f}", refresh=False)
        elif self.enabled and step % self.every == 0:
            rate = (step - self.step_start) / max(time.time() - self.t_start, 1e-9)
            eta = (self.total - step) / max(rate, 1e-9)
            self.log(f"step {step}/{self.total} ({cur_nimg / 1000:g} kimg) loss {s['loss']:.4f} "
                     f"grad norm {s['grad_norm']:.3g}, {rate:.2f} steps/s, ETA {eta / 60:.1f} min")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux reports KiB)


def _write_atomic(path, text):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tensorboard(logdir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(logdir))
