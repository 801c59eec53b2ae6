"""The run directory's lock and its config.json (rank 0).

One trainer per run directory: rank 0 holds an exclusive flock on RUN_DIR/lock for the whole run,
with its pid, host and start time written in the file. The kernel drops the lock when the process
dies however it dies (kill -9 included), so a stale lock is taken over by the next trainer, which
logs whose it was. A second trainer on a directory in use stops with the holder's details.

config.json: a run that already has checkpoints resumes only with the same config, apart from the
fields config.RESUME_FREE (length, intervals, reporting) and those named in --allow-change; the
check runs before anything in the directory is written.
"""
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from scm_fast import checkpoint, config, runs
from scm_fast.train.distributed import RunError

LOCK, CONFIG = "lock", "config.json"


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self._lock_fd = None
        self.stale = None  # whose lock was taken over, if any

    def lock(self):
        """Take the run directory's lock (RunError when another trainer holds it)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunError(f"--run-dir {self.path}: cannot create it or write into it ({err.strerror}); "
                           "pass a --run-dir on a writable filesystem") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(f"--run-dir {self.path} is in use by another trainer ({holder}); wait for it to "
                               "finish, stop it, or pass another --run-dir") from None
            raise RunError(f"--run-dir {self.path}: cannot lock {LOCK} ({err.strerror})") from None
        self.stale = os.pread(fd, 4096, 0).decode(errors="replace").strip() or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._lock_fd = fd

    def check_config(self, cfg):
        """The fields this command changes against the saved config.json (when the run has checkpoints);
        RunError when a change is not allowed on a resume."""
        saved = self.path / CONFIG
        if not saved.exists() or not checkpoint.list_checkpoints(self.path / runs.CHECKPOINTS):
            return {}
        try:
            old = config.from_dict(json.loads(saved.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise RunError(f"{saved}: unreadable ({err}); restore it or move the run directory away") from None
        try:
            return config.check_resume(old, cfg)
        except ValueError as err:
            raise RunError(f"--run-dir {self.path}: {err}") from None

    def write_config(self, cfg):
        (self.path / "samples").mkdir(parents=True, exist_ok=True)
        tmp = self.path / (CONFIG + ".tmp")
        tmp.write_text(config.dumps(cfg))
        os.replace(tmp, self.path / CONFIG)

    def release(self):
        """Clear the holder's details and drop the lock (a lock file with details left is a dead trainer's)."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None
