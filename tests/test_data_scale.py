"""Data larger than memory: .npy files read sample by sample (NpyRows), streaming checks and latent
statistics, the loader's worker processes, and a trainer run on an array far larger than its memory."""
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scm_fast import data, loader, npy

REPO = Path(__file__).resolve().parents[1]


def _save(tmp_path, name, a, fortran=False):
    path = tmp_path / name
    np.save(path, np.asfortranarray(a) if fortran else a)
    return path


@pytest.mark.parametrize("shape, dtype", [((37, 5, 5), np.uint8), ((23, 6, 6, 3), np.uint8),
                                          ((19, 4, 3, 3), np.float16), ((11, 2, 4, 4), np.float32)])
def test_npy_rows_read_what_np_load_reads(tmp_path, shape, dtype):
    a = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    rows = npy.NpyRows.open(_save(tmp_path, "a.npy", a))
    assert rows.shape == a.shape and rows.dtype == a.dtype and len(rows) == len(a)
    idx = np.random.default_rng(1).integers(0, len(a), 40)
    np.testing.assert_array_equal(rows[idx], a[idx])  # any order, repeats
    np.testing.assert_array_equal(rows[3:9], a[3:9])
    np.testing.assert_array_equal(rows[len(a) - 2:len(a) + 5], a[len(a) - 2:])


def test_fortran_order_npy_is_memory_mapped_and_reads_the_same(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, (9, 6, 6, 3), dtype=np.uint8)
    path = _save(tmp_path, "f.npy", a, fortran=True)
    assert npy.NpyRows.open(path) is None
    ds = data.load_arrays(path)
    ref = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float() / 127.5 - 1.0
    assert torch.equal(ds.get_batch(torch.arange(9))[0], ref)


