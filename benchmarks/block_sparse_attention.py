"""Benchmark block-sparse attention: scm_fast.ops.attention(block_mask=...) against the dense op.

For B x H heads of length L, head dim D and random block masks of block x block tiles at each density
(the fraction of live blocks; 1.0 is every block, still through the block-sparse path), each of
  jvp  torch.func.jvp over the op: output and tangent in one fused pass (12 L^2 D FLOPs a head, dense)
  fwd  the forward under no_grad (4 L^2 D)
  bwd  the backward of a recorded forward (10 L^2 D)
is timed on each backend asked for, beside the dense op without a block mask (its FLOP rate against
the machine's matmul rate, measured in the same run, is the "x limit" column: 1.0 = matmul speed).
A dead tile costs nothing but its state lookup, so the ideal time is density x dense time; "vs ideal"
is the measured time over that. The masks keep the diagonal blocks, so no row is empty. Before timing,
every case is checked on the first 128 query rows of batch 0 against fp64 attention_ref with the
equivalent dense mask (harness.check_close, harness.TOL); a failing check aborts the run.

Run:  python benchmarks/block_sparse_attention.py                 L 4096, D 64, cpp backend
      python benchmarks/block_sparse_attention.py --backends cpp reference --L 2048
      python benchmarks/block_sparse_attention.py --device cuda --L 16384 --H 16   the Triton kernels, bf16
(on CUDA: triton.testing.do_bench, bf16; the matmul rate is bf16's)
Writes OUT/block_sparse_attention.json (raw numbers and environment).
"""
import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from scm_fast.ops import BlockSparse, _registry, attention, attention_ref, use_backend  # noqa: E402
from scm_fast.ops.attention_blocks import element_blocks  # noqa: E402

FLOP_PER_L2D = {"jvp": 12, "fwd": 4, "bwd": 10}
CHECK_ROWS = 128
TARGET_S = 6.0  # repetitions ~ this many seconds a measurement, 2 to MAX_REPS
MAX_REPS = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--L", type=int, default=4096, help="sequence length (queries = keys)")
    p.add_argument("--D", type=int, default=64, help="head dim")
    p.add_argument("--B", type=int, default=1, help="batch")
    p.add_argument("--H", type=int, default=4, help="heads")
    p.add_argument("--block", type=int, default=128, help="block size (queries and keys)")
    p.add_argument("--density", type=float, nargs="+", default=[0.1, 0.5, 1.0], help="fractions of live blocks")
    p.add_argument("--kinds", nargs="+", choices=sorted(FLOP_PER_L2D), default=["jvp", "fwd", "bwd"])
    p.add_argument("--backends", nargs="+", choices=["cpp", "reference"], default=["cpp"],
                   help="scm_fast CPU backends to time (ignored with --device cuda: the Triton kernels)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", default=os.path.join("benchmarks", "out"))
    args = p.parse_args(argv)
    if args.device == "cuda":
        args.backends = ["auto"]
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return args


