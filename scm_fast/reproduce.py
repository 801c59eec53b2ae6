"""Evidence: sCM's claims [P §9] reproduced on the embedded digits, on a CPU, with one command.

    python -m scm_fast.reproduce [--out docs] [--runs-dir runs/reproduce] [--quick] [--threads N]

Trains, as `python -m scm_fast.train` subprocesses with explicit flags and a fixed seed:
- a TrigFlow diffusion teacher (digits-teacher);
- sCD from it (digits-scd), sCT initialised from it (digits-sct --init) and sCT from scratch (digits-sct);
- the ablations, all on sCT from scratch: tangent normalization off, tangent warmup off, both off; and
  fp16 (autocast + loss scaling) with the JVP rearrangement vs the naive tangent (dxdt / sigma_d, 1).
Every checkpoint's EMA (and the step-0 weights) is sampled with the trainer's own protocol (teacher:
Heun, 18 steps = NFE 35, CFG 1.5; students: 1 and 2 steps [P §5.2]; n images with cycling labels,
seed + 1) and scored by eval.evaluate: Frechet distance, precision and recall in the features of
the digits classifier. The fp16 runs' checkpoints are also probed with objectives.scm_loss in fp16,
both tangent parametrisations on the same weights, times and noise, counting non-finite tangent
entries and the error of ||g|| against fp32.

Writes OUT/results.md (tables with the paper's numbers beside ours, the claims that held and those
that did not, the command, wall time and machine), OUT/results/*.png (FD against training images
for each run, the ablations, upscaled copies of the final sample grids) and RUNS_DIR/summary.json.
Resumable: a finished run is not trained again (an unfinished one resumes from its newest
checkpoint), and scores already computed are cached in RUNS_DIR/<run>/curve.json.
`--quick` runs the same pipeline tiny (defaults RUNS_DIR runs/reproduce-quick, OUT RUNS_DIR/docs).
Needs matplotlib (`pip install matplotlib`) for the plots.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scm_fast import checkpoint, config, data, images, objectives, sample
from scm_fast import eval as sfeval

SEED = 0
# [P Tables 1, 2] (scm-reference.md §9): FID; teacher (FID, NFE), students (1 step, 2 steps).
PAPER = {
    "CIFAR-10": {"teacher": (2.15, 35), "sct": (2.85, 2.06), "scd": (3.66, 2.52)},
    "ImageNet 64": {"teacher": (1.38, 63), "sct": (2.04, 1.48), "scd": (2.44, 1.66)},
    "ImageNet 512": {"teacher": (1.73, 126), "sct": (4.29, 3.76), "scd": (2.28, 1.88)},
}
SETTINGS = {"diffusion": (("heun-nfe35", 18),), "student": (("1step", 1), ("2step", 2))}


@dataclass(frozen=True)
class Run:
    """One training run: its directory name under RUNS_DIR, trainer preset and flags.
    source: 'teacher' (sCD: --teacher the teacher run) or 'init' (--init the teacher run)."""
    name: str
    label: str
    preset: str
    kimg: float
    ckpt_kimg: float
    flags: tuple = ()
    source: str = ""
    group: str = "main"           # main | tangent | fp16 (which table and plot)
    knobs: dict = field(default_factory=dict, compare=False)


def plan(quick=False):
    """The runs, in training order. Full: 820 kimg; quick: 70 kimg. The ablations share the sCT
    run's checkpoint times, so their curves compare point by point."""
    main_kimg, student_kimg, abl_kimg = (12.8, 6.4, 6.4) if quick else (100.0, 60.0, 100.0)
    per = 2 if quick else 5       # checkpoints (FD points) per run
    sct = dict(tnorm="l2", warmup=200, precision="fp32", jvp="rearranged")

    def ablation(name, label, flags, group, **knobs):
        return Run(name, label, "digits-sct", abl_kimg, abl_kimg / (1 if quick else per), flags, group=group,
                   knobs={**sct, **knobs})
    return [
        Run("teacher", "TrigFlow teacher", "digits-teacher", main_kimg, main_kimg / per),
        Run("scd", "sCD (from the teacher)", "digits-scd", student_kimg, student_kimg / (per + 1), source="teacher"),
        Run("sct-init", "sCT (init from the teacher)", "digits-sct", student_kimg, student_kimg / (per + 1),
            ("--lr", "5e-4"), source="init"),
        Run("sct", "sCT (from scratch)", "digits-sct", main_kimg, main_kimg / per, knobs=sct),
        ablation("sct-no-tnorm", "sCT, no tangent normalization", ("--tangent-norm", "none"), "tangent",
                 tnorm="none"),
        ablation("sct-no-warmup", "sCT, no tangent warmup", ("--tangent-warmup", "0"), "tangent", warmup=0),
        ablation("sct-no-tnorm-no-warmup", "sCT, neither", ("--tangent-norm", "none", "--tangent-warmup", "0"),
                 "tangent", tnorm="none", warmup=0),
        ablation("sct-fp16", "sCT fp16, JVP rearrangement", ("--precision", "fp16"), "fp16", precision="fp16"),
        ablation("sct-fp16-naive", "sCT fp16, naive tangent", ("--precision", "fp16", "--no-rearranged-jvp"),
                 "fp16", precision="fp16", jvp="naive"),
    ]


