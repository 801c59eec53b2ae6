"""Evidence: sCM's claims [P §9] reproduced on the embedded digits, on a CPU, with one command.

    python experiments/reproduce.py [--out docs] [--runs-dir runs/reproduce] [--seeds 0,1,2] [--jobs 2]
                                      [--quick] [--runs teacher,scd]

Trains every configuration once per training seed, as `python -m scm_fast.train` with explicit flags:
- a TrigFlow diffusion teacher (digits-teacher);
- sCD from it (digits-scd), sCT initialised from it (digits-sct-ft) and sCT from scratch (digits-sct);
  the students of seed s start from the teacher of seed s;
- the ablations, on sCT from scratch: tangent normalization off, tangent warmup off, both off; fp16
  (autocast + loss scaling) with the JVP rearrangement and with the naive tangent (dxdt / sigma_d, 1).
A job is one (configuration, seed): train, then score every checkpoint's EMA (and the step-0 weights)
with the trainer's own protocol (teacher: Heun, 18 steps = NFE 35, CFG 1.5; students: 1 and 2 steps
[P §5.2]; n images with cycling labels, sampling seed = training seed + 1) by eval.evaluate (Frechet
distance, precision, recall in the digits classifier's features). The final checkpoint is also scored
with its raw weights and over a sweep of the 2-step sampler's t_mid (students). The fp16 runs'
checkpoints are probed with objectives.scm_loss in fp16 (both tangent parametrisations on the same
weights, times and noise), counting non-finite tangent entries and the error of ||g|| against fp32.
`--jobs` jobs run side by side with `--threads` torch threads each (default: one per core: this small
network gains more from two processes than from two threads), respecting the teacher dependency.

Writes OUT/results.md, OUT/results.json and OUT/results/*.png (reproduce_report.py), with
RUNS_DIR/summary.json. Resumable: a finished job is not trained again, an unfinished one resumes from
its newest checkpoint, scores are cached in RUNS_DIR/<run>-s<seed>/scores.json.
`--quick` runs the same pipeline tiny (defaults: RUNS_DIR runs/reproduce-quick, OUT RUNS_DIR/docs).
Needs matplotlib (`pip install matplotlib`) for the plots. An experiment, not part of the package:
it drives the trainer's command line and reads runs with the package's public pieces (scm_fast.runs,
scm_fast.sample, scm_fast.train.build / evaluate, scm_fast.eval).
"""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scm_fast import checkpoint, config, data, objectives, runs, sample, trigflow
from scm_fast import eval as sfeval
from scm_fast.models import build_network
from scm_fast.precision import autocast
from scm_fast.train import NonFiniteStop
from scm_fast.train.build import init_weights
from scm_fast.train.evaluate import sample_settings

SEEDS = (0, 1, 2)
T_MIDS = (0.6, 0.8, 1.0, 1.1, 1.2, 1.3, 1.4)  # the 2-step sampler's intermediate times swept


@dataclass(frozen=True)
class Run:
    """One configuration, trained once per seed: its name, trainer preset and extra flags.
    source: 'teacher' (sCD: --teacher the teacher of the same seed) or 'init' (--init it)."""
    name: str
    label: str
    preset: str
    kimg: float
    ckpt_kimg: float
    flags: tuple = ()
    source: str = ""
    group: str = "main"           # main | tangent | fp16 (which table and plot)
    knobs: dict = field(default_factory=dict, compare=False)

    @property
    def depends_on(self):
        return "teacher" if self.source else None


