"""The report of `python experiments/reproduce.py`: means and spreads over training seeds, the paper's
claims with verdicts, results.md, results.json and the figures.

Verdicts: a comparison of two configurations is paired by training seed (a student of seed s starts
from the teacher of seed s); it "held" when every seed goes the claimed way, is "contradicted" when
every seed goes the other way, and is "not resolved" otherwise. Threshold claims (a ratio) use the
means over seeds and say how many seeds pass on their own.
"""
import json
import math
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from scm_fast import config
from scm_fast import eval as sfeval
import reproduce as rp

# [P Tables 1, 2] (scm-reference.md §9): FID; teacher (FID, NFE), students (1 step, 2 steps).
PAPER = {
    "CIFAR-10": {"teacher": (2.15, 35), "sct": (2.85, 2.06), "scd": (3.66, 2.52)},
    "ImageNet 64": {"teacher": (1.38, 63), "sct": (2.04, 1.48), "scd": (2.44, 1.66)},
    "ImageNet 512": {"teacher": (1.73, 126), "sct": (4.29, 3.76), "scd": (2.28, 1.88)},
}
COLLAPSE = 1.5  # a checkpoint after the warmup more than this times worse than the one before it


# ---- the summary ----------------------------------------------------------------------------------
def summarize(args, jobs, started, load_start, wall_s):
    """Everything the report needs, from the jobs' RUN_DIR/job.json files."""
    runs = {}
    for run, seed in jobs:
        entry = runs.setdefault(run.name, {"label": run.label, "group": run.group, "preset": run.preset,
                                           "kimg": run.kimg, "knobs": run.knobs, "jobs": {}})
        entry["jobs"][str(seed)] = json.loads((rp.job_dir(args.runs_dir, run, seed) / "job.json").read_text())
        entry["warmup_kimg"] = _warmup_kimg(run)
    train_s = sum(j["train_s"] for r in runs.values() for j in r["jobs"].values())
    score_s = sum(j["score_s"] for r in runs.values() for j in r["jobs"].values())
    summary = {"quick": args.quick, "n": args.n, "seeds": list(args.seeds), "runs": runs, "floor": data_floor(),
               "command": "python experiments/reproduce.py " + " ".join(_cli_args(args)), "date": started,
               "machine": machine(load_start, args), "wall_s": wall_s, "train_s": train_s, "score_s": score_s,
               "t_mids": list(rp.T_MIDS)}
    summary["claims"] = claims(summary)
    return summary


def _cli_args(args):
    out = ["--quick"] if args.quick else []
    if args.seeds != ((0,) if args.quick else rp.SEEDS):
        out += ["--seeds", ",".join(map(str, args.seeds))]
    if len(args.plan) != len(rp.plan(args.quick)):
        out += ["--runs", ",".join(r.name for r in args.plan)]
    return out + ["--jobs", str(args.jobs), "--threads", str(args.threads)]


def _warmup_kimg(run):
    cfg = config.resolve(run.preset, for_run=False)
    h = cfg.tangent_warmup
    for flag, value in zip(run.flags, run.flags[1:]):
        if flag == "--tangent-warmup":
            h = int(value)
    return h * cfg.batch / 1000 if cfg.objective != "diffusion" else 0.0


def data_floor(seed=0):
    """FD, precision, recall between two random halves of the digits: the best score at this n."""
    x, _ = sfeval.load_digits_images()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    a, b = sfeval.digits_features(x[perm[::2]]), sfeval.digits_features(x[perm[1::2]])
    fd = sfeval.frechet_distance(*sfeval.feature_stats(a), *sfeval.feature_stats(b))
    precision, recall = sfeval.precision_recall(b, a)
    return {"fd": fd, "precision": precision, "recall": recall, "n": len(a)}


def machine(load_start, args):
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "jobs": args.jobs,
            "threads": args.threads, "python": platform.python_version(), "load_start": round(load_start, 2)}


# ---- statistics over seeds ------------------------------------------------------------------------
def seeds_of(s, run):
    return sorted(s["runs"][run]["jobs"], key=int)


def final(s, run, setting, key="fd"):
    """[value per seed] of the final checkpoint's EMA."""
    return [s["runs"][run]["jobs"][k]["curve"][-1]["scores"][setting][key] for k in seeds_of(s, run)]


