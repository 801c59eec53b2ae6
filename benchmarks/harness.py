"""What the benchmark scripts share: check a case first, then time it, measure its memory, record it.

jvp_attention.py, adaptive_norm.py and train_step.py import this module from their own directory
(each puts it on sys.path, so `python benchmarks/<name>.py` works from the repo root). The case
lists, FLOP / byte counts, tables and the scripts' own JSON stay in the scripts.

A case (run_case):
  1. one call of fn, under a PeakMemory if one is given (the peak extra bytes of that call); its
     duration goes to the timer (e.g. to choose a repetition count);
  2. check(result) -> Check; a failing check returns the record at once: never timed (median None);
  3. timer(fn, first_call_s) -> Timing: time_loop (perf_counter, CUDA synchronize around each call)
     or time_do_bench (triton.testing.do_bench, CUDA); median and quantiles of the samples.
Records (one a case: name, config, check, median, quantiles, memory, metrics) are written to
OUT/<benchmark>.records.json by Records, next to the script's own output; Records.abort writes
them and exits with the failing check's message.
"""
import contextlib
import ctypes
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # max error / max(1, max |exact|)
QUANTILES = (0.2, 0.5, 0.8)
MiB = 2 ** 20


def resolve_device(device):
    """"auto" -> "cuda" if available else "cpu"; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ---- correctness -----------------------------------------------------------------------------
@dataclass
class Check:
    """status: "pass", "fail", "reference" (the case is the others' reference) or "skipped"."""
    status: str
    errors: dict = field(default_factory=dict)  # output name -> max |got - exact|
    bounds: dict = field(default_factory=dict)  # output name -> allowed max error
    message: str = ""

    @property
    def ok(self):
        return self.status != "fail"

    def as_dict(self):
        return {"status": self.status, "errors": self.errors, "bounds": self.bounds, "message": self.message}


def _max_abs(x):
    return x.double().abs().max().item() if torch.is_tensor(x) else abs(float(x))


def _max_error(got, want):
    if torch.is_tensor(got) or torch.is_tensor(want):
        return (torch.as_tensor(got).double() - torch.as_tensor(want).double()).abs().max().item()
    return abs(float(got) - float(want))


def check_close(got, want, tol, names=None, label="", reference="reference"):
    """Check pairs of tensors (or numbers): max |got - want| <= tol x max(1, max |want|) for each.

    Pairs as zip(names, got, want) makes them (names default to "output 0", "output 1", ...); a NaN
    error fails. The message names the first failing output:
    "MISMATCH: {label} {name}: max error E > B vs {reference}"."""
    got, want = list(got), list(want)
    names = list(names) if names is not None else [f"output {i}" for i in range(len(want))]
    errors, bounds, failed = {}, {}, []
    for name, g, w in zip(names, got, want):
        errors[name] = _max_error(g, w)
        bounds[name] = tol * max(1.0, _max_abs(w))
        if not errors[name] <= bounds[name]:
            failed.append(name)
    if not failed:
        return Check("pass", errors, bounds)
    name = failed[0]
    return Check("fail", errors, bounds, f"MISMATCH: {label} {name}: max error {errors[name]:.3e} > "
                                         f"{bounds[name]:.3e} vs {reference}")


# ---- timing ----------------------------------------------------------------------------------
def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def quantile(values, q):
    """The q-quantile of values, linear between order statistics (numpy's and Triton's default)."""
    xs = sorted(values)
    point = q * (len(xs) - 1)
    lo, hi = math.floor(point), math.ceil(point)
    return xs[lo] + (point - lo) * (xs[hi] - xs[lo])


@dataclass
class Timing:
    """Seconds per call: median (statistics.median of the samples), quantiles {"p20": ..., ...}."""
    median: float
    quantiles: dict
    samples: int
    reps: int = None  # repetitions of time_loop; None where the timer chose them (do_bench)
    timer: str = "perf_counter"
    times: list = None  # every sample, where the timer gives them

    @classmethod
    def from_times(cls, times, reps=None, timer="perf_counter"):
        times = list(times)
        return cls(statistics.median(times), {f"p{round(100 * q)}": quantile(times, q) for q in QUANTILES},
                   len(times), reps, timer, times)


def time_loop(fn, reps, device="cpu", warmup=1):
    """`warmup` untimed calls, then `reps` calls timed one by one with time.perf_counter (on CUDA
    with torch.cuda.synchronize before and after each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return Timing.from_times(times, reps)


def time_do_bench(fn):
    """triton.testing.do_bench (CUDA): its own warm-up and repetitions, L2 flushed between calls."""
    import triton.testing
    try:
        ms = triton.testing.do_bench(fn, return_mode="all")  # every sample (Triton >= 3)
    except (AssertionError, TypeError, ValueError):
        ms = None
    if isinstance(ms, (list, tuple)) and len(ms) > 0:
        return Timing.from_times([t / 1e3 for t in ms], timer="triton.testing.do_bench")
    p20, p50, p80 = (t / 1e3 for t in triton.testing.do_bench(fn, quantiles=list(QUANTILES)))  # older Triton
    return Timing(p50, {"p20": p20, "p50": p50, "p80": p80}, samples=None, timer="triton.testing.do_bench")


# ---- memory ----------------------------------------------------------------------------------
def rss_kib(field_name):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field_name}:\s+(\d+) kB", f.read()).group(1))


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


class PeakMemory:
    """Peak memory above what was in use at begin(), until end(), in bytes.

    On CUDA: torch.cuda.max_memory_allocated() - memory_allocated() at begin() (peak stats reset there).
    On CPU, cpu="rss": VmHWM - VmRSS at begin() (the high-water mark reset through
    /proc/self/clear_refs, Linux only); cpu="malloc": the largest glibc mallinfo2 in-use bytes a
    PeakSampler sees during sampling() (or the value at end() without it) - those at begin()."""

    def __init__(self, device, cpu="rss"):
        self.device = device
        if str(device).startswith("cuda"):
            self.method = "cuda_max_memory_allocated"
        else:
            self.method = {"rss": "vmhwm_minus_vmrss", "malloc": "mallinfo2_in_use"}[cpu]
        self._base = self._peak = None

    def begin(self):
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif self.method == "vmhwm_minus_vmrss":
            self._base = rss_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        else:
            self._base, self._peak = malloc_in_use(), None
        return self

    @contextlib.contextmanager
    def sampling(self):
        """Around the calls whose peak counts (cpu="malloc": runs the sampler; otherwise nothing)."""
        if self.method != "mallinfo2_in_use":
            yield
            return
        with PeakSampler() as sampler:
            yield
        self._peak = sampler.peak if self._peak is None else max(self._peak, sampler.peak)

    def end(self):
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self._base
        if self.method == "vmhwm_minus_vmrss":
            return (rss_kib("VmHWM") - self._base) * 1024
        return (malloc_in_use() if self._peak is None else self._peak) - self._base


# ---- a case and its record -------------------------------------------------------------------
@dataclass
class Record:
    name: str
    config: dict
    check: Check
    timing: Timing = None  # None: not timed (failed or skipped)
    memory_bytes: int = None
    memory_method: str = None
    metrics: dict = field(default_factory=dict)  # per benchmark: FLOPs, bytes/s, ...

    @property
    def median(self):
        return None if self.timing is None else self.timing.median

    def as_dict(self):
        t = self.timing
        return {"name": self.name, "config": self.config, "check": self.check.as_dict(),
                "median_s": None if t is None else t.median,
                "quantiles_s": None if t is None else t.quantiles,
                "samples": None if t is None else t.samples, "reps": None if t is None else t.reps,
                "timer": None if t is None else t.timer,
                "peak_extra_bytes": self.memory_bytes, "memory_method": self.memory_method,
                "metrics": self.metrics}


def run_case(name, config, fn, check, timer, memory=None, metrics=None):
    """Call fn once (under `memory`, a PeakMemory, if given), check its result, then time it.

    check(result) -> Check; timer(fn, first_call_seconds) -> Timing. A failing check returns the
    record untimed."""
    start = time.perf_counter()
    if memory is not None:
        memory.begin()
    out = fn()
    extra = memory.end() if memory is not None else None
    first_call_s = time.perf_counter() - start
    result = check(out)
    del out
    record = Record(name, config, result, None, extra, memory.method if memory is not None else None,
                    dict(metrics or {}))
    if result.ok:
        record.timing = timer(fn, first_call_s)
    return record


class Records:
    """The records of one benchmark run, written to OUT/<benchmark>.records.json."""

    def __init__(self, out_dir, benchmark):
        self.benchmark = benchmark
        self.path = os.path.join(out_dir, f"{benchmark}.records.json")
        self.items = []

    def add(self, record):
        """A Record (serialised at write(), so its metrics may still be filled in) or a record dict."""
        self.items.append(record)
        return record

    def write(self, environment=None):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        records = [r.as_dict() if isinstance(r, Record) else r for r in self.items]
        with open(self.path, "w") as f:
            json.dump({"benchmark": self.benchmark, "environment": environment, "records": records}, f, indent=2)
        return self.path

    def abort(self, message, environment=None):
        """Write the records so far (the failing one included) and exit with `message`."""
        self.write(environment)
        sys.exit(message)


# ---- one case in a fresh process -------------------------------------------------------------
def reply(record, payload):
    """Worker side: print the one JSON line run_worker reads (payload plus the record); on a failed
    check exit with its message instead of returning."""
    print(json.dumps({**payload, "record": record.as_dict()}), flush=True)
    if not record.check.ok:
        sys.exit(record.check.message)


def run_worker(script, spec, label, records=None, metrics=None):
    """Run `python script --worker JSON(spec)`; return the payload its last stdout line holds.

    The worker's record (see reply) goes to `records`, with `metrics` added. If the worker fails,
    exit with "{label} failed:" and its stderr (after writing `records`)."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    payload = None
    lines = proc.stdout.strip().splitlines()
    if lines:
        try:
            payload = json.loads(lines[-1])
        except json.JSONDecodeError:
            payload = None
    record = payload.pop("record", None) if isinstance(payload, dict) else None
    if record is not None and records is not None:
        record["metrics"] = {**record.get("metrics", {}), **(metrics or {})}
        records.add(record)
    if proc.returncode != 0 or payload is None:
        message = f"{label} failed:\n{proc.stderr.strip()}"
        if records is not None:
            records.abort(message)
        sys.exit(message)
    return payload


# ---- output ----------------------------------------------------------------------------------
def aligned(head, lines):
    """Rows of strings, right-aligned in columns two spaces apart; head first."""
    widths = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head] + lines)