def plan(quick=False):
    """The configurations, in training order. The ablations checkpoint at the sCT run's kimg, so
    their curves compare point by point."""
    if quick:
        teacher_kimg, student_kimg, sct_kimg, abl_kimg, fp16_kimg, per = 12.8, 6.4, 12.8, 6.4, 3.2, 2
    else:  # fp16 matmuls are ~25x slower than fp32 on a CPU without AVX512-FP16: its ablation is short
        teacher_kimg, student_kimg, sct_kimg, abl_kimg, fp16_kimg, per = 100.0, 40.0, 100.0, 40.0, 6.4, 5
    sct = dict(tnorm="l2", warmup=_preset("digits-sct").tangent_warmup, precision="fp32", jvp="rearranged")
    sct_ckpt = sct_kimg / per

    def ablation(name, label, flags, group, **knobs):
        kimg = fp16_kimg if group == "fp16" else abl_kimg
        ckpt = kimg / 4 if group == "fp16" else (sct_ckpt if not quick else kimg)
        return Run(name, label, "digits-sct", kimg, ckpt, flags, group=group, knobs={**sct, **knobs})
    return [
        Run("teacher", "TrigFlow teacher", "digits-teacher", teacher_kimg, teacher_kimg / per),
        Run("scd", "sCD (from the teacher)", "digits-scd", student_kimg, student_kimg / per, source="teacher"),
        Run("sct-init", "sCT (from the teacher)", "digits-sct-ft", student_kimg, student_kimg / per, source="init"),
        Run("sct", "sCT (from scratch)", "digits-sct", sct_kimg, sct_ckpt, knobs=sct),
        ablation("sct-no-tnorm", "sCT, no tangent normalization", ("--tangent-norm", "none"), "tangent",
                 tnorm="none"),
        ablation("sct-no-warmup", "sCT, no tangent warmup", ("--tangent-warmup", "0"), "tangent", warmup=0),
        ablation("sct-no-tnorm-no-warmup", "sCT, neither", ("--tangent-norm", "none", "--tangent-warmup", "0"),
                 "tangent", tnorm="none", warmup=0),
        ablation("sct-fp16", "sCT fp16, JVP rearrangement", ("--precision", "fp16"), "fp16", precision="fp16"),
        ablation("sct-fp16-naive", "sCT fp16, naive tangent", ("--precision", "fp16", "--no-rearranged-jvp"),
                 "fp16", precision="fp16", jvp="naive"),
    ]


def _preset(name):
    return config.resolve(name, for_run=False)


# ---- jobs: (configuration, seed) ---------------------------------------------------------------
def job_dir(runs_dir, run, seed):
    return Path(runs_dir) / f"{run.name}-s{seed}"


def train_args(run, seed, runs_dir, threads):
    """The trainer's command-line flags for one job (all explicit)."""
    keep = math.ceil(run.kimg / run.ckpt_kimg) + 2
    args = ["--preset", run.preset, "--run-dir", str(job_dir(runs_dir, run, seed)), "--seed", str(seed),
            "--total-kimg", f"{run.kimg:g}", "--ckpt-every-kimg", f"{run.ckpt_kimg:g}", "--keep-ckpts", str(keep),
            "--sample-every-kimg", "0", "--eval-n", "0", "--no-progress", "--no-tensorboard",
            "--threads", str(threads)]
    teacher = str(Path(runs_dir) / f"teacher-s{seed}")
    if run.source == "teacher":
        args += ["--teacher", teacher]
    elif run.source == "init":
        args += ["--init", teacher]
    return args + list(run.flags)


def is_trained(run, seed, runs_dir):
    """The newest good checkpoint is the last step and the final grids exist, or the trainer
    stopped the job for non-finite steps (a result of the ablation, recorded in stopped.json)."""
    d = job_dir(runs_dir, run, seed)
    if (d / "stopped.json").exists():
        return True
    last = checkpoint.latest(d / runs.CHECKPOINTS, log=None)
    steps = config.steps_for(run.kimg, _preset(run.preset).batch)
    return last is not None and checkpoint.step_of(last) >= steps and any((d / "samples").glob("final-*.png"))


def train(run, seed, runs_dir, threads, log=print):
    """The trainer on one job (it resumes by itself) -> wall seconds. A job the trainer stops for
    non-finite steps is recorded in stopped.json, not raised."""
    d = job_dir(runs_dir, run, seed)
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "scm_fast.train", *train_args(run, seed, runs_dir, threads)]
    log(f"{d.name}: training {run.kimg:g} kimg")
    t0 = time.time()
    with open(d / "trainer.out", "a") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        if rc != NonFiniteStop.exit_code:
            raise SystemExit(f"{d.name}: the trainer failed (exit {rc}); see {d / 'trainer.out'}")
        reason = (d / "trainer.out").read_text().splitlines()[-1]  # the trainer's last words: its message
        (d / "stopped.json").write_text(json.dumps({"reason": reason}))
        log(f"{d.name}: stopped by the trainer: {reason}")
    return time.time() - t0