def make_blocks(args, density, seed=1):
    """Random (B, H, n, n) blocks with a `density` fraction live, the diagonal always among them."""
    n = -(-args.L // args.block)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(args.B, args.H, n, n, generator=g)
    scores.diagonal(dim1=-2, dim2=-1).fill_(-1.0)  # kept first
    keep = max(n, round(density * n * n))
    order = scores.flatten(-2).argsort(-1)[..., :keep]
    blocks = torch.zeros(args.B, args.H, n * n, dtype=torch.bool).scatter_(-1, order, True)
    return blocks.view(args.B, args.H, n, n)


def thunk(kind, inputs, block_mask):
    q, k, v, tq, tk, tv = inputs
    run = lambda q, k, v: attention(q, k, v, block_mask=block_mask)  # noqa: E731
    if kind == "jvp":
        return lambda: torch.func.jvp(run, (q, k, v), (tq, tk, tv))
    if kind == "fwd":
        def forward():
            with torch.no_grad():
                return (run(q, k, v),)
        return forward
    primals = [x.detach().requires_grad_() for x in (q, k, v)]
    out = run(*primals)
    return lambda: torch.autograd.grad(out, primals, tq, retain_graph=True)  # tq is grad_out


def check(kind, outputs, inputs, block_mask, label):
    """First CHECK_ROWS query rows of batch 0 against fp64 attention_ref with the dense mask."""
    q, k, v, tq, tk, tv = (x[:1].double() for x in inputs)
    rows = slice(0, CHECK_ROWS)
    q, tq = q[:, :, rows], tq[:, :, rows]
    mask = None
    if block_mask is not None:
        mask = element_blocks(block_mask.blocks[:1], block_mask.block_q, block_mask.block_k, inputs[0].shape[2],
                              inputs[1].shape[2])[:, :, rows]
    ref = lambda q, k, v: attention_ref(q, k, v, attn_mask=mask)  # noqa: E731
    if kind == "jvp":
        exact = torch.func.jvp(ref, (q, k, v), (tq, tk, tv))
    elif kind == "fwd":
        exact = (ref(q, k, v),)
    else:
        q.requires_grad_()
        exact = torch.autograd.grad(ref(q, k, v), q, tq)
        outputs = outputs[:1]
    got = [x[:1, :, rows] for x in outputs]
    result = harness.check_close(got, exact, harness.TOL[inputs[0].dtype], label=label, reference="fp64 attention_ref")
    if not result.ok:
        raise SystemExit(f"check failed, not timing: {result.message}")


def measure(kind, inputs, block_mask, label):
    fn = thunk(kind, inputs, block_mask)
    device = inputs[0].device.type
    first = harness.time_loop(fn, 1, device, warmup=0).median
    check(kind, fn(), inputs, block_mask, label)
    if device == "cuda":
        return harness.time_do_bench(fn).median
    reps = max(2, min(MAX_REPS, round(TARGET_S / max(first, 1e-3))))
    return harness.time_loop(fn, reps, device, warmup=0).median


def matmul_rate(dtype, device):
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    timer = harness.time_do_bench(lambda: a @ b) if device == "cuda" else harness.time_loop(lambda: a @ b, 5, device)
    return 2 * n ** 3 / timer.median


def run(args):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(args.B, args.H, args.L, args.D, generator=g).to(args.device, args.dtype) for _ in range(6)]
    rows = []
    for backend in args.backends:
        with use_backend(backend):
            for kind in args.kinds:
                dense = measure(kind, inputs, None, f"{backend} {kind} dense")
                flop = FLOP_PER_L2D[kind] * args.B * args.H * args.L ** 2 * args.D
                rows.append(dict(backend=backend, kind=kind, density=None, time_s=dense, flop=flop))
                print(f"{backend} {kind} dense: {dense * 1e3:.0f} ms", file=sys.stderr, flush=True)
                for density in args.density:
                    block_mask = BlockSparse(make_blocks(args, density).to(args.device), args.block, args.block)
                    live = block_mask.density()
                    t = measure(kind, inputs, block_mask, f"{backend} {kind} density {density}")
                    rows.append(dict(backend=backend, kind=kind, density=live, time_s=t, dense_s=dense))
                    print(f"{backend} {kind} density {live:.3f}: {t * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return rows


def table(rows, rate):
    head = ["backend", "kind", "density", "time", "vs dense", "speedup", "vs ideal", "dense GFLOP/s", "x limit"]
    lines = []
    for r in rows:
        if r["density"] is None:
            gflops = r["flop"] / r["time_s"]
            lines.append([r["backend"], r["kind"], "dense", f"{r['time_s'] * 1e3:.0f} ms", "1.00", "1.00x", "-",
                          f"{gflops / 1e9:.1f}", f"{rate / gflops:.2f}"])
            continue
        ratio = r["time_s"] / r["dense_s"]
        lines.append([r["backend"], r["kind"], f"{r['density']:.3f}", f"{r['time_s'] * 1e3:.0f} ms", f"{ratio:.2f}",
                      f"{1 / ratio:.2f}x", f"{ratio / r['density']:.2f}", "-", "-"])
    return harness.aligned(head, lines)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    rate = matmul_rate(args.dtype, args.device)
    rows = run(args)
    rate = max(rate, matmul_rate(args.dtype, args.device))
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "threads": torch.get_num_threads(), "B": args.B, "H": args.H, "L": args.L, "D": args.D,
           "block": args.block, "device": args.device, "dtype": str(args.dtype),
           "backend": _registry.describe()["attention_fwd_jvp"], "matmul_flop_per_s": rate}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "block_sparse_attention.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=2)
    print(f"\n{args.device} {str(args.dtype)[6:]}, B={args.B} H={args.H} L={args.L} D={args.D}, "
          f"{args.block} x {args.block} blocks, {env['threads']} threads; matmul rate {rate / 1e9:.1f} GFLOP/s")
    print("vs dense = time / the dense op's; vs ideal = (time / dense) / density; x limit = matmul rate / "
          "the dense op's FLOP rate\n")
    print(table(rows, rate))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
