"""Image I/O without Pillow: uint8 conversion, sample grids and a small PNG writer/reader.

Conventions: model images are float tensors (N, C, H, W) in [-1, 1]; image files and arrays on disk are
numpy uint8 (H, W, C), C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA). Sample grids of data with
another channel count (latents) show each channel as a normalised grayscale tile (save_grid).

The PNG codec here is pure Python (zlib + struct): the writer emits 8-bit, non-interlaced files with
filter type 0; the reader handles 8-bit, non-interlaced PNGs of every colour type and all five filter
types (PNG spec §9). Anything else (16-bit, interlaced, bit depth < 8) and JPEGs need Pillow, the
`scm_fast[images]` extra; `read_image` uses Pillow whenever it is importable.
"""
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PILLOW_HINT = "install pillow (`pip install pillow`, the `scm_fast[images]` extra)"
# PNG colour type -> samples per pixel (PNG spec §6.1); 3 is a palette index.
_CHANNELS_OF_TYPE = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_TYPE_OF_CHANNELS = {1: 0, 2: 4, 3: 2, 4: 6}


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


# ----------------------------------------------------------------------------- PNG writer

def _chunk(kind, data):
    """One PNG chunk: length, type, data, CRC-32 over type + data (PNG spec §5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _as_hwc(array):
    """Validate a uint8 image array (H, W) or (H, W, C), C in 1..4; return it as (H, W, C)."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise TypeError(f"write_png: array must be uint8, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in _TYPE_OF_CHANNELS or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"write_png: array must be (H, W) or (H, W, C) with C in 1..4 and H, W >= 1, "
                         f"got shape {a.shape}")
    return np.ascontiguousarray(a)


