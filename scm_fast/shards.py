"""A dataset folder of .npy shards with a JSON index: any number of samples, read sample by sample.

    DATASET/dataset.json   the index (below)
    DATASET/<key>-00000.npy, <key>-00001.npy, ...   one file per key and shard, samples along axis 0

    {"format": "scm_fast.shards", "version": 1, "kind": "images" | "latents", "num_samples": N,
     "num_classes": K (0: no labels), "keys": {"x": {"shape": [C, H, W], "dtype": "uint8"},
                                                "labels": {"shape": [], "dtype": "int64"},
                                                "encoder_hidden_states": {"shape": [L, D], "dtype": "float16"}, ...},
     "shards": [{"num_samples": n_0, "files": {"x": "x-00000.npy", ...}}, ...],
     "mean": [C floats], "std": [C floats],   (latents: the per-channel statistics of x)
     "null": {"encoder_hidden_states": "null-encoder_hidden_states.npy", ...}}   (optional)

`null` names, per conditioning key, one sample's worth (shape as in "keys") of the null / negative
conditioning: what classifier-free guidance runs the teacher's unconditional F with, and what label
dropout trains a teacher on.

`x` holds the images (uint8 in [0, 255] or float in [-1, 1]) or the latents; `labels` the class labels;
every other key is per-sample conditioning that reaches the network as a keyword argument of that
name (encoder_hidden_states (L, D), pooled_projections (D,), encoder_attention_mask (L,), ...).

Why plain .npy shards and not webdataset tar streams, Hugging Face `datasets` or MosaicML streaming:
the trainer's data order is one seeded global permutation cut per rank (loader.ShardedSampler), the
same on any world size and resumable at any step from two integers; that needs random access to
sample i, which a .npy gives by offset arithmetic (os.pread of one row, NpyRows) with numpy alone,
while tar streams shuffle within a buffer (an order that depends on the workers and ranks), and
Arrow/MDS readers add a dependency and a cache layer for what an offset computes. Shards (rather
than one file) keep each file below filesystem limits and let `scm_fast.prepare` write them one at a
time. Float values are checked when a batch is read (NaN / Inf: a ValueError naming the key, the
sample and the file), not in a pass over the whole set at start.
"""
import json
from pathlib import Path

import numpy as np
import torch

from scm_fast import data, npy

FORMAT, VERSION, INDEX = "scm_fast.shards", 1, "dataset.json"
KINDS = ("images", "latents")


def is_shards(path):
    """True when `path` is a folder with a dataset.json."""
    return (Path(path) / INDEX).is_file()


def _bad(root, msg):
    return ValueError(f"{Path(root) / INDEX}: {msg}")


def _index(root):
    try:
        index = json.loads((Path(root) / INDEX).read_text())
    except (OSError, ValueError) as err:
        raise _bad(root, f"not a readable JSON index ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise _bad(root, f"expected \"format\": \"{FORMAT}\"")
    if index.get("version") != VERSION:
        raise _bad(root, f"version {index.get('version')!r} is not {VERSION} (written by another scm_fast?)")
    for field, kind in (("kind", str), ("num_samples", int), ("keys", dict), ("shards", list)):
        if not isinstance(index.get(field), kind):
            raise _bad(root, f"\"{field}\" must be a {kind.__name__}, got {index.get(field)!r}")
    if index["kind"] not in KINDS:
        raise _bad(root, f"\"kind\" must be one of {KINDS}, got {index['kind']!r}")
    if "x" not in index["keys"]:
        raise _bad(root, "\"keys\" must hold \"x\" (the images or latents)")
    return index


def _open_key(root, key, spec, shards):
    """The NpyRows of `key` in every shard, checked against the index (shape, dtype, count)."""
    rows = []
    for i, shard in enumerate(shards):
        name = shard.get("files", {}).get(key)
        if name is None:
            raise _bad(root, f"shard {i} has no file for key {key!r}")
        path = Path(root) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (shard {i}, key {key!r} of {Path(root) / INDEX})")
        r = npy.NpyRows.open(path)
        want = (int(shard["num_samples"]), *spec["shape"])
        if r is None or r.shape != want or r.dtype != np.dtype(spec["dtype"]):
            got = "a Fortran-ordered or object array" if r is None else f"{r.dtype} {r.shape}"
            raise ValueError(f"{path}: expected {spec['dtype']} {want} (shard {i}, key {key!r} of the index), "
                             f"got {got}")
        rows.append(r)
    return rows