def stats(values):
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "per_seed": [float(x) for x in v]}


def fmt(values, digits=1):
    st = stats(values)
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}" if len(values) > 1 else f"{st['mean']:.{digits}f}"


def paired(better, worse):
    """'held' when every seed's `better` is lower, 'contradicted' when every one is higher."""
    wins = sum(b < w for b, w in zip(better, worse))
    if wins == len(better):
        return "held"
    return "contradicted" if wins == 0 else f"not resolved ({wins} of {len(better)} seeds)"


def mean_curve(s, run, setting):
    """(kimg, mean FD, min, max) over seeds at each checkpoint."""
    curves = [s["runs"][run]["jobs"][k]["curve"] for k in seeds_of(s, run)]
    n = min(len(c) for c in curves)
    fd = np.array([[c[i]["scores"][setting]["fd"] for i in range(n)] for c in curves])
    return [c["kimg"] for c in curves[0][:n]], fd.mean(0), fd.min(0), fd.max(0)


def sweep(s, run):
    """{t_mid: [FD per seed]} of the 2-step sampler."""
    jobs = [s["runs"][run]["jobs"][k]["t_mid_sweep"] for k in seeds_of(s, run)]
    return {t: [j[t] for j in jobs] for t in jobs[0]}


# ---- the claims -----------------------------------------------------------------------------------
def claims(s):
    """[{claim, paper, ours, verdict}] for the claims of scm-reference.md §9 and the ablations."""
    have = s["runs"].keys()
    found = []
    if {"teacher", "scd"} <= have:
        found += [_claim_scd_teacher(s), _claim_scd_compute(s)]
    students = [r for r in ("scd", "sct-init", "sct") if r in have]
    found += [_claim_two_steps(s, r) for r in students]
    if students:
        found.append(_claim_stability(s, students))
    if {"sct", "sct-init"} <= have:
        found.append(_claim_init(s))
    if {"sct", "sct-init", "scd"} <= have:
        found.append(_claim_sct_vs_scd(s))
    found += [_claim_ablation(s, run, what) for run, what in (
        ("sct-no-tnorm", "tangent normalization"), ("sct-no-warmup", "tangent warmup"),
        ("sct-no-tnorm-no-warmup", "tangent normalization + warmup")) if {"sct", run} <= have]
    if {"sct-fp16", "sct-fp16-naive"} <= have:
        found.append(_claim_fp16(s))
    return [dict(zip(("claim", "paper", "ours", "verdict"), c)) for c in found]


def _claim_scd_teacher(s):
    teacher, scd2 = final(s, "teacher", "heun-nfe35"), final(s, "scd", "2step")
    ratio = np.mean(scd2) / np.mean(teacher)
    per_seed = [b / a for a, b in zip(teacher, scd2)]
    paper = "; ".join(f"{d} {p['scd'][1]} / {p['teacher'][0]} = {p['scd'][1] / p['teacher'][0]:.2f}"
                      for d, p in PAPER.items())
    ours = (f"2-step sCD {fmt(scd2)} / teacher {fmt(teacher)} = {ratio:.3f} (per seed "
            + ", ".join(f"{r:.3f}" for r in per_seed) + f"); 1 step: {fmt(final(s, 'scd', '1step'))}")
    within = sum(r <= 1.10 for r in per_seed)
    v = ("held" if ratio <= 1.10 else "not held") + f" ({within} of {len(per_seed)} seeds within 10% on their own)"
    return ("2-step sCD FD within 10% of the teacher's (ratio of the means <= 1.10)", paper, ours, v)


