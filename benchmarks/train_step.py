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
Before timing, the first (warm-up) step's loss of each method is compared with the fused one (same
seed; fused runs first): a mismatch aborts the benchmark before that method is timed.
Timing, memory and the records are benchmarks/harness.py's.

Run:  python benchmarks/train_step.py           DiT 1024 tokens (64x64x4, patch 2), hidden 384,
                                                6 heads, 12 blocks, batch 4, fp32 (the issue's target)
      python benchmarks/train_step.py --quick   a small model (a smoke run)
Writes OUT/train_step.json and OUT/train_step.records.json (one record a method: check, median,
p20/p80, memory).
"""
import argparse
import contextlib
import itertools
import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from scm_fast import objectives  # noqa: E402
from scm_fast.models import DiT, DiTConfig, use_pytorch_ops  # noqa: E402

METHODS = ("fused", "two_math", "two_mixed")  # fused first: the others' first loss is checked against it
MiB = harness.MiB
LOSS_TOL = 1e-3  # first loss: |loss - fused| <= LOSS_TOL x max(1, |fused|)


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
    args.device = harness.resolve_device(args.device)
    if args.quick:
        args.img, args.hidden, args.heads, args.depth = 16, 64, 2, 2
    return args


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

    seeds = itertools.count()  # step i uses seed i: the same for every method

    def step():
        loss, _ = objectives.scm_loss(F, x0, 100, scm, generator=torch.Generator(device).manual_seed(next(seeds)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    params = sum(p.numel() for p in model.parameters())
    config = {k: v for k, v in spec.items() if k not in ("method", "ref_loss")}
    first_loss = step()  # warm-up, checked before any timing
    if spec.get("ref_loss") is None:
        check = harness.Check("reference")
    else:
        check = harness.check_close([first_loss], [spec["ref_loss"]], LOSS_TOL, ["first loss"], label=method,
                                    reference="fused")
        if not check.ok:
            check.message = f"MISMATCH: {method} first loss {first_loss} vs fused {spec['ref_loss']}"
    record = harness.Record(method, config, check, metrics={"first_loss": first_loss, "params": params})
    if not check.ok:
        harness.reply(record, {})
    memory = harness.PeakMemory(device, cpu="malloc").begin()
    # timed steps, without the memory sampler (it takes malloc's lock); on CUDA the peak spans them too
    record.timing = harness.time_loop(step, spec["reps"], device, warmup=0)
    with memory.sampling():  # one more step for memory
        step()
    record.memory_bytes, record.memory_method = memory.end(), memory.method
    harness.reply(record, {"time_s": record.timing.median, "times": record.timing.times,
                           "extra_bytes": record.memory_bytes, "first_loss": first_loss, "params": params})


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
    records = harness.Records(args.out, "train_step")
    for method in METHODS:
        print(f"  {method} ...", end=" ", file=sys.stderr, flush=True)
        ref = results["fused"]["first_loss"] if "fused" in results else None  # same data, seed and weights
        results[method] = harness.run_worker(__file__, {**spec, "method": method, "ref_loss": ref}, method, records)
        r = results[method]
        print(f"{r['time_s']:.2f} s, {r['extra_bytes'] / MiB:.0f} MiB, loss {r['first_loss']:.6f}", file=sys.stderr)
    f = results["fused"]
    print(f"\nDiT {tokens} tokens, hidden {args.hidden}, {args.heads} heads, {args.depth} blocks, batch {args.batch}, "
          f"{f['params'] / 1e6:.1f} M params, fp32; {args.device}, {args.threads} threads; median of {args.reps} steps\n")
    print(f"{'method':>10}  {'step':>8}  {'peak extra':>10}  {'fused faster by':>15}  {'fused memory':>12}")
    for method, r in results.items():
        print(f"{method:>10}  {r['time_s']:7.2f}s  {r['extra_bytes'] / MiB:7.0f} MiB  "
              f"{r['time_s'] / f['time_s']:14.2f}x  {f['extra_bytes'] / max(r['extra_bytes'], 1):11.2f}x")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "train_step.json")
    env = {"torch": torch.__version__, "platform": platform.platform(), **spec}
    with open(path, "w") as fh:
        json.dump({"environment": env, "results": results}, fh, indent=2)
    print(f"wrote {path}, {records.write(env)}")


if __name__ == "__main__":
    main()