class ShardedData(data.LatentNorm, data._Dataset):
    """A dataset folder (module docstring): get_batch -> (x, labels) as every dataset, get_extra -> the
    conditioning tensors {key: (b, ...)}. Images: uint8 -> x / 127.5 - 1, float as [-1, 1]; latents:
    (x - mean_c) / std_c * sigma_d (statistics from the index)."""

    def __init__(self, root, sigma_d=0.5):
        self.root, index = Path(root), _index(root)
        shards, keys = index["shards"], index["keys"]
        counts = [int(s.get("num_samples", -1)) for s in shards]
        if not shards or min(counts) < 1 or sum(counts) != index["num_samples"]:
            raise _bad(root, f"the shards' num_samples {counts} must be >= 1 and add up to num_samples "
                             f"{index['num_samples']}")
        self._rows = {k: _open_key(root, k, keys[k], shards) for k in keys}
        self._starts = np.cumsum([0] + counts)
        self.kind, self._n = f"shards({self.root.name}, {index['kind']})", index["num_samples"]
        self._shape = tuple(keys["x"]["shape"])
        if len(self._shape) != 3:
            raise _bad(root, f"x must be (C, H, W) per sample, got {self._shape}")
        self.is_latent, self.sigma_d = index["kind"] == "latents", float(sigma_d)
        if self.is_latent:
            self._stats(index)
        self._num_classes = int(index.get("num_classes", 0)) if "labels" in keys else 0
        self.cond_keys = tuple(k for k in keys if k not in ("x", "labels"))
        self.null_cond = self._null(index.get("null", {}), keys)

    def _null(self, files, keys):
        """{key: tensor (1, ...)} of the index's "null" files, each checked against its key's spec."""
        if not isinstance(files, dict) or set(files) - set(self.cond_keys):
            raise _bad(self.root, f"\"null\" must map conditioning keys {list(self.cond_keys)} to .npy files, got "
                                  f"{files!r}")
        out = {}
        for key, name in files.items():
            path = self.root / name
            try:
                a = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ValueError(f"{path}: the null conditioning of key {key!r} cannot be read ({err})") from None
            spec = keys[key]
            if list(a.shape) != list(spec["shape"]) or a.dtype != np.dtype(spec["dtype"]):
                raise ValueError(f"{path}: the null {key!r} must be {spec['dtype']} {tuple(spec['shape'])} (one "
                                 f"sample), got {a.dtype} {a.shape}")
            out[key] = torch.from_numpy(a[None].copy())
        return out

    def _stats(self, index):
        c = self._shape[0]
        stats = [np.asarray(index.get(k, []), dtype=np.float64).reshape(-1) for k in ("mean", "std")]
        if any(s.size != c or not np.isfinite(s).all() for s in stats) or not (stats[1] > 0).all():
            raise _bad(self.root, f"latents need \"mean\" and \"std\" with {c} finite values (std > 0), got "
                                  f"{index.get('mean')!r} and {index.get('std')!r}")
        self.set_stats(*(torch.from_numpy(s) for s in stats), self.sigma_d)

    def _read(self, key, idx):
        """Rows `idx` (int64 numpy) of `key` from their shards, in order; float rows checked finite."""
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        rows = self._rows[key]
        out = np.empty((len(idx), *rows[0].shape[1:]), rows[0].dtype)
        for s in np.unique(shard):
            at = np.nonzero(shard == s)[0]
            out[at] = rows[s][idx[at] - self._starts[s]]
        if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
            k = int(np.argmin(np.isfinite(out.reshape(len(idx), -1)).all(axis=1)))
            s = int(shard[k])
            raise ValueError(f"{rows[s].path}: non-finite values (NaN/Inf) in key {key!r} of sample {int(idx[k])} "
                             f"(row {int(idx[k] - self._starts[s])} of shard {s}): drop or repair that sample")
        return out

    def get_batch(self, indices):
        """indices LongTensor (b,) -> (x float32 (b, C, H, W), labels int64 (b,) or None)."""
        idx = self._check_indices(indices).numpy()
        x = torch.from_numpy(self._read("x", idx))
        x = self.normalize(x) if self.is_latent else data.pixels_to_float(x)
        labels = torch.from_numpy(self._read("labels", idx)).to(torch.int64) if self._num_classes else None
        return x, labels

    def get_extra(self, indices):
        """{key: tensor (b, ...)} of the conditioning keys (their stored dtype; floats checked finite)."""
        idx = self._check_indices(indices).numpy()
        return {k: torch.from_numpy(self._read(k, idx)) for k in self.cond_keys}