def _claim_scd_compute(s):
    """The first sCD checkpoint whose mean 2-step FD is within 10% of the teacher's, in teacher compute."""
    teacher = np.mean(final(s, "teacher", "heun-nfe35"))
    t_rate = np.mean([j["train_stats"]["images_per_s"] for j in s["runs"]["teacher"]["jobs"].values()])
    s_rate = np.mean([j["train_stats"]["images_per_s"] for j in s["runs"]["scd"]["jobs"].values()])
    kimg, mean, _, _ = mean_curve(s, "scd", "2step")
    t_kimg = s["runs"]["teacher"]["kimg"]
    pts = [(k / t_kimg * t_rate / s_rate, k, f) for k, f in zip(kimg, mean) if k > 0]
    ours = f"teacher FD {teacher:.1f}; sCD 2-step mean: " + "; ".join(
        f"{k:g} kimg ({frac:.0%} of its compute) {f:.1f}" for frac, k, f in pts)
    within = [(frac, k) for frac, k, f in pts if f <= 1.10 * teacher]
    if within and within[0][0] < 0.20:
        v = "held"
    elif within:
        v = f"not held (first within 10% at {within[0][1]:g} kimg, {within[0][0]:.0%} of the teacher's compute)"
    else:
        v = "not held (no checkpoint within 10%)"
    return ("sCD reaches it with < 20% of the teacher's training compute", "stated (ImageNet)", ours, v)


def _claim_two_steps(s, run):
    one, two = final(s, run, "1step"), final(s, run, "2step")
    sw = {t: np.mean(v) for t, v in sweep(s, run).items()}
    best = min(sw, key=sw.get)
    t_mid = config.resolve(s["runs"][run]["preset"], for_run=False).t_mid
    ours = (f"1 step {fmt(one)} -> 2 steps (t_mid {t_mid:g}) {fmt(two)}; best t_mid of the sweep {best}: "
            f"{sw[best]:.1f}")
    paper = {"scd": "CIFAR-10 3.66 -> 2.52, ImageNet 64 2.44 -> 1.66, ImageNet 512 2.28 -> 1.88",
             "sct-init": "CIFAR-10 2.85 -> 2.06, ImageNet 64 2.04 -> 1.48, ImageNet 512 4.29 -> 3.76",
             "sct": "(the paper's sCT starts from a teacher) CIFAR-10 2.85 -> 2.06"}[run]
    return (f"2 steps improve on 1 step: {s['runs'][run]['label']}", paper, ours, paired(two, one))


def _claim_stability(s, students):
    """Checkpoints after the warmup whose 1-step FD exceeds COLLAPSE x the checkpoint before it."""
    bad, checked = [], 0
    for run in students:
        w = s["runs"][run]["warmup_kimg"]
        for k in seeds_of(s, run):
            curve = [p for p in s["runs"][run]["jobs"][k]["curve"]]
            for prev, p in zip(curve, curve[1:]):
                if p["kimg"] <= w or prev["step"] == 0:
                    continue
                checked += 1
                a, b = prev["scores"]["1step"]["fd"], p["scores"]["1step"]["fd"]
                if not b <= COLLAPSE * a:
                    bad.append(f"{run} seed {k}: {a:.1f} -> {b:.1f} at {p['kimg']:g} kimg")
    ours = "; ".join(bad) if bad else f"none of {checked} checkpoints after the warmup ({', '.join(students)})"
    return (f"no collapse after the tangent warmup (no checkpoint more than {COLLAPSE}x worse than the one before "
            "it, 1-step FD)", "the paper's premise [P §4]: stable training", ours,
            "held" if not bad else f"not held ({len(bad)} of {checked} checkpoints)")


def _claim_init(s):
    rows, verdicts = [], []
    for setting in ("1step", "2step"):
        a, b = final(s, "sct-init", setting), final(s, "sct", setting)
        rows.append(f"{setting}: from the teacher {fmt(a)} ({s['runs']['sct-init']['kimg']:g} kimg) vs from scratch "
                    f"{fmt(b)} ({s['runs']['sct']['kimg']:g} kimg)")
        verdicts.append(paired(a, b))
    v = verdicts[0] if len(set(verdicts)) == 1 else f"1 step {verdicts[0]}; 2 steps {verdicts[1]}"
    return ("sCT from the teacher at least as good as sCT from scratch", "the paper initialises every CM from "
            "the teacher [P App. G]", "; ".join(rows), v)


def _claim_sct_vs_scd(s):
    a, b = final(s, "sct-init", "2step"), final(s, "scd", "2step")
    names = {"held": "sCT better", "contradicted": "sCD better"}
    v = paired(a, b)
    return ("sCT vs sCD from the same teacher and budget (2 steps)", "sCT better on CIFAR-10 (2.06 vs 2.52) and "
            "ImageNet 64 (1.48 vs 1.66), sCD better at 512 (1.88 vs 3.76)", f"sCT {fmt(a)} vs sCD {fmt(b)}",
            names.get(v, v))


