"""The data loader against the training step: samples/s of loader.BatchLoader with 0, 2, 4 workers next
to the samples/s a training step consumes, and the peak RSS of a training process against the
dataset's size (1x and 10x).

    python benchmarks/data_loader.py [--n 20000] [--size 64] [--batch 256] [--json PATH]

Data: a uint8 .npy of n random RGB images of size x size (1x); 10x is the same header with 10n images
(a sparse file: the RSS question is what the process holds, not what the disk does). Loader: batches of
--batch from a ShardedSampler, after 3 warm-up batches, median of 3 runs of 20 batches each
(images / s). Step: `python -m scm_fast.train` (DiT --model, --batch, on the 1x file, workers 0) for
--steps steps; its images_per_s from stats.jsonl after the first 2 steps. RSS: ru_maxrss of the
trainer process (with --workers 2, the largest of the trainer and its workers) on 1x and 10x.
Timings need an idle machine: run nothing beside it.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scm_fast import data, loader  # noqa: E402


def write_npy(path, n, size, fill=True):
    a = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    if fill:
        rng = np.random.default_rng(0)
        for i in range(0, n, 4096):
            a[i:i + 4096] = rng.integers(0, 256, a[i:i + 4096].shape, dtype=np.uint8)
    a.flush()
    return path


def loader_rate(path, batch, workers, batches=20, runs=3):
    ds = data.load_arrays(path)
    rates = []
    for r in range(runs):
        batches = loader.BatchLoader(ds, loader.ShardedSampler(len(ds), batch, seed=r), workers=workers)
        for _ in range(3):
            batches.next()
        t = time.perf_counter()
        for _ in range(batches):
            batches.next()
        rates.append(batches * batch / (time.perf_counter() - t))
        batches.close()
    return statistics.median(rates)


def _train(path, run_dir, args, workers, steps):
    kimg = steps * args.batch / 1000
    cmd = [sys.executable, "-c", "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
           "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
           sys.executable, "-m", "scm_fast.train", "--data", str(path), "--run-dir", str(run_dir),
           "--model", args.model, "--batch", str(args.batch), "--total-kimg", f"{kimg:g}", "--eval-n", "0",
           "--n-grid", "4", "--no-progress", "--no-tensorboard", "--sample-every-kimg", "0",
           "--ckpt-every-kimg", "0", "--log-every", "1", "--workers", str(workers)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    if out[-2] != "0":
        raise RuntimeError(f"the trainer failed on {path}")
    recs = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_s"] for r in recs[2:]), int(out[-1]) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="images in the 1x file")
    ap.add_argument("--size", type=int, default=64, help="image side (RGB uint8)")
    ap.add_argument("--batch", type=int, default=256, help="images per batch (loader and step)")
    ap.add_argument("--model", default="tiny", help="the DiT size of the training step")
    ap.add_argument("--steps", type=int, default=8, help="training steps timed")
    ap.add_argument("--workers", default="0,2,4", help="loader worker counts to time")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = write_npy(tmp / "one.npy", args.n, args.size)
        ten = write_npy(tmp / "ten.npy", 10 * args.n, args.size, fill=False)
        rows = {"images": args.n, "size": args.size, "batch": args.batch, "threads": torch.get_num_threads()}
        rows["loader_images_per_s"] = {w: loader_rate(one, args.batch, int(w)) for w in args.workers.split(",")}
        rows["step_images_per_s"], rows["rss_mib_1x"] = _train(one, tmp / "r1", args, 0, args.steps)
        rows["rss_mib_1x_workers2"] = _train(one, tmp / "r2", args, 2, 3)[1]
        rows["rss_mib_10x_workers2"] = _train(ten, tmp / "r3", args, 2, 3)[1]
        rows["file_mib"] = {"1x": one.stat().st_size / 2 ** 20, "10x": ten.stat().st_size / 2 ** 20}
    print(f"{args.n} x {args.size}x{args.size}x3 uint8, batch {args.batch}, {rows['threads']} threads")
    for w, r in rows["loader_images_per_s"].items():
        print(f"loader, {w} workers: {r:10.0f} images/s")
    print(f"training step (DiT {args.model}): {rows['step_images_per_s']:10.0f} images/s")
    print(f"peak RSS: 1x {rows['rss_mib_1x']:.0f} MiB (workers 0), 1x {rows['rss_mib_1x_workers2']:.0f} MiB and "
          f"10x {rows['rss_mib_10x_workers2']:.0f} MiB (workers 2); files {rows['file_mib']['1x']:.0f} / "
          f"{rows['file_mib']['10x']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