# ---- training -----------------------------------------------------------------------------------
def train_args(run, runs_dir, threads):
    """The trainer's command-line flags for a run (all explicit)."""
    keep = math.ceil(run.kimg / run.ckpt_kimg) + 2
    args = ["--preset", run.preset, "--run-dir", str(runs_dir / run.name), "--seed", str(SEED),
            "--total-kimg", f"{run.kimg:g}", "--ckpt-every-kimg", f"{run.ckpt_kimg:g}", "--keep-ckpts", str(keep),
            "--sample-every-kimg", "0", "--eval-n", "0", "--no-progress", "--no-tensorboard",
            "--threads", str(threads)]
    if run.source == "teacher":
        args += ["--teacher", str(runs_dir / "teacher")]
    elif run.source == "init":
        args += ["--init", str(runs_dir / "teacher")]
    return args + list(run.flags)


def total_steps(run):
    batch = config.resolve(run.preset, for_run=False).batch
    return config.steps_for(run.kimg, batch)


def is_finished(run, runs_dir):
    """The run's newest good checkpoint is its last step and the final grids exist, or the trainer
    stopped it for non-finite steps (a result of the ablation, recorded in stopped.json)."""
    run_dir = runs_dir / run.name
    if (run_dir / "stopped.json").exists():
        return True
    last = checkpoint.latest(run_dir / "checkpoints", log=None)
    return (last is not None and checkpoint.step_of(last) >= total_steps(run)
            and any((run_dir / "samples").glob("final-*.png")))


def train(run, runs_dir, threads, log=print):
    """Run the trainer for one run (it resumes by itself); returns the wall seconds. A run the
    trainer stops for non-finite steps is recorded in stopped.json, not raised."""
    run_dir = runs_dir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "scm_fast.train", *train_args(run, runs_dir, threads)]
    log(f"{run.name}: training {run.kimg:g} kimg ({' '.join(cmd[3:])})")
    t0 = time.time()
    with open(run_dir / "trainer.out", "a") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if rc != 0:
        text = (run_dir / "trainer.out").read_text()
        if "non-finite steps in a row" not in text:
            raise SystemExit(f"{run.name}: the trainer failed (exit {rc}); see {run_dir / 'trainer.out'}")
        reason = [line for line in text.splitlines() if "non-finite steps in a row" in line][-1]
        (run_dir / "stopped.json").write_text(json.dumps({"reason": reason}))
        log(f"{run.name}: stopped by the trainer: {reason}")
    log(f"{run.name}: trained in {seconds / 60:.1f} min")
    return seconds


# ---- scoring ------------------------------------------------------------------------------------
def settings(cfg):
    """(name, steps) to sample with: the teacher's Heun NFE 35, the students' 1 and 2 steps."""
    return SETTINGS["diffusion" if cfg.objective == "diffusion" else "student"]


def score(net, cfg, shape, num_classes, n, seed_offset=1):
    """{setting: {fd, precision, recall}} of n samples (labels 0..K-1 cycling, seed cfg.seed + 1:
    the trainer's final-eval protocol) against all 1797 digits; NaN for non-finite samples."""
    labels = sample.class_labels(n, num_classes)
    out = {}
    for name, steps in settings(cfg):
        x = sample.generate(net, cfg, shape, n, steps, labels=labels, seed=cfg.seed + seed_offset)
        if not torch.isfinite(x).all():  # a diverged network: no score
            out[name] = {"fd": float("nan"), "precision": float("nan"), "recall": float("nan")}
            continue
        r = sfeval.evaluate(x.clamp(-1, 1), reference="digits")
        out[name] = {k: r[k] for k in ("fd", "precision", "recall")}
    return out


def initial_network(run_dir, shape, num_classes):
    """The network before step 1, as the trainer builds it: seeded init, then (sCD, --init) the
    source run's EMA weights with the guidance embedding's output layer zeroed."""
    cfg = config.from_dict(json.loads((run_dir / "config.json").read_text()))
    torch.manual_seed(cfg.seed)
    net = sample.build_network(cfg, shape, num_classes)
    source = cfg.init or (cfg.teacher if cfg.objective == "scd" else "")
    if source:
        net.load_state_dict(sample.load_run(source)[0].state_dict(), strict=False)
        guidance = getattr(net, "guidance", None)
        if guidance is not None:
            torch.nn.init.zeros_(guidance.mlp[2].weight)
            torch.nn.init.zeros_(guidance.mlp[2].bias)
    return net.eval().requires_grad_(False), cfg


def curve(run, runs_dir, n, timings, log=print):
    """[{step, kimg, scores}] for step 0 and every checkpoint, cached in RUN_DIR/curve.json."""
    run_dir = runs_dir / run.name
    cache_file = run_dir / "curve.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    cache = cache if cache.get("n") == n else {"n": n, "points": {}}
    ckpts = checkpoint.list_checkpoints(run_dir / "checkpoints")
    meta = checkpoint.read_object(ckpts[0], "meta")
    shape, K = tuple(meta["shape"]), meta["num_classes"]
    for step, ckpt in [(0, None)] + [(checkpoint.step_of(c), c) for c in ckpts]:
        if str(step) in cache["points"]:
            continue
        t0 = time.time()
        if ckpt is None:
            net, cfg = initial_network(run_dir, shape, K)
            kimg = 0.0
        else:
            net, cfg, m = sample.load_run(ckpt)
            kimg = m["cur_nimg"] / 1000
        cache["points"][str(step)] = {"step": step, "kimg": kimg, "scores": score(net, cfg, shape, K, n)}
        cache_file.write_text(json.dumps(cache, indent=1))
        timings.add(f"score:{run.name}", time.time() - t0)
        log(f"{run.name}: scored step {step} ({kimg:g} kimg) in {time.time() - t0:.0f} s: " + fmt_scores(
            cache["points"][str(step)]["scores"]))
    return sorted(cache["points"].values(), key=lambda p: p["step"])