# ---- scoring ------------------------------------------------------------------------------------
def fd_scores(net, cfg, shape, num_classes, n, settings, times=None):
    """{setting: {fd, precision, recall}} of n samples (labels 0..K-1 cycling, sampling seed
    cfg.seed + 1: the trainer's final-eval protocol) against all 1797 digits; NaN when a sample is
    non-finite (a diverged network)."""
    labels = sample.class_labels(n, num_classes)
    out = {}
    for name, steps in settings:
        x = sample.generate(net, cfg, shape, n, steps, labels=labels, times=times, seed=cfg.seed + 1)
        if not torch.isfinite(x).all():
            out[name] = {"fd": math.nan, "precision": math.nan, "recall": math.nan}
            continue
        r = sfeval.evaluate(x.clamp(-1, 1), reference="digits")
        out[name] = {k: r[k] for k in ("fd", "precision", "recall")}
    return out


def settings_of(cfg):
    return sample_settings(cfg.objective)


def initial_network(run_dir, shape, num_classes):
    """The network before step 1, as the trainer builds it: seeded init, then (sCD, --init) the
    source run's EMA weights with the guidance embedding's output layer zeroed."""
    cfg = config.from_dict(json.loads((run_dir / "config.json").read_text()))
    torch.manual_seed(cfg.seed)
    net = build_network(cfg, shape, num_classes)
    init_weights(net, cfg, None, "cpu", log=lambda _msg: None)
    return net.eval().requires_grad_(False), cfg


class ScoreCache:
    """RUN_DIR/scores.json: {key: value}, written after every new entry (resumable)."""

    def __init__(self, run_dir, n):
        self.path = Path(run_dir) / "scores.json"
        found = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data = found if found.get("n") == n else {"n": n}

    def get(self, key, compute):
        if key not in self.data:
            self.data[key] = compute()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)
        return self.data[key]


def score_job(run, seed, runs_dir, n, log=print):
    """{curve, final_raw, t_mid_sweep, probe, train_stats} of one trained job (cached)."""
    d = job_dir(runs_dir, run, seed)
    cache = ScoreCache(d, n)
    ckpts = checkpoint.list_checkpoints(d / runs.CHECKPOINTS)
    meta = checkpoint.read_object(ckpts[0], runs.META)
    shape, K = tuple(meta["shape"]), meta["num_classes"]
    curve = []
    for step, ckpt in [(0, None)] + [(checkpoint.step_of(c), c) for c in ckpts]:
        curve.append(cache.get(f"curve:{step}", lambda: _curve_point(d, ckpt, shape, K, n)))
    log(f"{d.name}: final " + ", ".join(f"{k} FD {v['fd']:.1f}" for k, v in curve[-1]["scores"].items()))
    last = ckpts[-1]
    out = {"curve": curve, "train_stats": training_stats(d)}
    if run.preset != "digits-teacher":  # (the teacher's Heun sampler costs 70 evaluations per image)
        out["final_raw"] = cache.get("final_raw", lambda: _final_scores(last, shape, K, n, ema="none"))
        out["t_mid_sweep"] = cache.get("t_mid_sweep", lambda: t_mid_sweep(last, shape, K, n))
    if run.group == "fp16":
        out["probe"] = {c.name: cache.get(f"probe:{c.name}", lambda c=c: tangent_probe(c, seed=seed)) for c in ckpts}
    return out


def _curve_point(run_dir, ckpt, shape, K, n):
    if ckpt is None:
        net, cfg = initial_network(run_dir, shape, K)
        kimg, step = 0.0, 0
    else:
        net, cfg, m = runs.load_run(ckpt)
        kimg, step = m["cur_nimg"] / 1000, m["step"]
    return {"step": step, "kimg": kimg, "scores": fd_scores(net, cfg, shape, K, n, settings_of(cfg))}


def _final_scores(ckpt, shape, K, n, ema):
    net, cfg, _ = runs.load_run(ckpt, ema=ema)
    return fd_scores(net, cfg, shape, K, n, settings_of(cfg))


