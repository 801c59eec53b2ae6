"""Dataset folders of .npy shards (scm_fast.shards): writing, reading, validation, conditioning keys,
and the trainer on them (the same losses as the in-memory digits on the same samples, on 1 and 2 ranks)."""
import json
import types

import numpy as np
import pytest
import torch

from scm_fast import config, data, loader, shards, trigflow
from scm_fast.train import step
from test_train import TINY, assert_close_seq, kimg, log_text, run, stats


def _write(root, n=17, shard_size=7, kind="images", cond=True, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 255, (n, 3, 4, 4)) if dtype == np.uint8 else rng.standard_normal((n, 3, 4, 4))).astype(dtype)
    labels = rng.integers(0, 5, n)
    ehs = rng.standard_normal((n, 6, 8)).astype(np.float16)
    w = shards.ShardWriter(root, kind, shard_size=shard_size, num_classes=5)
    for i in range(0, n, 5):  # batches that do not line up with the shards
        batch = dict(x=x[i:i + 5], labels=labels[i:i + 5])
        if cond:
            batch["encoder_hidden_states"] = ehs[i:i + 5]
        w.add(**batch)
    stats = dict(mean=x.mean(axis=(0, 2, 3)), std=x.std(axis=(0, 2, 3))) if kind == "latents" else {}
    w.close(**stats)
    return x, labels, ehs


def test_roundtrip_across_shards(tmp_path):
    x, labels, ehs = _write(tmp_path / "ds")
    index = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert [s["num_samples"] for s in index["shards"]] == [7, 7, 3]
    ds = data.build_dataset(str(tmp_path / "ds"))
    assert isinstance(ds, shards.ShardedData) and len(ds) == 17 and ds.shape == (3, 4, 4) and ds.num_classes == 5
    assert ds.cond_keys == ("encoder_hidden_states",)
    idx = torch.tensor([16, 0, 7, 6, 13, 0])
    got_x, got_labels = ds.get_batch(idx)
    assert torch.equal(got_x, torch.from_numpy(x[idx.numpy()]).float() / 127.5 - 1.0)
    assert torch.equal(got_labels, torch.from_numpy(labels[idx.numpy()]))
    extra = ds.get_extra(idx)
    assert extra["encoder_hidden_states"].dtype == torch.float16
    assert torch.equal(extra["encoder_hidden_states"], torch.from_numpy(ehs[idx.numpy()]))