def fmt_scores(scores):
    return ", ".join(f"{k} FD {v['fd']:.1f}" for k, v in scores.items())


def seed_spread(run, runs_dir, n, offsets, timings):
    """FD of the final checkpoint under other sampling seeds (the evaluation's own noise), cached."""
    run_dir = runs_dir / run.name
    cache_file = run_dir / "spread.json"
    key = f"{n}:{','.join(map(str, offsets))}"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if key not in cache:
        t0 = time.time()
        net, cfg, meta = sample.load_run(run_dir)
        per_seed = [score(net, cfg, tuple(meta["shape"]), meta["num_classes"], n, o) for o in offsets]
        cache[key] = {name: [s[name]["fd"] for s in per_seed] for name in per_seed[0]}
        cache_file.write_text(json.dumps(cache, indent=1))
        timings.add(f"score:{run.name}", time.time() - t0)
    return cache[key]


def data_floor(seed=SEED):
    """FD, precision, recall between two random halves of the digits: the best score at this n."""
    x, _ = sfeval.load_digits_images()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    a, b = sfeval.digits_features(x[perm[::2]]), sfeval.digits_features(x[perm[1::2]])
    fd = sfeval.frechet_distance(*sfeval.feature_stats(a), *sfeval.feature_stats(b))
    precision, recall = sfeval.precision_recall(b, a)
    return {"fd": fd, "precision": precision, "recall": recall, "n": len(a)}


# ---- the fp16 tangent probe ---------------------------------------------------------------------
def tangent_probe(ckpt, batches=4, batch=128, seed=SEED):
    """Non-finite tangent entries and the error of ||g|| (fp16 vs fp32) of objectives.scm_loss on a
    checkpoint's training weights, for the naive tangent and the JVP rearrangement on the same x0,
    t and noise. Returns {naive|rearranged: {nonfinite, entries, g_rel_err_median, g_rel_err_max}}."""
    net, cfg, _ = sample.load_run(ckpt, ema="none")
    ds = data.digits()
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:batches * batch]
    out = {}
    for jvp in ("naive", "rearranged"):
        scm = objectives.SCMConfig(sigma_d=cfg.sigma_d, P_mean=cfg.P_mean, P_std=cfg.P_std, tangent_warmup=0,
                                   tangent_norm=cfg.tangent_norm, rearranged_jvp=jvp == "rearranged", one_pass=False)
        nonfinite, errs = 0, []
        for b in range(batches):
            x0, labels = ds.get_batch(idx[b * batch:(b + 1) * batch])
            s16, s32 = (_probe_stats(net, scm, x0, labels, dtype, seed + b) for dtype in (torch.float16, None))
            nonfinite += int(s16["nonfinite_tangent"])
            errs.append(((s16["g_norm"] - s32["g_norm"]).abs() / s32["g_norm"]).nan_to_num(float("inf")))
        errs = torch.cat(errs)
        out[jvp] = {"nonfinite": nonfinite, "entries": batches * batch * x0[0].numel(),
                    "g_rel_err_median": errs.median().item(), "g_rel_err_max": errs.max().item()}
    return out


def _probe_stats(net, scm, x0, labels, dtype, seed):
    """scm_loss's stats with the network under autocast(dtype) (None: fp32)."""
    def F(x_in, t, **c):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            return net(x_in, t, **c)
    _, stats = objectives.scm_loss(F, x0, 10 ** 9, scm, {"labels": labels},
                                   generator=torch.Generator().manual_seed(seed))
    return stats


def probe_run(run, runs_dir, timings, log=print):
    """tangent_probe of every checkpoint of a run, summed (cached in RUN_DIR/probe.json)."""
    run_dir = runs_dir / run.name
    cache_file = run_dir / "probe.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    for ckpt in checkpoint.list_checkpoints(run_dir / "checkpoints"):
        if ckpt.name not in cache:
            t0 = time.time()
            cache[ckpt.name] = tangent_probe(ckpt)
            cache_file.write_text(json.dumps(cache, indent=1))
            timings.add(f"score:{run.name}", time.time() - t0)
    total = {}
    for jvp in ("naive", "rearranged"):
        rows = [c[jvp] for c in cache.values()]
        total[jvp] = {"nonfinite": sum(r["nonfinite"] for r in rows), "entries": sum(r["entries"] for r in rows),
                      "g_rel_err_median": float(np.median([r["g_rel_err_median"] for r in rows])),
                      "g_rel_err_max": max(r["g_rel_err_max"] for r in rows)}
    log(f"{run.name}: fp16 tangent probe over {len(cache)} checkpoints: " + ", ".join(
        f"{k} {v['nonfinite']} non-finite of {v['entries']}" for k, v in total.items()))
    return total


# ---- training logs ------------------------------------------------------------------------------
def training_stats(run, runs_dir):
    """From stats.jsonl: skipped steps, final loss scale, median images/s, logged non-finite
    tangents (when the trainer logs them), and whether the trainer stopped the run."""
    run_dir = runs_dir / run.name
    lines = (run_dir / "stats.jsonl").read_text().splitlines() if (run_dir / "stats.jsonl").exists() else []
    recs = [json.loads(line) for line in lines if line]
    stopped = run_dir / "stopped.json"
    last = recs[-1] if recs else {}
    speed = float(np.median([r["images_per_s"] for r in recs[1:] or recs])) if recs else None
    return {"skipped": last.get("skipped"), "loss_scale": last.get("loss_scale"),
            "nonfinite_tangent": last.get("nonfinite_tangent"), "images_per_s": speed, "kimg": last.get("kimg"),
            "stopped": json.loads(stopped.read_text())["reason"] if stopped.exists() else None}


