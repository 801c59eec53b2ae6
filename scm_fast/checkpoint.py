"""Crash-safe checkpoint directories.

Layout:
    root/ckpt-000001000/            one complete checkpoint (step 1000)
        model.safetensors, optim.pt, ...   any files, subfolders too (torch.distributed.checkpoint)
        MANIFEST.json               each file's relative path, size and sha256; the step; a format version
    root/.tmp-ckpt-000002000/       being written; never read by latest()

A checkpoint becomes visible in one atomic step: its files are written and fsynced inside the
staged directory, MANIFEST.json is written last, then the directory is renamed to ckpt-<step>.
A crash at any point leaves either the previous checkpoints or the new complete one; latest()
also re-hashes every file, so a checkpoint damaged later (truncated copy, bad disk) is skipped.

Protocol, for one process or several ranks sharing a filesystem (the caller owns the barriers):

    tmp = checkpoint.stage(root, step)            # rank 0 creates it; every rank gets the same path
    dist.barrier()                                # the directory exists for everybody
    checkpoint.write_tensors(tmp, f"model-rank{rank}", shards)
    checkpoint.write_object(tmp, f"train-rank{rank}", {"step": step, "rng": rng})
    dist.barrier()                                # every rank's files are written and fsynced
    if rank == 0:
        checkpoint.commit(tmp, keep=3)
    dist.barrier()                                # nobody starts the next stage before the rename

To resume, rank 0 calls latest(root) (it hashes every file) and broadcasts the path.
"""
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import torch

__all__ = ["CheckpointError", "commit", "latest", "list_checkpoints", "make_room", "quarantine", "read_object",
           "read_tensors", "stage", "step_of", "verify", "write_object", "write_tensors"]

FORMAT = "scm_fast-checkpoint"
VERSION = 1
MANIFEST = "MANIFEST.json"
_NAME = re.compile(r"^(?:\.tmp-|\.old-|\.del-)?ckpt-(\d+)$")
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, has the wrong size or checksum, or cannot be read.

    Attributes: `path` the checkpoint directory, `file` the file's path relative to it, `reason`.
    """

    def __init__(self, path, file, reason):
        self.path, self.file, self.reason = Path(path), str(file), reason
        super().__init__(f"{Path(path) / file}: {reason}")


_IO_OPS = [0]


def _io_point():
    """Fault injection for the tests: SCM_FAST_FAULT=killio@N SIGKILLs this process at the N-th
    checkpoint file operation (a write, the manifest, a rename, a removal)."""
    faults = [f.partition("@")[2] for f in os.environ.get("SCM_FAST_FAULT", "").split(",") if f.startswith("killio@")]
    if not faults:
        return
    _IO_OPS[0] += 1
    if str(_IO_OPS[0]) in faults:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _rank():
    """This process's rank under torch.distributed, 0 without it."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _fsync_dir(path):
    """Make a directory's entries (created / renamed files) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path):
    """Flush a file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def step_of(path):
    """The step in a checkpoint directory's name (ckpt-000001000 -> 1000, also for .tmp-ckpt-...)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"step_of: {path} is not a checkpoint directory name (expected ckpt-<9-digit step>)")
    return int(match.group(1))


def _final_dir(root, step):
    return Path(root) / f"ckpt-{step:09d}"


def _staged_dir(root, step):
    return Path(root) / f".tmp-ckpt-{step:09d}"


def _check_step(where, step):
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{where}: step must be an int >= 0, got {step!r}")


def stage(root, step, *, rank=None):
    """The staging directory root/.tmp-ckpt-<step> (same on every rank).

    Rank 0 (`rank`, default: torch.distributed's rank or 0) removes a stale one and creates it; other
    ranks only get the path and must wait for the caller's dist.barrier() before writing into it.
    """
    _check_step("stage", step)
    staged = _staged_dir(root, step)
    if (_rank() if rank is None else rank) == 0:
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        _fsync_dir(staged.parent)
    return staged


def _target(where, dirpath, stem, suffix):
    """dirpath/<stem><suffix>, after checking that the directory exists and the stem is a plain name."""
    dirpath = Path(dirpath)
    if not isinstance(stem, str) or not stem or "/" in stem or os.sep in stem or stem.startswith("."):
        raise ValueError(f"{where}: stem must be a plain file name without '/' or a leading '.', got {stem!r}")
    if not dirpath.is_dir():
        raise FileNotFoundError(f"{where}: directory {dirpath} does not exist (rank 0 creates it in stage(); "
                                "other ranks write after dist.barrier())")
    return dirpath / f"{stem}{suffix}"


def write_tensors(dirpath, stem, tensors):
    """Write dict name -> Tensor to dirpath/<stem>.safetensors (contiguous CPU copies) and fsync it."""
    from safetensors.torch import save_file
    path = _target("write_tensors", dirpath, stem, ".safetensors")
    if not isinstance(tensors, dict):
        raise TypeError(f"write_tensors: tensors must be a dict name -> Tensor, got {type(tensors).__name__}")
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"write_tensors: tensors must map str -> Tensor; entry {name!r} is "
                            f"{type(name).__name__} -> {type(value).__name__}")
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    _io_point()
    save_file(cpu, str(path))
    _fsync_file(path)
    return path


_LEAVES = (str, int, float, bool, type(None))


def _check_plain(obj, where):
    """Raise TypeError unless obj is dicts/lists/tuples of tensors, numbers, strings (weights_only-loadable)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, _LEAVES):
                raise TypeError(f"write_object: key {k!r} in obj{where} is a {type(k).__name__}; "
                                "expected str/int/float/bool/None keys")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif type(obj) not in (torch.Tensor, torch.nn.Parameter) and not isinstance(obj, _LEAVES):
        raise TypeError(f"write_object: obj{where} is a {type(obj).__module__}.{type(obj).__name__}; expected "
                        "dict/list/tuple of Tensor, int, float, bool, str, None (torch.load weights_only=True)")


