"""Datasets for sCM training.

Conventions: a batch is x float32 (b, C, H, W) in [-1, 1] (pixel data; its std is about sigma_d = 0.5)
or normalized latents with per-channel std sigma_d, and labels int64 (b,) in [0, num_classes), or None
for unlabeled data (num_classes == 0). Every dataset has len(ds), ds.shape == (C, H, W),
ds.num_classes, ds.get_batch(indices) -> (x, labels) and ds.describe() (one line).

`build_dataset(spec)` maps the trainer's --data value to a dataset; scm_fast.loader cuts the data order
into per-rank batches (ShardedSampler) and reads them ahead of the step (BatchLoader); scm_fast.shards
holds the dataset folders; scm_fast.npy reads .npy files sample by sample.
"""
import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scm_fast import images as _images
from scm_fast.npy import NpyRows

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_BYTES = 2 << 30  # ImageFolder keeps decoded uint8 images up to this many bytes in memory
DATA_HINT = "expected 'digits', an image folder, a dataset folder (dataset.json), a .npy/.npz file or latents:PATH"


# ----------------------------------------------------------------------------- common API

class _Dataset:
    """Shared part of the datasets: len, shape (C, H, W), num_classes, describe, index checks."""

    kind = "dataset"
    cond_keys = ()  # names of the per-sample conditioning tensors of get_extra (shards.ShardedData)
    null_cond = {}  # {key: (1, ...)}: the null / negative conditioning of classifier-free guidance
    is_latent = False  # latents (normalized per channel; denormalize() maps back), not pixels

    def get_extra(self, indices):
        """{key: tensor (b, ...)} of the per-sample conditioning (none here)."""
        return {}

    def __len__(self):
        """Number of images N."""
        return self._n

    @property
    def shape(self):
        """(C, H, W) of one image."""
        return self._shape

    @property
    def num_classes(self):
        """Number of classes; 0 for unlabeled data."""
        return self._num_classes

    def describe(self):
        """One line: kind, N, shape (C, H, W) and classes."""
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabeled"
        return f"{self.kind}: {len(self)} images of shape {tuple(self.shape)}, {classes}"

    def _check_indices(self, indices):
        """indices: integer tensor (b,) with values in [0, N) -> int64 CPU tensor (b,)."""
        idx = torch.as_tensor(indices)
        if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"get_batch: indices must be an integer tensor of shape (b,), "
                             f"got {idx.dtype} of shape {tuple(idx.shape)}")
        idx = idx.to(device="cpu", dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ValueError(f"get_batch: indices must lie in [0, {len(self)}), "
                             f"got values in [{int(idx.min())}, {int(idx.max())}]")
        return idx


def _check_labels(labels, n, num_classes, where):
    """labels: integer array/tensor (N,) -> (int64 tensor, num_classes); None -> (None, 0)."""
    if labels is None:
        if num_classes:
            raise ValueError(f"{where}: num_classes={num_classes} given but there are no labels")
        return None, 0
    lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if lab.is_floating_point() or lab.dtype == torch.bool or lab.dim() != 1 or lab.shape[0] != n:
        raise ValueError(f"{where}: labels must be integers of shape ({n},), "
                         f"got {lab.dtype} of shape {tuple(lab.shape)}")
    lab = lab.to(torch.int64)
    k = int(lab.max()) + 1 if num_classes is None else int(num_classes)
    if n and (int(lab.min()) < 0 or int(lab.max()) >= k):
        raise ValueError(f"{where}: labels must lie in [0, num_classes={k}), "
                         f"got values in [{int(lab.min())}, {int(lab.max())}]")
    return lab, k


# ----------------------------------------------------------------------------- in-memory arrays

def pixels_to_float(x):
    """A batch as stored -> float32 in [-1, 1]: uint8 [0, 255] as x / 127.5 - 1, floats as they are."""
    return x.to(torch.float32) / 127.5 - 1.0 if x.dtype == torch.uint8 else x.to(torch.float32)


class LatentNorm:
    """Per-channel latent normalization x = (latent - mean_c) / std_c * sigma_d (EDM2 / sCM), in float64
    then float32; set_stats(mean, std, sigma_d) with float64 tensors (C,)."""

    is_latent = True

    def set_stats(self, mean, std, sigma_d):
        c = mean.numel()
        self.sigma_d, self._m64, self._s64 = float(sigma_d), mean.view(1, c, 1, 1), std.view(1, c, 1, 1)
        self.mean, self.std = mean.to(torch.float32), std.to(torch.float32)

    def normalize(self, latents):
        """latents (b, C, H, W), any float dtype -> normalized float32."""
        return ((latents.to(torch.float64) - self._m64) / self._s64 * self.sigma_d).to(torch.float32)

    def denormalize(self, x):
        """Normalized x (..., C, H, W) -> latents: x / sigma_d * std_c + mean_c."""
        m, s = (t.to(device=x.device, dtype=x.dtype).view(-1, 1, 1) for t in (self.mean, self.std))
        return x / self.sigma_d * s + m


class ArrayData(_Dataset):
    """In-memory images float (N, C, H, W) with optional int labels (N,).

    num_classes defaults to max(label) + 1 (0 when unlabeled). `kind` names the data in describe().
    """

    def __init__(self, images, labels=None, num_classes=None, *, kind="arrays"):
        """images float (N, C, H, W), stored as float32; labels integer (N,) or None."""
        x = torch.as_tensor(images)
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"ArrayData: images must be a float tensor (N, C, H, W), "
                             f"got {x.dtype} of shape {tuple(x.shape)}")
        if x.shape[0] < 1:
            raise ValueError(f"ArrayData: images must hold at least one image, got shape {tuple(x.shape)}")
        self.images = x.to(torch.float32).contiguous()
        self.labels, self._num_classes = _check_labels(labels, x.shape[0], num_classes, "ArrayData")
        self._n, self._shape, self.kind = x.shape[0], tuple(x.shape[1:]), kind

    def get_batch(self, indices):
        """indices LongTensor (b,) -> (x float32 (b, C, H, W), labels int64 (b,) or None)."""
        idx = self._check_indices(indices)
        return self.images[idx], (None if self.labels is None else self.labels[idx])


