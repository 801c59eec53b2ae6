"""Compile report for the Triton attention and adaptive-norm kernels, for sm_80 and sm_90, without a GPU.

Every kernel of kernels/attention.py is compiled ahead of time (triton.compile with a
GPUTarget) for every head-dim tile BLOCK_D in (64, 128, 256) (BLOCK_DV = BLOCK_D) and every tuning
config of CONFIGS for the target, in its heaviest variant (additive fp32 mask, causal; the forward
also storing the row max where it is pass 1 of the two-pass JVP). Kinds: fwd, fwd_jvp (one-pass
forward + JVP, head dim <= 64), jvp (pass 2 of the two-pass forward + JVP, head dim > 64), bwd_dkdv,
bwd_dq, bwd_delta. Per config it reports:

    regs    registers per thread (cuobjdump --dump-resource-usage on the cubin)
    spill   local-memory bytes per thread, stack frame included (> 0: registers spilled; ptxas puts
            spill slots in the stack frame, so cuobjdump shows them as STACK, not LOCAL)
    smem    shared memory bytes per block (marked "!" above the target's limit: the launch fails)
    occupancy  blocks per SM x warps per block, and what limits it (regs, smem, warps, blocks)
    tc      tensor-core instructions in the PTX: wgmma and/or mma ("-": none)
    time    compile seconds (report() bypasses the Triton cache)

Arguments are assumed aligned (pointers and all sizes and strides but H, GROUP, block_q, block_k
divisible by 16), as the JIT specializes them for head dims and sequence lengths that are multiples of 16.

--blocks compiles the block-sparse variants instead (kinds +aligned / +unaligned; a block_mask,
scm_fast.ops.attention_blocks): HAS_BLOCKS, the loop walks each tile's list of live tiles; unaligned
adds BLOCK_KEYS, the per-key check of partly live tiles (blocks that are not multiples of the tile).
`make report` gates the dense kernels and the aligned variants (flex's 128 blocks and any multiple of
the tiles); the unaligned variants are reported, not shipped spill-free (NOTES.md section 26).

The adaptive-norm kernels of kernels/adaptive_norm.py (kinds norm_fwd, norm_fwd_jvp, norm_bwd,
norm_finish) are compiled with the launchers' heuristic tiles for every channel count of --norm-c
and the cases of NORM_CASES (norm, layout, R positions, G groups), weight and bias present, scale and
shift in the dtype of x; the block_d column holds C there, and the config column the norm, layout
(cl: channels-last, cf: channels-first), the tile (positions x channels), "chunk" when rows are read
in channel chunks, and the warps.

    python benchmarks/kernel_report.py [--dtypes fp16,bf16,fp32] [--arch 80,90] [--json PATH]

(--kinds, --block-d, --norm-c and --defaults-only narrow the sweep; all of it takes ~6 min on 2 CPU
cores, the 104 norm configs ~1 min of it.)

Exits non-zero if a shipped config fails to compile, spills outside DOCUMENTED_SPILLS (marked * in
the spill column), exceeds its target's shared memory or, for a kernel with dots, has no tensor-core
instruction. Under TRITON_INTERPRET=1 the kernels are not
JITFunctions, so the compiles run in a subprocess with the variable removed.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from scm_fast.kernels import adaptive_norm as an
from scm_fast.kernels import attention as aj

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KINDS = ("fwd", "fwd_jvp", "jvp", "bwd_dkdv", "bwd_dq", "bwd_delta")
KERNELS = {"fwd": aj._attn_fwd_kernel, "fwd_jvp": aj._attn_fwd_kernel, "jvp": aj._attn_jvp_kernel,
           "bwd_dkdv": aj._attn_bwd_dkdv_kernel, "bwd_dq": aj._attn_bwd_dq_kernel,
           "bwd_delta": aj._attn_bwd_delta_kernel}
INT_ARGS = {"H", "GROUP", "Lq", "Lk", "D", "DV", "block_q", "block_k"}
FP32_PTRS = {"Mask", "LSE", "Delta", "RowMax"}
INT32_PTRS = {"ArgMax", "TileNum", "TileIdx"}  # TileNum/TileIdx: a block mask's live tiles
INT8_PTRS = {"Blocks"}  # a block mask's bool blocks (as uint8)
UNALIGNED = {"H", "GROUP", "block_q", "block_k"}
UNIT_STRIDES = {"stride_mn"}  # attention._mask_args gives every mask a unit key stride
NORM_KINDS = ("norm_fwd", "norm_fwd_jvp", "norm_bwd", "norm_finish")
NORM_CASES = (("layer", True, 4096, 1), ("rms", True, 4096, 1), ("rms", False, 4096, 1), ("group", False, 4096, 32))
NORM_C = (1152, 4096)
NO_DOT = ("bwd_delta",) + NORM_KINDS
SHARED_LIMIT = {80: 166912, 90: 232448}  # max shared memory per block (A100, H100)
SM_LIMITS = {80: dict(regs=65536, warps=64, blocks=32, smem=167936),  # per SM (A100, H100; CUDA guide)
             90: dict(regs=65536, warps=64, blocks=32, smem=233472)}
# Groups (kernel, block_d, dtype; None = every dtype) whose shipped configs may spill, and why. Any
# other spilling shipped config fails the report (exit 1).
DOCUMENTED_SPILLS = {
    ("jvp", 256, None): "head dim 256, pass 2 of forward + JVP: q and tq (BLOCK_M x 256, 16-bit) and the "
                        "fp32 t_acc alone take 128 + 64 registers a thread at 64 rows and 8 warps "
                        "(NOTES.md section 20: measured bytes, and the value-dim split left to do)",
    ("fwd_jvp", 128, "fp32"): "fp32 tiles: twice the registers of fp16 at the same tile",
    ("jvp", 128, "fp32"): "fp32 tiles: twice the registers of fp16 at the same tile",
    ("bwd_dkdv+aligned", 64, None): "block-sparse walk on sm_80, 64x32 w8 s2: 8 B, the live-tile count and "
                                    "entry pointers beside 128 registers (NOTES.md section 26)",
    ("bwd_dkdv+aligned", 128, None): "block-sparse walk on sm_80, 32x64 w8 s1: 8 B at 255 registers "
                                     "(NOTES.md section 26)",
}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
COLUMNS = ("kernel", "target", "dtype", "block_d", "config", "regs", "spill", "smem", "occupancy", "tc", "time")


def configs(kind, block_d, dtype, arch):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) list; the delta kernel has one launch (no BLOCK_N)."""
    if kind == "bwd_delta":
        return [(aj.delta_block_m(block_d), None, 4, 3)]
    return aj.configs(kind, block_d, DTYPES[dtype], arch)