# ---- outputs ------------------------------------------------------------------------------------
def copy_grids(runs, runs_dir, results_dir, scale=4):
    """Upscaled (nearest, x scale) copies of the main runs' final sample grids -> {run: [file names]}."""
    out = {}
    for run in runs:
        names = []
        for src in sorted((runs_dir / run.name / "samples").glob("final-*.png")):
            grid = images.read_png(src)
            name = f"{run.name}-{src.stem[len('final-'):]}.png"
            images.write_png(results_dir / name, np.kron(grid, np.ones((scale, scale, 1), np.uint8)))
            names.append(name)
        out[run.name] = names
    return out


def _plot_run(ax, points, label, color):
    """FD against kimg of one run: solid for the first sampler (teacher Heun / 1 step), dashed 2 steps."""
    for name, style in zip(points[0]["scores"], ("-o", "--s")):
        ax.plot([p["kimg"] for p in points], [p["scores"][name]["fd"] for p in points], style, color=color,
                label=f"{label}, {name}", ms=3)


def plot_curves(path, groups, floor, title, warmup_kimg):
    """One figure, one panel per (panel title, [(label, points)]), FD on a log axis; a vertical
    line where the students' tangent warmup ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, (panel, runs) in zip(axes[0], groups):
        for i, (label, points) in enumerate(runs):
            _plot_run(ax, points, label, f"C{i}")
        ax.axhline(floor, color="gray", ls=":", label=f"two halves of the data ({floor:.1f})")
        ax.axvline(warmup_kimg, color="gray", ls="-.", lw=0.8, label=f"tangent warmup ends ({warmup_kimg:g} kimg)")
        ax.set(yscale="log", xlabel="training images (kimg)", ylabel="FD (digits-classifier features)",
               title=panel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(summary, results_dir):
    """fd_vs_kimg.png (main runs) and ablations.png (tangent knobs, fp16)."""
    runs, floor = summary["runs"], summary["floor"]["fd"]
    preset = config.resolve("digits-sct", for_run=False)
    warmup = preset.tangent_warmup * preset.batch / 1000

    def group(g):
        return [(r["label"], r["curve"]) for r in runs.values() if r["group"] == g]
    plot_curves(results_dir / "fd_vs_kimg.png", [("teacher and students", group("main"))], floor,
                "FD against training images (n = %d samples per point; students: their own images)" % summary["n"],
                warmup)
    sct = [(runs["sct"]["label"] + " (fp32, both on)", runs["sct"]["curve"])]
    plot_curves(results_dir / "ablations.png", [("tangent normalization / warmup", sct + group("tangent")),
                                                ("fp16: JVP rearrangement vs naive tangent", sct + group("fp16"))],
                floor, "Ablations on sCT from scratch", warmup)


# ---- the summary ----------------------------------------------------------------------------------
def final_scores(r):
    return r["curve"][-1]["scores"]


def fd(summary, run, setting):
    return final_scores(summary["runs"][run])[setting]["fd"]


def compute_fraction(summary, kimg):
    """sCD compute at kimg as a fraction of the teacher's training: images x seconds per image."""
    t, s = summary["runs"]["teacher"], summary["runs"]["scd"]
    return (kimg / t["kimg"]) * (t["train_stats"]["images_per_s"] / s["train_stats"]["images_per_s"])


def spread(summary, run, setting):
    """The sampling seeds' range of a run's final FD: max - min over the seeds (same weights)."""
    vals = summary["runs"][run]["spread"][setting] + [fd(summary, run, setting)]
    return max(vals) - min(vals)


def kfmt(kimg):
    return f"{kimg:.3g}"


def best_point(curve, setting):
    """The trained checkpoint (step > 0) with the lowest FD for a sampler."""
    return min((p for p in curve if p["step"] > 0 and p["scores"][setting]["fd"] == p["scores"][setting]["fd"]),
               key=lambda p: p["scores"][setting]["fd"])


def collapses(curve, setting, factor=3.0):
    """[(kimg, FD, best FD before)] for checkpoints whose FD exceeds factor x the best earlier one."""
    out, best = [], math.inf
    for p in (p for p in curve if p["step"] > 0):
        v = p["scores"][setting]["fd"]
        if v > factor * best or v != v:
            out.append((p["kimg"], v, best))
        best = min(best, v)
    return out


def wins(s, on, off, setting):
    """(checkpoints where run `on` has the lower FD, checkpoints compared), matched by step (k > 0)."""
    a = {p["step"]: p["scores"][setting]["fd"] for p in s["runs"][on]["curve"] if p["step"] > 0}
    b = {p["step"]: p["scores"][setting]["fd"] for p in s["runs"][off]["curve"] if p["step"] > 0}
    steps = sorted(set(a) & set(b))
    return sum(a[k] < b[k] for k in steps), len(steps)


def verdict(better, worse, margin):
    """'held' when better < worse by more than margin, 'contradicted' when the reverse, else 'not resolved'."""
    if worse - better > margin:
        return "held"
    if better - worse > margin:
        return "contradicted"
    return "not resolved (within the sampling-seed range)"


def claims(summary):
    """[(claim, paper, ours, verdict)] for the claims of scm-reference.md §9 and the ablations."""
    return [_claim_scd_teacher(summary), _claim_scd_compute(summary), _claim_two_steps(summary),
            _claim_sct_vs_scd(summary), _claim_stability(summary), *_claims_tangent(summary),
            _claim_fp16(summary)]


