"""Benchmark adaptive double normalization: scm_fast's fused op against the PyTorch composition.

    y = norm(x) * pnorm(scale) + pnorm(shift),   pnorm(a) = a / sqrt(mean_c(a^2) + eps)

The composition is what a codebase writes with PyTorch's own kernels: F.layer_norm / F.rms_norm /
F.group_norm, two pixel norms of the (B, C) vectors, a multiply and an add. For each pass:
  fwd      y, no grad
  fwd+jvp  torch.func.jvp with tangents on x, scale and shift (y and its tangent)
  bwd      torch.autograd.grad of a recorded forward w.r.t. x, scale and shift
Bytes: the op is memory bound; the count is the N = B x L x C element traffic it cannot avoid
(fwd: read x, write y = 2N; fwd+jvp: x, tx, y, ty = 4N; bwd: dy, x, dx = 3N) x element size; the
(B, C) vectors are ignored. "% copy" divides the achieved bytes/s by the rate of a plain
`dst.copy_(src)` of N elements (2N bytes moved) measured in the same run.
Before timing, each method is checked against the fp64 reference (adaptive_double_norm_ref) on
the first two batch elements (batch elements are independent): max error <= TOL x max(1, max |exact|);
a mismatch aborts the benchmark before that case is timed.
Time: median of repetitions after a warm-up (check, timing and records: benchmarks/harness.py).

Run:  python benchmarks/adaptive_norm.py                 B 64 x L 1024 tokens, C 1152, layer, fp32
      python benchmarks/adaptive_norm.py --norm group --groups 32 --C 512 --L 4096   feature maps
Writes OUT/adaptive_norm.json and OUT/adaptive_norm.records.json (one record a case: check, median,
p20/p80).
"""
import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from scm_fast.ops import _registry, adaptive_double_norm, adaptive_double_norm_ref  # noqa: E402

DTYPES, TOL = harness.DTYPES, harness.TOL
PASSES = ("fwd", "fwd+jvp", "bwd")
TRAFFIC = {"fwd": 2, "fwd+jvp": 4, "bwd": 3}  # N-element tensors read or written
EPS = 1e-6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--L", type=int, default=1024, help="tokens (positions) per batch element")
    p.add_argument("--C", type=int, default=1152)
    p.add_argument("--norm", choices=["layer", "rms", "group"], default="layer")
    p.add_argument("--groups", type=int, default=32, help="num_groups for --norm group")
    p.add_argument("--dtype", choices=DTYPES, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.path.join("benchmarks", "out"))
    args = p.parse_args(argv)
    args.device = harness.resolve_device(args.device)
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    return args


# ---- the two implementations -----------------------------------------------------------------
def pnorm(a):
    return a * torch.rsqrt(a.square().mean(-1, keepdim=True) + EPS)


def composition(args):
    """PyTorch's kernels; tokens (B, L, C) for layer/rms, feature maps (B, C, L) for group."""
    if args.norm == "group":
        return lambda x, s, h: (F.group_norm(x, args.groups, eps=EPS) * pnorm(s)[:, :, None]
                                + pnorm(h)[:, :, None])
    norm = F.layer_norm if args.norm == "layer" else F.rms_norm
    return lambda x, s, h: norm(x, (args.C,), eps=EPS) * pnorm(s)[:, None, :] + pnorm(h)[:, None, :]


def fused(args):
    groups = args.groups if args.norm == "group" else None
    return lambda x, s, h: adaptive_double_norm(x, s, h, norm=args.norm, num_groups=groups, eps=EPS)


def reference(args):
    groups = args.groups if args.norm == "group" else None
    return lambda x, s, h: adaptive_double_norm_ref(x, s, h, norm=args.norm, num_groups=groups, eps=EPS,
                                                    channels_last=args.norm != "group")