def t_mid_sweep(ckpt, shape, K, n):
    """{t_mid: FD} of the 2-step sampler (t_max(sigma_d), t_mid) on a checkpoint's EMA."""
    net, cfg, _ = runs.load_run(ckpt)
    tmax = trigflow.t_max(cfg.sigma_d)
    return {f"{t:g}": fd_scores(net, cfg, shape, K, n, (("2step", 2),), times=(tmax, t))["2step"]["fd"]
            for t in T_MIDS}


def training_stats(run_dir):
    """From stats.jsonl: skipped steps, final loss scale, median images/s, logged non-finite
    tangents, and whether the trainer stopped the job."""
    path = Path(run_dir) / "stats.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    stopped = Path(run_dir) / "stopped.json"
    last = recs[-1] if recs else {}
    speeds = sorted(r["images_per_s"] for r in recs[1:] or recs)
    return {"skipped": last.get("skipped"), "loss_scale": last.get("loss_scale"),
            "nonfinite_tangent": last.get("nonfinite_tangent"), "kimg": last.get("kimg"),
            "images_per_s": speeds[len(speeds) // 2] if speeds else None,
            "stopped": json.loads(stopped.read_text())["reason"] if stopped.exists() else None}


# ---- the fp16 tangent probe ---------------------------------------------------------------------
def tangent_probe(ckpt, batches=4, batch=128, seed=0):
    """Non-finite tangent entries and the error of ||g|| (fp16 vs fp32) of objectives.scm_loss on a
    checkpoint's training weights, for the naive tangent and the JVP rearrangement on the same x0,
    t and noise. Returns {naive|rearranged: {nonfinite, entries, g_rel_err_median, g_rel_err_max}}."""
    net, cfg, _ = runs.load_run(ckpt, ema="none")
    ds = data.digits()
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:batches * batch]
    out = {}
    for jvp in ("naive", "rearranged"):
        scm = dataclasses.replace(config.scm_config(cfg), tangent_warmup=0, rearranged_jvp=jvp == "rearranged",
                                  one_pass=False)
        nonfinite, errs = 0, []
        for b in range(batches):
            x0, labels = ds.get_batch(idx[b * batch:(b + 1) * batch])
            s16, s32 = (_probe_stats(net, scm, x0, labels, precision, seed + b) for precision in ("fp16", "fp32"))
            nonfinite += int(s16["nonfinite_tangent"])
            errs.append(((s16["g_norm"] - s32["g_norm"]).abs() / s32["g_norm"]).nan_to_num(float("inf")))
        errs = torch.cat(errs)
        out[jvp] = {"nonfinite": nonfinite, "entries": batches * batch * x0[0].numel(),
                    "g_rel_err_median": errs.median().item(), "g_rel_err_max": errs.max().item()}
    return out


def _probe_stats(net, scm, x0, labels, precision, seed):
    """scm_loss's stats with the network under the autocast of --precision `precision`."""
    def F(x_in, t, **c):
        with autocast("cpu", precision):
            return net(x_in, t, **c)
    _, stats = objectives.scm_loss(F, x0, 10 ** 9, scm, {"labels": labels},
                                   generator=torch.Generator().manual_seed(seed))
    return stats


# ---- the job runner -------------------------------------------------------------------------------
def run_job(run, seed, args, log=print):
    """Train (unless finished) and score one job; writes RUN_DIR/job.json -> its summary."""
    path = job_dir(args.runs_dir, run, seed) / "job.json"
    seconds = json.loads(path.read_text())["train_s"] if path.exists() else 0.0  # earlier invocations'
    if not is_trained(run, seed, args.runs_dir):
        seconds += train(run, seed, args.runs_dir, args.threads, log)
    t0 = time.time()
    result = score_job(run, seed, args.runs_dir, args.n, log)
    result.update(seed=seed, run_dir=str(job_dir(args.runs_dir, run, seed)), train_s=seconds, score_s=time.time() - t0,
                  trainer_flags=" ".join(train_args(run, seed, args.runs_dir, args.threads)))
    path.write_text(json.dumps(result, indent=1))
    return result