def _claim_scd_teacher(s):
    teacher, scd1, scd2 = fd(s, "teacher", "heun-nfe35"), fd(s, "scd", "1step"), fd(s, "scd", "2step")
    best = best_point(s["runs"]["scd"]["curve"], "2step")
    b2 = best["scores"]["2step"]["fd"]
    paper = "; ".join(f"{d} {p['scd'][1]} / {p['teacher'][0]} = {p['scd'][1] / p['teacher'][0]:.2f}"
                      for d, p in PAPER.items())
    ours = (f"final: {scd2:.1f} / {teacher:.1f} = {scd2 / teacher:.3f}; best checkpoint ({kfmt(best['kimg'])} kimg): "
            f"{b2:.1f} / {teacher:.1f} = {b2 / teacher:.3f}; 1 step final: {scd1:.1f} / {teacher:.1f} = "
            f"{scd1 / teacher:.3f}")
    if scd2 <= 1.10 * teacher:
        v = "held"
    else:
        v = "not held" + (f" at the end; held at {kfmt(best['kimg'])} kimg" if b2 <= 1.10 * teacher else "")
    return ("2-step sCD FD within 10% of the teacher's (ratio <= 1.10)", paper, ours, v)


def _claim_scd_compute(s):
    teacher = fd(s, "teacher", "heun-nfe35")
    pts = [(compute_fraction(s, p["kimg"]), p) for p in s["runs"]["scd"]["curve"] if p["step"] > 0]
    within = [(f, p) for f, p in pts if p["scores"]["2step"]["fd"] <= 1.10 * teacher]
    kimg_t = s["runs"]["teacher"]["kimg"]
    ours = "; ".join(f"{kfmt(p['kimg'])} kimg ({p['kimg'] / kimg_t:.0%} of its images, {f:.0%} of its compute): "
                     f"FD {p['scores']['2step']['fd']:.1f}" for f, p in pts)
    if within and min(f for f, _ in within) < 0.20:
        v = "held"
    else:
        f, p = min(pts, key=lambda fp: fp[1]["scores"]["2step"]["fd"])
        v = (f"not held (no sCD checkpoint within 10%; the best, {p['scores']['2step']['fd'] / teacher:.2f}x the "
             f"teacher, used {f:.0%} of its compute)") if not within else f"not held (first within 10% at {f:.0%})"
    return ("sCD reaches it with < 20% of the teacher's training compute", "stated (ImageNet)",
            f"teacher FD {teacher:.1f}; sCD 2-step: {ours}", v)


def _claim_two_steps(s):
    rows = [(r, fd(s, r, "1step"), fd(s, r, "2step"), max(spread(s, r, "1step"), spread(s, r, "2step")))
            for r in ("scd", "sct-init", "sct")]
    ours = "; ".join(f"{r}: {a:.1f} -> {b:.1f}" for r, a, b, _ in rows) + " (final checkpoints)"
    verdicts = {verdict(b, a, m) for r, a, b, m in rows}
    v = verdicts.pop() if len(verdicts) == 1 else "mixed: " + ", ".join(
        f"{r} {verdict(b, a, m)}" for r, a, b, m in rows)
    return ("2 steps improve on 1 step", "every row (e.g. CIFAR-10 sCD 3.66 -> 2.52, sCT 2.85 -> 2.06)", ours,
            {"held": "held", "contradicted": "not held (2 steps worse)"}.get(v, v))


def _claim_sct_vs_scd(s):
    sct, scd = s["runs"]["sct-init"]["curve"], s["runs"]["scd"]["curve"]
    a, b = fd(s, "sct-init", "2step"), fd(s, "scd", "2step")
    ba, bb = best_point(sct, "2step"), best_point(scd, "2step")
    fa, fb = ba["scores"]["2step"]["fd"], bb["scores"]["2step"]["fd"]
    ours = (f"2 steps, final: sCT {a:.1f} vs sCD {b:.1f}; best checkpoints: sCT {fa:.1f} ({kfmt(ba['kimg'])} kimg) "
            f"vs sCD {fb:.1f} ({kfmt(bb['kimg'])} kimg); sCT from scratch final {fd(s, 'sct', '1step'):.1f} / "
            f"{fd(s, 'sct', '2step'):.1f}")
    m = max(spread(s, "sct-init", "2step"), spread(s, "scd", "2step"))
    names = {"held": "sCT better", "contradicted": "sCD better"}
    final, best = verdict(a, b, m), verdict(fa, fb, m)
    v = f"final: {names.get(final, 'not resolved')}; best checkpoints: {names.get(best, 'not resolved')}"
    paper = "sCT better on CIFAR-10 (2.06 vs 2.52) and ImageNet 64 (1.48 vs 1.66), sCD better at 512 (1.88 vs 3.76)"
    return ("sCT vs sCD at small scale: sCT (same init and budget) at least as good", paper, ours, v)


def _claim_stability(s):
    """The first collapse (FD > 3x the run's best earlier checkpoint) of each run, 1 step / teacher."""
    found = []
    for name, r in s["runs"].items():
        setting = next(iter(r["curve"][0]["scores"]))
        first = collapses(r["curve"], setting)[:1]
        found += [(name, *c, r["curve"][-1]["scores"][setting]["fd"]) for c in first]
    preset = config.resolve("digits-sct", for_run=False)
    ours = "; ".join(f"{name}: FD {b:.1f} -> {v:.1f} at {kfmt(k)} kimg, {end:.1f} at the end"
                     for name, k, v, b, end in found) or "no collapse in any run"
    v = "held" if not found else (
        f"not held for {', '.join(f[0] for f in found)} (the digits presets' tangent warmup ends at step "
        f"{preset.tangent_warmup} = {preset.tangent_warmup * preset.batch / 1000:g} kimg)")
    return ("sCM training with TrigFlow, tangent normalization and warmup is stable (no collapse: 1-step / "
            "teacher FD > 3x the run's best earlier checkpoint)", "the paper's premise [P §4]: stable training",
            ours, v)