def write_object(dirpath, stem, obj):
    """torch.save a plain object (dicts/lists of tensors, numbers, strings) to dirpath/<stem>.pt and fsync it."""
    path = _target("write_object", dirpath, stem, ".pt")
    _check_plain(obj, "")
    _io_point()
    buffer = io.BytesIO()  # serialised first: a full disk then fails as an OSError of the write (torch.save
    torch.save(obj, buffer)  # straight to the file reports it as a RuntimeError of its zip writer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    return path


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(directory):
    """Relative POSIX paths of every regular file below `directory` except MANIFEST.json, sorted."""
    out = []
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(directory).as_posix()
            if rel == MANIFEST:
                continue
            if full.is_symlink() or not full.is_file():
                raise ValueError(f"commit: {full} is not a regular file (links are not allowed in a checkpoint)")
            out.append(rel)
    return sorted(out)


def _manifest_checksum(body):
    """sha256 of the manifest's canonical JSON without its own checksum field."""
    text = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _write_manifest(staged, step):
    """Hash every file under `staged` and write MANIFEST.json (fsynced)."""
    files = [{"path": rel, "size": (staged / rel).stat().st_size, "sha256": _sha256(staged / rel)}
             for rel in _files_under(staged)]
    body = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
    body["checksum"] = _manifest_checksum(body)
    _io_point()
    path = staged / MANIFEST
    with open(path, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for dirpath, _, _ in os.walk(staged, topdown=False):
        _fsync_dir(dirpath)
    return body


def _remove(path, log):
    """Delete a directory: rename it to .del-ckpt-<step> first so a crash mid-delete leaves nothing latest() reads."""
    path = Path(path)
    target = path.with_name(f".del-ckpt-{step_of(path):09d}")
    if target != path:
        if target.exists():
            shutil.rmtree(target)
        os.rename(path, target)
    _io_point()
    shutil.rmtree(target)
    if log is not None:
        log(f"checkpoint: removed {path}")


def _prune(root, committed, keep, log):
    """Keep the committed checkpoint and the newest keep - 1 others; drop leftovers older than it."""
    step = step_of(committed)
    others = [p for p in list_checkpoints(root) if p != committed]
    if keep is not None:
        for path in others[:max(0, len(others) - (keep - 1))]:
            _remove(path, log)
    for path in sorted(Path(root).iterdir()):
        name = path.name
        if path.is_dir() and name.startswith((".tmp-ckpt-", ".old-ckpt-", ".del-ckpt-")) and _NAME.match(name):
            if name.startswith(".del-") or step_of(path) < step:
                _remove(path, log)


def commit(staged, keep=3, log=print):
    """Rank 0 only: seal the staged directory as root/ckpt-<step> and prune old checkpoints; returns its path.

    Writes MANIFEST.json, renames atomically (an existing checkpoint of the same step is moved aside
    first and deleted after), fsyncs root, then keeps the newest `keep` complete checkpoints (the
    committed one always among them; keep=None keeps all) and removes stale .tmp-ckpt-* of older steps.
    """
    staged = Path(staged)
    if _rank() != 0:
        raise RuntimeError(f"commit: call on rank 0 only (this is rank {_rank()}); other ranks wait at a barrier")
    if not staged.name.startswith(".tmp-ckpt-") or _NAME.match(staged.name) is None:
        raise ValueError(f"commit: {staged} is not a directory made by stage() (expected .tmp-ckpt-<step>)")
    if not staged.is_dir():
        raise FileNotFoundError(f"commit: staged directory {staged} does not exist")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"commit: keep must be an int >= 1 or None (keep all), got {keep!r}")
    step, root = step_of(staged), staged.parent
    if not _files_under(staged):
        raise ValueError(f"commit: staged directory {staged} holds no files")
    body = _write_manifest(staged, step)
    final = _final_dir(root, step)
    old = root / f".old-ckpt-{step:09d}"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)   # a crash until the next rename falls back to the previous step's checkpoint
    _io_point()
    os.rename(staged, final)
    _io_point()
    _fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)
    size = sum(f["size"] for f in body["files"])
    if log is not None:
        log(f"checkpoint: saved {final} ({len(body['files'])} files, {size / 2**20:.1f} MiB)")
    _prune(root, final, keep, log)
    return final


