"""End-to-end tests of the trainer (python -m scm_fast.train, torchrun) and the sampler CLI.

Every run is tiny (DiT 'tiny' on the 8x8 digits, global batch 16, a few steps, CPU fp32, one thread) and
runs in a subprocess; runs are compared through run_dir/stats.jsonl (one record per step here) and the
checkpoints' safetensors.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BATCH = 16
KIMG_PER_STEP = BATCH / 1000
# 8 steps of 16 images, a checkpoint every 4 steps
TINY = ["--model", "tiny", "--batch", str(BATCH), "--log-every", "1", "--eval-n", "0", "--n-grid", "4",
        "--no-progress", "--no-tensorboard", "--threads", "1", "--sample-every-kimg", "0",
        "--ckpt-every-kimg", f"{4 * KIMG_PER_STEP:g}"]
FULL = ["--total-kimg", f"{8 * KIMG_PER_STEP:g}"]


def kimg(steps):
    return ["--total-kimg", f"{steps * KIMG_PER_STEP:g}"]


def _env(fault=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("SCM_FAST_FAULT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["SCM_FAST_FAULT"] = fault
    return env


def _torchrun():
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def run(args, nproc=1, fault=None, timeout=180, torchrun_args=(), module="scm_fast.train", check=True):
    """Run the trainer (or another module) -> CompletedProcess; check=True asserts exit code 0."""
    if nproc == 1 and not torchrun_args:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [*_torchrun(), "--standalone", f"--nproc_per_node={nproc}", *torchrun_args, "-m", module, *args]
    # a session of its own: on a timeout the whole group (torchrun and its workers) is killed
    with subprocess.Popen(cmd, cwd=REPO, env=_env(fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s:\n--- stdout\n{out[-3000:]}\n"
                        f"--- stderr\n{err[-3000:]}")
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{_tail(p)}"
    return p


def _tail(p, n=4000):
    return f"--- stdout\n{p.stdout[-n:]}\n--- stderr\n{p.stderr[-n:]}"


def train(run_dir, *extra, **kw):
    return run([*TINY, "--run-dir", str(run_dir), *extra], **kw)


def stats(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines() if line]


def ckpt_dir(run_dir, step):
    return Path(run_dir) / "checkpoints" / f"ckpt-{step:09d}"


def log_text(run_dir):
    return (Path(run_dir) / "log.txt").read_text()


def assert_close_seq(ref, got, key, rel=1e-5, abs_tol=1e-8):
    assert [r["step"] for r in ref] == [g["step"] for g in got]
    for r, g in zip(ref, got):
        assert math.isclose(r[key], g[key], rel_tol=rel, abs_tol=abs_tol), \
            f"step {r['step']}: {key} {r[key]!r} (1 process) vs {g[key]!r}"


# ---- shared runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process, 8 steps, checkpoints at steps 4 and 8."""
    d = tmp_path_factory.mktemp("single") / "run"
    train(d, *FULL)
    return d


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two processes (gloo, DDP), the same command as single_run."""
    d = tmp_path_factory.mktemp("ddp") / "run"
    train(d, *FULL, nproc=2)
    return d


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """One process, the first 4 steps of single_run (its final checkpoint at step 4)."""
    d = tmp_path_factory.mktemp("half") / "run"
    train(d, *kimg(4))
    return d


# ---- one and two processes -----------------------------------------------------------------------
def test_single_process_run(single_run):
    s = stats(single_run)
    assert [r["step"] for r in s] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["skipped"] == 0 for r in s)
    # the network's and the weight head's gradient norms apart (the head's dwarfs the network's early on)
    assert all(r["grad_norm_logvar"] > 0 and math.isfinite(r["grad_norm_logvar"]) for r in s)
    assert len({r["grad_norm"] for r in s} | {r["grad_norm_logvar"] for r in s}) == 16
    assert [r["kimg"] for r in s] == pytest.approx([i * KIMG_PER_STEP for i in range(1, 9)])
    assert len({r["loss"] for r in s}) == 8  # it trains: the loss changes every step
    assert [p.name for p in sorted((single_run / "checkpoints").iterdir())] == ["ckpt-000000004", "ckpt-000000008"]
    cfg = json.loads((single_run / "config.json").read_text())
    assert cfg["model"] == "tiny" and cfg["batch"] == BATCH
    assert sorted(p.name for p in (single_run / "samples").iterdir()) == ["final-1step.png", "final-2step.png"]
    assert "world size 1" in log_text(single_run)


def _weights_close(a_dir, b_dir, atol):
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


def test_ddp_matches_single_process(single_run, ddp_run):
    assert "world size 2 (ddp)" in log_text(ddp_run)
    ref, got = stats(single_run), stats(ddp_run)
    assert len(got) == 8
    assert_close_seq(ref, got, "loss")
    assert_close_seq(ref, got, "grad_norm")
    _weights_close(ckpt_dir(single_run, 8), ckpt_dir(ddp_run, 8), atol=1e-4)


def test_fsdp_matches_single_process(single_run, tmp_path):
    d = tmp_path / "fsdp"
    train(d, *FULL, "--parallel", "fsdp", nproc=2)
    assert "world size 2 (fsdp)" in log_text(d)
    ref, got = stats(single_run), stats(d)
    assert len(got) == 8
    assert_close_seq(ref, got, "loss")
    assert_close_seq(ref, got, "grad_norm")
    _weights_close(ckpt_dir(single_run, 8), ckpt_dir(d, 8), atol=1e-4)  # gathered full weights


def test_global_batch_not_divisible_by_world_size(tmp_path):
    p = train(tmp_path / "r", "--batch", "15", *kimg(1), nproc=2, check=False)
    assert p.returncode != 0
    assert "--batch 15" in p.stderr and "divisible by the world size 2" in p.stderr, _tail(p)


# ---- resume -----------------------------------------------------------------------------------------
def test_resume_is_bit_exact(single_run, half_run, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(half_run, d)
    assert [r["step"] for r in stats(d)] == [1, 2, 3, 4]
    assert [p.name for p in (d / "checkpoints").iterdir()] == ["ckpt-000000004"]
    p = train(d, *FULL)
    assert f"resumed from {ckpt_dir(d, 4)} at step 4" in p.stdout + log_text(d)
    ref, got = stats(single_run), stats(d)
    assert [r["step"] for r in got] == list(range(1, 9))
    # CPU fp32, same command: identical to the uninterrupted run, bit for bit
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]
    a, b = load_file(str(ckpt_dir(single_run, 8) / "model.safetensors")), load_file(str(ckpt_dir(d, 8) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_loader_workers_is_bit_exact(single_run, half_run, tmp_path):
    """Resumed with --workers 2 (batches read ahead by two processes): the same batches, so the same
    run, bit for bit, as the uninterrupted run that read them in the training process."""
    d = tmp_path / "r"
    shutil.copytree(half_run, d)
    train(d, *FULL, "--workers", "2")
    ref, got = stats(single_run), stats(d)
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    a, b = load_file(str(ckpt_dir(single_run, 8) / "model.safetensors")), load_file(str(ckpt_dir(d, 8) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_two_processes_follows_the_single_process_run(single_run, half_run, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(half_run, d)
    train(d, *FULL, nproc=2)
    assert "world size 2 (ddp)" in log_text(d) and f"resumed from {ckpt_dir(d, 4)} at step 4" in log_text(d)
    ref, got = stats(single_run), stats(d)
    assert [r["loss"] for r in got[:4]] == [r["loss"] for r in ref[:4]]
    assert_close_seq(ref, got, "loss")
    assert_close_seq(ref, got, "grad_norm")


def test_rerun_of_finished_run_does_nothing(single_run, tmp_path):
    d = tmp_path / "done"
    shutil.copytree(single_run, d)
    before = stats(d)
    p = train(d, *FULL)
    assert "run already complete at step 8" in p.stdout
    assert stats(d) == before


def test_torchrun_restart_after_kill_loses_nothing(ddp_run, tmp_path):
    d = tmp_path / "killed"
    p = train(d, *FULL, nproc=2, torchrun_args=["--max-restarts=1"], fault="kill@6:1", timeout=180)
    log = log_text(d)
    assert log.count("world size 2 (ddp)") == 2, log  # two attempts
    assert f"resumed from {ckpt_dir(d, 4)} at step 4" in log, _tail(p)
    ref, got = stats(ddp_run), stats(d)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]


# ---- SIGTERM ----------------------------------------------------------------------------------------
def test_sigterm_checkpoints_and_resumes(tmp_path):
    d = tmp_path / "term"
    cmd = [sys.executable, "-m", "scm_fast.train", *TINY, "--ckpt-every-kimg", "0", "--total-kimg", "20",
           "--run-dir", str(d)]
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=err, start_new_session=True)
        try:
            deadline = time.time() + 120
            while not ((d / "stats.jsonl").exists() and (d / "stats.jsonl").read_text().strip()):
                assert proc.poll() is None, "the run ended before it was signalled"
                assert time.time() < deadline, "no stats record within 120 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 0, (tmp_path / "err.txt").read_text()[-3000:]
    step = stats(d)[-1]["step"]
    assert 1 <= step < 1250
    log = log_text(d)
    assert "received signal 15" in log and f"checkpoint at step {step} written" in log
    assert [p.name for p in (d / "checkpoints").iterdir()] == [f"ckpt-{step:09d}"]
    assert "samples: " not in log  # it stopped: no final samples
    # re-running resumes from that checkpoint (here with a total of one more step)
    p = train(d, "--ckpt-every-kimg", "0", *kimg(step + 1))
    assert f"resumed from {ckpt_dir(d, step)} at step {step}" in p.stdout
    assert [r["step"] for r in stats(d)] == list(range(1, step + 2))


# ---- non-finite steps ---------------------------------------------------------------------------------
def _all_finite(path):
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_nan_step_is_skipped(single_run, tmp_path):
    d = tmp_path / "nan"
    p = train(d, *FULL, fault="nan@3")
    s = stats(d)
    assert [r["step"] for r in s] == list(range(1, 9))
    assert [r["skipped"] for r in s] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert math.isnan(s[2]["loss"])
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(s) if i != 2)
    assert "step 3: non-finite loss" in p.stdout
    assert [r["loss"] for r in s[:2]] == [r["loss"] for r in stats(single_run)[:2]]
    # the skipped step changed neither the weights nor the EMA
    final = ckpt_dir(d, 8)
    assert _all_finite(final / "model.safetensors") and _all_finite(final / "ema-halflife-10k.safetensors")


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    d = tmp_path / "nans"
    p = train(d, *kimg(4), "--max-nonfinite", "2", fault="nan@1,nan@2,nan@3,nan@4", check=False)
    assert p.returncode == 3  # NonFiniteStop: what experiments/reproduce.py tells from a failure
    assert "2 non-finite steps in a row" in p.stderr, _tail(p)
    assert "--max-nonfinite 2" in p.stderr
    assert [r["step"] for r in stats(d)] == [1, 2]
    assert ckpt_dir(d, 2).is_dir()


# ---- corrupt checkpoint --------------------------------------------------------------------------------
def test_corrupt_checkpoint_falls_back_to_previous(single_run, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(single_run, d)
    bad = ckpt_dir(d, 8) / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    p = train(d, *FULL)
    lines = [line for line in p.stdout.splitlines() if "unusable" in line]
    assert lines and str(ckpt_dir(d, 8)) in lines[0] and "model.safetensors" in lines[0], p.stdout
    assert f"resumed from {ckpt_dir(d, 4)} at step 4" in p.stdout
    # steps 5..8 are trained again, exactly as before
    assert [r["loss"] for r in stats(d)] == [r["loss"] for r in stats(single_run)]


# ---- configuration errors ---------------------------------------------------------------------------------
def test_bad_cli_value_exits_2_in_a_subprocess(tmp_path):
    p = train(tmp_path / "r", "--objective", "foo", check=False)
    assert p.returncode == 2
    assert "--objective" in p.stderr and "foo" in p.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, flag", [
    (["--objective", "foo"], "--objective"),
    (["--batch", "0"], "--batch"),
    (["--batch", "abc"], "--batch"),
    (["--lr", "-1"], "--lr"),
    (["--betas", "0.9"], "--betas"),
    (["--betas", "0.9,x"], "--betas"),
    (["--total-kimg", "0"], "--total-kimg"),
    (["--ema", "sometimes"], "--ema"),
    (["--parallel", "tp"], "--parallel"),
    (["--objective", "scd"], "--teacher"),
    (["--preset", "nope"], "--preset"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_cli_values(args, flag, capsys):
    from scm_fast import train as train_mod
    with pytest.raises(SystemExit) as info:
        train_mod.main(["--run-dir", "/nonexistent/never-created", *args])
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("batch", [1, 3, 16, 128, 512, 2048])
def test_training_length_is_exact_in_steps(batch):
    """--total-kimg / --ckpt-every-kimg that are whole numbers of batches give exactly that many steps
    (no float round-up: 2007 x 16 images = 32.112 kimg is 2007 steps, not 2008)."""
    from decimal import Decimal
    from scm_fast import config
    for steps in (1, 2, 7, 2007, 2011, 40_003, 99_999):
        assert config.steps_for(float(Decimal(steps * batch) / 1000), batch) == steps
    assert config.steps_for(float(Decimal(7 * batch + 1) / 1000), batch) == 8  # a partial batch rounds up
    assert config.steps_for(1e-6, batch) == 1


def test_missing_data_is_a_clear_error(tmp_path):
    p = train(tmp_path / "r", "--data", "/nonexistent/data.npz", *kimg(1), check=False)
    assert p.returncode != 0
    assert "--data" in p.stderr and "/nonexistent/data.npz" in p.stderr and "does not exist" in p.stderr
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "r").exists()  # nothing written for a command that cannot run


def test_missing_teacher_is_a_clear_error(tmp_path):
    p = train(tmp_path / "r", "--objective", "scd", "--teacher", str(tmp_path / "no-teacher"), *kimg(1), check=False)
    assert p.returncode != 0
    assert "--teacher" in p.stderr and "no-teacher" in p.stderr
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def test_teacher_must_be_a_diffusion_run(single_run, tmp_path):
    p = train(tmp_path / "r", "--objective", "scd", "--teacher", str(single_run), *kimg(1), check=False)
    assert p.returncode != 0
    assert "--teacher" in p.stderr and "diffusion" in p.stderr and "'sct'" in p.stderr
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


# ---- sCD end to end ---------------------------------------------------------------------------------------
def test_scd_student_starts_from_teacher(tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    train(teacher, "--objective", "diffusion", *kimg(3))
    assert len(stats(teacher)) == 3
    t_ckpt = ckpt_dir(teacher, 3)
    assert (t_ckpt / "ema-halflife-10k.safetensors").exists()
    # a different seed (different fresh weights) and an lr so small that the weights cannot move
    p = train(student, "--objective", "scd", "--teacher", str(teacher), "--seed", "1", "--lr", "1e-30", *kimg(2))
    assert f"teacher: {t_ckpt} (ema-halflife-10k)" in p.stdout
    assert f"initialised from {teacher}" in p.stdout
    s = stats(student)
    assert [r["step"] for r in s] == [1, 2] and all(math.isfinite(r["loss"]) for r in s)
    tw = load_file(str(t_ckpt / "ema-halflife-10k.safetensors"))
    sw = load_file(str(ckpt_dir(student, 2) / "model.safetensors"))
    new = sorted(k for k in sw if k not in tw)
    assert new and all(k.startswith(("guidance.", "logvar.")) for k in new), new
    for k, v in tw.items():
        assert torch.allclose(sw[k], v, rtol=0, atol=1e-12), f"{k} is not the teacher's (EMA) weight"
    # the guidance embedding's output layer starts at zero: the student starts as the teacher
    out = [k for k in new if k.startswith("guidance.mlp.2.")]
    assert out and all(sw[k].abs().max() <= 1e-12 for k in out)
    # and they are not what a fresh student of this seed holds
    from scm_fast import config
    from scm_fast.models import build_network
    torch.manual_seed(1)
    init = build_network(config.resolve(model="tiny", objective="scd", teacher=str(teacher)), (1, 8, 8), 10)
    init = init.state_dict()
    assert any(not torch.allclose(init[k], tw[k]) for k in tw)
    # the adaptive weight head starts at its equilibrium (objectives.initial_logvar), constant in t
    from scm_fast import objectives
    cfg = config.resolve(objective="scd", teacher=str(teacher))
    lv = objectives.initial_logvar("scd", cfg.tangent_norm, 64, cfg.sigma_d, cfg.P_mean, cfg.P_std, cfg.tangent_norm_c)
    assert lv < -4 and f"logvar(t) starts at {lv:.3f}" in p.stdout
    assert sw["logvar.linear.bias"].item() == pytest.approx(lv, abs=1e-6)
    assert sw["logvar.linear.weight"].abs().max() <= 1e-12


# ---- sampling ----------------------------------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_sample_cli_writes_pngs_and_npz(single_run, tmp_path):
    out = tmp_path / "samples"
    p = run(["--ckpt", str(single_run), "--n", "5", "--steps", "2", "--outdir", str(out), "--device", "cpu"],
            module="scm_fast.sample", timeout=120)
    assert "wrote 5 samples" in p.stdout
    _png_size(out / "grid.png")
    pngs = sorted((out / "images").iterdir())
    assert [q.name for q in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert all(_png_size(q) == (8, 8) for q in pngs)
    with np.load(out / "samples.npz") as z:
        assert z["images"].shape == (5, 8, 8, 1) and z["images"].dtype == np.uint8
        assert z["labels"].tolist() == [0, 1, 2, 3, 4]
        assert z["images"].std() > 0
    info = json.loads((out / "sample.json").read_text())
    assert info["checkpoint"] == str(ckpt_dir(single_run, 8)) and info["weights"] == "ema-halflife-10k"


def test_sample_cli_bad_checkpoint(tmp_path):
    p = run(["--ckpt", str(tmp_path / "nothing"), "--outdir", str(tmp_path / "o")], module="scm_fast.sample",
            check=False, timeout=120)
    assert p.returncode == 2 and "--ckpt" in p.stderr


# ---- --dry-run ----------------------------------------------------------------------------------------------
def _dry_run_output(stdout):
    cfg, end = json.JSONDecoder().raw_decode(stdout)
    return cfg, stdout[end:].strip().splitlines()


def _memory_lines(lines):
    start = next(i for i, line in enumerate(lines) if line.startswith("estimated memory per device"))
    return lines[start], {line.split("  ")[1].strip(): line.strip().split(None)[-2:] for line in lines[start + 1:]
                          if line.startswith("  ")}


def test_dry_run_tiny(tmp_path):
    from scm_fast import config
    from scm_fast.models import build_network
    from scm_fast.train.dry_run import format_bytes
    p = run(["--model", "tiny", "--dry-run", "--run-dir", str(tmp_path / "r")], timeout=120)
    cfg, lines = _dry_run_output(p.stdout)
    assert cfg["model"] == "tiny" and cfg["preset"] == "digits-sct"
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    c = config.resolve(model="tiny")
    n = sum(q.numel() for q in build_network(c, (1, 8, 8), 10).parameters())
    assert f"network dit tiny: {n:,} parameters" in p.stdout
    head, mem = _memory_lines(lines)
    assert "world size 1" in head and "batch 128 per device" in head
    for part in ("weights", "gradients", "optimizer", "ema", "activations", "total"):
        assert part in mem, (part, lines)
    assert " ".join(mem["weights"]) == format_bytes(4 * n)
    assert " ".join(mem["optimizer"]) == format_bytes(8 * n)


def test_dry_run_imagenet512_scd_without_data():
    from scm_fast.train.dry_run import format_bytes
    p = run(["--preset", "imagenet512-scd", "--dry-run", "--world-size", "8"], timeout=120)
    cfg, lines = _dry_run_output(p.stdout)
    assert cfg["preset"] == "imagenet512-scd" and cfg["objective"] == "scd" and cfg["parallel"] == "fsdp"
    line = next(line for line in lines if " parameters (" in line)
    n = int(line.split(": ")[1].split(" parameters")[0].replace(",", ""))
    assert n > 100_000_000
    head, mem = _memory_lines(lines)
    assert "world size 8, fsdp" in head and f"batch {cfg['batch'] // 8} per device" in head
    assert " ".join(mem["weights"]) == format_bytes(4 * n / 8)  # FSDP2 shards the weights
    assert "teacher (no grad)" in mem and "total" in mem


def test_activation_checkpointing_gives_the_two_pass_step(tmp_path):
    """--act-ckpt recomputes the blocks in the gradient pass, so the step runs two-pass (logged);
    losses and grad norms equal a two-pass run without checkpointing, and the one-pass run's."""
    runs = {}
    for name, extra in (("ckpt", ["--act-ckpt"]), ("two_pass", ["--no-one-pass"]), ("one_pass", [])):
        runs[name] = tmp_path / name
        train(runs[name], "--total-kimg", f"{4 * KIMG_PER_STEP:g}", *extra)
    assert "act_ckpt: the gradient pass is checkpointed" in log_text(runs["ckpt"])
    for other in ("two_pass", "one_pass"):
        assert_close_seq(stats(runs[other]), stats(runs["ckpt"]), "loss")
        assert_close_seq(stats(runs[other]), stats(runs["ckpt"]), "grad_norm")


def test_checkpointed_blocks_recompute_in_backward():
    import torch
    from scm_fast import train as train_mod
    from scm_fast.models import DiT, dit_config
    net = DiT(dit_config("tiny", img_size=4, in_channels=1, patch=1))
    calls = []
    for block in net.blocks:  # count calls of each block's own forward (the function checkpointing reruns)
        def counted(*args, _forward=block.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)
        block.forward = counted
    train_mod.checkpoint_blocks(net)
    out = net(torch.randn(2, 1, 4, 4), torch.tensor([0.3, 1.0]))
    assert len(calls) == len(net.blocks)
    out.square().sum().backward()
    assert len(calls) == 2 * len(net.blocks)  # each block's forward ran again during backward