def _claim_ablation(s, run, what):
    """Each knob off vs the sCT run, at the ablation's last checkpoint, paired by seed (1-step FD)."""
    last = s["runs"][run]["kimg"]
    on = [_fd_at(s["runs"]["sct"]["jobs"][k]["curve"], last) for k in seeds_of(s, run)]
    off = final(s, run, "1step")
    stopped = [k for k, j in s["runs"][run]["jobs"].items() if j["train_stats"]["stopped"]]
    ours = f"at {last:g} kimg: on {fmt(on)}, off {fmt(off)} (1 step)" + (
        f"; stopped for non-finite steps: seeds {stopped}" if stopped else "")
    return (f"{what} improves sCT (FD at equal training images)", "ablation [P §4.2]: they stabilise training "
            "and improve FID", ours, paired(on, off))


def _fd_at(curve, kimg, setting="1step"):
    return min(curve, key=lambda p: abs(p["kimg"] - kimg))["scores"][setting]["fd"]


def nonfinite(s, run, jvp):
    """Non-finite tangent entries of the fp16 probe over every checkpoint and seed, and the entries probed."""
    probes = [p[jvp] for j in s["runs"][run]["jobs"].values() for p in j["probe"].values()]
    return sum(p["nonfinite"] for p in probes), sum(p["entries"] for p in probes)


def _claim_fp16(s):
    bad = sum(nonfinite(s, r, "naive")[0] for r in ("sct-fp16", "sct-fp16-naive"))
    good = sum(nonfinite(s, r, "rearranged")[0] for r in ("sct-fp16", "sct-fp16-naive"))
    entries = sum(nonfinite(s, r, "naive")[1] for r in ("sct-fp16", "sct-fp16-naive"))
    skipped = {r: [j["train_stats"]["skipped"] for j in s["runs"][r]["jobs"].values()]
               for r in ("sct-fp16", "sct-fp16-naive")}
    ours = (f"non-finite tangent entries (probe, {entries} per tangent): naive {bad}, rearranged {good}; skipped "
            f"steps naive {skipped['sct-fp16-naive']} / rearranged {skipped['sct-fp16']}; FD 1 step naive "
            f"{fmt(final(s, 'sct-fp16-naive', '1step'))} / rearranged {fmt(final(s, 'sct-fp16', '1step'))}")
    v = "held" if bad > good else ("not reproduced (neither tangent overflows at this scale)" if bad == good == 0
                                   else "not held")
    return ("fp16: the naive tangent overflows, the JVP rearrangement does not", "stated [P §5.1]", ours, v)


# ---- results.json ---------------------------------------------------------------------------------
def results_json(s):
    """One object per configuration and sampler: FDs over seeds (mean, std, per seed), for tools."""
    out = []
    for name, r in s["runs"].items():
        obj = {"run": name.replace("-", "_"), "label": r["label"], "kimg": r["kimg"],
               "seeds": [int(k) for k in seeds_of(s, name)]}
        settings = list(r["jobs"][seeds_of(s, name)[0]]["curve"][-1]["scores"])
        for setting in settings:
            key = "fd_teacher" if setting == "heun-nfe35" else f"fd_{setting}"
            obj[key] = stats(final(s, name, setting))
            if "final_raw" in r["jobs"][seeds_of(s, name)[0]]:
                obj[key.replace("fd_", "fd_raw_")] = stats([j["final_raw"][setting]["fd"] for j in _jobs(s, name)])
        if "t_mid_sweep" in r["jobs"][seeds_of(s, name)[0]]:
            obj["fd_2step_by_t_mid"] = {t: stats(v) for t, v in sweep(s, name).items()}
        out.append(obj)
    return {"command": s["command"], "date": s["date"], "n": s["n"], "seeds": s["seeds"], "floor": s["floor"],
            "runs": out, "claims": s["claims"]}


def _jobs(s, run):
    return [s["runs"][run]["jobs"][k] for k in seeds_of(s, run)]


