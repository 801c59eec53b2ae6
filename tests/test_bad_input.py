"""Bad input to the trainer (issue 15): data of any channel count, broken or ambiguous data files, and
teachers / --init runs that do not fit the student. Each case is a real, tiny run of the trainer in a
subprocess (tests/test_train.py's TINY flags); refused input exits 1 with a message and no traceback,
and data that cannot be used is refused before the run directory is created."""
import numpy as np
import pytest

from test_data import _corrupt_idat
from scm_fast import images
from test_train import KIMG_PER_STEP, _tail, kimg, run, train


def _refused(p, *needles):
    """The run exited 1 with a one-message error (no traceback) holding every needle."""
    assert p.returncode == 1, _tail(p)
    assert "Traceback" not in p.stderr, _tail(p)
    for needle in needles:
        assert needle in p.stderr, f"{needle!r} not in the error:\n{_tail(p)}"


# ---- any channel count: the sample grids ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["latents-4ch", "images-5ch"])
def test_any_channel_count_trains_and_writes_grids(tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "latents-4ch":
        lat = rng.normal(size=(32, 4, 8, 8)).astype(np.float32) * [[[[1.0]], [[3.0]], [[0.5]], [[2.0]]]]
        np.savez(tmp_path / "lat.npz", latents=lat.astype(np.float32), labels=np.arange(32) % 4,
                 mean=np.zeros(4), std=np.array([1.0, 3.0, 0.5, 2.0]))
        spec, c, nrow, rows = f"latents:{tmp_path / 'lat.npz'}", 4, 8, 1  # labeled: max(classes, 8) a row
    else:
        np.save(tmp_path / "x5.npy", rng.uniform(-1, 1, (32, 5, 8, 8)).astype(np.float32))
        spec, c, nrow, rows = str(tmp_path / "x5.npy"), 5, 2, 2  # unlabeled: ceil(sqrt(4)) a row
    d = tmp_path / "run"
    p = train(d, "--data", spec, *kimg(2), "--sample-every-kimg", f"{KIMG_PER_STEP:g}", "--sigma-d", "0.5")
    names = sorted(q.name for q in (d / "samples").iterdir())
    assert names == ["000000k-1step.png", "000000k-2step.png", "final-1step.png", "final-2step.png"], _tail(p)
    grid = images.read_image(d / "samples" / "final-1step.png", keep_alpha=True)
    # --n-grid 4 cells 2 px apart, each the C channels as 8 px grayscale tiles; upscaled 4x (32 px)
    assert grid.shape == (4 * (rows * (8 + 2) + 2), 4 * (nrow * (c * 8 + 2) + 2), 1)
    assert len(np.unique(grid)) > 10  # normalised per channel: not a blank or saturated image
    # the sampler CLI on the same run: grid and samples.npz, no per-image PNG of latents
    out = tmp_path / "samples"
    run(["--ckpt", str(d), "--n", "3", "--outdir", str(out), "--device", "cpu"], module="scm_fast.sample")
    assert np.load(out / "samples.npz")["images"].shape == (3, 8, 8, c) and (out / "grid.png").is_file()
    assert not (out / "images").exists()


# ---- bad data files: refused before the run directory exists ---------------------------------------
def _bad_data(tmp_path, case):
    """(--data value, the file the error must name, a phrase it must hold)."""
    rng = np.random.default_rng(1)
    if case == "truncated-npz":
        np.savez(tmp_path / "ok.npz", x=rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8))
        data = (tmp_path / "ok.npz").read_bytes()
        (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
        return str(tmp_path / "cut.npz"), "cut.npz", "not a readable .npz (truncated or corrupt"
    if case == "nonsquare-npz":
        np.savez(tmp_path / "rect.npz", x=rng.integers(0, 256, (32, 8, 6, 3), dtype=np.uint8))
        return str(tmp_path / "rect.npz"), "rect.npz holds 8x6 images", "square"
    if case == "nan-latents":
        lat = rng.normal(size=(32, 4, 8, 8)).astype(np.float32)
        lat[5, 0, 1, 1], lat[9, 3, 0, 0] = np.nan, np.inf
        np.savez(tmp_path / "lat.npz", latents=lat, mean=np.zeros(4), std=np.ones(4))
        return f"latents:{tmp_path / 'lat.npz'}", "lat.npz: 2 non-finite values", "first in sample 5"
    if case == "corrupt-png":
        for i in range(8):
            images.write_png(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        _corrupt_idat(tmp_path / "imgs" / "3.png")  # valid header and CRCs, garbage pixel data
        return str(tmp_path / "imgs"), "3.png", "--data"
    if case == "ambiguous-layout":
        np.save(tmp_path / "cube.npy", rng.integers(0, 256, (32, 4, 4, 4), dtype=np.uint8))
        return str(tmp_path / "cube.npy"), "cube.npy", "ambiguous"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated-npz", "nonsquare-npz", "nan-latents", "corrupt-png",
                                  "ambiguous-layout"])
