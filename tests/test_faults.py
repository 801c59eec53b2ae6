"""The trainer under faults (docs/reliability.md): kills at random points of the checkpoint path,
torn stats, corrupt and unloadable checkpoints, a second trainer on the same run directory, resumes
with a changed config, a full disk and a read-only filesystem (tmpfs mounts, skipped where the test
cannot mount), signals in setup, in a checkpoint write and in the final evaluation.

Every run is test_train's tiny run (8 steps of 16 images) in a real subprocess; bit-exact means
the same loss at every step and the same final weights as an uninterrupted run."""
import hashlib
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from test_train import FULL, REPO, TINY, _env, _tail, ckpt_dir, kimg, log_text, run, stats, train

EVERY_STEP = ["--ckpt-every-kimg", "0.016"]  # a checkpoint after every step: the checkpoint path is hit often


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _final_weights(run_dir, step=8):
    return _digest(ckpt_dir(run_dir, step) / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every faulted run must reproduce (a checkpoint after every step, keep 2)."""
    d = tmp_path_factory.mktemp("ref") / "run"
    train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "2")
    return d


def _assert_same_run(ref, got):
    assert [r["step"] for r in stats(got)] == list(range(1, 9))
    assert [r["loss"] for r in stats(got)] == [r["loss"] for r in stats(ref)]
    assert _final_weights(got) == _final_weights(ref)


# ---- kill -9 anywhere in the checkpoint path, then resume -----------------------------------------
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_kill_at_a_random_checkpoint_operation_then_resume_bit_exact(reference, tmp_path, seed):
    n = random.Random(seed).randint(1, 60)  # 8 checkpoints x ~9 file operations (writes, manifest, renames, prunes)
    d = tmp_path / "run"
    p = train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "2", fault=f"killio@{n}", check=False)
    assert p.returncode == -9, f"killio@{n} did not kill the run:\n{_tail(p)}"
    train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "2")
    _assert_same_run(reference, d)
    assert not list((d / "checkpoints").glob(".tmp-*")), "a staged checkpoint was left behind"


# ---- stats.jsonl ----------------------------------------------------------------------------------------
def test_torn_stats_line_is_dropped_on_resume(reference, tmp_path):
    d = tmp_path / "run"
    train(d, *kimg(4), *EVERY_STEP, "--keep-ckpts", "2")
    with open(d / "stats.jsonl", "a") as f:
        f.write('{"step": 5, "kimg": 0.08, "lo')  # a kill or a full disk in the middle of an append
    p = train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "2")
    assert "dropped 1 unreadable line" in p.stdout
    _assert_same_run(reference, d)


def test_rerun_after_a_kill_before_the_first_checkpoint_keeps_one_record_per_step(tmp_path):
    d = tmp_path / "run"
    p = train(d, *FULL, fault="kill@3:0", check=False)  # TINY checkpoints every 4 steps
    assert p.returncode == -9 and [r["step"] for r in stats(d)] == [1, 2]
    train(d, *FULL)
    assert [r["step"] for r in stats(d)] == list(range(1, 9))


# ---- unusable checkpoints -------------------------------------------------------------------------
def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_checkpoint_corrupt_refuses_and_changes_nothing(tmp_path):
    d = tmp_path / "run"
    train(d, *FULL)
    for step in (4, 8):
        _flip_a_byte(ckpt_dir(d, step) / "model.safetensors")
    before = {p: _digest(p) for p in (d / "checkpoints").rglob("*") if p.is_file()}
    p = train(d, *kimg(12), check=False)
    assert p.returncode == 1 and "none of the 2 checkpoints" in p.stderr and "Traceback" not in p.stderr, _tail(p)
    assert "model.safetensors: checksum mismatch" in p.stderr
    assert {p: _digest(p) for p in (d / "checkpoints").rglob("*") if p.is_file()} == before


def _unloadable_checkpoint(run_dir, step):
    """A checkpoint that verifies (a good manifest) but holds no trainer state."""
    from scm_fast import checkpoint
    staged = checkpoint.stage(run_dir / "checkpoints", step, rank=0)
    checkpoint.write_object(staged, "meta", {"config": {}})
    checkpoint.write_object(staged, "state", {"step": step})
    checkpoint.commit(staged, keep=None, log=None)


def test_a_checkpoint_that_verifies_but_does_not_load_falls_back_and_is_kept_aside(reference, tmp_path):
    d = tmp_path / "run"
    train(d, *kimg(4), *EVERY_STEP, "--keep-ckpts", "2")
    _unloadable_checkpoint(d, 6)
    p = train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "2")
    assert f"checkpoint {ckpt_dir(d, 6)} is unusable: it verifies but does not load" in p.stdout, p.stdout
    assert f"resumed from {ckpt_dir(d, 4)} at step 4" in p.stdout
    assert (d / "checkpoints" / "corrupt-ckpt-000000006").is_dir()  # kept for inspection, not pruned
    _assert_same_run(reference, d)


def test_newer_corrupt_checkpoints_do_not_crowd_out_the_new_ones(tmp_path):
    d = tmp_path / "run"
    train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "3")
    for step in (7, 8):
        _flip_a_byte(ckpt_dir(d, step) / "model.safetensors")
    train(d, *kimg(10), *EVERY_STEP, "--keep-ckpts", "3")
    names = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert names == ["ckpt-000000008", "ckpt-000000009", "ckpt-000000010", "corrupt-ckpt-000000007",
                     "corrupt-ckpt-000000008"], names


# ---- one trainer per run directory ----------------------------------------------------------------
def _start(run_dir, *extra):
    cmd = [sys.executable, "-m", "scm_fast.train", *TINY, "--run-dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_stats(proc, run_dir, timeout=120):
    deadline = time.time() + timeout
    while not ((run_dir / "stats.jsonl").exists() and (run_dir / "stats.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no stats record in time"
        time.sleep(0.05)


def test_a_second_trainer_on_the_same_run_directory_is_refused(tmp_path):
    d = tmp_path / "run"
    first = _start(d, "--total-kimg", "20", "--ckpt-every-kimg", "0")
    try:
        _wait_for_stats(first, d)
        p = train(d, *FULL, check=False)
        assert p.returncode == 1 and "is in use by another trainer (pid" in p.stderr, _tail(p)
        assert "Traceback" not in p.stderr
    finally:
        first.kill()  # SIGKILL: the lock file keeps its details, the kernel drops the lock
        first.communicate()
    steps = [r["step"] for r in stats(d)]
    assert steps == list(range(1, len(steps) + 1)), "the refused trainer wrote into the run"
    p = train(d, *FULL)  # the dead trainer's lock is taken over
    assert f"took over the lock of a trainer that is gone (pid {first.pid}" in p.stdout, p.stdout


# ---- resuming with another config -----------------------------------------------------------------
@pytest.fixture(scope="module")
def half(tmp_path_factory):
    d = tmp_path_factory.mktemp("half") / "run"
    train(d, *kimg(4))
    return d


@pytest.mark.parametrize("flags, field", [
    (["--lr", "0.01"], "lr"), pytest.param(["--seed", "1"], "seed", marks=pytest.mark.slow),
    pytest.param(["--preset", "digits-teacher", "--model", "tiny"], "preset", marks=pytest.mark.slow)])
def test_a_changed_config_is_refused_with_the_fields_and_then_allowed(half, tmp_path, flags, field):
    import shutil
    d = tmp_path / "run"
    shutil.copytree(half, d)
    saved = (d / "config.json").read_text()
    p = train(d, *FULL, *flags, check=False)
    assert p.returncode == 1 and "differs from the run's saved config.json" in p.stderr, _tail(p)
    assert f"  {field.replace('_', '-')}: " in p.stderr and "Traceback" not in p.stderr
    assert (d / "config.json").read_text() == saved, "config.json was overwritten by a refused resume"
    if field == "preset":
        assert "cannot change on a resume" in p.stderr and "--objective" in p.stderr.split("cannot change")[0]
        return
    changed = p.stderr.split("--allow-change ")[1].split()[0]
    assert field in changed.split(",")
    p = train(d, *FULL, *flags, "--allow-change", changed)
    assert f"resuming with changed {field}" in p.stdout and f"resumed from {ckpt_dir(d, 4)}" in p.stdout


@pytest.mark.parametrize("flags", [["--ema", "none", "--optimizer", "adam", "--model", "digits"],
                                   ["--objective", "diffusion", "--allow-change", "objective"]])
def test_changes_that_cannot_resume_are_refused_even_when_allowed(half, tmp_path, flags):
    import shutil
    d = tmp_path / "run"
    shutil.copytree(half, d)
    p = train(d, *FULL, *flags, check=False)
    assert p.returncode == 1 and "cannot change on a resume" in p.stderr and "Traceback" not in p.stderr, _tail(p)
    for flag in flags[::2]:
        if flag != "--allow-change":
            assert f"  {flag[2:]}: " in p.stderr, (flag, p.stderr)


# ---- full disk, read-only filesystem (tmpfs mounts) -------------------------------------------------
@contextmanager
def _tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}): needs root or CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount(path, opts):
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True, capture_output=True)


def _checkpoint_bytes(run_dir):
    return max(sum(f.stat().st_size for f in c.rglob("*") if f.is_file()) for c in (run_dir / "checkpoints").iterdir())


def test_disk_full_stops_cleanly_and_the_run_resumes_after(reference, tmp_path):
    size = _checkpoint_bytes(reference)
    with _tmpfs(tmp_path / "disk", f"{int(1.5 * size) + 200_000}") as disk:
        d = disk / "run"
        p = train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "2", check=False)
        assert p.returncode == 1 and "No space left on device" in p.stderr and "Traceback" not in p.stderr, _tail(p)
        assert not list((d / "checkpoints").glob(".tmp-*")), "the partial checkpoint was not removed"
        _remount(disk, f"size={3 * size + 400_000}")  # room for the two checkpoints --keep-ckpts 2 keeps
        train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "2")
        _assert_same_run(reference, d)


def test_a_disk_that_holds_keep_checkpoints_is_enough(reference, tmp_path):
    size = _checkpoint_bytes(reference)
    with _tmpfs(tmp_path / "disk", f"{int(2.6 * size) + 300_000}") as disk:  # 2 checkpoints fit, 3 do not
        d = disk / "run"
        train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "2")
        _assert_same_run(reference, d)


def test_read_only_run_directory_is_a_clear_error(tmp_path):
    with _tmpfs(tmp_path / "ro", "4m") as disk:
        _remount(disk, "ro")
        p = train(disk / "run", *FULL, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, _tail(p)
        assert f"--run-dir {disk / 'run'}: cannot create it or write into it (Read-only file system)" in p.stderr


# ---- signals --------------------------------------------------------------------------------------
def test_sigterm_during_setup_exits_0_having_trained_nothing(tmp_path):
    d = tmp_path / "run"
    p = train(d, *FULL, fault="term@setup")
    assert "received signal 15: stopping once set up" in p.stdout and "nothing was trained" in p.stdout
    assert not (d / "checkpoints").exists() or not list((d / "checkpoints").iterdir())
    train(d, *FULL)
    assert [r["step"] for r in stats(d)] == list(range(1, 9))


def test_sigterm_during_a_checkpoint_write_finishes_it_then_stops(reference, tmp_path):
    d = tmp_path / "run"
    p = train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "2", fault="term@ckpt")
    assert "received signal 15: finishing the step, then checkpointing" in p.stdout
    assert "stop requested: checkpoint at step 2 written" in p.stdout, p.stdout  # the step after the signal
    train(d, *FULL, *EVERY_STEP, "--keep-ckpts", "2")
    _assert_same_run(reference, d)


def test_sigterm_during_the_final_evaluation_stops_it(tmp_path):
    d = tmp_path / "run"
    p = train(d, *FULL, "--eval-n", "200", fault="term@eval")
    assert "during the final sampling / evaluation: stopped it" in p.stdout, p.stdout
    assert ckpt_dir(d, 8).is_dir() and not (d / "eval.json").exists()
    p = train(d, *FULL, "--eval-n", "200")  # the rerun samples and evaluates
    assert "run already complete at step 8" in p.stdout and (d / "eval.json").exists()
    assert "received signal" not in log_text(d).split("run already complete")[-1]