def _resize(x, size):
    """Bilinear, antialiased resize of float (N, C, H, W) to (N, C, size, size)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def digits(img_size=8):
    """scikit-learn's 8x8 handwritten digits (bundled, no download): (1797, 1, 8, 8), labels 0..9.

    Pixel values 0..16 map to x / 8 - 1 in [-1, 1]; img_size != 8 resizes (bilinear, antialias).
    """
    from sklearn.datasets import load_digits

    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"digits: img_size must be a positive int, got {img_size!r}")
    d = load_digits()
    x = torch.from_numpy(d.images).to(torch.float32).unsqueeze(1) / 8.0 - 1.0  # (1797, 1, 8, 8)
    x = _resize(x, img_size).clamp(-1.0, 1.0)
    return ArrayData(x, torch.from_numpy(d.target), num_classes=10, kind="digits")


# ----------------------------------------------------------------------------- .npy / .npz files

# what numpy raises for a truncated or corrupt .npy / .npz (the archive, or a member of it, when read)
_NUMPY_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


def _read_numpy(path):
    """-> (rows, {}) for a .npy (NpyRows: read sample by sample, never whole; a Fortran-ordered one is
    memory-mapped), or (None, {key: array}) for a .npz (in memory: zip members cannot be read in
    place), without pickles; a file that cannot be read raises ValueError naming it."""
    try:
        if Path(path).suffix.lower() != ".npz" and not zipfile.is_zipfile(path):
            rows = NpyRows.open(path)
            if rows is not None:
                return rows, {}
        obj = np.load(path, mmap_mode="r", allow_pickle=False)
        if isinstance(obj, np.ndarray):
            return obj, {}
        with obj as z:
            return None, {k: z[k] for k in z.files}
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except _NUMPY_READ_ERRORS as err:
        if "Object arrays" in str(err):
            raise ValueError(f"{path}: holds Python object arrays, which are not loaded (allow_pickle=False); "
                             f"store numeric arrays") from None
        kind = path.suffix.lower() if path.suffix.lower() in (".npy", ".npz") else "NumPy file"
        raise ValueError(f"{path}: not a readable {kind} (truncated or corrupt: {type(err).__name__}: {err})") from None


def _load_file(path, keys, what):
    """.npy -> (array, {}); .npz -> (the array under the first of `keys`, the whole archive as a dict)."""
    path = Path(path)
    array, files = _read_numpy(path)
    if array is not None:
        return array, {}
    key = next((k for k in keys if k in files), None)
    if key is None:
        raise ValueError(f"{path}: no {what} in the archive (expected a key among {list(keys)}, "
                         f"found {sorted(files)})")
    return files[key], files


def _labels_from(files):
    """Labels from an npz dict under 'labels' or 'y', else None."""
    return next((files[k] for k in ("labels", "y") if k in files), None)


LAYOUTS = ("NCHW", "NHWC")


def _layout_of(shape, path, layout=None):
    """'NCHW' or 'NHWC' for a 4-d image array: `layout` when given (an .npz's 'layout' entry), else
    from the shape. NHWC holds square images with 1-4 channels last (the image-file convention:
    gray, gray + alpha, RGB, RGBA), NCHW square images with any number of channels; non-square ones
    are NHWC when only the last dim is 1-4 and NCHW when the last dim is not. A shape that reads both
    ways, e.g. (N, 4, 4, 4) or (N, 3, 5, 4), raises ValueError asking for the layout."""
    if layout is not None:
        layout = str(layout).upper()
        if layout not in LAYOUTS:
            raise ValueError(f"{path}: layout must be 'NCHW' or 'NHWC', got {str(layout)!r}")
        return layout
    _, d1, d2, d3 = shape
    nhwc, nchw = d1 == d2 and 1 <= d3 <= 4, d2 == d3
    if not (nhwc or nchw):  # non-square either way: by where a small channel count sits
        nhwc, nchw = 1 <= d3 <= 4, d3 > 4 or d1 <= 4
    if nhwc and nchw and d1 > 1:  # (N, 1, 1, 1) reads the same either way
        raise ValueError(f"{path}: images of shape {tuple(shape)} are ambiguous: they read as NCHW ({d1} channels "
                         f"of {d2}x{d3}) or as NHWC ({d3} channels of {d1}x{d2}); save them in an .npz with a "
                         f"'layout' entry, 'NCHW' or 'NHWC' (np.savez(path, images=..., layout='NHWC'))")
    return "NHWC" if nhwc and not nchw else "NCHW"


CHUNK = 1024  # samples per read of the one-pass checks and statistics over arrays read row by row


def _chunks(a):
    """(first sample, in-memory chunk of `a`) over the samples of an array or NpyRows (N, ...)."""
    for i in range(0, len(a), CHUNK):
        yield i, np.asarray(a[i:i + CHUNK])


def _check_finite(a, path, what, first_sample=0, total=None):
    """ValueError naming the file, the count and the first sample when a float array (N, ...) holds NaN /
    Inf; `a` may be a chunk whose first sample is `first_sample` of `total`."""
    finite = np.isfinite(a)
    if finite.all():
        return
    bad = finite.size - int(np.count_nonzero(finite))
    first = first_sample + int(np.argmin(finite.reshape(len(a), -1).all(axis=1)))
    raise ValueError(f"{path}: {bad} non-finite values (NaN/Inf) in the {what}, the first in sample {first} "
                     f"(of {total or len(a)}); every batch holding one would be a skipped step: drop or repair "
                     f"those samples")


def _check_pixels(a, path):
    """uint8, or float in [-1, 1] and finite (checked chunk by chunk); ValueError naming the file otherwise."""
    if a.dtype == np.uint8:
        return
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{path}: images must be uint8 in [0, 255] or float in [-1, 1], got dtype {a.dtype}")
    for first, chunk in _chunks(a):
        _check_finite(chunk, path, "images", first, len(a))
        peak = float(np.abs(chunk).max()) if chunk.size else 0.0
        if peak > 1.5:
            raise ValueError(f"{path}: float images must be in [-1, 1], got absolute max {peak:g} "
                             f"(store uint8 in [0, 255] for pixel values)")


class NumpyImages(_Dataset):
    """Images of a NumPy array (N, H, W), (N, C, H, W) or (N, H, W, C), converted batch by batch: a
    .npy is read sample by sample (NpyRows), so a process holds only the samples of its batches (the
    page cache, shared by every rank and loader worker, holds what was read) and N may exceed memory.

    uint8 in [0, 255] -> x / 127.5 - 1; float images are taken as [-1, 1] (|x| <= 1.5, finite: one pass
    over the file at start). The layout: _layout_of. NHWC arrays follow the image-file convention:
    C = 2 is gray + alpha and C = 4 is RGBA, and their alpha channel is dropped as for image files
    (ImageFolder), giving 1 or 3 channels; NCHW arrays keep every channel.
    """

    def __init__(self, array, path, labels=None, layout=None):
        """array: an ndarray or NpyRows (N, H, W), (N, C, H, W) or (N, H, W, C); labels integer (N,) or None."""
        if array.ndim not in (3, 4):
            raise ValueError(f"{path}: images must be (N, C, H, W) or (N, H, W, C), got shape {array.shape}")
        if array.shape[0] < 1 or array.size == 0:
            raise ValueError(f"{path}: holds no images (shape {array.shape})")
        self._gray = array.ndim == 3  # (N, H, W): one channel
        shape4 = (array.shape[0], 1, *array.shape[1:]) if self._gray else tuple(array.shape)
        self._nhwc = _layout_of(shape4, path, layout) == "NHWC"
        _check_pixels(array, path)
        channels = shape4[3] if self._nhwc else shape4[1]
        self._keep = channels - 1 if self._nhwc and channels in (2, 4) else channels  # drop alpha
        self._array, self._path = array, path
        self._shape = (self._keep, shape4[1], shape4[2]) if self._nhwc else shape4[1:]
        self._n, self.kind = shape4[0], f"arrays({Path(path).name})"
        self.labels, self._num_classes = _check_labels(labels, self._n, None, str(path))

    def get_batch(self, indices):
        """indices LongTensor (b,) -> (x float32 (b, C, H, W), labels int64 (b,) or None); reads only those samples."""
        idx = self._check_indices(indices)
        rows = self._array[idx.numpy()]
        if self._gray:
            rows = rows[:, None]
        if self._nhwc:
            rows = rows[..., :self._keep].transpose(0, 3, 1, 2)
        x = pixels_to_float(torch.from_numpy(np.ascontiguousarray(rows)))
        return x, (None if self.labels is None else self.labels[idx])


def load_arrays(path):
    """Images from .npy (images only, read sample by sample) or .npz ('images' / 'x' / 'arr_0', labels 'labels' /
    'y', and optionally 'layout': 'NCHW' or 'NHWC' for shapes that read both ways) -> NumpyImages:
    batches of float32 (b, C, H, W) in [-1, 1]; num_classes = max label + 1. Float images with NaN /
    Inf, and files that cannot be read, raise ValueError naming the file.
    """
    a, files = _load_file(path, ("images", "x", "arr_0"), "images")
    labels = _labels_from(files)
    if labels is not None and labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # (N, 1) -> (N,)
    if a.size == 0:
        raise ValueError(f"{path}: holds no images (shape {a.shape})")
    return NumpyImages(a, path, labels, files.get("layout"))


# ----------------------------------------------------------------------------- latents

def _channel_stat(value, c, name, path):
    """A per-channel statistic (scalar or C values) -> float64 tensor (C,)."""
    t = torch.as_tensor(np.asarray(value, dtype=np.float64)).reshape(-1)
    if t.numel() == 1:
        t = t.expand(c).clone()
    if t.numel() != c:
        raise ValueError(f"LatentData({path}): {name} must have one value per channel ({c}), got {t.numel()}")
    return t


class ChannelStats:
    """Per-channel mean and std (population, over N, H, W) of arrays (b, C, H, W) added batch by batch,
    in float64 (Chan et al.'s pairwise update of count, mean and M2)."""

    def __init__(self, channels):
        self.count, self.mean, self.m2 = 0, np.zeros(channels), np.zeros(channels)

    def add(self, a):
        c = np.asarray(a, dtype=np.float64).transpose(1, 0, 2, 3).reshape(len(self.mean), -1)
        k, mu = c.shape[1], c.mean(axis=1)
        delta = mu - self.mean
        self.m2 += ((c - mu[:, None]) ** 2).sum(axis=1) + delta ** 2 * self.count * k / (self.count + k)
        self.mean += delta * k / (self.count + k)
        self.count += k

    @property
    def std(self):
        return np.sqrt(self.m2 / self.count)


def _latent_stats(a, path):
    """(mean, std) per channel of latents (N, C, H, W), one chunk at a time, checking them finite."""
    stats = ChannelStats(a.shape[1])
    for first, chunk in _chunks(a):
        _check_finite(chunk, path, "latents", first, len(a))
        stats.add(chunk)
    return stats.mean, stats.std


class LatentData(LatentNorm, _Dataset):
    """Precomputed latents (N, C, H, W), normalized per channel as in EDM2 / sCM:

        x = (latent - mean_c) / std_c * sigma_d

    mean/std come from the arguments, else the npz keys 'mean' / 'std', else the data (over N, H, W).
    Latents live under 'latents', 'x' or 'arr_0' (or are the .npy); labels under 'labels' / 'y'.
    A .npy is read sample by sample and each batch is normalized when it is read (float64, then float32),
    so a process holds only its batches, whatever N; an .npz stays in its own dtype in memory.
    `denormalize(x)` maps model outputs back to latent space; ds.mean, ds.std are float32 (C,).
    Latents with NaN / Inf, and non-finite statistics, raise ValueError naming the file (one pass over
    the file at start).
    """

    def __init__(self, path, mean=None, std=None, sigma_d=0.5):
        """path: .npy / .npz of float latents (N, C, H, W); mean, std: scalar or (C,) or None."""
        a, files = _load_file(path, ("latents", "x", "arr_0"), "latents")
        if a.ndim != 4 or not np.issubdtype(a.dtype, np.floating) or a.shape[0] < 1:
            raise ValueError(f"LatentData({path}): latents must be float (N, C, H, W) with N >= 1, "
                             f"got {a.dtype} of shape {a.shape}")
        c = a.shape[1]
        data_mean, data_std = _latent_stats(a, path)
        m = _channel_stat(files.get("mean", data_mean) if mean is None else mean, c, "mean", path)
        s = _channel_stat(files.get("std", data_std) if std is None else std, c, "std", path)
        for name, t in (("mean", m), ("std", s)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"LatentData({path}): {name} must be finite in every channel, got {t.tolist()}")
        if not bool((s > 0).all()):
            raise ValueError(f"LatentData({path}): std must be > 0 in every channel, got {s.tolist()}")
        self.set_stats(m, s, sigma_d)
        peak = np.max([np.abs(chunk.astype(np.float64) - self._m64.numpy()).max(axis=(0, 2, 3))
                       for _, chunk in _chunks(a)], axis=0)  # (C,)
        if not bool(torch.isfinite((torch.from_numpy(peak) / s * self.sigma_d).to(torch.float32)).all()):
            raise ValueError(f"LatentData({path}): the normalised latents overflow (std {s.tolist()} is too "
                             f"small for their range)")
        self._latents, self._n, self._shape = a, a.shape[0], tuple(a.shape[1:])
        self.labels, self._num_classes = _check_labels(_labels_from(files), self._n, None, f"LatentData({path})")
        self.kind = f"latents({Path(path).name})"

    def get_batch(self, indices):
        """indices LongTensor (b,) -> (x float32 (b, C, H, W) normalized, labels int64 (b,) or None)."""
        idx = self._check_indices(indices)
        x = self.normalize(torch.from_numpy(np.ascontiguousarray(self._latents[idx.numpy()])))
        return x, (None if self.labels is None else self.labels[idx])


# ----------------------------------------------------------------------------- image folders

def _list_images(root):
    """All .png / .jpg / .jpeg files under root (recursive, case-insensitive), sorted by path."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _classes_of(root, files):
    """(class_names, labels or None): one class per immediate subdirectory holding images."""
    tops = [p.relative_to(root).parts for p in files]
    direct = [p for p, t in zip(files, tops) if len(t) == 1]
    if len(direct) == len(files):
        return [], None
    if direct:
        raise ValueError(f"ImageFolder: {root} mixes images directly in it ({direct[0].name}, ...) with "
                         f"class subfolders; put every image in a class subfolder, or none")
    names = sorted({t[0] for t in tops})
    index = {n: i for i, n in enumerate(names)}
    return names, [index[t[0]] for t in tops]


def _common_size(root, files, infos):
    """The (H, W) all images share; raises naming two files that differ."""
    sizes = {}
    for p, (h, w, _) in zip(files, infos):
        sizes.setdefault((h, w), p)
    if len(sizes) > 1:
        (s0, p0), (s1, p1) = list(sizes.items())[:2]
        raise ValueError(f"ImageFolder: images under {root} have different sizes ({p0.name} is {s0[0]}x{s0[1]}, "
                         f"{p1.name} is {s1[0]}x{s1[1]}); pass img_size to center-crop and resize them")
    return next(iter(sizes))


def _center_crop(x):
    """Center-crop float (1, C, H, W) to a square of side min(H, W)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top:top + s, left:left + s]


def _match_channels(a, channels):
    """uint8 (H, W, c) -> (H, W, channels): gray repeated to 3, colour to luma (ITU-R 601) for 1."""
    if a.shape[2] == channels:
        return a
    if channels == 3:
        return np.repeat(a, 3, axis=2)
    luma = a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, :, None]