def test_latent_shards_are_normalized_with_the_index_statistics(tmp_path):
    x, _, _ = _write(tmp_path / "lat", kind="latents", dtype=np.float32, cond=False)
    ds = data.build_dataset(str(tmp_path / "lat"), sigma_d=0.5)
    m, s = x.astype(np.float64).mean(axis=(0, 2, 3)), x.astype(np.float64).std(axis=(0, 2, 3))
    ref = (x.astype(np.float64) - m[None, :, None, None]) / s[None, :, None, None] * 0.5
    np.testing.assert_allclose(ds.get_batch(torch.arange(17))[0].numpy(), ref.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert torch.allclose(ds.denormalize(ds.get_batch(torch.arange(3))[0]), torch.from_numpy(x[:3]), atol=1e-5)


def _index(root):
    return json.loads((root / "dataset.json").read_text())


def _rewrite(root, index):
    (root / "dataset.json").write_text(json.dumps(index))


def test_bad_folders_are_named(tmp_path):
    root = tmp_path / "ds"
    _write(root)
    good = _index(root)
    cases = [
        (dict(good, format="webdataset"), r"dataset\.json: expected \"format\": \"scm_fast\.shards\""),
        (dict(good, version=7), "version 7 is not 1"),
        (dict(good, num_samples=18), r"add up to num_samples 18"),
        (dict(good, kind="video"), "\"kind\" must be one of"),
        (dict(good, keys={k: v for k, v in good["keys"].items() if k != "x"}), "must hold \"x\""),
    ]
    for index, match in cases:
        _rewrite(root, index)
        with pytest.raises(ValueError, match=match):
            shards.ShardedData(root)
    _rewrite(root, good)
    (root / "encoder_hidden_states-00001.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"encoder_hidden_states-00001\.npy: missing \(shard 1, key 'encoder_hidden_states'"):
        shards.ShardedData(root)
    np.save(root / "encoder_hidden_states-00001.npy", np.zeros((7, 6, 9), np.float16))
    with pytest.raises(ValueError, match=r"expected float16 \(7, 6, 8\).*got float16 \(7, 6, 9\)"):
        shards.ShardedData(root)


def test_non_finite_conditioning_names_key_sample_and_file(tmp_path):
    root = tmp_path / "ds"
    _write(root)
    e = np.load(root / "encoder_hidden_states-00001.npy")
    e[3, 2, 1] = np.nan  # sample 7 + 3 = 10
    np.save(root / "encoder_hidden_states-00001.npy", e)
    ds = shards.ShardedData(root)
    ds.get_extra(torch.tensor([0, 9, 11]))
    with pytest.raises(ValueError, match=r"encoder_hidden_states-00001\.npy: non-finite .* key 'encoder_hidden_states' "
                                         r"of sample 10 \(row 3 of shard 1\)"):
        ds.get_extra(torch.tensor([0, 10]))


class _TextNet(torch.nn.Module):
    """A network that takes per-sample text conditioning: F = W x + mean(encoder_hidden_states)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Conv2d(3, 3, 1)
        self.seen = []

    def forward(self, x_in, t, labels=None, encoder_hidden_states=None):
        self.seen.append((tuple(encoder_hidden_states.shape), encoder_hidden_states.dtype, labels is not None))
        return self.w(x_in) + encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_conditioning_keys_reach_the_network(tmp_path):
    """The loader's conditioning tensors become keyword arguments of the network in the training loss."""
    _write(tmp_path / "ds")
    ds = data.build_dataset(str(tmp_path / "ds"))
    batches = loader.BatchLoader(ds, loader.ShardedSampler(len(ds), 4, seed=1), workers=1)
    cfg = config.parse(["--preset", "digits-sct", "--objective", "diffusion"])[0]
    net = _TextNet()
    parts = types.SimpleNamespace(net=net, logvar=None, teacher=None, gen=trigflow.BatchGenerator(0, 0, 1, "cpu"))
    x0, labels, extra = step.next_batch(types.SimpleNamespace(loader=batches, num_classes=5), "cpu")
    value, _ = step.loss(parts, cfg, 0, x0, labels, extra)
    value.backward()
    assert net.seen == [((4, 6, 8), torch.float16, True)] and net.w.weight.grad is not None
    batches.close()


def test_trainer_refuses_conditioning_its_network_does_not_take(tmp_path):
    _write(tmp_path / "ds")
    p = run([*TINY, "--data", str(tmp_path / "ds"), "--run-dir", str(tmp_path / "run"), *kimg(1)], check=False)
    assert p.returncode == 1
    assert "the per-sample conditioning ['encoder_hidden_states'] is not an input of --arch dit" in p.stderr


def _digits_as_shards(root, shard_size=500):
    """The embedded digits (float [-1, 1], labels) written as 4 shards, in their own order."""
    ds = data.digits()
    x, labels = ds.get_batch(torch.arange(len(ds)))
    w = shards.ShardWriter(root, "images", shard_size=shard_size, num_classes=10)
    w.add(x=x.numpy(), labels=labels.numpy())
    return w.close()


def test_trainer_on_shards_matches_the_in_memory_digits(tmp_path):
    """Same samples in the same order: the same losses bit for bit on 1 rank; 2 ranks follow it."""
    root = _digits_as_shards(tmp_path / "digits-shards")
    run([*TINY, "--data", "digits", "--run-dir", str(tmp_path / "mem"), *kimg(4)])
    run([*TINY, "--data", str(root), "--run-dir", str(tmp_path / "sh"), *kimg(4), "--workers", "1"])
    assert "shards(digits-shards, images): 1797 images" in log_text(tmp_path / "sh")
    ref, got = stats(tmp_path / "mem"), stats(tmp_path / "sh")
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    run([*TINY, "--data", str(root), "--run-dir", str(tmp_path / "sh2"), *kimg(4)], nproc=2)
    assert_close_seq(ref, stats(tmp_path / "sh2"), "loss")


def test_truncated_shard_is_named(tmp_path):
    root = tmp_path / "ds"
    _write(root)
    f = root / "x-00001.npy"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"x-00001\.npy: truncated"):
        data.build_dataset(str(root))
