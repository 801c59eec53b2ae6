"""Crash-safe checkpoint directories (scm_fast/checkpoint.py)."""
import json
import os

import pytest
import torch

from scm_fast import checkpoint as ckpt
from scm_fast.checkpoint import CheckpointError


def _save(root, step, value=0.0, keep=3, log=None, extra=True):
    """One checkpoint as the trainer writes it: tensors, a plain object, a DCP-like subfolder."""
    tmp = ckpt.stage(root, step)
    ckpt.write_tensors(tmp, "model", {"w": torch.full((4, 3), value), "n": torch.arange(5)[::2]})
    ckpt.write_object(tmp, "train", {"step": step, "lr": [1e-4, 2e-4], "name": "run", "rng": torch.arange(3),
                                     "opt": {0: {"betas": (0.9, 0.99), "eps": None}}})
    if extra:
        (tmp / "dcp").mkdir()
        (tmp / "dcp" / "__0_0.distcp").write_bytes(bytes(range(256)) * 8)
    return ckpt.commit(tmp, keep=keep, log=log if log is not None else (lambda msg: None))


def test_roundtrip(tmp_path):
    lines = []
    path = _save(tmp_path, 12, value=1.5, log=lines.append)
    assert path == tmp_path / "ckpt-000000012" and ckpt.step_of(path) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000012"]      # no .tmp left
    assert "saved" in lines[0] and str(path) in lines[0]
    manifest = ckpt.verify(path)
    assert manifest["step"] == 12 and manifest["version"] == ckpt.VERSION
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == {"model.safetensors", "train.pt", "dcp/__0_0.distcp"}
    assert files["dcp/__0_0.distcp"]["size"] == 2048
    tensors = ckpt.read_tensors(path, "model")
    assert torch.equal(tensors["w"], torch.full((4, 3), 1.5)) and torch.equal(tensors["n"], torch.tensor([0, 2, 4]))
    obj = ckpt.read_object(path, "train")
    assert obj["step"] == 12 and obj["lr"] == [1e-4, 2e-4] and obj["opt"][0]["betas"] == (0.9, 0.99)
    assert ckpt.list_checkpoints(tmp_path) == [path] and ckpt.latest(tmp_path) == path


def test_keep_prunes(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step * 10, keep=2)
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [40, 50]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000040", "ckpt-000000050"]
    _save(tmp_path, 30, keep=1)   # the committed checkpoint is always kept, even if older
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [30]


def test_stale_tmp_ignored_then_cleaned(tmp_path):
    good = _save(tmp_path, 5)
    stale = ckpt.stage(tmp_path, 7)                     # a crash after writing, before commit
    ckpt.write_tensors(stale, "model", {"w": torch.zeros(2)})
    (tmp_path / "ckpt-000000009").mkdir()               # a directory without MANIFEST.json
    assert ckpt.latest(tmp_path) == good
    assert ckpt.list_checkpoints(tmp_path) == [good]
    newer_tmp = ckpt.stage(tmp_path, 20)
    _save(tmp_path, 8)
    assert not stale.exists() and newer_tmp.exists()
    assert ckpt.step_of(ckpt.latest(tmp_path)) == 8


def test_stage_replaces_stale_same_step(tmp_path):
    tmp = ckpt.stage(tmp_path, 3)
    (tmp / "junk.bin").write_bytes(b"x")
    tmp = ckpt.stage(tmp_path, 3)
    assert list(tmp.iterdir()) == []
    other = ckpt.stage(tmp_path / "other", 3, rank=1)   # non-zero ranks only get the path
    assert not other.exists()


def _truncate(path):
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-7])
    return "model.safetensors", "wrong size"


def _flip(path):
    file = path / "dcp" / "__0_0.distcp"
    data = bytearray(file.read_bytes())
    data[1000] ^= 0x01
    file.write_bytes(bytes(data))
    return "dcp/__0_0.distcp", "checksum mismatch"


def _delete(path):
    os.remove(path / "train.pt")
    return "train.pt", "missing"


def _garble_manifest(path):
    file = path / "MANIFEST.json"
    file.write_text(file.read_text()[:40])
    return "MANIFEST.json", "unreadable"


def _edit_manifest(path):
    file = path / "MANIFEST.json"
    body = json.loads(file.read_text())
    body["files"][0]["size"] += 1
    file.write_text(json.dumps(body))
    return "MANIFEST.json", "checksum mismatch"


@pytest.mark.parametrize("damage", [_truncate, _flip, _delete, _garble_manifest, _edit_manifest])
def test_damage_is_detected_and_latest_falls_back(tmp_path, damage):
    good = _save(tmp_path, 100, value=1.0)
    bad = _save(tmp_path, 200, value=2.0)
    file, reason = damage(bad)
    with pytest.raises(CheckpointError, match=reason) as info:
        ckpt.verify(bad)
    assert info.value.file == file and str(bad / file) in str(info.value)
    lines = []
    assert ckpt.latest(tmp_path, log=lines.append) == good
    assert lines == [f"checkpoint {bad} is unusable: {file}: {info.value.reason}; trying the previous one"]


def test_latest_none(tmp_path):
    assert ckpt.latest(tmp_path / "missing") is None
    bad = _save(tmp_path, 1)
    os.remove(bad / "model.safetensors")
    lines = []
    assert ckpt.latest(tmp_path, log=lines.append) is None
    assert "model.safetensors: missing; no older checkpoint left" in lines[0]
    assert "none of the 1 checkpoints" in lines[1]


def test_recommit_same_step_replaces(tmp_path):
    _save(tmp_path, 3, value=1.0)
    path = _save(tmp_path, 3, value=2.0, extra=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000003"]
    assert torch.equal(ckpt.read_tensors(path, "model")["w"], torch.full((4, 3), 2.0))
    assert not (path / "dcp").exists()
    ckpt.verify(path)


def test_read_errors_name_the_file(tmp_path):
    path = _save(tmp_path, 4)
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: missing"):
        ckpt.read_tensors(path, "ema")
    (path / "train.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"train\.pt: unreadable"):
        ckpt.read_object(path, "train")
    (path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
        ckpt.read_tensors(path, "model")


def test_write_validation(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist .*stage"):
        ckpt.write_tensors(tmp_path / "nope", "model", {"w": torch.zeros(1)})
    tmp = ckpt.stage(tmp_path, 1)
    with pytest.raises(TypeError, match=r"obj\['rng'\] is a numpy.ndarray"):
        import numpy as np
        ckpt.write_object(tmp, "train", {"rng": np.zeros(2)})
    with pytest.raises(ValueError, match="stem must be a plain file name"):
        ckpt.write_object(tmp, "a/b", {})
    with pytest.raises(TypeError, match="entry 'w' is str -> list"):
        ckpt.write_tensors(tmp, "model", {"w": [1.0]})
    with pytest.raises(ValueError, match="holds no files"):
        ckpt.commit(tmp)
    with pytest.raises(ValueError, match="keep must be an int >= 1 or None"):
        ckpt.commit(tmp, keep=0)
    with pytest.raises(ValueError, match="not a directory made by stage"):
        ckpt.commit(tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint directory name"):
        ckpt.step_of(tmp_path / "model")