def _arg_type(name, dtype):
    if name == "tau":
        return "fp32"
    if name in INT_ARGS or name.startswith("stride"):
        return "i32"
    if name in INT32_PTRS:
        return "*i32"
    if name in INT8_PTRS:
        return "*i8"
    return "*fp32" if name in FP32_PTRS else "*" + dtype


def _source(kind, dtype, block_d, block_m, block_n, blocks=None):
    fn = KERNELS[kind]
    flags = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_d, HAS_MASK=True,
                 MASK_IS_BOOL=False, IS_CAUSAL=True, BOTTOM_RIGHT=False, HAS_TANGENT=kind == "fwd_jvp",
                 PDS_FP32=dtype == "fp16", UPCAST=False, INPUT_PRECISION="tf32", S_AS_FWD=False,
                 STORE_MAX=kind == "fwd" and aj.two_pass(block_d), HAS_BLOCKS=bool(blocks),
                 BLOCK_KEYS=blocks == "unaligned")
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", flags[p.name]
        elif p.name in UNIT_STRIDES:  # the launchers pass unit strides there; the JIT specializes 1
            signature[p.name], constexprs[p.name] = "constexpr", 1
        else:
            signature[p.name] = _arg_type(p.name, dtype)
            if p.name not in UNALIGNED and signature[p.name] != "fp32":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _resource_usage(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


def compile_config(kind, dtype, block_d, cfg, arch, blocks=None):
    """One report row: resources of `kind` (blocks "aligned" / "unaligned": its block-sparse variant,
    kernel `kind+aligned` / `kind+unaligned`) compiled for sm_`arch`, or an `error` entry."""
    block_m, block_n, num_warps, num_stages = cfg
    variant = f"+{blocks}" if blocks and kind != "bwd_delta" else ""
    row = dict(kernel=kind + variant, target=f"sm_{arch}", dtype=dtype,
               block_d=block_d, block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    start = time.perf_counter()
    try:
        k = triton.compile(_source(kind, dtype, block_d, block_m, block_n, blocks), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        usage = _resource_usage(k.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - a failing config is a report row, not a crash
        cause = e.__cause__ or e  # a CompilationError's message is the source excerpt
        return dict(row, error=f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:200]}")
    ptx = k.asm["ptx"]
    tc = [name for name, pat in (("wgmma", r"\bwgmma\.mma_async"), ("mma", r"\bmma\.sync")) if re.search(pat, ptx)]
    return dict(row, regs=usage["REG"], spill=usage["STACK"] + usage["LOCAL"], smem=k.metadata.shared,
                smem_ok=k.metadata.shared <= SHARED_LIMIT[arch], tc="+".join(tc) or "-",
                **occupancy(usage["REG"], num_warps, k.metadata.shared, arch),
                time=round(time.perf_counter() - start, 2))


def occupancy(regs, num_warps, smem, arch):
    """Blocks (and warps) resident per SM, and the limiting resource: registers (allocated per warp
    in units of 256, i.e. per thread rounded up to 8), shared memory (+1 KiB the driver reserves per
    block), warps or blocks."""
    lim = SM_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by = dict(regs=lim["regs"] // (per_warp * num_warps), smem=lim["smem"] // (smem + 1024),
              warps=lim["warps"] // num_warps, blocks=lim["blocks"])
    limit = min(by, key=by.get)
    return dict(blocks_per_sm=by[limit], warps_per_sm=by[limit] * num_warps, occupancy_limit=limit)


def spill_exception(row):
    """The DOCUMENTED_SPILLS reason for `row`'s group, or None."""
    for kernel in dict.fromkeys((row["kernel"], row["kernel"].split("+")[0])):  # a variant's own, then its kind's
        for dtype in (row["dtype"], None):
            reason = DOCUMENTED_SPILLS.get((kernel, row["block_d"], dtype))
            if reason:
                return reason
    return None


# ---- adaptive-norm kernels -----------------------------------------------------------------
NORM_INT_ARGS = {"R", "C", "G", "tiles_per_prog", "P"}
NORM_FP32_PTRS = {"Mean", "Rstd", "Part", "Acc"}
NORM_UNALIGNED = {"G", "tiles_per_prog", "P"}


def norm_configs(kind, dtype, channels):
    """(kernel, constexprs, num_warps, label) of `kind` for C = channels, for every case of NORM_CASES
    (norm_finish: one, it does not depend on the case)."""
    if kind == "norm_finish":
        block_c, warps = an.finish_config(channels)
        return [(an._adanorm_bwd_finish_kernel, dict(BLOCK_C=block_c, HAS_W=True, HAS_B=True), warps,
                 f"C{block_c} w{warps}")]
    sub = kind[len("norm_"):]
    rows = []
    for norm, channels_last, R, G in NORM_CASES:
        layout = "cl" if channels_last else "cf"
        flags = dict(CHANNELS_LAST=channels_last, HAS_W=True, HAS_B=True, HAS_TANGENT=sub == "fwd_jvp", INT64=False)
        if norm == "group":
            block_r, block_c, warps = an.group_config(channels // G, R, sub)
            flags.update(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_PN=an.pnorm_block(channels))
            fn = an._adanorm_group_bwd_kernel if sub == "bwd" else an._adanorm_group_fwd_kernel
            label = f"group{G} {layout} {block_r}x{block_c}"
        else:
            block_r, block_c, single, warps = an.row_config(channels, R, DTYPES[dtype].itemsize, channels_last, sub)
            flags.update(BLOCK_R=block_r, BLOCK_C=block_c, SINGLE=single, IS_RMS=norm == "rms")
            fn = an._adanorm_row_bwd_kernel if sub == "bwd" else an._adanorm_row_fwd_kernel
            label = f"{norm} {layout} {block_r}x{block_c}{'' if single else ' chunk'}"
        rows.append((fn, flags, warps, f"{label} w{warps}"))
    return rows


def _norm_source(fn, dtype, flags):
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", flags.get(p.name, False)
        else:
            if p.name == "eps":
                signature[p.name] = "fp32"
            elif p.name in NORM_INT_ARGS:
                signature[p.name] = "i32"
            else:
                signature[p.name] = "*fp32" if p.name in NORM_FP32_PTRS else "*" + dtype
            if p.name not in NORM_UNALIGNED and signature[p.name] != "fp32":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_norm_config(kind, dtype, channels, cfg, arch):
    """One report row of an adaptive-norm kernel (num_stages: Triton's default, as the launchers)."""
    fn, flags, num_warps, label = cfg
    row = dict(kernel=kind, target=f"sm_{arch}", dtype=dtype, block_d=channels, config=label,
               num_warps=num_warps)
    start = time.perf_counter()
    try:
        k = triton.compile(_norm_source(fn, dtype, flags), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=num_warps))
        usage = _resource_usage(k.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - a failing config is a report row, not a crash
        cause = e.__cause__ or e
        return dict(row, error=f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:200]}")
    return dict(row, regs=usage["REG"], spill=usage["STACK"] + usage["LOCAL"], smem=k.metadata.shared,
                smem_ok=k.metadata.shared <= SHARED_LIMIT[arch], tc="-",
                **occupancy(usage["REG"], num_warps, k.metadata.shared, arch),
                time=round(time.perf_counter() - start, 2))


def report(kinds=KINDS, dtypes=("fp16", "bf16"), archs=(80, 90), block_ds=(64, 128, 256),
           defaults_only=False, norm_cs=NORM_C, blocks=None):
    """Rows for every kind x arch x dtype x BLOCK_D x config (only the first config if defaults_only;
    blocks: the block-sparse variants); norm kinds: kind x arch x dtype x C (norm_cs) x case."""
    if not isinstance(aj._attn_fwd_kernel, triton.runtime.JITFunction):  # TRITON_INTERPRET=1
        return _report_subprocess(kinds, dtypes, archs, block_ds, defaults_only, norm_cs, blocks)
    if blocks:  # only the attention kernels that walk tiles have block-sparse variants
        kinds = [k for k in kinds if k in KINDS and k != "bwd_delta"]
    with triton.knobs.compilation.scope():
        triton.knobs.compilation.always_compile = True  # time real compiles, not cache hits
        rows = [compile_config(kind, dtype, block_d, cfg, arch, blocks)
                for kind in kinds if kind not in NORM_KINDS for arch in archs for dtype in dtypes
                for block_d in block_ds for cfg in configs(kind, block_d, dtype, arch)[:1 if defaults_only else None]]
        return rows + [compile_norm_config(kind, dtype, channels, cfg, arch)
                       for kind in kinds if kind in NORM_KINDS for arch in archs for dtype in dtypes
                       for channels in norm_cs for cfg in norm_configs(kind, dtype, channels)]


def _report_subprocess(kinds, dtypes, archs, block_ds, defaults_only, norm_cs=NORM_C, blocks=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, __file__, "--json", path, "--kinds", ",".join(kinds),
               "--dtypes", ",".join(dtypes), "--arch", ",".join(map(str, archs)),
               "--block-d", ",".join(map(str, block_ds)),
               "--norm-c", ",".join(map(str, norm_cs))] + ["--defaults-only"] * defaults_only
        cmd += ["--blocks", blocks] if blocks else []
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
        with open(path) as f:
            return json.load(f)


def _cells(row):
    cfg = row.get("config") or f"{row['block_m']}x{row['block_n'] or '-'} w{row['num_warps']} s{row['num_stages']}"
    head = [row["kernel"], row["target"], row["dtype"], str(row["block_d"]), cfg]
    if "error" in row:
        return head + ["ERROR", "", "", "", "", "", row["error"]]
    smem = f"{row['smem']}{'' if row['smem_ok'] else '!'}"
    occ = f"{row['blocks_per_sm']}x{row['num_warps']}w {row['occupancy_limit']}"
    spill = f"{row['spill']}{'*' if row['spill'] and spill_exception(row) else ''}"
    return head + [str(row["regs"]), spill, smem, occ, row["tc"], f"{row['time']:.1f}"]


def print_table(rows):
    lines = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    for line in lines:  # an error message follows the last column
        print("  ".join([c.ljust(w) for c, w in zip(line, widths)] + line[len(COLUMNS):]).rstrip())


def _csv(cast=str):
    return lambda s: [cast(x) for x in s.split(",")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", type=_csv(), default=list(KINDS + NORM_KINDS))
    ap.add_argument("--dtypes", type=_csv(), default=["fp16", "bf16"], help="of fp16, bf16, fp32")
    ap.add_argument("--arch", type=_csv(int), default=[80, 90])
    ap.add_argument("--block-d", type=_csv(int), default=[64, 128, 256])
    ap.add_argument("--norm-c", type=_csv(int), default=list(NORM_C), help="channels C of the norm kernels")
    ap.add_argument("--defaults-only", action="store_true", help="only the first config of each list")
    ap.add_argument("--blocks", choices=["aligned", "unaligned"],
                    help="compile the attention kernels' block-sparse variants instead of the dense ones: aligned "
                         "(blocks a multiple of the tile, e.g. flex's 128: tiles skipped, no key check) or unaligned "
                         "(BLOCK_KEYS: keys of partly live tiles checked)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON instead of a table")
    args = ap.parse_args()
    unknown = set(args.kinds) - set(KINDS + NORM_KINDS)
    if unknown:
        ap.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS + NORM_KINDS)}")
    rows = report(args.kinds, args.dtypes, args.arch, args.block_d, args.defaults_only, args.norm_c, args.blocks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    else:
        print_table(rows)
    ok = [r for r in rows if "error" not in r]
    spills = [r for r in ok if r["spill"] > 0]
    documented = [r for r in spills if spill_exception(r)]
    print(f"{len(ok)}/{len(rows)} configs compiled in {sum(r['time'] for r in ok):.0f} s: "
          f"{len(spills)} spill ({len(documented)} in the documented groups, marked *), "
          f"{sum(not r['smem_ok'] for r in ok)} over the shared-memory limit, "
          f"{sum(r['tc'] == '-' and r['kernel'] not in NO_DOT for r in ok)} "
          f"without tensor-core instructions ({'/'.join(NO_DOT)} not counted: no dot), "
          f"{len(rows) - len(ok)} failed")
    bad = failures(rows)
    for row, why in bad:
        print(f"FAIL {' '.join(_cells(row)[:5])}: {why}")
    sys.exit(1 if bad else 0)


def failures(rows):
    """(row, why) for every shipped config that fails to compile, spills outside DOCUMENTED_SPILLS,
    exceeds the shared memory of its target or, for a kernel with dots, has no tensor-core instruction."""
    out = []
    for r in rows:
        if "error" in r:
            out.append((r, r["error"]))
        elif r["spill"] > 0 and not spill_exception(r):
            out.append((r, f"spills {r['spill']} bytes a thread (not a documented exception)"))
        elif not r["smem_ok"]:
            out.append((r, f"needs {r['smem']} bytes of shared memory, more than sm_{r['target'][3:]} has"))
        elif r["tc"] == "-" and r["kernel"] not in NO_DOT:
            out.append((r, "no tensor-core instruction"))
    return out


if __name__ == "__main__":
    main()