def encode_png(array):
    """uint8 (H, W) / (H, W, C), C in 1..4 -> PNG file bytes (8-bit, non-interlaced, filter 0)."""
    a = _as_hwc(array)
    h, w, c = a.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, w * c)], axis=1)  # filter byte 0
    ihdr = struct.pack(">IIBBBBB", w, h, 8, _TYPE_OF_CHANNELS[c], 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


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
    """Write uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) to `path` as PNG, atomically."""
    _atomic_write(path, encode_png(array))


# ----------------------------------------------------------------------------- PNG reader

def _unsupported(path, what):
    """ValueError for a PNG feature the built-in decoder lacks."""
    return ValueError(f"{path}: {what} PNGs are not supported by the built-in decoder; {PILLOW_HINT}")


def _read_chunks(path, data):
    """Split PNG bytes into [(type, payload)], checking the signature and every CRC."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError(f"{path}: not a PNG file (bad signature)")
    chunks, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(payload) != length or len(crc) != 4 or zlib.crc32(kind + payload) & 0xFFFFFFFF != \
                struct.unpack(">I", crc)[0]:
            raise ValueError(f"{path}: corrupt PNG (truncated chunk or CRC mismatch in {kind!r})")
        chunks.append((kind, payload))
        pos += 12 + length
        if kind == b"IEND":
            return chunks
    raise ValueError(f"{path}: corrupt PNG (no IEND chunk)")


def _parse_header(path, chunks):
    """IHDR -> (height, width, colour type, samples per pixel); rejects what the decoder lacks."""
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise ValueError(f"{path}: corrupt PNG (first chunk is not a 13-byte IHDR)")
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if ctype not in _CHANNELS_OF_TYPE:
        raise ValueError(f"{path}: corrupt PNG (colour type {ctype})")
    if depth != 8:
        raise _unsupported(path, f"{depth}-bit")
    if interlace != 0:
        raise _unsupported(path, "interlaced")
    return h, w, ctype, _CHANNELS_OF_TYPE[ctype]


def _unfilter_average(line, prior, bpp):
    """Filter 3: x + floor((left + up) / 2), sequential along the row (bytes -> bytearray)."""
    cur = bytearray(line)
    for i in range(len(cur)):
        left = cur[i - bpp] if i >= bpp else 0
        cur[i] = (cur[i] + ((left + prior[i]) >> 1)) & 0xFF
    return cur


def _unfilter_paeth(line, prior, bpp):
    """Filter 4: x + PaethPredictor(left, up, upper-left) (PNG spec §9.4), sequential along the row."""
    cur = bytearray(line)
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = prior[i]
        c = prior[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        cur[i] = (cur[i] + pred) & 0xFF
    return cur


def _unfilter_row(path, ftype, line, prior, bpp):
    """Undo one row's filter: line, prior uint8 (stride,) -> uint8 (stride,)."""
    if ftype == 0:
        return line.copy()
    if ftype == 1:  # Sub: running sum along pixels, per byte of the pixel, mod 256
        return np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    if ftype == 2:  # Up
        return line + prior
    if ftype == 3:
        return np.frombuffer(_unfilter_average(line.tobytes(), prior.tobytes(), bpp), np.uint8)
    if ftype == 4:
        return np.frombuffer(_unfilter_paeth(line.tobytes(), prior.tobytes(), bpp), np.uint8)
    raise ValueError(f"{path}: corrupt PNG (filter type {ftype})")


def _unfilter(path, raw, h, w, bpp):
    """Decompressed scanlines (h * (1 + w * bpp) bytes) -> uint8 (h, w * bpp)."""
    stride = w * bpp
    if len(raw) != h * (stride + 1):
        raise ValueError(f"{path}: corrupt PNG (image data has {len(raw)} bytes, expected {h * (stride + 1)})")
    buf = np.frombuffer(raw, np.uint8).reshape(h, stride + 1)
    out = np.empty((h, stride), np.uint8)
    prior = np.zeros(stride, np.uint8)
    for y in range(h):
        prior = out[y] = _unfilter_row(path, int(buf[y, 0]), buf[y, 1:], prior, bpp)
    return out


def _apply_palette(path, idx, chunks):
    """Palette indices (H, W, 1) -> RGB (H, W, 3), or RGBA (H, W, 4) when a tRNS chunk is present."""
    plte = next((p for k, p in chunks if k == b"PLTE"), None)
    if plte is None or len(plte) % 3:
        raise ValueError(f"{path}: corrupt PNG (palette image without a valid PLTE chunk)")
    pal = np.frombuffer(plte, np.uint8).reshape(-1, 3)
    trns = next((p for k, p in chunks if k == b"tRNS"), None)
    if trns is not None:
        alpha = np.full((len(pal), 1), 255, np.uint8)
        alpha[:len(trns), 0] = np.frombuffer(trns[:len(pal)], np.uint8)
        pal = np.concatenate([pal, alpha], axis=1)
    if idx.size and int(idx.max()) >= len(pal):
        raise ValueError(f"{path}: corrupt PNG (palette index {int(idx.max())} >= {len(pal)} entries)")
    return pal[idx[:, :, 0]]


def decode_png(data, path="<bytes>"):
    """PNG bytes -> uint8 (H, W, C): C = 1 gray, 2 gray+alpha, 3 RGB / palette, 4 RGBA / palette+tRNS."""
    chunks = _read_chunks(path, data)
    h, w, ctype, bpp = _parse_header(path, chunks)
    try:
        raw = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    except zlib.error as e:
        raise ValueError(f"{path}: corrupt PNG (zlib: {e})") from None
    img = _unfilter(path, raw, h, w, bpp).reshape(h, w, bpp)
    return _apply_palette(path, img, chunks) if ctype == 3 else img


def read_png(path):
    """Decode an 8-bit, non-interlaced PNG file -> uint8 (H, W, C); other PNGs raise ValueError."""
    return decode_png(Path(path).read_bytes(), path)


def png_info(path):
    """(H, W, C) of a PNG file from its header alone; C after dropping alpha (1 gray, 3 colour)."""
    with open(path, "rb") as f:
        head = f.read(33)  # signature + the IHDR chunk
    h, w, ctype, _ = _parse_header(path, _read_chunks(path, head + _chunk(b"IEND", b""))[:1])
    return h, w, (1 if ctype in (0, 4) else 3)


# ----------------------------------------------------------------------------- any image file

def _import_pillow():
    """PIL.Image if Pillow is installed, else None."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def _gray_mode(mode):
    """Whether a Pillow mode is single-channel luminance (optionally with alpha)."""
    return mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


def _needs_pillow(path):
    """ImportError for a non-PNG file read without Pillow."""
    return ImportError(f"reading {path} needs Pillow (only PNG is decoded without it); {PILLOW_HINT}")


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
    pil = _import_pillow()
    if pil is not None:
        try:
            with pil.open(path) as im:
                return im.height, im.width, (1 if _gray_mode(im.mode) else 3)
        except _IO_ERRORS:
            raise
        except _PILLOW_ERRORS as err:
            raise _unreadable(path, err) from err
    if Path(path).suffix.lower() != ".png":
        raise _needs_pillow(path)
    return png_info(path)


def read_image(path):
    """Decode an image file -> uint8 (H, W, C), C in {1, 3} (alpha dropped).

    Uses Pillow when importable; otherwise the built-in decoder for .png, and ImportError for others.
    A corrupt or truncated file raises ValueError naming it.
    """
    pil = _import_pillow()
    if pil is not None:
        try:
            with pil.open(path) as im:
                a = np.asarray(im.convert("L" if _gray_mode(im.mode) else "RGB"), dtype=np.uint8)
        except _IO_ERRORS:
            raise
        except _PILLOW_ERRORS as err:
            raise _unreadable(path, err) from err
        return a[:, :, None] if a.ndim == 2 else a
    if Path(path).suffix.lower() != ".png":
        raise _needs_pillow(path)
    a = read_png(path)
    return a[:, :, :1] if a.shape[2] == 2 else a[:, :, :3]