def make_room(root, keep, log=print):
    """Rank 0, before stage(): delete the oldest complete checkpoints so that committing one more
    leaves `keep` (a disk that holds `keep` checkpoints then never needs room for keep + 1). With
    keep=1 nothing is deleted first (the only checkpoint stays until its successor is committed)."""
    if keep is None or keep < 2:
        return
    found = list_checkpoints(root)
    for path in found[:max(0, len(found) - (keep - 1))]:
        _remove(path, log)


def quarantine(path, log=print):
    """Move a checkpoint that cannot be used out of the way (root/corrupt-ckpt-<step>[.N]): it is
    kept for inspection, never read by latest() or deleted by pruning. Returns the new path."""
    path = Path(path)
    target = path.with_name(f"corrupt-{path.name}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"corrupt-{path.name}.{n}"), n + 1
    os.rename(path, target)
    _fsync_dir(path.parent)
    if log is not None:
        log(f"checkpoint: moved {path.name} aside to {target.name}")
    return target


def list_checkpoints(root):
    """Complete checkpoint directories (ckpt-<step> holding MANIFEST.json) under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.name.startswith("ckpt-") and _NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def _read_manifest(path):
    """Parse and check MANIFEST.json; CheckpointError naming it when missing or unreadable."""
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(path, MANIFEST, "missing")
    try:
        body = json.loads(file.read_text())
        files = body["files"]
        ok = (body.get("format") == FORMAT and isinstance(files, list)
              and all(isinstance(f, dict) and {"path", "size", "sha256"} <= f.keys() for f in files))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(path, MANIFEST, f"unreadable ({type(err).__name__}: {err})") from err
    if not ok:
        raise CheckpointError(path, MANIFEST, f"unreadable (not a {FORMAT} manifest)")
    if body.get("version") != VERSION:
        raise CheckpointError(path, MANIFEST, f"format version {body.get('version')!r}, expected {VERSION}")
    if body.get("checksum") != _manifest_checksum(body):
        raise CheckpointError(path, MANIFEST, "checksum mismatch (the manifest was modified)")
    if _NAME.match(path.name) and body.get("step") != step_of(path):
        raise CheckpointError(path, MANIFEST, f"step {body.get('step')!r} does not match the directory name")
    return body


def verify(path):
    """Check every file listed in MANIFEST.json (exists, size, sha256); returns the manifest dict.

    Raises CheckpointError naming the first bad file and the problem.
    """
    path = Path(path)
    body = _read_manifest(path)
    for entry in body["files"]:
        file = path / entry["path"]
        if not file.is_file():
            raise CheckpointError(path, entry["path"], "missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(path, entry["path"], f"wrong size: {size} bytes, expected {entry['size']}")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(path, entry["path"], "checksum mismatch (sha256 differs from MANIFEST.json)")
    return body


def latest(root, log=print):
    """The newest checkpoint under root that verifies, or None; logs every newer one it skips and why."""
    found = list_checkpoints(root)
    for i, path in enumerate(reversed(found)):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            more = "trying the previous one" if i + 1 < len(found) else "no older checkpoint left"
            if log is not None:
                log(f"checkpoint {path} is unusable: {err.file}: {err.reason}; {more}")
    if found and log is not None:
        log(f"checkpoint: none of the {len(found)} checkpoints under {root} verifies; starting without one")
    return None


def _existing(path, stem, suffix):
    """(checkpoint dir, file name) after checking that the file exists."""
    path = Path(path)
    file = f"{stem}{suffix}"
    if not (path / file).is_file():
        raise CheckpointError(path, file, "missing")
    return path, file


def read_tensors(path, stem):
    """dict name -> CPU Tensor from <path>/<stem>.safetensors; CheckpointError naming the file if unreadable."""
    from safetensors.torch import load_file
    path, file = _existing(path, stem, ".safetensors")
    try:
        return load_file(str(path / file), device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(path, file, f"unreadable ({type(err).__name__}: {err})") from err


def read_object(path, stem):
    """The object in <path>/<stem>.pt (torch.load weights_only=True, on CPU); CheckpointError if unreadable."""
    path, file = _existing(path, stem, ".pt")
    try:
        return torch.load(path / file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip / weights_only errors
        raise CheckpointError(path, file, f"unreadable ({type(err).__name__}: {err})") from err