def schedule(jobs, args, log):
    """Run `python experiments/reproduce.py --job NAME:SEED` subprocesses, args.jobs at a time; a
    student starts once the teacher of its seed has finished. Returns the jobs that failed."""
    pending, running, done, failed = list(jobs), {}, set(), []
    while pending or running:
        for job in list(pending):
            if len(running) < args.jobs and _ready(job, done):
                pending.remove(job)
                running[job] = _spawn(job, args)
        time.sleep(0.5)
        for job, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[job]
            (done.add if proc.returncode == 0 else failed.append)(job)
            log(f"{job[0].name}-s{job[1]}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}"
                f" ({len(done)} of {len(jobs)})")
        if failed:  # dependants of a failed teacher would only fail too
            pending = [j for j in pending if (j[0].depends_on, j[1]) not in {(f[0].name, f[1]) for f in failed}]
    return failed


def _ready(job, done):
    run, seed = job
    if run.depends_on is None:
        return True
    return any(r.name == run.depends_on and s == seed for r, s in done)


def _spawn(job, args):
    run, seed = job
    d = job_dir(args.runs_dir, run, seed)
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", f"{run.name}:{seed}", "--runs-dir",
           str(args.runs_dir), "--threads", str(args.threads), "--n", str(args.n)] + (["--quick"] if args.quick else [])
    out = open(d / "job.out", "a")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


# ---- command line ---------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python experiments/reproduce.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="where results.md, results.json and results/ go (default docs; "
                                               "--quick: RUNS_DIR/docs)")
    p.add_argument("--runs-dir", default=None, help="run directories (default runs/reproduce; --quick: "
                                                    "runs/reproduce-quick)")
    p.add_argument("--quick", action="store_true", help="a tiny version of the whole job (a few minutes)")
    p.add_argument("--seeds", default=None, help="training seeds, comma-separated (default 0,1,2; --quick: 0)")
    p.add_argument("--runs", default=None, help="only these configurations, comma-separated (default: all; "
                                                "students bring their teacher)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="jobs side by side (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (default: %(default)s)")
    p.add_argument("--n", type=int, default=None, help="samples per FD (default 1000; --quick: 500)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # NAME:SEED, run by the scheduler
    args = p.parse_args(argv)
    args.runs_dir = Path(args.runs_dir or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    args.out = Path(args.out or (args.runs_dir / "docs" if args.quick else "docs"))
    args.n = args.n or (500 if args.quick else 1000)
    try:
        args.seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else ((0,) if args.quick else SEEDS)
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    runs = {r.name: r for r in plan(args.quick)}
    wanted = args.runs.split(",") if args.runs else list(runs)
    unknown = [w for w in wanted if w not in runs]
    if unknown:
        p.error(f"--runs: unknown {unknown}; expected some of {', '.join(runs)}")
    wanted += [runs[w].depends_on for w in wanted if runs[w].depends_on and runs[w].depends_on not in wanted]
    args.plan = [r for r in runs.values() if r.name in wanted]
    if args.jobs < 1 or args.threads < 1 or args.n < 10:
        p.error(f"--jobs and --threads must be >= 1 and --n >= 10; got {args.jobs}, {args.threads}, {args.n}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.job:
        name, seed = args.job.split(":")
        torch.set_num_threads(args.threads)
        run_job(next(r for r in args.plan if r.name == name), int(seed), args, log=_log)
        return None
    import reproduce_report as report  # (beside this file: the script's directory is on sys.path)
    t0, load_start, started = time.time(), os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M %Z")
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(r, s) for r in args.plan for s in args.seeds]  # in plan order: teachers first, students next
    _log(f"{len(jobs)} jobs ({len(args.plan)} configurations x seeds {list(args.seeds)}), {args.jobs} at a time, "
         f"{args.threads} thread(s) each")
    failed = schedule(jobs, args, _log)
    if failed:
        raise SystemExit("failed jobs: " + ", ".join(f"{r.name}-s{s} (see {job_dir(args.runs_dir, r, s) / 'job.out'})"
                                                     for r, s in failed))
    summary = report.summarize(args, jobs, started, load_start, wall_s=time.time() - t0)
    report.write_all(summary, args.out)
    (args.runs_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _log(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'} and {args.out / 'results'}/ in "
         f"{(time.time() - t0) / 60:.1f} min")
    return summary


def _log(msg):
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


if __name__ == "__main__":
    main()