# ---- outputs ----------------------------------------------------------------------------------------
def write_all(s, out):
    results = Path(out) / "results"
    results.mkdir(parents=True, exist_ok=True)
    s["grids"] = copy_grids(s, results)
    try:
        import matplotlib  # noqa: F401  (make reproduce installs it; the tables need nothing but numpy)
        write_plots(s, results)
        s["plots"] = True
    except ImportError:
        print("reproduce: matplotlib is not installed, so no plots (pip install matplotlib)", flush=True)
        s["plots"] = False
    (Path(out) / "results.json").write_text(json.dumps(results_json(s), indent=1) + "\n")
    (Path(out) / "results.md").write_text("\n".join(markdown(s)) + "\n")


def copy_grids(s, results_dir):
    """The first seed's final sample grids of the main runs (the trainer saves them upscaled)."""
    out = {}
    for name, r in s["runs"].items():
        if r["group"] != "main":
            continue
        src_dir = Path(r["jobs"][seeds_of(s, name)[0]]["run_dir"]) / "samples"
        out[name] = []
        for src in sorted(src_dir.glob("final-*.png")):
            dst = f"{name}-{src.stem[len('final-'):]}.png"
            shutil.copyfile(src, results_dir / dst)
            out[name].append(dst)
    return out


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(s, results_dir):
    main = [n for n, r in s["runs"].items() if r["group"] == "main"]
    plot_curves(s, main, results_dir / "fd_vs_kimg.png")
    panels = [("tangent normalization / warmup", ["sct"] + [n for n, r in s["runs"].items() if r["group"] == "tangent"]),
              ("fp16: JVP rearrangement vs naive", [n for n, r in s["runs"].items() if r["group"] == "fp16"])]
    panels = [(t, runs) for t, runs in panels if len(runs) > 1 and all(r in s["runs"] for r in runs)]
    if panels:
        plot_ablations(s, panels, results_dir / "ablations.png")
    swept = [n for n in main if "t_mid_sweep" in s["runs"][n]["jobs"][seeds_of(s, n)[0]]]
    if swept:
        plot_t_mid(s, swept, results_dir / "t_mid.png")