def make_inputs(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (args.B, args.C, args.L) if args.norm == "group" else (args.B, args.L, args.C)
    x = torch.randn(shape, generator=g) + 0.5
    vecs = [torch.randn(args.B, args.C, generator=g) for _ in range(2)]
    prim = [t.to(args.device, args.dtype) for t in (x, *vecs)]
    tangents = [torch.randn(t.shape, generator=g).to(t) for t in prim]
    grad_y = torch.randn(shape, generator=g).to(prim[0])
    return prim, tangents, grad_y


def thunk(fn, pass_name, prim, tangents, grad_y):
    """A no-argument callable running `pass_name` of fn; returns the tensors to check."""
    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                return (fn(*prim),)
        return run
    if pass_name == "fwd+jvp":
        return lambda: torch.func.jvp(fn, tuple(prim), tuple(tangents))
    leaves = [p.detach().requires_grad_() for p in prim]
    y = fn(*leaves)
    return lambda: torch.autograd.grad(y, leaves, grad_y, retain_graph=True)


def check(name, pass_name, outputs, args, prim, tangents, grad_y):
    """harness.Check of outputs against the fp64 reference on batch elements 0 and 1."""
    sl = slice(0, 2)
    p64 = [p[sl].double() for p in prim]
    exact = thunk(reference(args), pass_name, p64, [t[sl].double() for t in tangents], grad_y[sl].double())()
    return harness.check_close([got[sl] for got in outputs], exact, TOL[args.dtype],
                               label=f"{name} {pass_name}", reference="fp64 reference")


# ---- timing ----------------------------------------------------------------------------------
def median_time(fn, args):
    """harness.Timing of args.reps calls after one warm-up call."""
    return harness.time_loop(fn, args.reps, args.device, warmup=1)


def copy_rate(args, n):
    """Bytes/s of dst.copy_(src) for n elements (read + write)."""
    src = torch.randn(n, device=args.device).to(args.dtype)
    dst = torch.empty_like(src)
    return 2 * n * src.element_size() / median_time(lambda: dst.copy_(src), args).median


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    prim, tangents, grad_y = make_inputs(args)
    n = prim[0].numel()
    esize = prim[0].element_size()
    rate = copy_rate(args, n)
    backend = _registry.describe()["adaptive_norm_fwd_jvp"][args.device]
    print(f"{args.device}, {str(args.dtype).replace('torch.', '')}, x {tuple(prim[0].shape)} norm={args.norm}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; scm_fast backend: {backend}; "
          f"copy rate {rate / 1e9:.2f} GB/s", file=sys.stderr)
    env = {"torch": torch.__version__, "platform": platform.platform(), "device": args.device,
           "threads": torch.get_num_threads(), "shape": list(prim[0].shape), "dtype": str(args.dtype),
           "norm": args.norm, "copy_bytes_per_s": rate, "backend": backend}
    config = {"shape": list(prim[0].shape), "dtype": str(args.dtype).replace("torch.", ""), "norm": args.norm,
              "device": args.device}
    records = harness.Records(args.out, "adaptive_norm")
    results = []
    for pass_name in PASSES:
        for name, make in (("fused", fused), ("torch", composition)):
            fn = thunk(make(args), pass_name, prim, tangents, grad_y)
            record = records.add(harness.run_case(
                name, {"pass": pass_name, **config}, fn,
                lambda out: check(name, pass_name, out, args, prim, tangents, grad_y),
                lambda fn, _: median_time(fn, args)))
            if not record.check.ok:
                records.abort(record.check.message, env)
            seconds = record.median
            gbps = TRAFFIC[pass_name] * n * esize / seconds
            record.metrics.update(bytes=TRAFFIC[pass_name] * n * esize, bytes_per_s=gbps, fraction_of_copy=gbps / rate)
            results.append({"pass": pass_name, "method": name, "time_s": seconds, "bytes_per_s": gbps,
                            "fraction_of_copy": gbps / rate})
            print(f"  {pass_name:8s} {name:6s} {seconds * 1e3:8.1f} ms", file=sys.stderr, flush=True)
    print(f"\nscm_fast backend {backend}; x {tuple(prim[0].shape)} {str(args.dtype).replace('torch.', '')}, "
          f"norm={args.norm}; {torch.get_num_threads()} threads; copy rate {rate / 1e9:.2f} GB/s (2N bytes)\n")
    print(table(results))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "adaptive_norm.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=2)
    print(f"wrote {path}, {records.write(env)}")


def table(results):
    get = {(r["pass"], r["method"]): r for r in results}
    head = ["pass", "fused", "fused GB/s", "% copy", "torch", "torch GB/s", "% copy", "speedup"]
    lines = []
    for p in PASSES:
        f, t = get[(p, "fused")], get[(p, "torch")]
        lines.append([p, f"{f['time_s'] * 1e3:.1f} ms", f"{f['bytes_per_s'] / 1e9:.2f}",
                      f"{100 * f['fraction_of_copy']:.0f}%", f"{t['time_s'] * 1e3:.1f} ms",
                      f"{t['bytes_per_s'] / 1e9:.2f}", f"{100 * t['fraction_of_copy']:.0f}%",
                      f"{t['time_s'] / f['time_s']:.2f}x"])
    return harness.aligned(head, lines)


if __name__ == "__main__":
    main()