def test_bad_data_is_refused_before_the_run_dir(tmp_path, case):
    spec, name, phrase = _bad_data(tmp_path, case)
    d = tmp_path / "run"
    p = train(d, "--data", spec, *kimg(1), check=False)
    _refused(p, name, phrase)
    assert not d.exists()


# ---- teachers and --init runs that do not fit the student --------------------------------------------
@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two one-step TrigFlow teachers on digits (DiT tiny): class-conditional and unconditional."""
    root = tmp_path_factory.mktemp("teachers")
    train(root / "cond", "--objective", "diffusion", *kimg(1))
    train(root / "uncond", "--objective", "diffusion", "--no-class-cond", *kimg(1))
    return root


def test_teacher_of_another_size(teachers, tmp_path):
    p = train(tmp_path / "r", "--objective", "scd", "--teacher", str(teachers / "cond"), "--model", "digits",
              *kimg(1), check=False)
    _refused(p, f"--teacher {teachers / 'cond'}", "dit tiny", "dit digits", "patchify.weight", "(64, 4)",
             "(128, 4)")


def test_teacher_of_another_arch(teachers, tmp_path):
    p = train(tmp_path / "r", "--objective", "scd", "--teacher", str(teachers / "cond"), "--arch", "unet",
              *kimg(1), check=False)
    _refused(p, "--teacher", "dit tiny", "unet tiny")


def test_init_of_another_size(teachers, tmp_path):
    p = train(tmp_path / "r", "--objective", "sct", "--init", str(teachers / "cond"), "--model", "digits",
              *kimg(1), check=False)
    _refused(p, f"--init {teachers / 'cond'}", "dit tiny", "dit digits", "patchify.weight")


def test_unconditional_teacher_with_conditional_student(teachers, tmp_path):
    p = train(tmp_path / "r", "--objective", "scd", "--teacher", str(teachers / "uncond"), *kimg(1), check=False)
    _refused(p, f"--teacher {teachers / 'uncond'}", "unconditional", "class-conditional teacher",
             "--no-class-cond")


@pytest.mark.parametrize("init", ["teacher", "uncond-init"])
def test_conditional_teacher_with_unconditional_student(teachers, tmp_path, init):
    extra = ["--init", str(teachers / "uncond")] if init == "uncond-init" else []
    p = train(tmp_path / "r", "--objective", "scd", "--teacher", str(teachers / "cond"), "--no-class-cond",
              *extra, *kimg(1), check=False)
    _refused(p, f"--teacher {teachers / 'cond'}", "class-conditional (10 classes)", "unconditional")


def test_unconditional_teacher_and_student_train(teachers, tmp_path):
    p = train(tmp_path / "r", "--objective", "scd", "--teacher", str(teachers / "uncond"), "--no-class-cond",
              *kimg(1))
    assert f"initialised from {teachers / 'uncond'}" in p.stdout