def _claims_tangent(s):
    """Each knob off vs the sCT run, checkpoint by checkpoint (1-step FD)."""
    m, out = spread(s, "sct", "1step"), []
    for run, what in (("sct-no-tnorm", "tangent normalization"), ("sct-no-warmup", "tangent warmup"),
                      ("sct-no-tnorm-no-warmup", "tangent normalization + warmup")):
        r = s["runs"][run]
        stopped, last = r["train_stats"]["stopped"], r["curve"][-1]
        base = point_at(s["runs"]["sct"]["curve"], last["kimg"])["scores"]["1step"]["fd"]
        off = last["scores"]["1step"]["fd"]
        n, total = wins(s, "sct", run, "1step")
        ours = (f"on better at {n} of {total} checkpoints; at {kfmt(last['kimg'])} kimg: on {base:.1f}, off "
                f"{off:.1f} (1 step; sampling-seed range {m:.1f})"
                + (f"; the run without it stopped: {stopped}" if stopped else ""))
        v = "held" if stopped or (n == total and off - base > m) else (
            "contradicted" if n == 0 and base - off > m else "not resolved")
        out.append((f"{what} improves sCT (FD at equal training images)", "ablation [P §4.2]: they stabilise "
                    "training and improve FID", ours, v))
    return out


def point_at(curve, kimg):
    """The curve point nearest to kimg training images."""
    return min(curve, key=lambda p: abs(p["kimg"] - kimg))


def _claim_fp16(s):
    naive, rearr = s["runs"]["sct-fp16-naive"], s["runs"]["sct-fp16"]
    probe = {jvp: sum(r["probe"][jvp]["nonfinite"] for r in (naive, rearr)) for jvp in ("naive", "rearranged")}
    logged = {k: r["train_stats"]["nonfinite_tangent"] for k, r in (("naive", naive), ("rearranged", rearr))}
    n, total = wins(s, "sct-fp16", "sct-fp16-naive", "1step")
    ours = (f"non-finite tangent entries, probe: naive {probe['naive']} / rearranged {probe['rearranged']} "
            f"(of {naive['probe']['naive']['entries'] * 2} each)"
            + ("" if None in logged.values() else f", training log: naive {logged['naive']} / rearranged "
               f"{logged['rearranged']}")
            + f"; skipped steps (non-finite gradients under the dynamic loss scale): naive "
            f"{naive['train_stats']['skipped']} / rearranged {rearr['train_stats']['skipped']}; FD 1 step final naive "
            f"{fd(s, 'sct-fp16-naive', '1step'):.1f} / rearranged {fd(s, 'sct-fp16', '1step'):.1f} (fp32: "
            f"{fd(s, 'sct', '1step'):.1f}), rearranged better at {n} of {total} checkpoints")
    bad = probe["naive"] + (logged["naive"] or 0)
    good = probe["rearranged"] + (logged["rearranged"] or 0)
    v = "held" if bad > good else ("not reproduced (neither tangent overflows at this scale)" if bad == good == 0
                                   else "not held")
    return ("fp16: the naive tangent overflows, the JVP rearrangement does not", "stated [P §5.1]", ours, v)


# ---- markdown ---------------------------------------------------------------------------------------
def _row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows):
    return [_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows]


def _score_cells(sc):
    return [f"{sc['fd']:.1f}", f"{sc['precision']:.3f}", f"{sc['recall']:.3f}"]


def _curve_cells(curve, setting):
    """FD at step 0 and the best checkpoint's FD (at its kimg)."""
    best = best_point(curve, setting)
    return [f"{curve[0]['scores'][setting]['fd']:.0f}", f"{best['scores'][setting]['fd']:.1f} ({kfmt(best['kimg'])})"]


def main_table(s):
    """Rows: data floor, teacher, each student at 1 and 2 steps, with the paper's FIDs beside."""
    rows = [["two halves of the data (floor)", "-", "-", "-", "-", *_score_cells(s["floor"]), "-", "-", "-"]]
    t = s["runs"]["teacher"]
    paper_t = [f"{p['teacher'][0]} (NFE {p['teacher'][1]})" for p in PAPER.values()]
    rows.append([t["label"], "Heun, NFE 35", kfmt(t["curve"][-1]["kimg"]), *_curve_cells(t["curve"], "heun-nfe35"),
                 *_score_cells(final_scores(t)["heun-nfe35"]), *paper_t])
    for name, key in (("scd", "scd"), ("sct-init", "sct"), ("sct", "sct")):
        r = s["runs"][name]
        for i, setting in enumerate(("1step", "2step")):
            paper = [p[key][i] if name != "sct" else f"({p[key][i]})" for p in PAPER.values()]
            rows.append([r["label"], f"{i + 1} step{'s' if i else ''}", kfmt(r["curve"][-1]["kimg"]),
                         *_curve_cells(r["curve"], setting),
                         *_score_cells(final_scores(r)[setting]), *paper])
    header = ["model", "sampler", "kimg", "FD at step 0", "best FD (at kimg)", "FD (final)", "precision", "recall",
              *[f"paper FID {d}" for d in PAPER]]
    return _table(header, rows)


