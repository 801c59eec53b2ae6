"""Reading .npy files sample by sample, for data larger than memory (scm_fast.data, scm_fast.shards)."""
import os
from pathlib import Path

import numpy as np


class NpyRows:
    """The samples (rows along axis 0) of a C-order .npy file, read on demand with os.pread: nothing
    of the file is mapped into or cached by the process, so its memory does not grow with what it has
    read, whatever the file's size (the OS page cache keeps hot data, shared by every rank and loader
    worker). Indexing: rows[int array] (any order) and rows[i:j] -> in-memory arrays."""

    def __init__(self, path, shape, dtype, offset):
        self.path, self.shape, self.dtype, self.offset = str(path), tuple(shape), np.dtype(dtype), int(offset)
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._fd, self._pid = None, None

    @classmethod
    def open(cls, path):
        """The rows of `path`, or None when it is Fortran-ordered or holds objects (then np.load it);
        ValueError naming the file when it is shorter than its header says."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
        if fortran or dtype.hasobject or len(shape) == 0:
            return None
        rows = cls(path, shape, dtype, offset)
        size = Path(path).stat().st_size
        if offset + rows.size * dtype.itemsize > size:
            raise ValueError(f"{path}: truncated: its header declares {shape} {dtype} "
                             f"({offset + rows.size * dtype.itemsize} bytes), the file has {size}")
        return rows

    def __len__(self):
        return self.shape[0]

    def _read(self, start, count):
        if self._pid != os.getpid():  # one descriptor per process (a forked worker opens its own)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, count * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape((count, *self.shape[1:]))

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("NpyRows: slices must have step 1")
            return self._read(start, max(0, stop - start))
        idx = np.asarray(key, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        for k, i in enumerate(idx):
            out[k] = self._read(int(i), 1)[0]
        return out

    def __getstate__(self):  # picklable (spawned workers): without the descriptor
        return dict(self.__dict__, _fd=None, _pid=None)