class ImageFolder(_Dataset):
    """Image files (.png / .jpg / .jpeg, recursive, sorted) under `root`, decoded lazily.

    Immediate subdirectories of root that hold images are the classes (sorted names -> 0..K-1,
    ds.class_names); images directly in root with no subfolders are unlabeled. Without img_size all
    images must share one size; with it each is center-cropped to a square and resized to
    (img_size, img_size) (bilinear, antialias). channels: None -> 3 if any image is colour, else 1.
    Decoded uint8 (C, H, W) images are cached in memory up to `cache_bytes` (2 GiB: all of them when
    N * C * H * W fits). When all of them fit they are decoded up front (preload(); in __init__ unless
    preload=False), so that a corrupt or truncated file is found and named before training; otherwise
    each is decoded at its first get_batch, and a file that cannot be decoded raises ValueError naming it.
    """

    kind = "folder"

    def __init__(self, root, img_size=None, channels=None, *, cache_bytes=CACHE_BYTES, preload=True):
        """Index the files and read their headers (size, gray/colour); pixels are decoded in get_batch."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a directory")
        if channels not in (None, 1, 3):
            raise ValueError(f"ImageFolder: channels must be None, 1 or 3, got {channels!r}")
        if img_size is not None and (not isinstance(img_size, int) or img_size < 1):
            raise ValueError(f"ImageFolder: img_size must be a positive int or None, got {img_size!r}")
        self.files = _list_images(self.root)
        if not self.files:
            raise ValueError(f"ImageFolder: no .png/.jpg/.jpeg images under {self.root}")
        self.class_names, labels = _classes_of(self.root, self.files)
        infos = [_images.image_info(p) for p in self.files]
        hw = (img_size, img_size) if img_size is not None else _common_size(self.root, self.files, infos)
        c = channels or (3 if any(i[2] == 3 for i in infos) else 1)
        self.img_size, self._n, self._shape = img_size, len(self.files), (c, *hw)
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        self._num_classes = len(self.class_names)
        self._cache, self._cache_max = {}, cache_bytes // (c * hw[0] * hw[1])
        if preload:
            self.preload()

    def preload(self):
        """Decode every image into the cache now when they all fit (True), so that a file that cannot be
        decoded raises here, named; False (nothing decoded) when they do not fit."""
        if self._n > self._cache_max:
            return False
        for i in range(self._n):
            self._load(i)
        return True

    def describe(self):
        """One line: folder, N, shape (C, H, W) and classes."""
        return super().describe() + f" ({self.root})"

    def _decode(self, i):
        """Image i -> uint8 tensor (C, H, W), cropped and resized to ds.shape."""
        a = _match_channels(_images.read_image(self.files[i]), self._shape[0])
        x = torch.from_numpy(np.array(a.transpose(2, 0, 1), order="C"))  # a copy: decoders may return read-only
        if self.img_size is None:
            return x
        y = _resize(_center_crop(x[None].to(torch.float32)), self.img_size)[0]
        return y.round().clamp(0, 255).to(torch.uint8)

    def _load(self, i):
        """Cached uint8 (C, H, W) of image i."""
        x = self._cache.get(i)
        if x is None:
            x = self._decode(i)
            if len(self._cache) < self._cache_max:
                self._cache[i] = x
        return x

    def get_batch(self, indices):
        """indices LongTensor (b,) -> (x float32 (b, C, H, W) in [-1, 1], labels int64 (b,) or None)."""
        idx = self._check_indices(indices)
        x = torch.stack([self._load(int(i)) for i in idx]) if idx.numel() else \
            torch.empty((0, *self._shape), dtype=torch.uint8)
        return x.to(torch.float32) / 127.5 - 1.0, (None if self.labels is None else self.labels[idx])


# ----------------------------------------------------------------------------- --data

def _check_img_size(ds, img_size, path):
    """Array / latent data cannot be resized here: img_size must match (or be None)."""
    if img_size is not None and tuple(ds.shape[1:]) != (img_size, img_size):
        raise ValueError(f"--data: {path} holds {ds.shape[1]}x{ds.shape[2]} images but img_size={img_size}; "
                         f"resize the arrays offline or leave img_size unset")
    return ds


def _check_square(ds, path, hint):
    """The networks need square images (models.build_network): ValueError with `hint` otherwise."""
    _, h, w = ds.shape
    if h != w:
        raise ValueError(f"--data: {path} holds {h}x{w} images; the networks need square images (H == W): {hint}")
    return ds


_ARRAY_SQUARE_HINT = ("crop or resize the arrays offline (--img-size center-crops and resizes only digits and "
                      "image folders, so a folder of image files with --img-size N works too)")


def build_dataset(spec, img_size=None, sigma_d=0.5):
    """--data value -> dataset: 'digits', an image folder, a .npy/.npz file, or 'latents:PATH'.

    img_size resizes digits and image folders; for arrays and latents it must match their size.
    The images must be square (the networks need H == W); ValueError naming the file otherwise.
    """
    spec = str(spec)
    if spec == "digits":
        return digits(img_size or 8)
    is_latent = spec.startswith("latents:")
    path = Path(spec[len("latents:"):] if is_latent else spec)
    if not path.exists():
        raise FileNotFoundError(f"--data: {path} does not exist ({DATA_HINT})")
    if is_latent:
        return _check_square(_check_img_size(LatentData(path, sigma_d=sigma_d), img_size, path), path,
                             "crop the latents offline")
    if path.is_dir() and (path / "dataset.json").is_file():
        from scm_fast.shards import ShardedData  # noqa: PLC0415 - shards builds on this module
        return _check_square(_check_img_size(ShardedData(path, sigma_d=sigma_d), img_size, path), path,
                             "crop them when writing the shards")
    if path.is_dir():
        ds = _check_square(ImageFolder(path, img_size=img_size, preload=False), path,
                           "pass --img-size N to center-crop and resize them to N x N")
        ds.preload()
        return ds
    if path.suffix.lower() in (".npy", ".npz"):
        return _check_square(_check_img_size(load_arrays(path), img_size, path), path, _ARRAY_SQUARE_HINT)
    raise ValueError(f"--data: {path} is neither a folder nor a .npy/.npz file ({DATA_HINT})")