def ablation_table(s):
    rows = []
    for name in ["sct"] + [n for n, r in s["runs"].items() if r["group"] in ("tangent", "fp16")]:
        r = s["runs"][name]
        k, ts, probe = r["knobs"], r["train_stats"], r.get("probe")
        nonfinite = f"{probe[k['jvp']]['nonfinite']} / {probe[k['jvp']]['entries']}" if probe else "-"
        sc = final_scores(r)
        rows.append([r["label"], k["tnorm"], k["warmup"], k["precision"], k["jvp"], kfmt(r["curve"][-1]["kimg"]),
                     ts["skipped"], "yes: " + ts["stopped"] if ts["stopped"] else "no",
                     "not logged" if ts["nonfinite_tangent"] is None else ts["nonfinite_tangent"], nonfinite,
                     f"{sc['1step']['fd']:.1f}", f"{sc['2step']['fd']:.1f}",
                     f"{sc['1step']['precision']:.3f} / {sc['1step']['recall']:.3f}"])
    header = ["run", "tangent norm", "warmup H (steps)", "precision", "tangent", "kimg", "skipped steps",
              "stopped", "non-finite tangent entries (training log)", "non-finite tangent entries (probe)",
              "FD 1 step", "FD 2 steps", "precision / recall (1 step)"]
    return _table(header, rows)


def probe_table(s):
    rows = []
    for name in ("sct-fp16", "sct-fp16-naive"):
        for jvp, p in s["runs"][name]["probe"].items():
            rows.append([f"{name} checkpoints", jvp, f"{p['nonfinite']} / {p['entries']}",
                         f"{p['g_rel_err_median']:.2e}", f"{p['g_rel_err_max']:.2e}"])
    return _table(["weights", "tangent in fp16", "non-finite entries of g", "median rel. error of ||g|| vs fp32",
                   "max rel. error"], rows)


def write_markdown(s, path):
    """docs/results.md from the summary."""
    lines = _md_header(s) + _md_setup(s) + ["", "## Results", ""] + main_table(s) + _md_main_notes(s)
    lines += ["", "## The paper's claims", ""] + _table(["claim", "paper", "ours", "verdict"], claims(s))
    lines += _md_claim_notes()
    lines += ["", "## FD over training", "", "![FD against training images](results/fd_vs_kimg.png)", ""]
    lines += ["## Ablations (sCT from scratch)", ""] + ablation_table(s) + ["", "fp16 tangent probe "
              "(objectives.scm_loss on each checkpoint's training weights, both tangents on the same x0, t, noise; "
              f"{s['probe_batches']} batches of 128 per checkpoint):", ""] + probe_table(s)
    lines += ["", "![ablations](results/ablations.png)", ""] + _md_grids(s) + _md_limits(s)
    path.write_text("\n".join(lines) + "\n")


def _md_header(s):
    m = s["machine"]
    return [
        "# sCM on digits: the paper's claims at CPU scale", "",
        "Generated by `scm_fast/reproduce.py`; do not edit by hand. Command:", "",
        f"    {s['command']}", "",
        f"- wall time of this invocation: **{s['wall_s'] / 60:.1f} min**; training + scoring time recorded for all "
        f"runs: {s['compute_s'] / 60:.1f} min (train {s['train_s'] / 60:.1f}, score {s['score_s'] / 60:.1f})",
        *[f"- invocation that trained {len(i['trained'])} of the {len(s['runs'])} runs: {i['date']}, "
          f"**{i['wall_s'] / 60:.1f} min** wall, load average at start {i['load_start']:.2f}"
          for i in s["invocations"]],
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['threads']} threads, "
        f"Python {m['python']}; load average at start {m['load_start']}; {s['date']}",
        f"- seed {SEED} for every run; CPU fp32 training is bit-exact on resume, so re-running reproduces these "
        "numbers (re-running skips finished runs and cached scores)",
        "- needs matplotlib for the plots (`pip install matplotlib`)",
        f"- data: scikit-learn's 1797 digits (8x8, 10 classes); model: the `digits` DiT; batch 128; "
        f"{'QUICK (tiny) version' if s['quick'] else 'full version'}",
        f"- metric: FD, precision and recall (k = 3) of n = {s['n']} samples (labels cycling 0-9, sampling seed 1) "
        "against all 1797 digits, in the 128-d features of the digits classifier (`scm_fast.eval`), not "
        "Inception FID: compare ratios and orderings with the paper, not values",
    ]


def _md_setup(s):
    rows = [[name, r["label"], f"`python -m scm_fast.train {r['trainer_flags']}`"] for name, r in s["runs"].items()]
    return ["", "## Runs", "", "Trained in this order; every flag explicit (checkpoints kept for the FD curves):",
            ""] + _table(["run", "what", "trainer command"], rows)


def _md_main_notes(s):
    sp = {r: {k: spread(s, r, k) for k in final_scores(s["runs"][r])} for r in ("teacher", "scd", "sct-init", "sct")}
    txt = "; ".join(f"{r} " + ", ".join(f"{k} {v:.1f}" for k, v in d.items()) for r, d in sp.items())
    return ["", "kimg: training images seen. FD at step 0: the weights before training (seeded init; sCD and "
            "sCT-init: the teacher's weights sampled as a consistency model). Paper columns: FID [P Tables 1, 2]; "
            "the sCT row of the paper starts from a teacher too, so its numbers stand beside 'sCT (init from the "
            "teacher)' and in parentheses beside sCT from scratch. Teacher sampling uses CFG scale 1.5; sCD "
            "students take s = 1.5 as input.", "",
            f"Sampling-seed spread of the final FD (max - min over {s['spread_seeds']} sampling seeds, same "
            f"weights): {txt}. Training-seed variation is not measured (one training seed) and is likely larger."]


