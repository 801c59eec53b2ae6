"""Benchmark attention forward + JVP: scm_fast's fused op against what codebases without one run.

For B x H heads of length L and head dim D (SDPA layout), each method below is timed and its peak
extra memory measured:
  fused      torch.func.jvp over scm_fast.ops.attention: output and tangent in one fused pass
             (whatever backend scm_fast dispatches to; printed at the start)
  math       torch.func.jvp over F.scaled_dot_product_attention with SDPBackend.MATH forced:
             what codebases without a JVP kernel do (O(L^2) memory)
  sdpa_fwd   the primal SDPA forward with its default backend, no JVP, no grad: the speed of light
  jvp_flash  torch.func.jvp over the jvp_flash_attention package's kernel (CUDA only, if installed)
and, for the forward and backward alone (what a plain training step runs):
  fused_fwd  scm_fast.ops.attention under no_grad, against sdpa_fwd
  fused_bwd  backward of scm_fast.ops.attention (torch.autograd.grad of a recorded forward)
  sdpa_bwd   backward of F.scaled_dot_product_attention with its default backend, the same way

FLOPs: forward + JVP = 12 B H L^2 D, six L x L x D matmuls of 2 L^2 D each (scm-reference §7:
Q K^T, tQ K^T + Q tK^T, P V, P tV, (P * dS) V); forward alone = 4 B H L^2 D; backward = 10 B H L^2 D
(Q K^T recomputed, dO V^T, P^T dO, dS K, dS^T Q). The machine's own matmul rate is measured in the
same run, before and after the methods (the larger counts); "x limit" = fused time / (12 B H L^2 D / matmul rate).

Each (method, L, D) runs in a fresh subprocess of this script (hidden --worker mode), which
allocates the inputs, warms the code paths up on a tiny problem, then runs the full-size problem
once and records the peak extra memory: on CPU VmHWM - VmRSS after the inputs (the high-water mark
is reset through /proc/self/clear_refs, Linux only), on CUDA max_memory_allocated - the inputs
(for the backward rows: beyond the recorded forward). Before timing, the worker checks the result
on the first 128 query rows of batch 0 (rows are independent, so this is exact) against fp64
attention_ref: the output and tangent of its JVP, its output, or its grad_q for the backward rows;
max error <= TOL[dtype] x max(1, max |exact|), else it aborts the benchmark (never timing that case).
Time: median over repetitions after that warm-up run (CPU: time.perf_counter, fewer repetitions for
longer runs; CUDA: triton.testing.do_bench). Check, timing and memory are benchmarks/harness.py's.

Run:  python benchmarks/jvp_attention.py           full run (fp32 on CPU: about 25 minutes)
      python benchmarks/jvp_attention.py --quick   smoke run: L 512, 1024 and D 64 only
Writes OUT/jvp_attention.json (raw numbers and environment), OUT/jvp_attention.records.json (one
record a case: check, median, p20/p80, memory) and, with matplotlib, OUT/jvp_attention.png.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from scm_fast.ops import _registry, attention, attention_ref  # noqa: E402

DTYPES, TOL, MiB = harness.DTYPES, harness.TOL, harness.MiB
CHECK_ROWS = 128
CPU_TARGET_S = 10.0  # CPU: repetitions ~ this many seconds per measurement, 1 to CPU_MAX_REPS
CPU_MAX_REPS = 15


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--L", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--D", type=int, nargs="+", default=[64, 128])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--quick", action="store_true", help="L 512, 1024 and D 64 only")
    p.add_argument("--skip-math-above", type=int, metavar="L", help="no math baseline above this L")
    p.add_argument("--out", default=os.path.join("benchmarks", "out"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = harness.resolve_device(args.device)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.quick:
        args.L, args.D = [512, 1024], [64]
    return args


# ---- the methods -----------------------------------------------------------------------------
def jvp_flash_available():
    try:
        import jvp_flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


KIND = {"fused": "jvp", "math": "jvp", "jvp_flash": "jvp", "sdpa_fwd": "fwd", "fused_fwd": "fwd",
        "fused_bwd": "bwd", "sdpa_bwd": "bwd"}
FLOP_PER_L2D = {"jvp": 12, "fwd": 4, "bwd": 10}


def method_fn(method, q, k, v, tq, tk, tv):
    """A thunk returning (o, to) for JVP methods, (o,) for forwards, (dq, dk, dv) for backwards.

    A backward method records its forward here, outside the thunk; tq serves as grad_out."""
    primals, tangents = (q, k, v), (tq, tk, tv)
    if KIND[method] == "bwd":
        fn = attention if method == "fused_bwd" else F.scaled_dot_product_attention
        primals = [x.detach().requires_grad_() for x in primals]
        out = fn(*primals)
        return lambda: torch.autograd.grad(out, primals, tq, retain_graph=True)
    if method == "fused":
        return lambda: torch.func.jvp(lambda q, k, v: attention(q, k, v), primals, tangents)
    if method == "math":
        def run():
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(F.scaled_dot_product_attention, primals, tangents)
        return run
    if method == "jvp_flash":
        from jvp_flash_attention.jvp_attention import JVPAttn
        return lambda: torch.func.jvp(JVPAttn.fwd_dual, primals, tangents)

    fn = attention if method == "fused_fwd" else F.scaled_dot_product_attention

    def forward():
        with torch.no_grad():
            return (fn(q, k, v),)
    return forward


def make_inputs(B, H, L, D, dtype, device, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    return [torch.randn(B, H, L, D, dtype=dtype, device=device, generator=gen) for _ in range(6)]


def exact_rows(kind, inputs):
    """(names, fp64 attention_ref results) on the first CHECK_ROWS query rows of batch 0."""
    q, k, v, tq, tk, tv = (x[:1].double() for x in inputs)
    rows = slice(0, CHECK_ROWS)
    q, tq = q[:, :, rows], tq[:, :, rows]
    if kind == "jvp":
        return ("output", "tangent"), torch.func.jvp(attention_ref, (q, k, v), (tq, tk, tv))
    if kind == "fwd":
        return ("output",), (attention_ref(q, k, v),)
    q.requires_grad_()
    return ("grad_q",), torch.autograd.grad(attention_ref(q, k, v), q, tq)  # tq is grad_out


def check(method, outputs, inputs):
    """harness.Check of outputs against fp64 attention_ref on the first rows of batch 0."""
    rows = slice(0, CHECK_ROWS)
    names, exact = exact_rows(KIND[method], inputs)
    return harness.check_close([got[:1, :, rows] for got in outputs], exact, TOL[inputs[0].dtype], names,
                               label=f"{method} L={inputs[0].shape[2]} D={inputs[0].shape[3]}",
                               reference="fp64 attention_ref")


# ---- one measurement, in a fresh process -----------------------------------------------------
def time_fn(fn, device, first_run_s):
    """harness.Timing: do_bench on CUDA; on CPU about CPU_TARGET_S seconds of perf_counter repetitions."""
    if device == "cuda":
        return harness.time_do_bench(fn)
    reps = max(1, min(CPU_MAX_REPS, round(CPU_TARGET_S / first_run_s)))
    return harness.time_loop(fn, reps, device, warmup=0)  # the checked first run was the warm-up


def case_config(spec):
    return {k: spec[k] for k in ("L", "D", "B", "H", "dtype", "device", "threads")}


def worker(spec):
    torch.set_num_threads(spec["threads"])
    dtype, device = DTYPES[spec["dtype"]], spec["device"]
    method_fn(spec["method"], *make_inputs(1, 1, 16, spec["D"], dtype, device))()  # load code paths
    inputs = make_inputs(spec["B"], spec["H"], spec["L"], spec["D"], dtype, device)
    fn = method_fn(spec["method"], *inputs)
    record = harness.run_case(spec["method"], case_config(spec), fn, lambda out: check(spec["method"], out, inputs),
                              lambda fn, first_run_s: time_fn(fn, device, first_run_s),
                              memory=harness.PeakMemory(device, cpu="rss"))
    op = {"jvp": "attention_fwd_jvp", "fwd": "attention_fwd", "bwd": "attention_bwd"}[KIND[spec["method"]]]
    backend = _registry.describe()[op][device]  # what this process dispatched to
    record.metrics["scm_fast_backend"] = backend
    timing = record.timing
    harness.reply(record, {} if timing is None else {
        "time_s": timing.median, "reps": None if device == "cuda" else timing.reps,
        "extra_bytes": record.memory_bytes, "max_errors": record.check.errors, "scm_fast_backend": backend})


def measure(spec, records, flop):
    return harness.run_worker(__file__, spec, f"{spec['method']} L={spec['L']} D={spec['D']}", records,
                              metrics={"flop": flop})


# ---- the driver ------------------------------------------------------------------------------
def matmul_rate(dtype, device):
    """FLOP/s of a square torch.matmul in this process (median)."""
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    if device == "cuda":
        seconds = harness.time_do_bench(lambda: a @ b).median
    else:
        seconds = harness.time_loop(lambda: a @ b, 5, device, warmup=1).median
    return 2 * n ** 3 / seconds


def run_all(args, methods, notes, records):
    runs = [(L, D, m) for D in args.D for L in args.L for m in methods]
    results = []
    for i, (L, D, method) in enumerate(runs, 1):
        flop = FLOP_PER_L2D[KIND[method]] * args.B * args.H * L * L * D
        row = {"method": method, "L": L, "D": D, "flop": flop}
        spec = {"method": method, "L": L, "D": D, "B": args.B, "H": args.H, "dtype": args.dtype,
                "device": args.device, "threads": args.threads}
        if method == "math" and args.skip_math_above and L > args.skip_math_above:
            results.append({**row, "skipped": True})
            skipped = harness.Check("skipped", message=f"--skip-math-above {args.skip_math_above}")
            records.add(harness.Record(method, case_config(spec), skipped, metrics={"flop": flop}))
            continue
        print(f"[{i:2d}/{len(runs)}] {method:9s} L={L:5d} D={D:3d} ...", end=" ", file=sys.stderr, flush=True)
        results.append({**row, **measure(spec, records, flop)})
        r = results[-1]
        print(f"{fmt_time(r['time_s'])}, {r['extra_bytes'] / MiB:.0f} MiB", file=sys.stderr, flush=True)
    if args.skip_math_above and any(L > args.skip_math_above for L in args.L):
        notes.append(f"math baseline skipped above L={args.skip_math_above}")
    return results


def fmt_time(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(args, results, rate):
    get = {(r["method"], r["L"], r["D"]): r for r in results}
    unit, scale = ("TFLOP/s", 1e12) if args.device == "cuda" else ("GFLOP/s", 1e9)
    has_flash = any(r["method"] == "jvp_flash" for r in results)
    head = ["L", "D", "fused", "fused MiB", "math", "math MiB", "speedup", "sdpa fwd", "fused/fwd",
            f"fused {unit}", "x limit"] + (["jvp_flash", "flash MiB"] if has_flash else [])
    lines = []
    for D in args.D:
        for L in args.L:
            f, m, s = (get[(k, L, D)] for k in ("fused", "math", "sdpa_fwd"))
            flops = f["flop"]
            math_ok = not m.get("skipped")
            row = [L, D, fmt_time(f["time_s"]), f"{f['extra_bytes'] / MiB:.0f}",
                   fmt_time(m["time_s"]) if math_ok else "skipped",
                   f"{m['extra_bytes'] / MiB:.0f}" if math_ok else "skipped",
                   f"{m['time_s'] / f['time_s']:.2f}x" if math_ok else "-",
                   fmt_time(s["time_s"]), f"{f['time_s'] / s['time_s']:.1f}",
                   f"{flops / f['time_s'] / scale:.1f}", f"{f['time_s'] * rate / flops:.2f}"]
            if has_flash:
                j = get[("jvp_flash", L, D)]
                row += [fmt_time(j["time_s"]), f"{j['extra_bytes'] / MiB:.0f}"]
            lines.append([str(c) for c in row])
    return harness.aligned(head, lines)


def fwd_bwd_table(args, results, unit, scale):
    """Forward alone and backward alone: scm_fast against SDPA's default backend."""
    get = {(r["method"], r["L"], r["D"]): r for r in results}
    head = ["L", "D", "fused fwd", "sdpa fwd", "fwd ratio", f"fwd {unit}", "fused bwd", "bwd MiB",
            "sdpa bwd", "sdpa MiB", "bwd ratio", f"bwd {unit}"]
    lines = []
    for D in args.D:
        for L in args.L:
            ff, sf, fb, sb = (get[(k, L, D)] for k in ("fused_fwd", "sdpa_fwd", "fused_bwd", "sdpa_bwd"))
            lines.append([str(c) for c in (
                L, D, fmt_time(ff["time_s"]), fmt_time(sf["time_s"]), f"{ff['time_s'] / sf['time_s']:.2f}",
                f"{ff['flop'] / ff['time_s'] / scale:.1f}", fmt_time(fb["time_s"]),
                f"{fb['extra_bytes'] / MiB:.0f}", fmt_time(sb["time_s"]), f"{sb['extra_bytes'] / MiB:.0f}",
                f"{fb['time_s'] / sb['time_s']:.2f}", f"{fb['flop'] / fb['time_s'] / scale:.1f}")])
    return harness.aligned(head, lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in dict.fromkeys(r["method"] for r in results):
        for D in sorted({r["D"] for r in results}):
            rs = [r for r in results if (r["method"], r["D"]) == (method, D) and not r.get("skipped")]
            if rs:
                Ls = [r["L"] for r in rs]
                ax_t.plot(Ls, [r["time_s"] for r in rs], marker="o", label=f"{method} D={D}")
                ax_m.plot(Ls, [r["extra_bytes"] / MiB for r in rs], marker="o", label=f"{method} D={D}")
    for ax, ylabel in ((ax_t, "time (s)"), (ax_m, "peak extra memory (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="L", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def environment(args, rate):
    return {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "dtype": args.dtype, "B": args.B, "H": args.H,
            "backend": _registry.describe(), "matmul_flop_per_s": rate}


def main():
    args = parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    torch.set_num_threads(args.threads)
    backend = _registry.describe()["attention_fwd_jvp"][args.device]
    print(f"device {args.device}, {args.dtype}, B={args.B} H={args.H}, {args.threads} threads, "
          f"torch {torch.__version__}; scm_fast backend: {backend}", file=sys.stderr)
    notes, methods = [], ["fused", "math", "sdpa_fwd", "fused_fwd", "fused_bwd", "sdpa_bwd"]
    if args.device == "cuda" and jvp_flash_available():
        methods.append("jvp_flash")
    else:
        notes.append("jvp_flash_attention not measured (" +
                     ("not installed)" if args.device == "cuda" else "CUDA only)"))
    rate = matmul_rate(DTYPES[args.dtype], args.device)
    began = time.perf_counter()
    records = harness.Records(args.out, "jvp_attention")
    results = run_all(args, methods, notes, records)
    rate = max(rate, matmul_rate(DTYPES[args.dtype], args.device))  # the machine's best, before or after
    env = environment(args, rate)
    os.makedirs(args.out, exist_ok=True)
    written = [os.path.join(args.out, "jvp_attention.json")]
    try:
        plot(results, os.path.join(args.out, "jvp_attention.png"))
        written.append(os.path.join(args.out, "jvp_attention.png"))
    except ImportError:
        notes.append("matplotlib not installed: no plot (pip install matplotlib)")
    with open(written[0], "w") as f:
        json.dump({"environment": env, "notes": notes, "results": results}, f, indent=2)
    written.insert(1, records.write(env))
    unit, scale = ("TFLOP/s", 1e12) if args.device == "cuda" else ("GFLOP/s", 1e9)
    print(f"\nscm_fast backend: {backend}; {env['device']}, {args.dtype}, B={args.B} H={args.H}, "
          f"{env['threads']} threads; matmul rate {rate / scale:.1f} {unit}; "
          f"measured in {time.perf_counter() - began:.0f} s")
    print("speedup = math / fused; fused/fwd = fused / SDPA primal forward; x limit = fused time / "
          "(12 B H L^2 D / matmul rate); MiB = peak extra memory\n")
    print(table(args, results, rate))
    print("\nforward alone and backward alone; ratio = scm_fast / SDPA default backend "
          "(bwd MiB: peak extra memory of the backward beyond the recorded forward)\n")
    print(fwd_bwd_table(args, results, unit, scale))
    for note in notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
