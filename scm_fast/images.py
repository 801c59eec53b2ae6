"""Images: uint8 conversion, sample grids, and image files through Pillow (a pinned dependency).

Conventions: model images are float tensors (N, C, H, W) in [-1, 1]; image files and arrays on disk are
numpy uint8 (H, W, C), C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA). Sample grids of data with
another channel count (latents) show each channel as a normalised grayscale tile (save_grid).
Pillow reads every format and variant it knows (PNG of any depth, interlacing or palette, JPEG, ...);
files are written as 8-bit PNGs, atomically.
"""
import io
import math
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_MODE_OF_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


# ----------------------------------------------------------------------------- tensors -> uint8

def to_uint8(x):
    """Float tensor (N, C, H, W) in [-1, 1] -> numpy uint8 (N, H, W, C): round((x + 1) * 127.5), clipped."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"to_uint8: x must be a tensor of shape (N, C, H, W), got {got}")
    if not x.is_floating_point():
        raise TypeError(f"to_uint8: x must be a float tensor in [-1, 1], got dtype {x.dtype}")
    y = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(x, nrow=None, pad=1):
    """(N, C, H, W) float in [-1, 1] -> numpy uint8 grid (Hg, Wg, C), C in {1, 3}.

    nrow images per grid row (default ceil(sqrt(N))); `pad` black pixels between and around images;
    cells past the last image stay black. Hg = rows * (H + pad) + pad, Wg = nrow * (W + pad) + pad.
    """
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] not in (1, 3):
        raise ValueError(f"make_grid: x must have 1 or 3 channels (N, C, H, W), got shape {tuple(x.shape)}")
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    if n == 0:
        raise ValueError("make_grid: x holds no images (N = 0)")
    nrow = math.ceil(math.sqrt(n)) if nrow is None else int(nrow)
    if nrow < 1 or pad < 0:
        raise ValueError(f"make_grid: expected nrow >= 1 and pad >= 0, got nrow={nrow}, pad={pad}")
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[top:top + h, left:left + w] = imgs[i]
    return grid


def channel_tiles(x):
    """(N, C, H, W) with C not in (1, 3) (latents, multi-channel arrays) -> (N, 1, H, C * W): each
    image's channels side by side as grayscale tiles. Every channel is normalised over the batch to
    [-1, 1] by its min and max (a constant channel is 0, mid gray), so channels of different scales
    are all visible."""
    x = x.detach().float().cpu()
    n, c, h, w = x.shape
    lo, hi = x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True)
    span = hi - lo
    y = torch.where(span > 0, (x - lo) / span.clamp_min(1e-30) * 2 - 1, torch.zeros_like(x))
    return y.permute(0, 2, 1, 3).reshape(n, 1, h, c * w)


def save_grid(path, x, nrow=None, min_size=32):
    """Write the images x (N, C, H, W) as one PNG grid (see make_grid) to `path`, upscaled by an
    integer factor (nearest neighbour) so that each image is at least min_size pixels tall: an 8x8
    digit is 4x4 screen pixels per pixel, not a speck. Returns the factor.

    C = 1 (gray) and C = 3 (RGB) are pixels in [-1, 1], shown as they are. Any other channel count
    (latents, e.g. 4 channels; multi-channel arrays) has no colour meaning: each cell of the grid
    shows one image's C channels left to right as grayscale tiles, each channel normalised over the
    batch by its min and max (channel_tiles), and the cells are 2 black pixels apart, not 1."""
    pad = 1
    if x.shape[1] not in (1, 3):
        x, pad = channel_tiles(x), 2
    scale = max(1, math.ceil(min_size / x.shape[-2]))
    grid = make_grid(x, nrow=nrow, pad=pad)
    write_png(path, grid.repeat(scale, axis=0).repeat(scale, axis=1))
    return scale


# ----------------------------------------------------------------------------- image files

def _as_hwc(array):
    """Validate a uint8 image array (H, W) or (H, W, C), C in 1..4; return it as (H, W, C)."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise TypeError(f"write_png: array must be uint8, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in _MODE_OF_CHANNELS or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"write_png: array must be (H, W) or (H, W, C) with C in 1..4 and H, W >= 1, "
                         f"got shape {a.shape}")
    return np.ascontiguousarray(a)


def _atomic_write(path, data):
    """Write bytes to path via a temporary file in the same directory and os.replace; creates parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_png(path, array):
    """Write uint8 (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4) to `path` as PNG, atomically."""
    a = _as_hwc(array)
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, _MODE_OF_CHANNELS[a.shape[2]]).save(buf, "PNG")
    _atomic_write(path, buf.getvalue())


def _gray_mode(mode):
    """Whether a Pillow mode is single-channel luminance (optionally with alpha)."""
    return mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


# what Pillow raises for a broken file (UnidentifiedImageError and "image file is truncated" are OSErrors);
# a file that is missing or unreadable keeps its own OSError
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)
_IO_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)


def _unreadable(path, err):
    """ValueError naming the file Pillow could not decode (its own messages often do not)."""
    return ValueError(f"{path}: cannot decode the image, the file is corrupt or truncated "
                      f"({type(err).__name__}: {err})")


def image_info(path):
    """(H, W, C) of an image file without decoding its pixels; C is 1 (gray) or 3 (colour).
    A file whose header cannot be read raises ValueError naming it."""
    try:
        with Image.open(path) as im:
            return im.height, im.width, (1 if _gray_mode(im.mode) else 3)
    except _IO_ERRORS:
        raise
    except _PILLOW_ERRORS as err:
        raise _unreadable(path, err) from err


def read_image(path, keep_alpha=False):
    """Decode an image file -> uint8 (H, W, C): C in {1, 3} (gray or RGB, alpha dropped), or with
    keep_alpha C in {1, 2, 3, 4} (gray, gray + alpha, RGB, RGBA). A corrupt or truncated file raises
    ValueError naming it."""
    try:
        with Image.open(path) as im:
            has_alpha = keep_alpha and ("A" in im.getbands() or "transparency" in im.info)
            mode = ("LA" if has_alpha else "L") if _gray_mode(im.mode) else ("RGBA" if has_alpha else "RGB")
            if im.mode.startswith("I;16"):  # 16-bit gray: its high byte (convert("L") would clip)
                a = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
            else:
                a = np.asarray(im.convert(mode), dtype=np.uint8)
    except _IO_ERRORS:
        raise
    except _PILLOW_ERRORS as err:
        raise _unreadable(path, err) from err
    return a[:, :, None] if a.ndim == 2 else a
