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

--model sd3 runs the same on a diffusers SD3Transformer2DModel as --arch diffusers trains it: one
sCD step (teacher: a frozen copy, CFG from a null embedding, the student's added guidance
embedding) with the attention through the fused op under patch_sdpa (fused) against diffusers'
own attention on SDPA's MATH backend in two passes (two_math; two_mixed: MATH in the JVP pass only).

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
    p.add_argument("--model", choices=("dit", "sd3"), default="dit",
                   help="dit: scm_fast's DiT (sCT step); sd3: a diffusers SD3Transformer2DModel (sCD step, --arch diffusers)")
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

    def F(x_in, t, **cond):
        math_here = method == "two_math" or not torch.is_grad_enabled()  # the JVP pass runs under no_grad
        with sdpa_kernel(SDPBackend.MATH) if math_here else contextlib.nullcontext():
            return model(x_in, t, **cond)
    return F


def sd3_parts(spec, device):
    """(F, teacher, cond, x0, parameters) of an sCD step on a diffusers SD3 (module docstring)."""
    import copy

    import diffusers

    from scm_fast import trigflow
    from scm_fast.models import diffusers_net
    heads, hidden = spec["heads"], spec["hidden"]
    model = diffusers.SD3Transformer2DModel(
        sample_size=spec["img"], patch_size=spec["patch"], in_channels=spec["channels"], out_channels=spec["channels"],
        num_layers=spec["depth"], attention_head_dim=hidden // heads, num_attention_heads=heads,
        joint_attention_dim=256, caption_projection_dim=hidden, pooled_projection_dim=128,
        pos_embed_max_size=spec["img"] // spec["patch"], qk_norm="rms_norm")
    g = torch.Generator().manual_seed(2)
    cond = {"encoder_hidden_states": torch.randn(spec["batch"], 77, 256, generator=g).to(device),
            "pooled_projections": torch.randn(spec["batch"], 128, generator=g).to(device)}
    spec_ = diffusers_net.DiffusersSpec(class_name="SD3Transformer2DModel", config=dict(model.config), kind="flow",
                                        null_cond={k: torch.zeros_like(v[:1]) for k, v in cond.items()})
    net = diffusers_net.DiffusersNet(model, spec_, guidance_embed=True).to(device)
    teacher = diffusers_net.DiffusersNet(copy.deepcopy(model), spec_).to(device).requires_grad_(False)
    for n in (net, teacher):
        n.fused_attention = spec["method"] == "fused"
    cond["labels"] = torch.zeros(spec["batch"], dtype=torch.long, device=device)
    return net, trigflow.cfg(model_F(spec["method"], teacher)), cond


def worker(spec):
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    if spec.get("model") == "sd3":
        return sd3_worker(spec, device)
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

    measure(spec, model, F, x0, scm, opt, device)


def sd3_worker(spec, device):
    method = spec["method"]
    torch.manual_seed(0)
    net, teacher, cond = sd3_parts(spec, device)
    scm = objectives.SCMConfig(one_pass=method == "fused", tangent_warmup=0, guidance_input=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x0 = torch.randn(spec["batch"], spec["channels"], spec["img"], spec["img"],
                     generator=torch.Generator().manual_seed(1)).to(device)
    measure(spec, net, model_F(method, net), x0, scm, opt, device, teacher, cond)


def measure(spec, model, F, x0, scm, opt, device, teacher=None, cond=None):
    """The warm-up step (checked against the fused loss), REPS timed steps, one step for memory."""
    method = spec["method"]
    seeds = itertools.count()  # step i uses seed i: the same for every method

    def step():
        loss, _ = objectives.scm_loss(F, x0, 100, scm, cond, teacher=teacher,
                                      generator=torch.Generator(device).manual_seed(next(seeds)))
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
                                          "threads", "device", "model")}
    tokens = (args.img // args.patch) ** 2
    print(f"{args.model.upper()} {tokens} tokens, hidden {args.hidden}, {args.heads} heads, {args.depth} blocks, batch {args.batch}, "
          f"fp32, {args.device}, {args.threads} threads", file=sys.stderr)
    results = {}
    records = harness.Records(args.out, "train_step" if args.model == "dit" else f"train_step_{args.model}")
    for method in METHODS:
        print(f"  {method} ...", end=" ", file=sys.stderr, flush=True)
        ref = results["fused"]["first_loss"] if "fused" in results else None  # same data, seed and weights
        results[method] = harness.run_worker(__file__, {**spec, "method": method, "ref_loss": ref}, method, records)
        r = results[method]
        print(f"{r['time_s']:.2f} s, {r['extra_bytes'] / MiB:.0f} MiB, loss {r['first_loss']:.6f}", file=sys.stderr)
    f = results["fused"]
    print(f"\n{args.model.upper()} {tokens} tokens, hidden {args.hidden}, {args.heads} heads, {args.depth} blocks, batch {args.batch}, "
          f"{f['params'] / 1e6:.1f} M params, fp32; {args.device}, {args.threads} threads; median of {args.reps} steps\n")
    print(f"{'method':>10}  {'step':>8}  {'peak extra':>10}  {'fused faster by':>15}  {'fused memory':>12}")
    for method, r in results.items():
        print(f"{method:>10}  {r['time_s']:7.2f}s  {r['extra_bytes'] / MiB:7.0f} MiB  "
              f"{r['time_s'] / f['time_s']:14.2f}x  {f['extra_bytes'] / max(r['extra_bytes'], 1):11.2f}x")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "train_step.json" if args.model == "dit" else f"train_step_{args.model}.json")
    env = {"torch": torch.__version__, "platform": platform.platform(), **spec}
    with open(path, "w") as fh:
        json.dump({"environment": env, "results": results}, fh, indent=2)
    print(f"wrote {path}, {records.write(env)}")


if __name__ == "__main__":
    main()