def _finish(plt, fig, path, title):
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # leave the suptitle its own band
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(s, runs, path):
    """One panel per configuration: FD against kimg for every seed (thin) and their mean (bold)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), squeeze=False)
    for ax, name in zip(axes[0], runs):
        r = s["runs"][name]
        for i, setting in enumerate(r["jobs"][seeds_of(s, name)[0]]["curve"][0]["scores"]):
            style = "-" if i == 0 else "--"
            for k in seeds_of(s, name):
                c = r["jobs"][k]["curve"]
                ax.plot([p["kimg"] for p in c], [p["scores"][setting]["fd"] for p in c], style, color=f"C{i}",
                        alpha=0.35, lw=0.8)
            kimg, mean, _, _ = mean_curve(s, name, setting)
            ax.plot(kimg, mean, style + "o", color=f"C{i}", ms=3, lw=1.8, label=f"{setting} (mean)")
        ax.axhline(s["floor"]["fd"], color="gray", ls=":", label=f"data floor {s['floor']['fd']:.1f}")
        if r["warmup_kimg"]:
            ax.axvline(r["warmup_kimg"], color="gray", ls="-.", lw=0.8, label="warmup ends")
        ax.set(yscale="log", xlabel="training images (kimg)", ylabel="FD (digits features)", title=r["label"])
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _finish(plt, fig, path, f"FD against training images; thin lines: the {len(s['seeds'])} training seeds")


def plot_ablations(s, panels, path):
    """Mean 1-step FD over seeds with the seeds' range shaded, per ablation."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        for i, name in enumerate(runs):
            kimg, mean, lo, hi = mean_curve(s, name, "1step")
            ax.plot(kimg, mean, "-o", ms=3, color=f"C{i}", label=s["runs"][name]["label"])
            ax.fill_between(kimg, lo, hi, color=f"C{i}", alpha=0.15)
        ax.axhline(s["floor"]["fd"], color="gray", ls=":", label="data floor")
        ax.set(yscale="log", xlabel="training images (kimg)", ylabel="FD, 1 step", title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _finish(plt, fig, path, "Ablations on sCT from scratch: mean over training seeds, their range shaded")


def plot_t_mid(s, runs, path):
    """2-step FD against t_mid (mean and std over seeds), with the 1-step FD as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for i, name in enumerate(runs):
        sw = sweep(s, name)
        ts = [float(t) for t in sw]
        ax.errorbar(ts, [np.mean(v) for v in sw.values()], yerr=[np.std(v, ddof=1) if len(v) > 1 else 0
                                                                  for v in sw.values()],
                    fmt="-o", ms=3, capsize=2, color=f"C{i}", label=f"{s['runs'][name]['label']}, 2 steps")
        ax.axhline(np.mean(final(s, name, "1step")), color=f"C{i}", ls="--", lw=0.8,
                   label="1 step (dashed, same colour)" if i == 0 else None)
    ax.axvline(1.1, color="gray", ls="-.", lw=0.8, label="the paper's t_mid = 1.1")
    ax.set(yscale="log", xlabel="t_mid", ylabel="FD (digits features)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _finish(plt, fig, path, "The 2-step sampler's intermediate time (mean ± std over seeds)")


# ---- results.md -------------------------------------------------------------------------------------
def _row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows):
    return [_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows]


def markdown(s):
    lines = _md_header(s) + _md_runs(s) + ["", "## Results", ""] + main_table(s) + _md_main_notes(s)
    lines += ["", "## The paper's claims", ""] + _table(["claim", "paper", "ours", "verdict"],
                                                        [list(c.values()) for c in s["claims"]])
    lines += ["", "Verdicts: comparisons are paired by training seed; 'held' when every seed goes the claimed way, "
              "'contradicted' when every seed goes the other way, 'not resolved' otherwise. Ratios use the means "
              "over seeds. 'Final' is the last checkpoint's EMA."]
    lines += _md_why(s)
    plot = _plot_link(s)
    lines += ["", "## FD over training"] + plot("FD against training images", "fd_vs_kimg")
    if (any(r["group"] == "main" and r["preset"] != "digits-teacher" for r in s["runs"].values())):
        lines += ["## The 2-step sampler's t_mid", ""] + t_mid_table(s) + plot("t_mid sweep", "t_mid")
    if any(r["group"] != "main" for r in s["runs"].values()):
        lines += ["## Ablations (sCT from scratch)", ""] + ablation_table(s) + _md_probe(s)
        lines += plot("ablations", "ablations")
    return lines + _md_grids(s) + _md_limits(s)


def _plot_link(s):
    """(alt text, file stem) -> the markdown lines of a figure, or a note when there are no plots."""
    def link(text, name):
        if not s.get("plots", True):
            return ["", "(no figure: matplotlib was not installed)", ""]
        return ["", f"![{text}](results/{name}.png)", ""]
    return link


def _md_header(s):
    m = s["machine"]
    return [
        "# sCM on digits: the paper's claims at CPU scale", "",
        "Generated by `python experiments/reproduce.py` (`make reproduce`); do not edit by hand. Command:", "",
        f"    {s['command']}", "",
        f"- wall time: **{s['wall_s'] / 60:.1f} min** ({m['jobs']} jobs side by side, {m['threads']} thread(s) each); "
        f"training {s['train_s'] / 60:.1f} and scoring {s['score_s'] / 60:.1f} job-minutes (all invocations)",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}; load average at "
        f"start {m['load_start']}; {s['date']}",
        f"- training seeds {s['seeds']} for every configuration (students of seed s start from the teacher of seed "
        "s); tables give mean ± standard deviation over them; CPU training is bit-exact on resume, so re-running "
        "reproduces these numbers (finished jobs and cached scores are skipped)",
        f"- data: scikit-learn's 1797 digits (8x8, 10 classes, std 0.75 = sigma_d); model: the `digits` DiT; "
        f"batch 128; {'QUICK (tiny) version' if s['quick'] else 'full version'}",
        f"- metric: FD, precision and recall (k = 3) of n = {s['n']} samples (labels cycling 0-9, sampling seed = "
        "training seed + 1) against all 1797 digits, in the 128-d features of the digits classifier "
        "(`scm_fast.eval`), not Inception FID: compare ratios and orderings with the paper, not values",
    ]


def _md_runs(s):
    rows = []
    for name, r in s["runs"].items():
        flags = r["jobs"][seeds_of(s, name)[0]]["trainer_flags"]
        rows.append([name, r["label"], f"`python -m scm_fast.train {flags}`"])
    return ["", "## Runs", "", "Every flag explicit (shown for the first seed; the others change --seed, --run-dir "
            "and the teacher's seed):", ""] + _table(["run", "what", "trainer command"], rows)


def main_table(s):
    rows = [["two halves of the data (floor)", "-", "-", "-", f"{s['floor']['fd']:.1f}", "-", "-",
             f"{s['floor']['precision']:.3f} / {s['floor']['recall']:.3f}", "-", "-", "-"]]
    for name, r in s["runs"].items():
        if r["group"] != "main":
            continue
        for setting in r["jobs"][seeds_of(s, name)[0]]["curve"][-1]["scores"]:
            fds = final(s, name, setting)
            raw = fmt([j["final_raw"][setting]["fd"] for j in _jobs(s, name)]) if "final_raw" in _jobs(s, name)[0] else "-"
            start = np.mean([j["curve"][0]["scores"][setting]["fd"] for j in _jobs(s, name)])
            pr = f"{np.mean(final(s, name, setting, 'precision')):.3f} / {np.mean(final(s, name, setting, 'recall')):.3f}"
            rows.append([r["label"], setting, f"{r['kimg']:g}", f"{start:.0f}", fmt(fds),
                         ", ".join(f"{v:.1f}" for v in fds), raw, pr, *_paper_cells(name, setting)])
    header = ["model", "sampler", "kimg", "FD at step 0", "FD (final EMA)", "per seed", "FD (final raw weights)",
              "precision / recall", *[f"paper FID {d}" for d in PAPER]]
    return _table(header, rows)


def _paper_cells(name, setting):
    if name == "teacher":
        return [f"{p['teacher'][0]} (NFE {p['teacher'][1]})" for p in PAPER.values()]
    key, i = ("scd" if name == "scd" else "sct"), (0 if setting == "1step" else 1)
    return [f"{p[key][i]}" if name != "sct" else f"({p[key][i]})" for p in PAPER.values()]


def _md_main_notes(s):
    return ["", "FD at step 0: the weights before training (seeded init; sCD and sCT from the teacher: the teacher's "
            "weights sampled as a consistency model), mean over seeds. Paper columns: FID [P Tables 1, 2]; the "
            "paper's sCT starts from a teacher too, so its numbers stand beside 'sCT (from the teacher)' and in "
            "parentheses beside sCT from scratch. Teacher sampling: Heun NFE 35 with CFG 1.5; sCD students take "
            "s = 1.5 as input."]


def t_mid_table(s):
    rows = []
    for name, r in s["runs"].items():
        if r["group"] != "main" or "t_mid_sweep" not in r["jobs"][seeds_of(s, name)[0]]:
            continue
        sw = sweep(s, name)
        best = min(sw, key=lambda t: np.mean(sw[t]))
        rows.append([r["label"], fmt(final(s, name, "1step"))] + [("**" + fmt(v) + "**") if t == best else fmt(v)
                                                                 for t, v in sw.items()])
    return _table(["model", "1 step", *[f"2 steps, t_mid {t}" for t in s["t_mids"]]], rows)


def ablation_table(s):
    rows = []
    for name in ["sct"] + [n for n, r in s["runs"].items() if r["group"] in ("tangent", "fp16")]:
        if name not in s["runs"]:
            continue
        r = s["runs"][name]
        k, jobs = r["knobs"], _jobs(s, name)
        tangent = [x["kimg"] for x in s["runs"].values() if x["group"] == "tangent"]
        at = tangent[0] if name == "sct" and tangent else r["kimg"]  # sct: at the tangent ablations' length
        one = [_fd_at(j["curve"], at) for j in jobs]
        two = [_fd_at(j["curve"], at, "2step") for j in jobs]
        skipped = [j["train_stats"]["skipped"] for j in jobs]
        stopped = sum(bool(j["train_stats"]["stopped"]) for j in jobs)
        rows.append([r["label"], k["tnorm"], k["warmup"], k["precision"], k["jvp"], f"{at:g}", fmt(one), fmt(two),
                     ",".join(map(str, skipped)), stopped])
    return _table(["run", "tangent norm", "warmup H (steps)", "precision", "tangent", "at kimg", "FD 1 step",
                   "FD 2 steps", "skipped steps (per seed)", "seeds stopped"], rows)


def _md_probe(s):
    if not {"sct-fp16", "sct-fp16-naive"} <= s["runs"].keys():
        return []
    rows = []
    for name in ("sct-fp16", "sct-fp16-naive"):
        for jvp in ("naive", "rearranged"):
            bad, entries = nonfinite(s, name, jvp)
            errs = [p[jvp] for j in _jobs(s, name) for p in j["probe"].values()]
            rows.append([f"{name} checkpoints", jvp, f"{bad} / {entries}",
                         f"{np.median([e['g_rel_err_median'] for e in errs]):.2e}",
                         f"{max(e['g_rel_err_max'] for e in errs):.2e}"])
    return ["", "fp16 tangent probe (objectives.scm_loss on every checkpoint's training weights of every seed, both "
            "tangents on the same x0, t, noise; 4 batches of 128 per checkpoint):", ""] + _table(
        ["weights", "tangent in fp16", "non-finite entries of g", "median rel. error of ||g|| vs fp32",
         "max rel. error"], rows)


def _md_grids(s):
    lines = ["## Samples (first seed's final EMA weights, one class per column, upscaled 4x)", ""]
    for name, files in s.get("grids", {}).items():
        if files:
            cells = " ".join(f"![{f}](results/{f})" for f in files)
            lines += [f"**{s['runs'][name]['label']}** ({', '.join(f[len(name) + 1:-4] for f in files)}): {cells}", ""]
    return lines


def _md_why(s):
    """The evidence behind the claims that did not hold (computed from this run)."""
    out = []
    for c in s["claims"]:
        if c["verdict"].startswith("held"):
            continue
        if c["claim"].startswith("sCD reaches it"):
            t, d = s["runs"]["teacher"], s["runs"]["scd"]
            rate = lambda r: np.mean([j["train_stats"]["images_per_s"] for j in r["jobs"].values()])  # noqa: E731
            out.append(f"- **Compute.** One sCD image costs {rate(t) / rate(d):.2f}x a teacher image here (the "
                       "teacher runs twice for CFG, then the student's forward+JVP and backward), and the digits "
                       f"teacher is short ({t['kimg']:g} kimg, still improving at the end: see the plot), so "
                       "matching it within 10% takes the share of its compute in the table; the paper's teachers "
                       "train for 0.2-2.1 Gimg.")
        elif c["claim"].startswith("fp16"):
            out.append("- **fp16 overflow.** This DiT uses c_noise(t) = t [P §4.1] with its time embedding in fp32 "
                       "[rCM], so the naive tangent's time component is 1 and dx_t/dt stays of the data's size: "
                       "neither tangent overflows (the probe's counts above) and the two train alike. The overflow "
                       "needs a time input whose derivative diverges at the ends, as EDM's c_noise = log(sigma)/4: "
                       "`tests/test_objectives.py::test_rearranged_jvp_stays_finite_in_fp16_where_the_naive_"
                       "tangent_overflows` shows non-finite naive tangents there and none rearranged, or tangents "
                       "grown through a far deeper network in fp16 than this 4-block one.")
        else:
            out.append(f"- **{c['claim']}**: {c['verdict']}; the numbers are in the table.")
    return (["", "## Claims that did not hold, and why", ""] + out) if out else []


def _md_limits(s):
    return ["## What this does and does not show", "",
            "- Scale: 8x8 digits, a ~1 M-parameter DiT, minutes of CPU training, against the paper's CIFAR-10 and "
            "ImageNet U-Nets (up to 1.5 B parameters) trained for days; the FD floor at this n is "
            f"{s['floor']['fd']:.1f} (two halves of the data).",
            f"- {len(s['seeds'])} training seeds per configuration; with so few, 'held' means every seed agreed, not "
            "a significance test.",
            "- The fp16 ablation runs CPU autocast (fp16 matmuls, fp32 time embedding and norms); GPU fp16 kernels "
            "may behave differently."]


__all__ = ["PAPER", "claims", "markdown", "results_json", "summarize", "write_all"]