def test_truncated_npy_is_named(tmp_path):
    path = _save(tmp_path, "t.npy", np.zeros((100, 8, 8), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"t\.npy.*truncated"):
        data.load_arrays(path)


def test_npy_images_are_read_per_batch_and_match_the_whole_array(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, (50, 8, 8, 2), dtype=np.uint8)  # gray + alpha, NHWC
    ds = data.load_arrays(_save(tmp_path, "ga.npy", a))
    assert isinstance(ds._array, npy.NpyRows)
    idx = torch.tensor([7, 0, 49, 7])
    x, labels = ds.get_batch(idx)
    ref = torch.from_numpy(np.ascontiguousarray(a[idx.numpy(), ..., :1].transpose(0, 3, 1, 2))).float() / 127.5 - 1.0
    assert torch.equal(x, ref)
    assert x.dtype == torch.float32 and labels is None and ds.shape == (1, 8, 8)


def test_float_images_out_of_range_are_found_in_a_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK", 4)
    a = np.zeros((10, 1, 4, 4), np.float32)
    a[9, 0, 1, 1] = 3.0
    with pytest.raises(ValueError, match="absolute max 3"):
        data.load_arrays(_save(tmp_path, "f.npy", a))
    a[9, 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="first in sample 9 .of 10."):
        data.load_arrays(_save(tmp_path, "n.npy", a))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_latent_statistics_stream_exactly(tmp_path, monkeypatch, dtype):
    """Chunked (Chan) per-channel mean/std equal the whole-array float64 ones; batches are normalized
    as (latent - mean) / std * sigma_d, read from the .npy batch by batch."""
    monkeypatch.setattr(data, "CHUNK", 7)
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((40, 4, 3, 3)) * np.array([3.0, 0.5, 1.0, 8.0])[None, :, None, None] + 2.0).astype(dtype)
    ds = data.LatentData(_save(tmp_path, "lat.npy", a), sigma_d=0.5)
    a64 = a.astype(np.float64)
    mean, std = a64.mean(axis=(0, 2, 3)), a64.std(axis=(0, 2, 3))
    np.testing.assert_allclose(ds.mean.numpy(), mean.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(ds.std.numpy(), std.astype(np.float32), rtol=1e-6)
    idx = torch.tensor([3, 39, 0])
    ref = (a64[idx.numpy()] - mean[None, :, None, None]) / std[None, :, None, None] * 0.5
    np.testing.assert_allclose(ds.get_batch(idx)[0].numpy(), ref.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert isinstance(ds._latents, npy.NpyRows)


def test_nan_latents_are_named_with_their_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK", 8)
    a = np.ones((30, 2, 2, 2), np.float32)
    a[21, 1] = np.inf
    with pytest.raises(ValueError, match=r"lat\.npy: 4 non-finite.*first in sample 21 \(of 30\)"):
        data.LatentData(_save(tmp_path, "lat.npy", a))


def _batches(batches, n):
    return [batches.next() for _ in range(n)]


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_workers_give_the_batches_of_the_sampler(tmp_path, workers):
    a = np.random.default_rng(0).integers(0, 255, (45, 4, 4), dtype=np.uint8)
    ds = data.load_arrays(_save(tmp_path, "a.npy", a))

    def make(w, state=None):
        s = loader.ShardedSampler(len(ds), 8, rank=1, world_size=2, seed=3)
        if state:
            s.load_state_dict(state)
        return loader.BatchLoader(ds, s, workers=w)

    ref = make(0)
    first = _batches(ref, 7)  # crosses an epoch (45 samples, 8 a step)
    state = ref.sampler.state_dict()
    rest = _batches(ref, 5)
    got = make(workers)
    assert all(torch.equal(x, y) for (x, *_), (y, *_) in zip(first, _batches(got, 7)))
    assert got.sampler.state_dict() == state  # the position is what was consumed, not what was read ahead
    resumed = make(workers, state)
    assert all(torch.equal(x, y) for (x, *_), (y, *_) in zip(rest, _batches(resumed, 5)))
    got.close()
    resumed.close()


def test_loader_rejects_negative_workers():
    with pytest.raises(ValueError, match="workers must be >= 0"):
        loader.BatchLoader(data.digits(), loader.ShardedSampler(10, 2), workers=-1)


def _peak_rss_mib(args):
    """Peak RSS (MiB) of `python -m scm_fast.train args` in a process of its own."""
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.stderr.write(p.stderr[-3000:])")
    p = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "scm_fast.train", *args], cwd=REPO,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    code, kib = p.stdout.split()
    assert code == "0", p.stderr
    return int(kib) / 1024


def test_training_on_an_array_larger_than_memory_keeps_rss_flat(tmp_path):
    """A 4 GiB uint8 .npy (16.7M images of 16x16, a sparse file) trains 3 steps with the peak RSS of the
    same run on the 1,797 digits + 96 MiB (the int32 permutation of 16.7M indices takes 64 MiB): far
    below the 4 GiB a whole load would take, and the bound holds whatever the file's size."""
    n = 1 << 24
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(n, 16, 16))
    big[:: 4099] = np.random.default_rng(0).integers(0, 255, (len(big[:: 4099]), 16, 16), dtype=np.uint8)
    big.flush()
    del big
    size_mib = (tmp_path / "big.npy").stat().st_size / 2 ** 20
    common = ["--model", "tiny", "--batch", "16", "--total-kimg", "0.048", "--eval-n", "0", "--n-grid", "4",
              "--no-progress", "--no-tensorboard", "--threads", "1", "--sample-every-kimg", "0",
              "--ckpt-every-kimg", "0", "--workers", "1"]
    rss_digits = _peak_rss_mib(["--data", "digits", "--run-dir", str(tmp_path / "d"), *common])
    rss_big = _peak_rss_mib(["--data", str(tmp_path / "big.npy"), "--run-dir", str(tmp_path / "b"), *common])
    assert size_mib >= 4096 and rss_big <= rss_digits + 96, (size_mib, rss_digits, rss_big)
    assert f"{n} images of shape (1, 16, 16)" in (tmp_path / "b" / "log.txt").read_text()
