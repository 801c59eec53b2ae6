"""Distil a diffusers model with the trainer, end to end on the embedded digits (CPU, <= 15 min on 2 cores).

    make distill-demo                      # or: python examples/distill_demo.py --out runs/distill-demo

1. a small flow-matching SD3Transformer2DModel (random init, save_pretrained) and the digits as a
   dataset folder whose conditioning is a fixed random embedding per class as encoder_hidden_states
   (plus pooled_projections) and zeros as the null embedding (python -m scm_fast.prepare --cond-per-class --null)
2. the teacher: --arch diffusers --objective diffusion trains it as a flow-matching model (through
   the TrigFlow conversion); RUN/diffusers/ is the teacher as a diffusers folder
3. the student: --arch diffusers --objective scd --teacher RUN/diffusers (sCD with CFG from the
   null embedding, an added guidance embedding, s ~ U[1, 2] per sample)
4. FD in the digits classifier's features of the teacher (Heun, 18 steps = NFE 35, CFG 1.5), of the
   teacher taken as a 1-step model (where the student starts) and of the student in 1 and 2 steps
   -> OUT/report.json
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def make_model(out, seed=0):
    import diffusers
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=4, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
        pos_embed_max_size=8, qk_norm="rms_norm")
    model.save_pretrained(out / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler().save_pretrained(out / "scheduler")
    return out


def make_data(out):
    from scm_fast import prepare
    g = np.random.default_rng(0)
    emb = {"encoder_hidden_states": g.standard_normal((10, 1, 32)).astype(np.float32),
           "pooled_projections": g.standard_normal((10, 32)).astype(np.float32)}
    np.savez(out.parent / "class_emb.npz", **emb)
    np.savez(out.parent / "null_emb.npz", **{k: np.zeros((1, *v.shape[1:]), np.float32) for k, v in emb.items()})
    if prepare.main(["digits", str(out), "--cond-per-class", str(out.parent / "class_emb.npz"),
                     "--null", str(out.parent / "null_emb.npz")]):
        raise SystemExit("scm_fast.prepare failed")
    return out


def train(*args):
    cmd = [sys.executable, "-m", "scm_fast.train", "--arch", "diffusers", "--sigma-d", "0.75", "--batch", "128",
           "--optimizer", "radam", "--no-tensorboard", "--eval-n", "0", "--sample-every-kimg", "0", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def fd(run_dir, steps, n, seed=1, as_one_step=False):
    """FD of n samples of a run (its first EMA) in the digits classifier's features. as_one_step: the
    teacher taken as a 1-step consistency model with CFG (the sCD student before training)."""
    from scm_fast import eval as sfeval
    from scm_fast import runs, sample, shards, trigflow
    from scm_fast.train.evaluate import grid_cond
    net, cfg, meta = runs.load_run(run_dir)
    ds = shards.ShardedData(cfg.data, cfg.sigma_d)
    labels = sample.class_labels(n, 10)
    cond = grid_cond(ds, labels, n)
    if as_one_step:
        noise = torch.randn((n, *meta["shape"]), generator=torch.Generator().manual_seed(seed))
        F = sample.network_fn(net, cfg, labels, cfg.sample_guidance, cond=cond)
        x = trigflow.consistency_sample(F, noise, sample.consistency_times(1, cfg.sigma_d), sigma_d=cfg.sigma_d)
    else:
        x = sample.generate(net, cfg, tuple(meta["shape"]), n, steps, labels=labels, seed=seed, cond=cond)
    return sfeval.evaluate(x.clamp(-1, 1), reference="digits")["fd"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/distill-demo", help="the folder for the model, data, runs and report")
    p.add_argument("--teacher-kimg", type=float, default=300.0, help="teacher training length (kimg)")
    p.add_argument("--student-kimg", type=float, default=60.0, help="sCD training length (kimg)")
    p.add_argument("--eval-n", type=int, default=1000, help="samples per FD")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out}: exists and is not empty (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    base, data = make_model(out / "sd3-base"), make_data(out / "digits-cond")
    common = ["--model", str(base), "--data", str(data), "--n-grid", "100"]
    train(*common, "--objective", "diffusion", "--lr", "2e-3", "--total-kimg", f"{args.teacher_kimg:g}",
          "--run-dir", str(out / "teacher"), "--ema-halflife-kimg", "20")
    t_teacher = time.time() - start
    train(*common, "--objective", "scd", "--teacher", str(out / "teacher" / "diffusers"), "--lr", "2e-4",
          "--total-kimg", f"{args.student_kimg:g}", "--tangent-warmup", "100", "--run-dir", str(out / "scd"),
          "--ema-halflife-kimg", "10")
    t_student = time.time() - start - t_teacher
    report = {"teacher_fd_heun_nfe35": fd(out / "teacher", 18, args.eval_n),
              "teacher_fd_1step": fd(out / "teacher", 1, args.eval_n, as_one_step=True),
              "student_fd_1step": fd(out / "scd", 1, args.eval_n),
              "student_fd_2step": fd(out / "scd", 2, args.eval_n),
              "eval_n": args.eval_n, "teacher_train_s": round(t_teacher, 1), "student_train_s": round(t_student, 1),
              "wall_s": round(time.time() - start, 1), "student_diffusers": str(out / "scd" / "diffusers")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