class ShardWriter:
    """Writes a dataset folder shard by shard: add(x=..., labels=..., key=...) batches of samples,
    close(mean=..., std=...) writes the index. Each shard holds `shard_size` samples (the last fewer)."""

    def __init__(self, root, kind, shard_size=65536, num_classes=0):
        if kind not in KINDS:
            raise ValueError(f"ShardWriter: kind must be one of {KINDS}, got {kind!r}")
        self.root, self.kind, self.shard_size, self.num_classes = Path(root), kind, int(shard_size), int(num_classes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._pending, self._shards, self._specs = {}, [], None

    def add(self, **batch):
        """batch: key -> array (b, ...) with the same b for every key, and the same keys every call."""
        batch = {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        specs = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in batch.items()}
        if self._specs is None:
            self._specs = specs
        if specs != self._specs or len({len(v) for v in batch.values()}) != 1:
            raise ValueError(f"ShardWriter.add: every call needs the keys, per-sample shapes and dtypes of the "
                             f"first ({self._specs}) and one batch size, got {specs}")
        for k, v in batch.items():
            self._pending.setdefault(k, []).append(v)
        while len(self._pending.get("x", [])) and sum(map(len, self._pending["x"])) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count):
        i, files = len(self._shards), {}
        for k, parts in self._pending.items():
            a = np.concatenate(parts)
            files[k] = f"{k}-{i:05d}.npy"
            np.save(self.root / files[k], np.ascontiguousarray(a[:count]))
            self._pending[k] = [a[count:]] if len(a) > count else []
        self._shards.append({"num_samples": count, "files": files})

    def close(self, mean=None, std=None, null=None):
        """Write the last shard and dataset.json (latents: mean, std per channel of x; null: {key: one
        sample of the null conditioning}); -> the root."""
        rest = sum(map(len, self._pending.get("x", [])))
        if rest:
            self._flush(rest)
        if not self._shards:
            raise ValueError("ShardWriter.close: no samples were added")
        index = {"format": FORMAT, "version": VERSION, "kind": self.kind,
                 "num_samples": sum(s["num_samples"] for s in self._shards), "num_classes": self.num_classes,
                 "keys": self._specs, "shards": self._shards}
        if self.kind == "latents":
            index.update(mean=[float(v) for v in mean], std=[float(v) for v in std])
        if null:
            index["null"] = self._write_null(null)
        tmp = self.root / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(self.root / INDEX)
        return self.root

    def _write_null(self, null):
        files = {}
        for key, a in null.items():
            spec = self._specs.get(key)
            a = np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a)
            if key in ("x", "labels") or spec is None:
                raise ValueError(f"null conditioning for {key!r}: not a conditioning key of this dataset "
                                 f"({[k for k in self._specs if k not in ('x', 'labels')]})")
            a = a.reshape(spec["shape"]).astype(spec["dtype"]) if a.size == np.prod(spec["shape"]) else a
            if list(a.shape) != spec["shape"]:
                raise ValueError(f"null conditioning for {key!r}: expected one sample of shape {tuple(spec['shape'])}, "
                                 f"got {a.shape}")
            files[key] = f"null-{key}.npy"
            np.save(self.root / files[key], np.ascontiguousarray(a))
        return files
