"""Benchmark one full sCM training step (forward + JVP, backward, optimizer) of a DiT.

Methods (all run scm_fast.objectives.scm_loss on the same model, data and seed):
  fused       one pass: a single forward under torch.func.jvp gives F with its graph and the tangent,
              through scm_fast's fused attention and adaptive double norm
  two_math    (a) two passes (no-grad JVP pass, then a forward with grad) on PyTorch's ops, SDPA on
              the MATH backend in both passes: what codebases without a JVP-capable kernel do, since
              SDPA's fused backends have no forward-mode rule
  two_mixed   (b) two passes on PyTorch's ops, MATH in the JVP pass only, SDPA's default backend in
              the grad pass
The baselines also use PyTorch's composition for the adaptive double norm (no fused kernel).
Each method runs in a fresh subprocess: build the model, one warm-up step, REPS timed steps, then
one step for memory: the peak of live allocated bytes during the timed steps above those live before them
(on CUDA max_memory_allocated; on CPU glibc's mallinfo2 in-use bytes, heap + mmapped, sampled
every 2 ms by a thread). Peak RSS is not used: what the heap keeps from earlier steps moved the
baselines' RSS figure by 3x between runs.
Before timing, the first step's loss of each method is compared with the fused one (same seed).

Run:  python benchmarks/train_step.py           DiT 1024 tokens (64x64x4, patch 2), hidden 384,
                                                6 heads, 12 blocks, batch 4, fp32 (the issue's target)
      python benchmarks/train_step.py --quick   a small model (a smoke run)
Writes OUT/train_step.json.
"""
import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scm_fast import objectives
from scm_fast.models import DiT, DiTConfig, use_pytorch_ops

METHODS = ("fused", "two_math", "two_mixed")
MiB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quick", action="store_true", help="img 16, hidden 64, depth 2")
    p.add_argument("--out", default=os.path.join("benchmarks", "out"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.img, args.hidden, args.heads, args.depth = 16, 64, 2, 2
    return args


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_in_use():
    """Bytes malloc has handed out and not taken back (heap in use + mmapped chunks), glibc >= 2.33."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakSampler:
    """Samples malloc_in_use() every `period` s in a thread; .peak is the largest value seen."""

    def __init__(self, period=0.002):
        self.period, self.peak, self._stop = period, malloc_in_use(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, malloc_in_use())
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, malloc_in_use())


def model_F(method, model):
    """F(x_in, t) for `method`, with the SDPA backend each pass of that method uses."""
    if method == "fused":
        return model

    def F(x_in, t):
        math_here = method == "two_math" or not torch.is_grad_enabled()  # the JVP pass runs under no_grad
        with sdpa_kernel(SDPBackend.MATH) if math_here else contextlib.nullcontext():
            return model(x_in, t)
    return F


def worker(spec):
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cfg = DiTConfig(img_size=spec["img"], in_channels=spec["channels"], patch=spec["patch"], hidden=spec["hidden"],
                    heads=spec["heads"], depth=spec["depth"])
    torch.manual_seed(0)
    model = DiT(cfg).to(device)
    for name, p in model.named_parameters():  # leave the zero init so that tangents and gradients are non-trivial
        if name.endswith("proj.weight") or name.endswith("mlp.2.weight") or name == "out.weight":
            torch.nn.init.normal_(p, std=0.02)
    method = spec["method"]
    use_pytorch_ops(model, method != "fused")
    scm = objectives.SCMConfig(one_pass=method == "fused", tangent_warmup=0)
    F = model_F(method, model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.randn(spec["batch"], cfg.in_channels, cfg.img_size, cfg.img_size,
                     generator=torch.Generator().manual_seed(1)).to(device)

    def step(seed):
        loss, _ = objectives.scm_loss(F, x0, 100, scm, generator=torch.Generator(device).manual_seed(seed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    first_loss = step(0)  # warm-up; the same seed for every method
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = malloc_in_use()
    times = []
    for i in range(spec["reps"]):  # timed steps, without the memory sampler (it takes malloc's lock)
        start = time.perf_counter()
        step(i + 1)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    with PeakSampler() if device == "cpu" else contextlib.nullcontext() as sampler:  # one more step for memory
        step(spec["reps"] + 1)
    extra = torch.cuda.max_memory_allocated() - base if device == "cuda" else sampler.peak - base
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"time_s": statistics.median(times), "times": times, "extra_bytes": extra,
                      "first_loss": first_loss, "params": params}))


def measure(spec):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{spec['method']} failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    spec = {k: getattr(args, k) for k in ("img", "channels", "patch", "hidden", "heads", "depth", "batch", "reps",
                                          "threads", "device")}
    tokens = (args.img // args.patch) ** 2
    print(f"DiT {tokens} tokens, hidden {args.hidden}, {args.heads} heads, {args.depth} blocks, batch {args.batch}, "
          f"fp32, {args.device}, {args.threads} threads", file=sys.stderr)
    results = {}
    for method in METHODS:
        print(f"  {method} ...", end=" ", file=sys.stderr, flush=True)
        results[method] = measure({**spec, "method": method})
        r = results[method]
        print(f"{r['time_s']:.2f} s, {r['extra_bytes'] / MiB:.0f} MiB, loss {r['first_loss']:.6f}", file=sys.stderr)
    ref = results["fused"]["first_loss"]
    for method, r in results.items():  # same data, seed and weights: the same loss up to rounding
        if abs(r["first_loss"] - ref) > 1e-3 * max(1.0, abs(ref)):
            sys.exit(f"MISMATCH: {method} first loss {r['first_loss']} vs fused {ref}")
    f = results["fused"]
    print(f"\nDiT {tokens} tokens, hidden {args.hidden}, {args.heads} heads, {args.depth} blocks, batch {args.batch}, "
          f"{f['params'] / 1e6:.1f} M params, fp32; {args.device}, {args.threads} threads; median of {args.reps} steps\n")
    print(f"{'method':>10}  {'step':>8}  {'peak extra':>10}  {'fused faster by':>15}  {'fused memory':>12}")
    for method, r in results.items():
        print(f"{method:>10}  {r['time_s']:7.2f}s  {r['extra_bytes'] / MiB:7.0f} MiB  "
              f"{r['time_s'] / f['time_s']:14.2f}x  {f['extra_bytes'] / max(r['extra_bytes'], 1):11.2f}x")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "train_step.json")
    with open(path, "w") as fh:
        json.dump({"environment": {"torch": torch.__version__, "platform": platform.platform(), **spec},
                   "results": results}, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