def _md_claim_notes():
    return ["", "How the verdicts are decided: ratios against the stated threshold; comparisons of two FDs need a "
            "difference larger than the sampling-seed range (max - min of the final FD over the sampling seeds), "
            "else 'not resolved'; the ablations also need the same ordering at every checkpoint. 'Final' is the last "
            "checkpoint, 'best' the lowest FD along training. Compute fraction = (sCD kimg / teacher kimg) x "
            "(teacher images/s / sCD images/s), from the trainers' logged throughput (one sCD step runs the teacher "
            "twice for CFG and the student's JVP)."]


def _md_grids(s):
    lines = ["## Samples (final EMA weights, one class per column, upscaled 4x)", ""]
    for name, files in s["grids"].items():
        if files:
            cells = " ".join(f"![{f}](results/{f})" for f in files)
            lines += [f"**{s['runs'][name]['label']}** ({', '.join(f[len(name) + 1:-4] for f in files)}): {cells}", ""]
    return lines


def _md_limits(s):
    return ["## What this does and does not show", "",
            "- Scale: 8x8 digits, a ~1 M-parameter DiT, minutes of CPU training, against the paper's CIFAR-10 and "
            "ImageNet U-Nets (up to 1.5 B parameters) trained for days; the FD floor at this n is "
            f"{s['floor']['fd']:.1f} (two halves of the data).",
            "- One training seed per configuration; differences smaller than the sampling-seed spread are noise.",
            "- The fp16 ablation runs CPU autocast (fp16 matmuls, fp32 time embedding and norms); GPU fp16 kernels "
            "may behave differently."]


# ---- the job ------------------------------------------------------------------------------------
def machine(load_start):
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_start": f"{load_start:.2f}"}


class Timings:
    """Seconds per training and scoring step of each run, kept in RUNS_DIR/timings.json across invocations."""

    def __init__(self, path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def add(self, key, seconds):
        self.data[key] = self.data.get(key, 0.0) + seconds
        self.path.write_text(json.dumps(self.data, indent=1))

    def total(self, prefix):
        return sum(v for k, v in self.data.items() if k.startswith(prefix))

    def record_invocation(self, **info):
        """Keep what an invocation that trained runs did (date, wall seconds, runs trained)."""
        self.data.setdefault("invocations", []).append(info)
        self.path.write_text(json.dumps(self.data, indent=1))


def run_all(runs, runs_dir, n, spread_offsets, threads, timings, log, trained):
    """Train (appending to `trained`) and score every run -> {name: run summary}."""
    out = {}
    for run in runs:
        if not is_finished(run, runs_dir):
            timings.add(f"train:{run.name}", train(run, runs_dir, threads, log))
            trained.append(run.name)
        entry = {"label": run.label, "group": run.group, "kimg": run.kimg, "knobs": run.knobs,
                 "trainer_flags": " ".join(train_args(run, runs_dir, threads)),
                 "curve": curve(run, runs_dir, n, timings, log), "train_stats": training_stats(run, runs_dir)}
        if run.group == "main":
            entry["spread"] = seed_spread(run, runs_dir, n, spread_offsets, timings)
        if run.group == "fp16":
            entry["probe"] = probe_run(run, runs_dir, timings, log)
        out[run.name] = entry
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scm_fast.reproduce", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="where results.md and results/ go (default docs; --quick: "
                                               "RUNS_DIR/docs)")
    p.add_argument("--runs-dir", default=None, help="run directories (default runs/reproduce; --quick: "
                                                    "runs/reproduce-quick)")
    p.add_argument("--quick", action="store_true", help="a tiny version of the whole job (a few minutes)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: %(default)s)")
    args = p.parse_args(argv)
    args.runs_dir = Path(args.runs_dir or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    args.out = Path(args.out or (args.runs_dir / "docs" if args.quick else "docs"))
    return args


def main(argv=None):
    args = parse_args(argv)
    t0, load_start, started = time.time(), os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M %Z")
    torch.set_num_threads(args.threads)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    (args.out / "results").mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    timings = Timings(args.runs_dir / "timings.json")
    n, offsets = (500, (2,)) if args.quick else (1000, (2, 3, 4))
    runs, trained = plan(args.quick), []
    summary = {"quick": args.quick, "n": n, "probe_batches": 4, "floor": data_floor(),
               "spread_seeds": 1 + len(offsets),
               "runs": run_all(runs, args.runs_dir, n, offsets, args.threads, timings, log, trained),
               "command": " ".join(["python -m scm_fast.reproduce", *(argv if argv is not None else sys.argv[1:])]),
               "machine": machine(load_start), "date": started}
    summary["grids"] = copy_grids([r for r in runs if r.group == "main"], args.runs_dir, args.out / "results")
    write_plots(summary, args.out / "results")
    summary.update(wall_s=time.time() - t0, train_s=timings.total("train:"), score_s=timings.total("score:"))
    if trained:
        timings.record_invocation(date=summary["date"], command=summary["command"], wall_s=summary["wall_s"],
                                  load_start=load_start, trained=trained)
    summary["invocations"] = timings.data.get("invocations", [])
    summary["compute_s"] = summary["train_s"] + summary["score_s"]
    summary["claims"] = claims(summary)
    write_markdown(summary, args.out / "results.md")
    (args.runs_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"wrote {args.out / 'results.md'} and {args.out / 'results'}/ in {summary['wall_s'] / 60:.1f} min")
    return summary


if __name__ == "__main__":
    main()
